"""DIMSE traffic counters of the receivers of one ``serve`` process, for ``/metrics``.

What the index cannot tell (associations, refusals that leave no file, bytes on the wire,
requests other than C-STORE) is counted as it happens. The counters live in one shared-memory
array created by the serve process and handed to every receiver process it spawns, so the
API's ``/metrics`` of that process reports all of its receivers; a separate serve process (another
host) reports its own, and Prometheus sums them. Like any Prometheus counter they start from
zero when the process starts.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

__all__ = ["ASSOCIATION_OUTCOMES", "REJECT_REASONS", "REQUESTS", "STORE_STATUSES",
           "ReceiverCounters"]

#: ``outcome`` label values of ``dicom_ai_associations_total``.
ASSOCIATION_OUTCOMES = ("accepted", "rejected", "released", "aborted")
#: ``reason`` label values of ``dicom_ai_association_rejections_total``.
REJECT_REASONS = ("host not allowed", "calling AE title not allowed", "limit or called AE title")
#: ``status`` label values of ``dicom_ai_store_responses_total`` (our C-STORE answers).
STORE_STATUSES = ("0x0000", "0xA700", "0xA900", "0xC000", "other")
#: ``service`` label values of ``dicom_ai_dimse_requests_total``.
REQUESTS = ("echo", "store", "find", "move", "get", "mpps")

_SLOTS: tuple[tuple[str, str], ...] = (
    *(("association", o) for o in ASSOCIATION_OUTCOMES),
    *(("rejection", r) for r in REJECT_REASONS),
    *(("store", s) for s in STORE_STATUSES),
    *(("request", r) for r in REQUESTS),
    ("bytes", ""),
)
_INDEX = {slot: i for i, slot in enumerate(_SLOTS)}


class ReceiverCounters:
    """Counters shared by the receivers of one serve process (threads and spawned processes).

    Picklable into a spawned process as a ``Process`` argument (the array is shared memory).
    Each increment takes the array's lock: well under a microsecond beside a C-STORE's
    milliseconds.
    """

    def __init__(self) -> None:
        self._values: Any = mp.get_context("spawn").Array("q", len(_SLOTS), lock=True)

    def _add(self, kind: str, key: str, n: int = 1) -> None:
        with self._values.get_lock():
            self._values[_INDEX[(kind, key)]] += n

    def association(self, outcome: str) -> None:
        """Count an association ``accepted``, ``rejected``, ``released`` or ``aborted``."""
        self._add("association", outcome)

    def rejection(self, reason: str) -> None:
        """Count a rejected association by reason (one of :data:`REJECT_REASONS`)."""
        self._add("association", "rejected")
        self._add("rejection", reason if reason in REJECT_REASONS else REJECT_REASONS[-1])

    def store(self, status: int, size: int) -> None:
        """Count a C-STORE answer; ``size`` bytes received are counted when it succeeded."""
        label = f"0x{status:04X}"
        self._add("store", label if label in STORE_STATUSES else "other")
        self._add("request", "store")
        if status == 0:
            self._add("bytes", "", size)

    def request(self, service: str) -> None:
        """Count a DIMSE request of another service (one of :data:`REQUESTS`)."""
        self._add("request", service)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Every counter now: ``{"association": {"accepted": n, ...}, "bytes": {"": n}}``."""
        with self._values.get_lock():
            values = list(self._values)
        out: dict[str, dict[str, int]] = {}
        for (kind, key), value in zip(_SLOTS, values, strict=True):
            out.setdefault(kind, {})[key] = int(value)
        return out
