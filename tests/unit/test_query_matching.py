"""Wildcard matching of C-FIND keys (PS3.4 C.2.2.2.4) in linear time, in Python and in SQL.

The patterns are what a peer sends: a backtracking matcher (``*`` as ``.*``) needs seconds for a
19-character pattern on a 28-character value and hours on a 64-character one. The matcher must
answer as the regular expression did (same semantics, case rules included), and the databases'
own matchers must stay polynomial on the same patterns.
"""

from __future__ import annotations

import fnmatch
import random
import re
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, literal, select

from storage import query
from storage.query import Condition, parse_condition, wildcard_match

# Each defeats a backtracking regex: the value has no "Z"/"b"/"c", so every way of
# distributing the value over the stars is tried.
PATHOLOGICAL = [
    "*?**?**?**?**?**?*Z",
    "*a*a*a*a*a*a*a*ab",
    "*?*?*?*?*?*?*?*?*?*?*?*?c",
    "*a?*a?*a?*a?*a?*a?*c",
]


def _reference(pattern: str, *, ignore_case: bool) -> re.Pattern[str]:
    """The former translation (``*`` to ``.*``, ``?`` to ``.``): exact, but backtracking."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _random_cases(seed: int, alphabet: str, pattern_alphabet: str, count: int
                  ) -> Iterator[tuple[str, str]]:
    rnd = random.Random(seed)
    for _ in range(count):
        value = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 10)))
        pattern = "".join(rnd.choice(pattern_alphabet) for _ in range(rnd.randint(0, 8)))
        if rnd.random() < 0.3 and value:  # a pattern made from the value: more matches
            chars = list(value)
            for i in rnd.sample(range(len(chars)), rnd.randint(1, len(chars))):
                chars[i] = rnd.choice("*?")
            pattern = "".join(chars)
        yield value, pattern


@pytest.mark.parametrize("pattern", PATHOLOGICAL)
@pytest.mark.parametrize("length", [28, 64, 100_000])
def test_pathological_patterns_match_in_linear_time(pattern: str, length: int) -> None:
    value = "a" * length
    started = time.perf_counter()
    assert not wildcard_match(value, pattern)
    assert not wildcard_match(value, pattern, ignore_case=True)
    assert not Condition("text", "wildcard", (pattern,)).matches(value)
    assert time.perf_counter() - started < 1.0


def test_a_huge_pattern_costs_what_the_value_allows() -> None:
    """A peer may send a megabyte of pattern: only pieces that fit the value are compiled."""
    pattern = "*" + "?*" * 500_000 + "Z"
    started = time.perf_counter()
    assert not wildcard_match("a" * 64, pattern)
    assert not wildcard_match("a" * 64, "a" * 1_000_000 + "*")
    assert wildcard_match("a" * 100, "*" + "?*" * 100)
    assert time.perf_counter() - started < 1.0


def test_equivalent_to_fnmatch_without_classes() -> None:
    """Case-sensitive: as fnmatchcase with ``[`` escaped (DICOM has no character classes)."""
    for value, pattern in _random_cases(17, "abAB[]*?.\\\n", "abA[]*?*?.\\\n", 30_000):
        expected = fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))
        assert wildcard_match(value, pattern) is expected, (value, pattern)


def test_equivalent_to_the_regular_expression_in_both_case_modes() -> None:
    # Letters whose case rules differ between ASCII and Unicode: sharp s, dotless and dotted
    # i, the Kelvin sign.
    letters = "\u00df\u1e9e\u0131\u0130\u212a"
    for value, pattern in _random_cases(23, f"aAbBIkK{letters}\n", f"aAbIK{letters}*?*?\n",
                                        30_000):
        for ignore_case in (False, True):
            expected = _reference(pattern, ignore_case=ignore_case).fullmatch(value) is not None
            assert wildcard_match(value, pattern, ignore_case=ignore_case) is expected, (
                value, pattern, ignore_case)


@pytest.mark.parametrize(("value", "pattern", "expected"), [
    ("", "*", True),
    ("", "?", False),
    ("abc", "abc", True),
    ("abc", "a?c", True),
    ("abc", "a*", True),
    ("abc", "*c", True),
    ("abc", "a*b*c", True),
    ("abc", "a**c", True),
    ("abc", "ab*bc", False),  # the pieces may not overlap
    ("abcbc", "ab*bc", True),
    ("aXbXc", "*X*X*", True),
    ("aXb", "*X*X*", False),
    ("a[b]c", "a[b]*", True),
    ("line\nbreak", "line?break", True),
])
def test_wildcard_semantics(value: str, pattern: str, expected: bool) -> None:
    assert wildcard_match(value, pattern) is expected


def test_case_rules_of_conditions() -> None:
    """PN wildcards ignore case (as the SQL folds both sides); other text does not."""
    pn = parse_condition("pn", "doe^j?NE*")
    assert pn is not None
    assert pn.kind == "wildcard"
    assert pn.matches("Doe^Jane")
    assert pn.matches("DOE^JANE^MRS")
    text = parse_condition("text", "AI find*")
    assert text is not None
    assert text.matches("AI findings")
    assert not text.matches("ai findings")


@pytest.mark.parametrize("pattern", PATHOLOGICAL)
def test_the_database_matchers_are_polynomial_too(db_url: str, pattern: str) -> None:
    """GLOB (SQLite) and LIKE (PostgreSQL), as :func:`storage.query._sql` writes them."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            for vr in ("text", "pn"):
                condition = Condition(vr, "wildcard", (pattern,))
                expression = query._sql(literal("a" * 100_000), condition, engine.dialect.name)
                started = time.perf_counter()
                assert conn.execute(select(expression)).scalar() in (False, 0)
                assert time.perf_counter() - started < 1.0
    finally:
        engine.dispose()


def test_sql_and_python_agree(db_url: str) -> None:
    """The same wildcard answers the same in the database as in :meth:`Condition.matches`."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            cases = list(_random_cases(31, "abAB%_!*[", "ab%_!*[*??", 300))
            for vr in ("text", "pn"):
                for value, pattern in cases:
                    condition = parse_condition(vr, pattern)
                    if condition is None or condition.kind != "wildcard":
                        continue
                    sql = query._sql(literal(value), condition, engine.dialect.name)
                    in_db = bool(conn.execute(select(sql)).scalar())
                    assert in_db is condition.matches(value), (vr, value, pattern)
    finally:
        engine.dispose()
