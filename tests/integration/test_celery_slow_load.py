"""A model that takes 10 s to load comes up under ``dicom-ai worker`` (Celery prefork).

A prefork child loads its models in ``worker_process_init``, before it tells the parent it is
up; Celery SIGKILLs a child started by the running worker (a replacement for one that died) that
is not up within ``worker_proc_alive_timeout`` (4 s by default), so after a crash a slow model
would never come up again. ``workers.model_load_timeout_seconds`` sets that limit. (Children
started with the worker are not timed, so the test kills the first child to get a replacement.)

The slow load is real: the worker runs through a small launcher (written by the test, not part
of the package) that makes every model load sleep 10 s before loading the bundled model, then
starts ``dicom_ai.cli`` as ``python -m`` would. Prefork children are forked, so they inherit it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_ai.config import Settings
from dicom_ai.service import Service
from tests.conftest import missing, need_binary
from tests.integration.test_loop import (  # noqa: F401  (cr_studies is a fixture)
    assert_valid_sr,
    cr_studies,
    db_jobs,
    dicom_files,
    loop_settings,
    push,
    received,
)
from tests.peers import ENV, REPO, StoreSCP, port_open, settings_toml, wait_until

LOAD_SECONDS = 10.0

# Wraps load_predictor before dicom_ai.runner.run imports it (in the child, on first use).
LAUNCHER = f"""
import runpy, sys, time

import dicom_ai.inference.runtime as runtime

_load = runtime.load_predictor


def slow_load(*args, **kwargs):
    started = time.monotonic()
    time.sleep({LOAD_SECONDS})
    predictor = _load(*args, **kwargs)
    print(f"slow-load: model loaded in {{time.monotonic() - started:.1f}} s", file=sys.stderr,
          flush=True)
    return predictor


runtime.load_predictor = slow_load
runpy.run_module("dicom_ai.cli", run_name="__main__", alter_sys=True)
"""


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (from /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_celery_worker_with_a_model_that_loads_in_10_s_comes_up_and_runs_a_job(
    tmp_path: Path, db_url: str, cr_studies: Path,  # noqa: F811
    start_service: Callable[[Settings], Service]
) -> None:
    need_binary("storescp")
    if not port_open(6379):
        missing("broker 127.0.0.1:6379 not reachable")
    launcher = tmp_path / "slow_launcher.py"
    launcher.write_text(LAUNCHER)
    log_path = tmp_path / "worker.log"
    with StoreSCP(tmp_path / "scp") as scp:
        # model_load_timeout_seconds left at its default (120 s).
        settings = loop_settings(
            tmp_path, db_url,
            [{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}],
            workers={"backend": "celery", "broker_url": "redis://127.0.0.1:6379/15",
                     "queue": f"dicom-ai-test-{uuid.uuid4().hex[:8]}"})
        service = start_service(settings)
        config = tmp_path / "worker.toml"
        config.write_text(settings_toml(settings))
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, str(launcher), "worker", "--config", str(config),
                 "--concurrency", "1"], cwd=REPO, env=ENV, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: " ready." in log_path.read_text(), 30, "the worker to start")
            # The crash that needs a replacement child (the fault run killed one this way).
            children = wait_until(lambda: _children(worker.pid), 10, "the prefork child")
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            push(service, dicom_files(cr_studies)[:1])

            def delivered() -> bool:
                assert worker.poll() is None, log_path.read_text()[-3000:]
                return len(received(scp.folder)["sr"]) == 1

            # Old code: the child is killed every 4 s and never comes up.
            wait_until(delivered, 50, "the SR from a worker whose model loads in 10 s")
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(timeout=30)
    text = log_path.read_text()
    assert "Timed out waiting for UP message" not in text
    assert text.count("SIGKILL") == len(children), "only the child the test killed"
    loads = [float(s) for s in re.findall(r"slow-load: model loaded in ([\d.]+) s", text)]
    assert loads, "the replacement child loaded the model"
    assert min(loads) >= LOAD_SECONDS, "the model really took 10 s to load"
    assert "dicom_ai.run_job" in text
    assert [j.state for j in db_jobs(db_url)] == ["done"]
    assert_valid_sr(received(scp.folder)["sr"][0])
