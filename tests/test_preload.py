"""workers/preload.py: workers forked from a server that imported the stack once behave like
subprocess.Popen children to the supervisor (exit codes, signals, wait), get their own environment,
and find the preloaded modules already imported."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from workers.preload import PreloadedSpawner, worker_module

TARGET = "tests.preload_fixture.target"


def forkable(argv):
    return TARGET if argv[1:] == ["-m", TARGET] else None


@pytest.fixture(scope="module")
def spawn():
    return PreloadedSpawner(modules=("tests.preload_fixture.marker",), forkable=forkable)


def start(spawn, tmp_path, **env):
    out = tmp_path / "report.json"
    full = {**{k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}, "PRELOAD_TEST_OUT": str(out), **env}
    return spawn([sys.executable, "-m", TARGET], full), out


def wait_for(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_only_worker_modules_are_forked():
    assert worker_module([sys.executable, "-m", "workers.image_worker"]) == "workers.image_worker"
    assert worker_module([sys.executable, "-m", "gateway"]) is None
    assert worker_module([sys.executable, "-m", "workers.submit"]) is None


def test_warm_waits_for_the_servers_imports_and_leaves_no_child(spawn):
    import multiprocessing

    assert spawn.warm() >= 0
    assert not [p for p in multiprocessing.active_children() if p.name == "preload-warm-up"]


def test_child_runs_as_main_with_its_env_and_preloaded_modules(spawn, tmp_path):
    proc, out = start(spawn, tmp_path, PRELOAD_TEST="hello", PRELOAD_TEST_EXIT="7")
    assert proc.wait(timeout=30) == 7 and proc.poll() == 7
    report = wait_for(out)
    assert report["pid"] == proc.pid and report["env"] == "hello" and report["name"] == "__main__"
    assert report["comm"] == "target"   # ps shows the worker's name, not the fork server's command line
    assert report["alloc_conf"] == "expandable_segments:True"   # set before the child's CUDA check
    # Imported by the fork server, not by this child and not by the test process.
    assert report["marker_imported_in"] not in (report["pid"], os.getpid())


def test_signals_and_wait_timeout_like_popen(spawn, tmp_path):
    proc, out = start(spawn, tmp_path, PRELOAD_TEST_WAIT="1")
    wait_for(out)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    proc.send_signal(signal.SIGTERM)   # after the exit: no error, as Popen
    (tmp_path / "second").mkdir()
    proc2, out2 = start(spawn, tmp_path / "second", PRELOAD_TEST_WAIT="1")
    wait_for(out2)
    proc2.kill()
    assert proc2.wait(timeout=10) == -signal.SIGKILL


def test_other_commands_start_as_plain_subprocesses(spawn):
    proc = spawn([sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ))
    assert isinstance(proc, subprocess.Popen) and proc.wait(timeout=30) == 3
