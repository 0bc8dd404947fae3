"""Fixtures of the fault suite and its report.

Every fault test records its figures (:class:`~tests.faults.harness.FaultFigures`) with the
session-scoped ``fault_report`` fixture. When fault tests ran, the figures are printed as a
table in the terminal summary, and written as JSON to the path in ``DICOM_AI_FAULT_REPORT``
when that is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.faults.harness import FaultFigures, ResultSCP
from tests.integration.test_loop import cr_studies  # noqa: F401  (a fixture for every module)

REPORT_ENV = "DICOM_AI_FAULT_REPORT"
FIGURES = pytest.StashKey[list[FaultFigures]]()


@pytest.fixture(scope="session")
def fault_report(request: pytest.FixtureRequest) -> Iterator[list[FaultFigures]]:
    """The figures of this session's fault runs: append one per run (JSON at the end)."""
    figures = request.config.stash.setdefault(FIGURES, [])
    yield figures
    target = os.environ.get(REPORT_ENV)
    if target and figures:
        Path(target).write_text(json.dumps([asdict(f) for f in figures], indent=2) + "\n")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[ResultSCP]:
    """The destination: a dcmtk storescp keeping every copy, stopped at teardown."""
    need_binary("storescp")
    with ResultSCP(tmp_path / "pacs") as scp:
        yield scp


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """A table of the measured figures, only when fault tests ran."""
    figures = config.stash.get(FIGURES, [])
    if not figures:
        return
    terminalreporter.section("fault suite: recovery figures")
    terminalreporter.write_line(f"{'fault':<30} {'studies':>7} {'acked':>5} {'lost':>4} "
                                f"{'results':>7} {'dups':>4} {'in flight':>9} {'reruns':>6} "
                                f"{'recovery s':>10}")
    for f in figures:
        in_flight = "-" if f.in_flight is None else str(f.in_flight)
        terminalreporter.write_line(
            f"{f.fault:<30} {f.studies:>7} {f.acknowledged:>5} {f.lost:>4} {f.results:>7} "
            f"{f.duplicates:>4} {in_flight:>9} {f.reruns:>6} {f.recovery_seconds:>10.1f}")
        for note in f.notes:
            terminalreporter.write_line(f"    {note}")
