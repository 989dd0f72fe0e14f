"""Keep N worker processes alive, supervisord style, in one thread without sleeping in `tick()`.

Life of a child:
    STARTING  spawned; loading weights. It calls `report_ready()` when it can take jobs.
    RUNNING   the ready file exists.
    BACKOFF   it exited; restarts at now + min(backoff_cap, backoff_base * 2**(n-1)),
              n = consecutive instant crashes (1 after a crash that follows a healthy run).
    FATAL     given up: `max_instant_crashes` consecutive crashes before becoming RUNNING, or exit
              code 78. A child that dies after reporting ready (a poison job, a kill -9) is always
              restarted after the BACKOFF delay: the queue's max_attempts already bounds each job.
    STOPPING / STOPPED  during and after `stop()`.

An "instant crash" is an exit before RUNNING, within `startsecs` of becoming RUNNING, or a
STARTING child killed after `ready_timeout`. A crash after a healthy run resets the count.

Exit code 78 (EX_CONFIG, sysexits.h) means "my configuration is wrong": restarting cannot help,
so the child goes FATAL at once. Workers exit 78 for a wrong job_types.yaml or environment.

Ready protocol: every spawn gets WORKER_READY_FILE=<fresh path in run_dir>; the child creates
that file after its weights load (`report_ready()`), and the next tick sees it.
"""
from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

READY_ENV = "WORKER_READY_FILE"
EX_CONFIG = 78
# Real wait per poll in stop(): short, so a fake clock in tests advances in small steps.
_STOP_POLL = 0.05
# How long to wait for a SIGKILLed child to be reaped.
_KILL_WAIT = 5.0


def report_ready(env: Mapping[str, str] | None = None) -> bool:
    """Called by a worker once its weights are loaded. No-op (False) when not supervised."""
    path = (os.environ if env is None else env).get(READY_ENV)
    if not path:
        return False
    Path(path).touch()
    return True


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    FATAL = "fatal"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the supervisor's own environment
    ready_timeout: float = 900.0
    startsecs: float = 10.0


def popen_spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    # Children inherit stdout/stderr: their log lines carry their own names.
    return subprocess.Popen(argv, env=env)


@dataclass
class _Child:
    spec: ProcessSpec
    state: State = State.STOPPED
    proc: Any = None
    ready_file: Path | None = None
    started_at: float = 0.0
    running_at: float | None = None
    since: float = 0.0
    restarts: int = 0
    spawns: int = 0
    last_exit: int | None = None
    instant_crashes: int = 0
    unready_crashes: int = 0        # consecutive exits before RUNNING: these alone lead to FATAL
    restart_at: float = 0.0


class Supervisor:
    def __init__(
        self,
        specs: list[ProcessSpec],
        clock: Callable[[], float] = time.monotonic,
        spawn: Callable[[list[str], dict[str, str]], Any] = popen_spawn,
        run_dir: str | os.PathLike = "run",
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        max_instant_crashes: int = 5,
        log: logging.Logger | None = None,
        on_change: Callable[[str, State, State], None] | None = None,
    ):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"process names must be unique: {names}")
        self.clock = clock
        self.spawn = spawn
        self.run_dir = Path(run_dir).resolve()
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_instant_crashes = max_instant_crashes
        self.log = log or logging.getLogger("workers.supervisor")
        self.on_change = on_change
        self._children = {s.name: _Child(spec=s, since=clock()) for s in specs}
        self._started = False
        self._stopped = False
        # status() may come from an HTTP health thread; re-entrant so on_change may call status().
        self._lock = threading.RLock()

    # -- public -------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn every child (STARTING)."""
        with self._lock:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._started = True
            now = self.clock()
            for child in self._children.values():
                self._spawn(child, now)

    def tick(self) -> None:
        """One pass: reap exits, promote ready children, enforce ready timeouts, restart due ones."""
        with self._lock:
            if self._stopped:
                return
            now = self.clock()
            for child in self._children.values():
                if child.state in (State.STARTING, State.RUNNING):
                    code = child.proc.poll()
                    if code is not None:
                        self._exited(child, code, now)
                    elif child.state is State.STARTING:
                        if child.ready_file is not None and child.ready_file.exists():
                            child.running_at = now
                            self._set(child, State.RUNNING, now)
                        elif now - child.started_at > child.spec.ready_timeout:
                            self.log.warning("%s (pid %s) not ready after %.0f s: killing it",
                                             child.spec.name, child.proc.pid, child.spec.ready_timeout)
                            self._exited(child, self._kill(child), now, instant=True)
                elif child.state is State.BACKOFF and now >= child.restart_at:
                    child.restarts += 1
                    self._spawn(child, now)

    def status(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                name: {
                    "state": c.state.value,
                    "pid": c.proc.pid if c.proc is not None else None,
                    "restarts": c.restarts,
                    "last_exit": c.last_exit,
                    "since": c.since,
                }
                for name, c in self._children.items()
            }

    def state(self, name: str) -> State:
        return self._children[name].state

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM every live child, wait up to `grace`, SIGKILL the rest. Everything ends STOPPED."""
        with self._lock:
            self._stopped = True
            now = self.clock()
            live = [c for c in self._children.values() if c.proc is not None]
            for child in live:
                self._set(child, State.STOPPING, now)
                self._signal(child, signal.SIGTERM)
            deadline = now + grace
            while live:
                for child in list(live):
                    code = child.proc.poll()
                    if code is not None:
                        self._reaped(child, code)
                        live.remove(child)
                remaining = deadline - self.clock()
                if not live or remaining <= 0:
                    break
                try:
                    live[0].proc.wait(timeout=min(_STOP_POLL, remaining))
                except subprocess.TimeoutExpired:
                    pass
            for child in live:
                self.log.warning("%s (pid %s) ignored SIGTERM for %.1f s: SIGKILL",
                                 child.spec.name, child.proc.pid, grace)
                self._reaped(child, self._kill(child))
            now = self.clock()
            for child in self._children.values():
                self._set(child, State.STOPPED, now)

    def run_forever(self, stop_event: threading.Event, interval: float = 0.2, grace: float = 30.0) -> None:
        """tick() every `interval` seconds until `stop_event` is set, then stop(grace)."""
        if not self._started:
            self.start()
        try:
            while not stop_event.wait(interval):
                try:
                    self.tick()
                except Exception:  # a supervisor bug must not orphan the children
                    self.log.exception("supervisor tick failed")
        finally:
            self.stop(grace)

    # -- internals ----------------------------------------------------------------------------

    def _set(self, child: _Child, new: State, now: float) -> None:
        old = child.state
        if old is new:
            return
        child.state, child.since = new, now
        self.log.info("%s: %s -> %s", child.spec.name, old.value, new.value)
        if self.on_change is not None:
            try:
                self.on_change(child.spec.name, old, new)
            except Exception:
                self.log.exception("on_change callback failed")

    def _spawn(self, child: _Child, now: float) -> None:
        child.spawns += 1
        # Fresh name per spawn: a file left by an earlier run can never mark a new child ready.
        ready = self.run_dir / f"{child.spec.name}.{child.spawns}.{uuid.uuid4().hex[:8]}.ready"
        ready.unlink(missing_ok=True)
        env = {**os.environ, **child.spec.env, READY_ENV: str(ready)}
        child.started_at, child.running_at, child.ready_file = now, None, ready
        try:
            child.proc = self.spawn(list(child.spec.argv), env)
        except OSError as exc:  # e.g. the executable is missing: same as an instant crash
            self.log.error("%s: cannot start %s: %s", child.spec.name, child.spec.argv[:1], exc)
            child.proc = None
            self._exited(child, None, now, instant=True)
            return
        self.log.info("%s: started pid %s", child.spec.name, child.proc.pid)
        self._set(child, State.STARTING, now)

    def _signal(self, child: _Child, sig: int) -> None:
        try:
            child.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def _kill(self, child: _Child) -> int | None:
        """SIGKILL and reap; returns the exit code (None if it could not be reaped)."""
        try:
            child.proc.kill()
        except ProcessLookupError:
            pass
        try:
            return child.proc.wait(timeout=_KILL_WAIT)
        except subprocess.TimeoutExpired:
            self.log.error("%s (pid %s) survived SIGKILL", child.spec.name, child.proc.pid)
            return None

    def _reaped(self, child: _Child, code: int | None) -> None:
        child.last_exit = code
        child.proc = None
        if child.ready_file is not None:
            child.ready_file.unlink(missing_ok=True)
            child.ready_file = None

    def _exited(self, child: _Child, code: int | None, now: float, instant: bool = False) -> None:
        name = child.spec.name
        instant = instant or child.running_at is None or now - child.running_at < child.spec.startsecs
        self._reaped(child, code)
        if code == EX_CONFIG:
            self.log.error("%s exited with code 78 (EX_CONFIG: bad configuration): FATAL, not restarting", name)
            self._set(child, State.FATAL, now)
            return
        child.instant_crashes = child.instant_crashes + 1 if instant else 0
        child.unready_crashes = child.unready_crashes + 1 if child.running_at is None else 0
        if child.unready_crashes >= self.max_instant_crashes:
            self.log.error("%s crashed %d times in a row before it was ready (last exit code %s): FATAL, "
                           "giving up", name, child.unready_crashes, code)
            self._set(child, State.FATAL, now)
            return
        n = max(child.instant_crashes, 1)
        delay = min(self.backoff_cap, self.backoff_base * 2 ** (n - 1))
        child.restart_at = now + delay
        self.log.warning("%s exited with code %s (%s): restarting in %.1f s", name, code,
                         "instant crash" if instant else "after a healthy run", delay)
        self._set(child, State.BACKOFF, now)
