#!/usr/bin/env python3
"""Generate ``dicom_ai/batch/profile_basic_table.py`` from a maintained copy of PS3.15 Table E.1-1.

The source is KitwareMedical's ``dicom-anonymizer`` (BSD-3-Clause, pinned in the ``dev`` extra):
each of its ``dicomanonymizer/dicom_anonymization_databases/dicomfields_<edition>.py`` modules
holds the Basic Profile column of Table E.1-1 of one edition of the standard, as lists of tags
per action (``D_TAGS``, ``Z_TAGS``, ``X_TAGS``, ``U_TAGS``, ``Z_D_TAGS``, ``X_Z_TAGS``,
``X_D_TAGS``, ``X_Z_D_TAGS``, ``X_Z_U_STAR_TAGS``), scraped by Kitware from the standard's
published Part 15. The module is read as text (parsed, never imported or executed) from:

* the installed distribution (the default: ``pip install dicom-anonymizer==2.1.0``), or
* ``--source PATH``: a wheel (``pip download --no-deps dicom-anonymizer==2.1.0``) or a folder
  holding the unpacked package and its ``.dist-info``.

Nothing is downloaded. ``--check`` compares instead of writing (exit status 1 when the committed
file differs), which is what ``tests/unit/test_profile_basic_table.py`` runs.

Usage::

    .venv/bin/python scripts/gen_profile_basic.py [--source PATH] [--edition 2026c]
        [--out dicom_ai/batch/profile_basic_table.py] [--check]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import io
import re
import sys
import tokenize
import zipfile
from dataclasses import dataclass
from pathlib import Path

DISTRIBUTION = "dicom-anonymizer"
DEFAULT_EDITION = "2026c"
DATABASE_DIR = "dicomanonymizer/dicom_anonymization_databases"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "dicom_ai" / "batch" / "profile_basic_table.py"

#: The source's lists -> Table E.1-1 action codes (PS3.15 E.1.1).
CATEGORIES: dict[str, str] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


class SourceError(Exception):
    """The source is missing or does not look like the table it should hold."""


@dataclass(frozen=True)
class Source:
    """One edition's database module, as text, and where it came from.

    Attributes
    ----------
    version : str
        The ``dicom-anonymizer`` release.
    edition : str
        The edition of the standard, e.g. ``2026c``.
    text : str
        The module's source text.
    licence : str
        The distribution's licence file.
    """

    version: str
    edition: str
    text: str
    licence: str

    @property
    def path(self) -> str:
        """The database module's path inside the distribution."""
        return f"{DATABASE_DIR}/dicomfields_{self.edition}.py"

    @property
    def sha256(self) -> str:
        """SHA-256 of the module's text (UTF-8), recorded in the generated header."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _from_installed(edition: str) -> Source:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SourceError(f"{DISTRIBUTION} is not installed (pip install "
                          f"'{DISTRIBUTION}==2.1.0'), or pass --source") from exc
    text = licence = None
    for file in dist.files or ():
        name = str(file)
        if name == f"{DATABASE_DIR}/dicomfields_{edition}.py":
            text = Path(str(file.locate())).read_text(encoding="utf-8")
        elif name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE"):
            licence = Path(str(file.locate())).read_text(encoding="utf-8")
    if text is None or licence is None:
        raise SourceError(f"{DISTRIBUTION} {dist.version} has no edition {edition} (or no "
                          "licence file)")
    return Source(dist.version, edition, text, licence)


def _from_files(names: list[str], read: dict[str, str], edition: str, where: str) -> Source:
    """A source from a wheel's or a folder's file list (``read``: name -> text)."""
    wanted = f"{DATABASE_DIR}/dicomfields_{edition}.py"
    info = [n for n in names if re.fullmatch(r"dicom_anonymizer-[^/]+\.dist-info/METADATA", n)]
    licences = [n for n in names if re.fullmatch(
        r"dicom_anonymizer-[^/]+\.dist-info/(licenses/)?LICENSE", n)]
    if wanted not in names or not info or not licences:
        raise SourceError(f"{where}: no {wanted}, dist-info METADATA or LICENSE")
    match = re.search(r"^Version: (\S+)$", read[info[0]], re.MULTILINE)
    if match is None:
        raise SourceError(f"{where}: {info[0]} has no Version")
    return Source(match.group(1), edition, read[wanted], read[licences[0]])


def load_source(source: Path | None, edition: str) -> Source:
    """Read one edition's database from the installed distribution, a wheel or a folder.

    Parameters
    ----------
    source : Path or None
        A ``.whl`` file or a folder holding ``dicomanonymizer/`` and its ``.dist-info``;
        None for the installed distribution.
    edition : str
        The edition, e.g. ``2026c`` (the module ``dicomfields_2026c.py``).

    Returns
    -------
    Source

    Raises
    ------
    SourceError
        When the source or the edition is not there.
    """
    if source is None:
        return _from_installed(edition)
    if source.is_file():
        with zipfile.ZipFile(source) as wheel:
            names = wheel.namelist()
            read = {n: wheel.read(n).decode("utf-8") for n in names
                    if n.endswith((".py", "METADATA", "LICENSE"))}
        return _from_files(names, read, edition, str(source))
    if source.is_dir():
        files = [p for p in source.rglob("*") if p.is_file()]
        names = [p.relative_to(source).as_posix() for p in files]
        read = {p.relative_to(source).as_posix(): p.read_text(encoding="utf-8")
                for p in files if p.name.endswith((".py", "METADATA", "LICENSE"))}
        return _from_files(names, read, edition, str(source))
    raise SourceError(f"{source}: no such file or folder")


def _comments(text: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    found: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


@dataclass(frozen=True)
class Row:
    """One row of the table: a tag, or a masked tag for a repeating group.

    Attributes
    ----------
    tag : int
        ``(group << 16) | element``.
    mask : int
        ``0xFFFFFFFF`` for one attribute; else the bits that must equal ``tag``.
    action : str
        The Basic Profile action code.
    name : str
        The attribute's name as the source gives it.
    """

    tag: int
    mask: int
    action: str
    name: str


def parse(source: Source) -> list[Row]:
    """The rows of the source's lists, checked for shape and conflicts.

    Parameters
    ----------
    source : Source

    Returns
    -------
    list of Row
        Sorted by tag, then mask.

    Raises
    ------
    SourceError
        When a list is missing, an entry is not ``(group, element)`` or ``(group, element,
        group_mask, element_mask)`` of 16-bit integers, or one tag has two actions.
    """
    tree = ast.parse(source.text)
    comments = _comments(source.text)
    lists: dict[str, ast.List] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.List)):
            lists[node.targets[0].id] = node.value
    rows: dict[tuple[int, int], Row] = {}
    for category, action in CATEGORIES.items():
        if category not in lists:
            raise SourceError(f"{source.path}: no {category}")
        for element in lists[category].elts:
            value = ast.literal_eval(element)
            if (not isinstance(value, tuple) or len(value) not in (2, 4)
                    or not all(isinstance(v, int) and 0 <= v <= 0xFFFF for v in value)):
                raise SourceError(f"{source.path}:{element.lineno}: not a tag: {value!r}")
            tag = value[0] << 16 | value[1]
            mask = value[2] << 16 | value[3] if len(value) == 4 else 0xFFFFFFFF
            name = comments.get(element.end_lineno or element.lineno, "")
            previous = rows.get((tag, mask))
            if previous is not None and previous.action != action:
                raise SourceError(f"{source.path}: ({value[0]:04X},{value[1]:04X}) is both "
                                  f"{previous.action} and {action}")
            rows[(tag, mask)] = Row(tag, mask, action, name)
    return [rows[key] for key in sorted(rows)]


def _licence_comment(licence: str) -> str:
    return "\n".join(f"# {line}".rstrip() for line in licence.strip().splitlines())


def render(source: Source) -> str:
    """The text of the generated module.

    Parameters
    ----------
    source : Source

    Returns
    -------
    str
        A Python module defining ``EDITION``, ``SOURCE_DISTRIBUTION``,
        ``SOURCE_PATH``, ``SOURCE_SHA256``, ``ROWS`` (tag ->
        action) and ``MASKED_ROWS`` (``(tag, mask, action)``).
    """
    rows = parse(source)
    single = [r for r in rows if r.mask == 0xFFFFFFFF]
    masked = [r for r in rows if r.mask != 0xFFFFFFFF]
    out = [
        f'"""PS3.15 Table E.1-1, Basic Profile column, edition {source.edition}: GENERATED, '
        "do not edit.",
        "",
        f"Written by ``scripts/gen_profile_basic.py`` from {DISTRIBUTION} {source.version}",
        "(KitwareMedical), which derives it from the standard's published Part 15:",
        f"``{source.path}``,",
        f"SHA-256 {source.sha256}.",
        "To move to another edition, pin the release that has it and run the script again;",
        ":mod:`dicom_ai.batch.profile_basic` applies these rows.",
        '"""',
        "",
        "# The rows are the source's data, whose licence follows.",
        _licence_comment(source.licence),
        "",
        "from __future__ import annotations",
        "",
        "from typing import Final",
        "",
        f'EDITION: Final = "{source.edition}"',
        f'SOURCE_DISTRIBUTION: Final = "{DISTRIBUTION}=={source.version}"',
        f'SOURCE_PATH: Final = "{source.path}"',
        f'SOURCE_SHA256: Final = "{source.sha256}"',
        "",
        f"#: Rows naming one attribute ({len(single)}): tag -> action code, in tag order.",
        "ROWS: Final[dict[int, str]] = {",
        *(f'    0x{r.tag:08X}: "{r.action}",  # {r.name}'.rstrip() for r in single),
        "}",
        "",
        f"#: Rows naming a repeating group ({len(masked)}): (tag, mask, action code); a tag t "
        "is in",
        "#: the row when t & mask == tag.",
        "MASKED_ROWS: Final[tuple[tuple[int, int, str], ...]] = (",
        *(f'    (0x{r.tag:08X}, 0x{r.mask:08X}, "{r.action}"),  # {r.name}'.rstrip()
          for r in masked),
        ")",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the generated module.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        0 when written or equal, 1 when ``--check`` finds a difference, 2 on a bad source.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", type=Path, default=None,
                        help="a dicom-anonymizer wheel or unpacked folder (default: installed)")
    parser.add_argument("--edition", default=DEFAULT_EDITION,
                        help=f"edition of the standard (default {DEFAULT_EDITION})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the module to write")
    parser.add_argument("--check", action="store_true",
                        help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    try:
        text = render(load_source(args.source, args.edition))
    except SourceError as exc:
        print(f"gen_profile_basic: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"gen_profile_basic: {args.out} differs from what {DISTRIBUTION} gives; "
                  "run scripts/gen_profile_basic.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
