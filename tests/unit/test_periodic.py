"""The polling thread scaffold shared by the scheduler, outbox, completion and retention."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from dicom_ai.periodic import PeriodicWorker
from tests.peers import wait_until

LOGGER = logging.getLogger("tests.periodic")


def test_a_failing_step_is_logged_once_and_its_recovery_once(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = {"bad": 0, "good": 0}

    def bad() -> None:
        calls["bad"] += 1
        if calls["bad"] <= 5:
            raise OSError("index unavailable")

    def good() -> None:
        calls["good"] += 1

    worker = PeriodicWorker("test-periodic", LOGGER, [("bad step", bad), ("good step", good)],
                            interval=0.01)
    caplog.set_level(logging.INFO, logger="tests.periodic")
    worker.start()
    try:
        wait_until(lambda: calls["bad"] > 8, 10, "nine rounds")
    finally:
        worker.stop()
    # The failing step did not hold up the other one.
    assert calls["good"] >= calls["bad"] - 1
    lines = [r.getMessage() for r in caplog.records if r.name == "tests.periodic"]
    assert lines[0] == ("bad step failed; retrying at every poll, logged once: "
                        "OSError: index unavailable")
    assert len(lines) == 2, lines
    assert lines[1].startswith("bad step works again after ")
    assert lines[1].endswith(" (5 failed polls)")


def test_wake_runs_a_round_now_and_stop_ends_the_thread() -> None:
    ran = threading.Event()
    worker = PeriodicWorker("test-periodic", LOGGER, [("step", ran.set)], interval=3600)
    worker.start()
    try:
        time.sleep(0.1)
        assert not ran.is_set()  # not before the interval...
        worker.wake()
        assert ran.wait(5)  # ...unless woken
    finally:
        started = time.monotonic()
        worker.stop()
    assert time.monotonic() - started < 5  # stop wakes the waiting thread
    assert worker.stopping
    assert worker._thread is not None
    assert not worker._thread.is_alive()


def test_run_first_runs_at_start() -> None:
    ran = threading.Event()
    worker = PeriodicWorker("test-periodic", LOGGER, [("step", ran.set)], interval=3600,
                            run_first=True)
    worker.start()
    try:
        assert ran.wait(5)
    finally:
        worker.stop()
