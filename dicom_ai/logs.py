"""Logging set-up: one format for the whole service, optionally JSON lines.

Modules log through ``logging.getLogger(__name__)`` and pass UIDs and AE titles only: patient
names, IDs and birth dates never reach a log record.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime

from dicom_ai.config import LoggingSettings


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(settings: LoggingSettings) -> None:
    """Configure the root logger once per process: stderr, and ``[logging] file`` if set.

    Parameters
    ----------
    settings : LoggingSettings
        Level, format and file.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        # Every process appends whole lines (O_APPEND); WatchedFileHandler reopens the file
        # after logrotate moved it.
        handlers.append(logging.handlers.WatchedFileHandler(settings.file, encoding="utf-8"))
    formatter = (_JsonFormatter() if settings.json_format else logging.Formatter(
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
