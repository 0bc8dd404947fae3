"""A pool worker ends when its serve process is gone (dicom_ai.dispatch.local)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.peers import ENV, REPO

WATCH = ("import os, sys, time\n"
         "from dicom_ai.dispatch.local import _exit_with_parent\n"
         "_exit_with_parent(int(sys.argv[1]), period=0.1)\n"
         "time.sleep(30)\n")


def test_a_worker_whose_serve_died_before_it_started_watching_exits_at_once() -> None:
    """Serve killed while the spawned worker was still importing: by the time it watches, its
    parent is already another process. It must compare with the pid the pool gave it (here one
    that is not its parent), not with whatever parent it finds, and exit."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", WATCH, "1"], env=ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=25, check=False)
    assert result.returncode == 3, result.stderr
    assert "is gone; exiting" in result.stderr
    assert time.monotonic() - started < 20


def test_a_worker_whose_serve_lives_keeps_running() -> None:
    process = subprocess.Popen([sys.executable, "-c", WATCH, str(os.getpid())],
                               env=ENV, cwd=REPO, stderr=subprocess.PIPE)
    try:
        time.sleep(3)
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()
