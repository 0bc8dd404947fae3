"""Logging set-up: one format for the whole service, optionally JSON lines.

Modules log through ``logging.getLogger(__name__)`` and pass UIDs and AE titles only: patient
names, IDs and birth dates never reach a log record.
"""

from __future__ import annotations

import json
import logging
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
    """Configure the root logger once per process (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.json_format:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # pynetdicom logs every PDU at DEBUG and each association at INFO: keep it quieter.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # highdicom logs each module it copies at INFO; Celery's own INFO lines stay.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
