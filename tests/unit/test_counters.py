"""Receiver traffic counters: one shared-memory row per receiver process, summed on read."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

from dicom_ai.network.counters import ReceiverCounters


def _count_in_child(counters: ReceiverCounters, stores: int) -> None:
    for _ in range(stores):
        counters.store(0x0000, 100)
    counters.store(0xA900, 100)  # refused: counted, its bytes are not
    counters.association("accepted")


def _hold_forever(counters: ReceiverCounters) -> None:
    counters.association("accepted")
    with counters._lock:  # killed while holding its own lock
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_spawned_receiver_counts_into_the_parents_snapshot() -> None:
    counters = ReceiverCounters(3)
    counters.store(0x0000, 10)  # row 0: the serve process's own receiver
    child = mp.get_context("spawn").Process(target=_count_in_child,
                                            args=(counters.for_slot(2), 5))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    snap = counters.snapshot()
    assert snap["store"]["0x0000"] == 6
    assert snap["store"]["0xA900"] == 1
    assert snap["request"]["store"] == 7
    assert snap["bytes"][""] == 10 + 5 * 100
    assert snap["association"]["accepted"] == 1


def test_a_receiver_killed_mid_count_blocks_no_one_and_its_counts_stay() -> None:
    counters = ReceiverCounters(2)
    child = mp.get_context("spawn").Process(target=_hold_forever, args=(counters.for_slot(1),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    replacement = counters.for_slot(1)  # a restarted receiver takes the same row
    replacement.association("accepted")
    counters.association("accepted")
    assert counters.snapshot()["association"]["accepted"] == 3


def test_unknown_labels_fold_into_other_and_slots_are_checked() -> None:
    counters = ReceiverCounters(1)
    counters.store(0xB000, 5)
    counters.rejection("something new")
    snap = counters.snapshot()
    assert snap["store"]["other"] == 1
    assert snap["rejection"]["limit or called AE title"] == 1
    assert snap["association"]["rejected"] == 1
    with pytest.raises(ValueError, match="slot 1"):
        counters.for_slot(1)


def test_a_replacement_receiver_settles_what_the_dead_one_held_open() -> None:
    counters = ReceiverCounters(2)
    dead = counters.for_slot(1)
    for _ in range(3):
        dead.connection("opened")
        dead.association("accepted")
    dead.connection("closed")
    dead.association("released")
    counters.connection("opened")  # row 0 is not the dead receiver's: left as it is
    counters.for_slot(1).settle()  # its replacement, before serving
    snap = counters.snapshot()
    assert snap["connection"] == {"opened": 4, "closed": 3}
    assert snap["association"]["aborted"] == 2  # they ended with the process
    assert snap["association"]["released"] == 1
