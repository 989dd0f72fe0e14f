"""Supervisor: state machine on a fake clock and fake processes; one test with real children."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.supervisor import EX_CONFIG, READY_ENV, ProcessSpec, State, Supervisor, report_ready


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProc:
    """A process whose exit the test decides. wait() advances the fake clock instead of sleeping."""

    _next_pid = 100

    def __init__(self, argv, env, clock: FakeClock, ignores_term: bool = False):
        FakeProc._next_pid += 1
        self.pid = FakeProc._next_pid
        self.argv, self.env, self.clock = argv, env, clock
        self.ignores_term = ignores_term
        self.code: int | None = None
        self.signals: list[int] = []

    def ready(self) -> None:
        assert report_ready(self.env)

    def exit(self, code: int) -> None:
        self.code = code

    def poll(self):
        return self.code

    def send_signal(self, sig):
        self.signals.append(sig)
        if sig == signal.SIGTERM and not self.ignores_term:
            self.code = -signal.SIGTERM

    def kill(self):
        self.signals.append(signal.SIGKILL)
        self.code = -signal.SIGKILL

    def wait(self, timeout=None):
        if self.code is None:
            self.clock.advance(timeout or 0)
            raise subprocess.TimeoutExpired(self.argv, timeout)
        return self.code


class Harness:
    def __init__(self, tmp_path: Path, specs=None, **kwargs):
        self.clock = FakeClock()
        self.procs: list[FakeProc] = []
        self.ignores_term = False
        self.changes: list[tuple[str, State, State]] = []
        specs = specs or [ProcessSpec("image", ["worker", "image"], {"A": "1"}, ready_timeout=100, startsecs=10)]
        self.sup = Supervisor(specs, clock=self.clock, spawn=self.spawn, run_dir=tmp_path / "run",
                              on_change=lambda *c: self.changes.append(c), **kwargs)

    def spawn(self, argv, env):
        proc = FakeProc(argv, env, self.clock, self.ignores_term)
        self.procs.append(proc)
        return proc

    @property
    def proc(self) -> FakeProc:
        return self.procs[-1]

    def state(self, name="image") -> State:
        return self.sup.state(name)

    def wait_out_backoff(self, step: float = 0.5) -> float:
        """Tick the fake clock until the child leaves BACKOFF; returns how long that took."""
        start = self.clock.now
        while self.state() is State.BACKOFF:
            self.clock.advance(step)
            self.sup.tick()
        return self.clock.now - start

    def crash_instantly(self, code=1) -> None:
        self.proc.exit(code)
        self.sup.tick()


def test_start_ready_running(tmp_path):
    h = Harness(tmp_path)
    h.sup.start()
    assert h.state() is State.STARTING
    env = h.proc.env
    assert env["A"] == "1" and Path(env[READY_ENV]).parent == (tmp_path / "run").resolve()
    h.clock.advance(5)
    h.sup.tick()
    assert h.state() is State.STARTING
    h.proc.ready()
    h.sup.tick()
    assert h.state() is State.RUNNING
    status = h.sup.status()["image"]
    assert status == {"state": "running", "pid": h.proc.pid, "restarts": 0, "last_exit": None, "since": 1005.0}
    assert h.changes == [("image", State.STOPPED, State.STARTING), ("image", State.STARTING, State.RUNNING)]


def test_crash_after_healthy_run_backs_off_base_delay_and_restarts_on_time(tmp_path):
    h = Harness(tmp_path, backoff_base=2.0)
    h.sup.start()
    h.proc.ready()
    h.sup.tick()
    first = h.proc
    h.clock.advance(60)
    first.exit(-9)
    h.sup.tick()
    assert h.state() is State.BACKOFF
    assert h.sup.status()["image"]["last_exit"] == -9 and h.sup.status()["image"]["pid"] is None
    h.clock.advance(1.99)
    h.sup.tick()
    assert h.state() is State.BACKOFF and len(h.procs) == 1
    h.clock.advance(0.01)
    h.sup.tick()
    assert h.state() is State.STARTING and len(h.procs) == 2
    # Every spawn gets a fresh ready file: the old one cannot mark the new child ready.
    assert h.proc.env[READY_ENV] != first.env[READY_ENV]
    assert not Path(first.env[READY_ENV]).exists()
    assert h.sup.status()["image"]["restarts"] == 1


def test_exit_within_startsecs_of_running_is_instant(tmp_path):
    h = Harness(tmp_path)
    h.sup.start()
    for expected_delay in (1, 2):
        h.proc.ready()
        h.sup.tick()
        h.clock.advance(9)
        h.crash_instantly()
        before = h.clock.now
        h.clock.advance(expected_delay - 0.001)
        h.sup.tick()
        assert h.state() is State.BACKOFF
        h.clock.now = before + expected_delay
        h.sup.tick()
        assert h.state() is State.STARTING
    # A healthy run resets the count: the next delay is the base again.
    h.proc.ready()
    h.sup.tick()
    h.clock.advance(10)
    h.crash_instantly()
    h.clock.advance(1)
    h.sup.tick()
    assert h.state() is State.STARTING


def test_instant_crash_delays_double_and_cap(tmp_path):
    h = Harness(tmp_path, backoff_base=1.0, backoff_cap=5.0, max_instant_crashes=10)
    h.sup.start()
    delays = []
    for _ in range(6):
        h.crash_instantly()
        assert h.state() is State.BACKOFF
        delays.append(h.wait_out_backoff())
    assert delays == [1, 2, 4, 5, 5, 5]


def test_fatal_after_max_instant_crashes(tmp_path, caplog):
    h = Harness(tmp_path, max_instant_crashes=3)
    h.sup.start()
    for code in (1, 1):
        h.crash_instantly(code)
        h.clock.advance(100)
        h.sup.tick()
        assert h.state() is State.STARTING
    with caplog.at_level("ERROR"):
        h.crash_instantly(3)
    assert h.state() is State.FATAL
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("image" in m and "exit code 3" in m for m in errors)
    h.clock.advance(1000)
    h.sup.tick()
    assert h.state() is State.FATAL and len(h.procs) == 3


def test_crashes_after_ready_back_off_but_are_never_fatal(tmp_path):
    # Poison jobs kill the worker right after it is ready, max_attempts times per job; several in a
    # row must not make the supervisor give up on the worker (the jobs behind them would be stuck).
    h = Harness(tmp_path, max_instant_crashes=3, backoff_cap=8.0)
    h.sup.start()
    delays = []
    for _ in range(6):
        h.proc.ready()
        h.sup.tick()
        h.clock.advance(1)
        h.crash_instantly(-9)
        assert h.state() is State.BACKOFF
        delays.append(h.wait_out_backoff())
    assert delays == [1, 2, 4, 8, 8, 8]
    for _ in range(2):    # crashes before ready still count towards FATAL, from zero
        h.crash_instantly()
        h.clock.advance(100)
        h.sup.tick()
    h.crash_instantly()
    assert h.state() is State.FATAL


def test_exit_78_is_fatal_at_once(tmp_path, caplog):
    h = Harness(tmp_path)
    h.sup.start()
    h.proc.ready()
    h.sup.tick()
    h.clock.advance(500)
    with caplog.at_level("ERROR"):
        h.crash_instantly(EX_CONFIG)
    assert h.state() is State.FATAL
    assert h.sup.status()["image"]["last_exit"] == 78
    assert any("78" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_ready_timeout_kills_and_backs_off(tmp_path):
    h = Harness(tmp_path)
    h.sup.start()
    h.clock.advance(100)
    h.sup.tick()
    assert h.state() is State.STARTING
    h.clock.advance(0.5)
    h.sup.tick()
    first = h.procs[0]
    assert first.signals == [signal.SIGKILL]
    assert h.state() is State.BACKOFF
    assert h.sup.status()["image"]["last_exit"] == -signal.SIGKILL
    h.clock.advance(1)
    h.sup.tick()
    assert h.state() is State.STARTING and len(h.procs) == 2


def test_spawn_failure_is_an_instant_crash(tmp_path):
    def broken(argv, env):
        raise FileNotFoundError(argv[0])

    sup = Supervisor([ProcessSpec("x", ["missing"], {})], clock=FakeClock(), spawn=broken,
                     run_dir=tmp_path, max_instant_crashes=1)
    sup.start()
    assert sup.state("x") is State.FATAL


def test_stop_terms_then_kills_a_process_ignoring_sigterm(tmp_path):
    specs = [ProcessSpec("polite", ["a"], {}), ProcessSpec("stubborn", ["b"], {}), ProcessSpec("waiting", ["c"], {})]
    h = Harness(tmp_path, specs=specs)
    h.sup.start()
    polite, stubborn, waiting = h.procs
    stubborn.ignores_term = True
    waiting.exit(1)
    h.sup.tick()
    assert h.state("waiting") is State.BACKOFF
    start = h.clock.now
    h.sup.stop(grace=3.0)
    assert polite.signals == [signal.SIGTERM]
    assert stubborn.signals == [signal.SIGTERM, signal.SIGKILL]
    assert waiting.signals == []
    assert h.clock.now - start == pytest.approx(3.0, abs=0.06)
    assert {s["state"] for s in h.sup.status().values()} == {"stopped"}
    assert h.sup.status()["stubborn"]["last_exit"] == -signal.SIGKILL
    h.sup.tick()  # after stop, tick restarts nothing
    assert len(h.procs) == 3


def test_report_ready_without_supervisor_is_a_noop():
    assert report_ready({}) is False


def test_real_children(tmp_path):
    ready_then_sleep = ("import os, time; from pathlib import Path; "
                        f"Path(os.environ[{READY_ENV!r}]).touch(); time.sleep(60)")
    specs = [ProcessSpec("good", [sys.executable, "-c", ready_then_sleep], {}, ready_timeout=10, startsecs=0.2),
             ProcessSpec("bad", [sys.executable, "-c", "raise SystemExit(1)"], {}, ready_timeout=10)]
    sup = Supervisor(specs, run_dir=tmp_path / "run", backoff_base=0.05, backoff_cap=0.1, max_instant_crashes=3)
    started = time.monotonic()
    sup.start()
    seen_backoff = False
    try:
        while time.monotonic() - started < 10:      # leaves as soon as both states are reached
            sup.tick()
            seen_backoff |= sup.state("bad") is State.BACKOFF
            if sup.state("good") is State.RUNNING and sup.state("bad") is State.FATAL:
                break
            time.sleep(0.01)
        assert sup.state("good") is State.RUNNING
        assert seen_backoff and sup.state("bad") is State.FATAL
        assert sup.status()["bad"]["last_exit"] == 1 and sup.status()["bad"]["restarts"] == 2
        pid = sup.status()["good"]["pid"]
    finally:
        stopping = time.monotonic()
        sup.stop(grace=2.0)
    assert time.monotonic() - stopping < 2.0          # the child stopped on SIGTERM, no kill needed
    assert sup.status()["good"]["state"] == "stopped"
    assert sup.status()["good"]["last_exit"] == -signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
