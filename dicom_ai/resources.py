"""Resource exhaustion is a wait, not a failure (design convention 15).

A job that meets a full disk or an unavailable index does not use an attempt: it waits (job
state ``waiting``) and is tried again every ``workers.resource_wait_seconds`` until the resource
is back. This module holds what the packages above ``storage`` share about it:

* :func:`space_problem`: is an exception a full disk (``ENOSPC``, ``EDQUOT``, our
  :class:`~dicom_ai.exceptions.OutOfSpaceError`)? The database side of the question is
  :func:`storage.db.is_resource_error` (only ``storage`` imports SQLAlchemy);
* :func:`results_space_problem`: can results (SR, SEG, heat-map SC) be written now? Used by the
  job runner before it runs a model, by ``/ready`` and by the ``dicom_ai_results_writable``
  metric;
* :class:`Outage`: a polling loop logs an outage once, not once per poll.

Reasons are ours: paths, byte counts and setting names, never a patient value.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from dicom_ai.exceptions import OutOfSpaceError, safe_message

__all__ = ["Outage", "causes", "results_space_problem", "space_problem"]

#: errno values that mean "the filesystem is full for us".
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or during (``__cause__``/``__context__``).

    Each exception once, at most 16: a chain made into a loop by hand ends.
    """
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 16:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]


def space_problem(exc: BaseException) -> str | None:
    """Why `exc` is a full disk, or None when it is not one.

    Parameters
    ----------
    exc : BaseException
        Any exception; its cause and context chain is searched too (a wrapper raised from an
        ``ENOSPC`` is still a full disk).

    Returns
    -------
    str or None
        ``"no space left on device"``, ``"disk quota exceeded"``, or the message of an
        :class:`~dicom_ai.exceptions.OutOfSpaceError` (a watermark: free bytes and the setting).
    """
    for current in causes(exc):
        if isinstance(current, OutOfSpaceError):
            return safe_message(current)
        if isinstance(current, OSError) and current.errno in _FULL:
            return _FULL[current.errno]
    return None


def results_space_problem(root: Path, min_free_bytes: int) -> str | None:
    """Why results cannot be written under `root` now, or None when they can.

    Cheap (one ``statvfs`` and one ``access``): called before every job runs its model.

    Parameters
    ----------
    root : Path
        The store root (results go to ``<root>/results/``).
    min_free_bytes : int
        ``storage.results_min_free_bytes``.

    Returns
    -------
    str or None
        E.g. ``"results store below storage.results_min_free_bytes (123 bytes free)"``.
    """
    folder = root / "results"
    target = folder if folder.is_dir() else root
    if not target.is_dir() or not os.access(target, os.W_OK):
        return f"results folder {target} is not writable"
    free = shutil.disk_usage(target).free
    if free < min_free_bytes:
        return f"results store below storage.results_min_free_bytes ({free} bytes free)"
    return None


def check_results_space(root: Path, min_free_bytes: int) -> None:
    """Raise :class:`OutOfSpaceError` when :func:`results_space_problem` finds a reason."""
    problem = results_space_problem(root, min_free_bytes)
    if problem is not None:
        raise OutOfSpaceError(problem)


class Outage:
    """Logs a polling loop's failures once per outage, and its recovery.

    The first failure is logged at ERROR (with its traceback, made safe by the logging set-up),
    repeats of the same message at DEBUG only, a different message again at ERROR; the first
    success after failures says how long the outage lasted.

    Parameters
    ----------
    logger : logging.Logger
        The loop's module logger.
    what : str
        What failed, e.g. ``"scheduler tick"``.
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self._since: float | None = None
        self._failures = 0
        self._message: str | None = None

    @property
    def active(self) -> bool:
        """True while the last call failed."""
        return self._since is not None

    def failed(self, exc: BaseException) -> None:
        """Record a failure of one poll (call from an ``except`` block)."""
        message = safe_message(exc)
        self._failures += 1
        if self._since is None:
            self._since = time.monotonic()
        if message != self._message:
            self._message = message
            self.logger.error("%s failed; retrying at every poll, logged once: %s", self.what,
                              message, exc_info=exc)
        else:
            self.logger.debug("%s failed again: %s", self.what, message)

    def ok(self) -> None:
        """Record a successful poll (ends an outage, logging it)."""
        if self._since is None:
            return
        self.logger.info("%s works again after %.1f s (%d failed polls)", self.what,
                         time.monotonic() - self._since, self._failures)
        self._since = None
        self._failures = 0
        self._message = None
