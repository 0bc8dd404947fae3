"""DICOM PS3.15 Annex E Table E.1-1, Basic Application Level Confidentiality Profile column.

Where the table comes from
--------------------------
The rows are generated, not transcribed: :mod:`dicom_ai.batch.profile_basic_table` is written by
``scripts/gen_profile_basic.py`` from KitwareMedical's ``dicom-anonymizer`` (BSD-3-Clause),
which keeps one module per edition of the standard, derived from the published Part 15. The
edition is :data:`EDITION`; ``tests/unit/test_profile_basic_table.py`` pins it (row count and
known rows) and, where ``dicom-anonymizer`` is installed (the ``dev`` extra pins it), checks that
the committed module is exactly what the script produces. This module adds the rules the
generated rows do not carry:

* Compound codes resolved without looking up the IOD (:data:`COMPOUND_RESOLUTION`).
* The table's row "(gggg,eeee) where gggg is odd", action X (private attributes; the source
  has no row for it): PS3.15 E.3.10, Retain Safe Private Option, is not applied, so every
  private attribute is removed.
* Curves and overlays: every element of the curve (50xx) and overlay (60xx) groups is removed,
  not only the rows' Curve Data, Overlay Data and Overlay Comments (an overlay without its data
  is not valid).

:mod:`dicom_ai.batch.deidentify` also has VR-based safety nets for anything not listed (every UI
remapped, every DA/DT shifted, every PN replaced), so an attribute newer than the edition does
not leak a UID, date or name.

Action codes (PS3.15 E.1.1, Table E.1-1 legend)
-----------------------------------------------
``D`` replace with a non-zero-length dummy value consistent with the VR; ``Z`` replace with a
zero-length value (or a dummy where the attribute is Type 1); ``X`` remove; ``K`` keep; ``C``
clean (an option's action); ``U`` replace the UID with a non-zero-length UID that is internally
consistent within the set of instances. Compound codes leave the choice to the IOD's Type:
``X/Z`` (X unless Type 2: Z), ``X/D`` (X unless Type 1: D), ``Z/D`` (Z unless Type 1: D),
``X/Z/D`` (X unless Type 2: Z, or Type 1: D) and ``X/Z/U*`` (X unless Z, or U for the UIDs of a
sequence's items, is needed for IOD conformance). A de-identifier that does not look up the IOD
must pick an action that is conformant whatever the Type is; :data:`COMPOUND_RESOLUTION` picks
the strictest such one: a zero-length value is legal for Type 2 and 3, a dummy for every Type,
and remapping a sequence's UIDs keeps a Type 1C reference valid. Neither Z nor D carries any of
the original value, so nothing identifying survives either choice.
"""

from __future__ import annotations

from typing import Final

from dicom_ai.batch.profile_basic_table import EDITION, MASKED_ROWS, ROWS

__all__ = [
    "BASIC_PROFILE",
    "COMPOUND_RESOLUTION",
    "EDITION",
    "PRIVATE_ACTION",
    "action_for_tag",
    "is_curve_or_overlay",
]

#: PS3.15 Table E.1-1, Basic Profile column, as generated: tag -> action code (compounds kept).
BASIC_PROFILE: Final[dict[int, str]] = ROWS

#: The table's action for private attributes, "(gggg,eeee) where gggg is odd".
PRIVATE_ACTION: Final = "X"

#: Compound codes -> the action applied when the IOD (and so the Type) is not looked up.
COMPOUND_RESOLUTION: Final[dict[str, str]] = {
    "X/Z": "Z",
    "X/D": "D",
    "Z/D": "D",
    "X/Z/D": "D",
    "X/Z/U*": "U",
}
_SIMPLE: Final[frozenset[str]] = frozenset({"X", "Z", "D", "U"})


def _resolve(action: str) -> str:
    resolved = COMPOUND_RESOLUTION.get(action, action)
    if resolved not in _SIMPLE:  # pragma: no cover - guarded by the unit tests
        raise ValueError(f"unknown Table E.1-1 action {action!r}")
    return resolved


# Resolved once: the table is read for every element of every exported instance.
_BY_TAG: Final[dict[int, str]] = {tag: _resolve(action) for tag, action in ROWS.items()}
_MASKED: Final[tuple[tuple[int, int, str], ...]] = tuple(
    (tag, mask, _resolve(action)) for tag, mask, action in MASKED_ROWS)


def is_curve_or_overlay(tag: int) -> bool:
    """Whether ``tag`` is in a curve (50xx) or overlay (60xx) repeating group.

    Parameters
    ----------
    tag : int
        ``(group << 16) | element``.

    Returns
    -------
    bool
        True for even groups 5000-501E and 6000-601E (PS3.5 section 7.6).
    """
    group = tag >> 16
    return (0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E) and group % 2 == 0


def action_for_tag(tag: int) -> str | None:
    """The Basic Profile action for an attribute, compounds resolved.

    Parameters
    ----------
    tag : int
        The attribute's tag as one integer, private and repeating-group tags included.

    Returns
    -------
    str or None
        One of ``X``, ``Z``, ``D``, ``U`` (PS3.15 Table E.1-1 of :data:`EDITION`, with
        :data:`COMPOUND_RESOLUTION` applied); ``X`` for a private attribute (odd group) and
        for every element of the curve and overlay groups (stricter than the table, which
        lists Curve Data, Overlay Data and Overlay Comments only); None where the table has
        no row.
    """
    group = tag >> 16
    if group % 2 == 1:
        return PRIVATE_ACTION
    if is_curve_or_overlay(tag):
        if group >= 0x6000:
            return "X"
        return next((action for row, mask, action in _MASKED if tag & mask == row), "X")
    return _BY_TAG.get(tag)
