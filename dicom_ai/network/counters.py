"""DIMSE traffic counters of the receivers of one ``serve`` process, for ``/metrics``.

What the index cannot tell (associations, refusals that leave no file, bytes on the wire,
requests other than C-STORE) is counted as it happens. The counters live in one shared-memory
array created by the serve process and handed to every receiver process it spawns, so the
API's ``/metrics`` of that process reports all of its receivers; a separate serve process (another
host) reports its own, and Prometheus sums them. Like any Prometheus counter they start from
zero when the process starts.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import threading
from typing import Any

from dicom_ai.dimse_status import Status

__all__ = ["ASSOCIATION_OUTCOMES", "CONNECTION_EVENTS", "CONTEXT_REFUSALS", "REFUSAL_REASONS",
           "REJECT_REASONS", "REQUESTS", "STORE_STATUSES", "ReceiverCounters",
           "context_refusal_reason"]

#: ``outcome`` label values of ``dicom_ai_associations_total``.
ASSOCIATION_OUTCOMES = ("accepted", "rejected", "released", "aborted")
#: ``reason`` label values of ``dicom_ai_association_rejections_total``.
REJECT_REASONS = ("host not allowed", "calling AE title not allowed", "limit or called AE title")
#: ``status`` label values of ``dicom_ai_store_responses_total`` (our C-STORE answers).
STORE_STATUSES = ("0x0000", "0xA700", "0xA900", "0xC000", "other")
#: ``service`` label values of ``dicom_ai_dimse_requests_total``.
REQUESTS = ("echo", "store", "find", "move", "get", "mpps")
#: TCP connections a receiver served: ``opened`` - ``closed`` are open now, associated or not.
CONNECTION_EVENTS = ("opened", "closed")
#: ``reason`` label values of ``dicom_ai_connections_refused_total`` (closed on accept).
REFUSAL_REASONS = ("per-host limit",)
#: ``reason`` label values of ``dicom_ai_presentation_contexts_refused_total``: the result of a
#: presentation context we refused at negotiation (PS3.8 9.3.3.2; the SOP class is logged, not
#: a label, since a peer can propose any UID).
CONTEXT_REFUSALS = ("abstract syntax not supported", "transfer syntaxes not supported", "other")
_CONTEXT_RESULTS = {0x03: CONTEXT_REFUSALS[0], 0x04: CONTEXT_REFUSALS[1]}


def context_refusal_reason(result: int | None) -> str:
    """The :data:`CONTEXT_REFUSALS` label of a presentation context's result (PS3.8 9.3.3.2).

    0x03 abstract syntax not supported, 0x04 transfer syntaxes not supported; 0x01 (user
    rejection) and 0x02 (no reason) are ``other``.
    """
    return _CONTEXT_RESULTS.get(result if result is not None else -1, CONTEXT_REFUSALS[-1])

_SLOTS: tuple[tuple[str, str], ...] = (
    *(("association", o) for o in ASSOCIATION_OUTCOMES),
    *(("rejection", r) for r in REJECT_REASONS),
    *(("store", s) for s in STORE_STATUSES),
    *(("request", r) for r in REQUESTS),
    ("bytes", ""),
    *(("connection", e) for e in CONNECTION_EVENTS),
    *(("refusal", r) for r in REFUSAL_REASONS),
    *(("context", r) for r in CONTEXT_REFUSALS),
)
_INDEX = {slot: i for i, slot in enumerate(_SLOTS)}


class ReceiverCounters:
    """Counters shared by the receivers of one serve process (threads and spawned processes).

    The counts live in a shared-memory array with one row per receiver slot. Each receiver
    writes only its own row (:meth:`for_slot`), under a lock of its own process, and
    :meth:`snapshot` sums the rows. No lock is shared between processes, so a receiver killed
    mid-increment cannot block the others, and its counts survive it (its replacement takes
    the same row). Picklable into a spawned process as a ``Process`` argument.

    Parameters
    ----------
    slots : int
        Receivers that count (``[dicom] receivers``).
    """

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self._values: Any = mp.get_context("spawn").RawArray("q", slots * len(_SLOTS))
        self._row = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]  # a lock of the process that uses the copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def for_slot(self, slot: int) -> ReceiverCounters:
        """The same counters, written to row `slot` (one receiver process's own row)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"receiver slot {slot} outside 0..{self.slots - 1}")
        view = copy.copy(self)  # through __getstate__/__setstate__: a lock of its own
        view._row = slot
        return view

    def _add(self, kind: str, key: str, n: int = 1) -> None:
        index = self._row * len(_SLOTS) + _INDEX[(kind, key)]
        with self._lock:
            self._values[index] += n

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
        if status == Status.SUCCESS:
            self._add("bytes", "", size)

    def request(self, service: str) -> None:
        """Count a DIMSE request of another service (one of :data:`REQUESTS`)."""
        self._add("request", service)

    def connection(self, event: str) -> None:
        """Count a TCP connection ``opened`` or ``closed`` by a receiver (associated or not)."""
        self._add("connection", event)

    def refusal(self, reason: str) -> None:
        """Count a connection refused on accept (one of :data:`REFUSAL_REASONS`)."""
        self._add("refusal", reason)

    def context_refused(self, result: int | None) -> None:
        """Count a presentation context refused at negotiation, by its result (0x03, 0x04...)."""
        self._add("context", context_refusal_reason(result))

    def settle(self) -> None:
        """Close this row's books: the connections and associations it counts open are gone.

        A receiver process that replaces one that died calls it before it serves: the
        connections of the dead process closed with it and its associations ended (aborted,
        as the peers saw it), so they no longer count as open.
        """
        width = len(_SLOTS)
        base = self._row * width

        def at(kind: str, key: str) -> int:
            return base + _INDEX[(kind, key)]

        with self._lock:
            values = self._values
            values[at("connection", "closed")] = values[at("connection", "opened")]
            ended = (values[at("association", "released")]
                     + values[at("association", "aborted")])
            values[at("association", "aborted")] += max(
                0, values[at("association", "accepted")] - ended)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Every counter now, summed over the receivers.

        Returns
        -------
        dict
            ``{"association": {"accepted": n, ...}, ..., "bytes": {"": n},
            "connection": {"opened": n, "closed": n}, "refusal": {...}, "context": {...}}``.
            Each value is read whole (aligned 64-bit words); a row being written may be one
            request behind.
        """
        values = list(self._values)
        width = len(_SLOTS)
        out: dict[str, dict[str, int]] = {}
        for i, (kind, key) in enumerate(_SLOTS):
            total = sum(values[row * width + i] for row in range(self.slots))
            out.setdefault(kind, {})[key] = int(total)
        return out
