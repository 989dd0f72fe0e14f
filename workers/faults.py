"""Fault injection, a testing facility of the reliability suite (tests/reliability). OFF by default.

With FAULT_INJECTION=1 a worker honours a marker in a job payload, top level or in `metadata`:

    "faultInjection": "oom"     generation raises a CUDA-out-of-memory error at its first step
    "faultInjection": "crash"   the worker process kills itself (SIGKILL) at the first step,
                                as a segfault or the kernel's OOM killer would

and FAULT_EXIT_AT_START=image (or video, or both, comma-separated) makes that worker exit at start
with EX_CONFIG, so the orchestrator gives it up at once (FATAL): how the suite stops a worker for good.

Without FAULT_INJECTION the marker is an ignored extra field, like any other. The runner consults
this module at one point only, `during_generation`, from its step callback. A worker refuses to
start with FAULT_INJECTION while SUPABASE_URL points at a non-local host (a real project), unless
FAULT_INJECTION_ALLOW_REMOTE=1 says that is meant.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Mapping
from urllib.parse import urlparse

from workers.config import ConfigError

ENV = "FAULT_INJECTION"
ALLOW_REMOTE_ENV = "FAULT_INJECTION_ALLOW_REMOTE"
EXIT_AT_START_ENV = "FAULT_EXIT_AT_START"
MARKER = "faultInjection"
KINDS = ("oom", "crash")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB (injected by FAULT_INJECTION)"

log = logging.getLogger("workers.faults")
_enabled = False


def configure(env: Mapping[str, str] | None = None) -> bool:
    """Read FAULT_INJECTION once, at worker start. Returns whether injection is on; raises ConfigError
    for a value it does not know or for a remote SUPABASE_URL without the explicit allowance."""
    global _enabled
    env = os.environ if env is None else env
    value = (env.get(ENV) or "").strip().lower()
    if value in ("", "0", "off", "false", "no"):
        _enabled = False
        return False
    if value not in ("1", "on", "true", "yes"):
        raise ConfigError(f"{ENV}={value!r}: use 1 to turn fault injection on, or leave it unset")
    host = urlparse(env.get("SUPABASE_URL") or "").hostname
    if host and host not in LOCAL_HOSTS and env.get(ALLOW_REMOTE_ENV) != "1":
        raise ConfigError(f"{ENV} is on while SUPABASE_URL points at {host}, a real project; "
                          f"set {ALLOW_REMOTE_ENV}=1 if that is really meant")
    _enabled = True
    log.warning("FAULT INJECTION IS ON: payloads marked %r can fail or crash this worker (testing only)", MARKER)
    return True


def enabled() -> bool:
    return _enabled


def exits_at_start(worker: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether this worker is told to exit at start (only with fault injection on)."""
    names = ((os.environ if env is None else env).get(EXIT_AT_START_ENV) or "").split(",")
    return _enabled and worker in (n.strip() for n in names)


def marker(payload: object) -> str | None:
    """The fault a payload asks for, or None."""
    if not isinstance(payload, dict):
        return None
    meta = payload.get("metadata")
    value = payload.get(MARKER)
    if value is None and isinstance(meta, dict):
        value = meta.get(MARKER)
    return value if value in KINDS else None


def during_generation(payload: object) -> None:
    """Called at each generation step; a no-op unless configured on and the payload is marked."""
    if not _enabled:
        return
    kind = marker(payload)
    if kind == "oom":
        # What torch raises (torch.cuda.OutOfMemoryError is a RuntimeError with this text).
        raise RuntimeError(OOM_MESSAGE)
    if kind == "crash":
        log.error("fault injection: killing this worker (pid %d) mid-job", os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
