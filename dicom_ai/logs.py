"""Logging set-up: one format for the whole service, optionally JSON lines.

Modules log through ``logging.getLogger(__name__)`` and pass UIDs and AE titles only: patient
names, IDs and birth dates never reach a log record. Two things are done here, once, rather
than at every call site:

* Every record is made value-free when it is created (a log record factory, installed by
  :func:`setup_logging`): an exception passed as an argument or as ``exc_info`` is rendered by
  :func:`dicom_ai.exceptions.safe_message` / :func:`~dicom_ai.exceptions.safe_traceback`
  (frames kept, messages classified without attribute values), and what pydicom and
  highdicom log or warn about an invalid value (``Invalid value for VR DA: '1901-12-31'``)
  has the value withheld. Python warnings are routed into logging for that.
* The formatters escape control characters in the message after ``%`` formatting (``\\n``,
  ``\\r``, other C0/C1 controls, Unicode line separators), so a peer's calling AE title, a
  file name or a UID with a newline cannot forge a log line, in the text and the JSON format.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from dicom_ai.config import LoggingSettings
from dicom_ai.exceptions import escape_controls, redact, safe_message, safe_traceback

__all__ = ["escape_controls", "setup_logging"]

# Loggers of the libraries that log attribute values they find invalid (and Python warnings,
# through which pydicom and highdicom repeat them).
_LIBRARY_LOGGERS = ("pydicom", "highdicom", "pynetdicom", "py.warnings")
_LONG_MESSAGE = 4000  # our own longer messages are not scanned for library value patterns


def _safe_arg(value: object) -> object:
    return safe_message(value) if isinstance(value, BaseException) else value


def _make_safe(record: logging.LogRecord) -> None:
    """Replace what a record carries that may quote an attribute value (see the module doc)."""
    if isinstance(record.msg, BaseException):
        record.msg = safe_message(record.msg)
    if isinstance(record.args, Mapping):
        record.args = {key: _safe_arg(value) for key, value in record.args.items()}
    elif record.args:
        record.args = tuple(_safe_arg(value) for value in record.args)
    library = record.name.startswith(_LIBRARY_LOGGERS)
    if library or (isinstance(record.msg, str) and len(record.msg) <= _LONG_MESSAGE):
        # A library's own text, or ours embedding one (``"... %s", str(exc)``).
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: logging reports it later
            message = None
        if message is not None:
            redacted = redact(message)
            if library or redacted != message:
                record.msg, record.args = redacted, ()
    if record.exc_info and record.exc_info[1] is not None:
        # Formatters use exc_text when set: every handler prints the safe traceback.
        record.exc_text = safe_traceback(record.exc_info[1])


def _install_record_factory() -> None:
    """Wrap the current log record factory (once per process) so every record is made safe."""
    current = logging.getLogRecordFactory()
    if getattr(current, "_dicom_ai_safe", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        try:
            _make_safe(record)
        except Exception:  # logging must not fail the caller; nor may it leak what it could
            record.msg = f"(message withheld: it could not be made safe; logged at " \
                f"{record.pathname}:{record.lineno})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return record

    factory._dicom_ai_safe = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class _SafeFormatter(logging.Formatter):
    """The text format: control characters escaped, tracebacks without attribute values."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        """Format with the message's control characters escaped."""
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        """A traceback whose exception messages are safe (frames kept)."""
        return safe_traceback(ei[1]) if ei and ei[1] is not None else super().formatException(ei)


class _JsonFormatter(_SafeFormatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": escape_controls(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(settings: LoggingSettings) -> None:
    """Configure the root logger once per process: stderr, and ``[logging] file`` if set.

    Also installs the record factory that keeps attribute values out of every record and
    routes Python warnings (pydicom's and highdicom's, which quote values) into logging.

    Parameters
    ----------
    settings : LoggingSettings
        Level, format and file.
    """
    _install_record_factory()
    logging.captureWarnings(True)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        # Every process appends whole lines (O_APPEND); WatchedFileHandler reopens the file
        # after logrotate moved it.
        handlers.append(logging.handlers.WatchedFileHandler(settings.file, encoding="utf-8"))
    formatter = (_JsonFormatter() if settings.json_format else _SafeFormatter(
        "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(settings.level)
    # pynetdicom logs every PDU at DEBUG and each association at INFO: keep it quieter.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # highdicom logs each module it copies at INFO; Celery's own INFO lines stay.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
