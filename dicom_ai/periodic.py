"""One polling thread scaffold for the service's background loops.

The scheduler (routing, dispatch), the outbox sender, the completion monitor and the retention
runner each run a few steps every poll interval, and sooner when woken. :class:`PeriodicWorker`
is that loop once: a daemon thread, :meth:`~PeriodicWorker.wake`, :meth:`~PeriodicWorker.stop`
with a bounded join, and each step's failures logged once per outage with
:class:`~dicom_ai.resources.Outage` (an unavailable or full index is a wait, design convention
15: the loop keeps polling until it is back).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from dicom_ai.resources import Outage

__all__ = ["PeriodicWorker"]

#: A step: what it does (as the outage log names it) and the call that does it.
Step = tuple[str, Callable[[], object]]


class PeriodicWorker:
    """Runs steps every `interval` seconds (and on :meth:`wake`) in a daemon thread.

    Each step runs on its own: one that raises does not hold up the next, and its failures are
    logged through :class:`~dicom_ai.resources.Outage` on the owner's `logger` (the first
    failure at ERROR, its recovery at INFO, repeats at DEBUG only).

    Parameters
    ----------
    name : str
        The thread's name.
    logger : logging.Logger
        The owning module's logger (outage lines carry its name).
    steps : sequence of (str, callable)
        ``(what, step)`` pairs, run in order each round; ``what`` names the step in the logs.
    interval : float
        Seconds between rounds.
    join_timeout : float
        How long :meth:`stop` waits for the round in progress.
    run_first : bool
        Run a round as soon as the thread starts, not after the first interval.
    """

    def __init__(self, name: str, logger: logging.Logger, steps: Sequence[Step], *,
                 interval: float, join_timeout: float = 10.0, run_first: bool = False) -> None:
        self._name = name
        self._interval = interval
        self._join_timeout = join_timeout
        self._run_first = run_first
        self._steps = [(Outage(logger, what), step) for what, step in steps]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called (a long step may check it to end early)."""
        return self._stop.is_set()

    def wake(self, *_: object) -> None:
        """Run a round now rather than at the next interval (usable as any callback)."""
        self._wake.set()

    def run_steps(self) -> None:
        """Run every step once, each failure recorded by its outage; never raises."""
        for outage, step in self._steps:
            try:
                step()
            except Exception as exc:
                outage.failed(exc)
            else:
                outage.ok()

    def _loop(self) -> None:
        if self._run_first:
            self.run_steps()
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.run_steps()

    def start(self) -> None:
        """Start the daemon thread."""
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop (the step in progress finishes first) and wait for the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self._join_timeout)
