"""Worker processes forked from a server that has already imported torch, diffusers and the pipelines.

    spawn = PreloadedSpawner()                      # the supervisor's `spawn`: argv, env → a Popen-like handle
    proc = spawn([sys.executable, "-m", "workers.image_worker"], env)
    proc.poll(); proc.send_signal(signal.SIGTERM); proc.wait(timeout=5); proc.kill()

Importing the stack is a fixed cost of every worker start: 13.9 s of a 43 s SDXL restart on the H200
(torch 4.0 s, torch._dynamo 3.6 s, the rest diffusers and transformers), 5.4 s on a 2-core CPU. A
fork server (multiprocessing's "forkserver") imports it once; each worker is forked from it, so a
restart after a crash or an out-of-memory exit starts at loading the weights. The server never
touches CUDA (nothing here does at import, and PYTORCH_NVML_BASED_CUDA_CHECK keeps an availability
check off the CUDA runtime), so a forked worker initialises CUDA itself. If that fails anyway, the
worker replaces itself with a fresh interpreter (exec, same pid): never worse than a plain start.
Other argv (the gateway, anything not `-m workers.*_worker`) start as plain subprocesses.
PRELOAD_WORKERS=0 starts every worker as a plain subprocess.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import runpy
import subprocess
import sys
import time

log = logging.getLogger(__name__)
PRELOAD = ("torch", "diffusers", "transformers", "workers.runner", "workers.pipelines.sdxl",
           "workers.pipelines.wan", "workers.pipelines.qwen_image", "workers.pipelines.z_image",
           "workers.image_worker", "workers.video_worker")


def worker_module(argv: list[str]) -> str | None:
    """`python -m workers.X_worker` → "workers.X_worker"; anything else None."""
    if len(argv) == 3 and argv[1] == "-m" and argv[2].startswith("workers.") and argv[2].endswith("_worker"):
        return argv[2]
    return None


class ForkedWorker:
    """What the supervisor uses of subprocess.Popen, for a process forked by the fork server."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self.process = process
        self.pid = process.pid
        self.args = process.name

    def poll(self) -> int | None:
        return self.process.exitcode   # negative signal number when killed, as Popen

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()


class PreloadedSpawner:
    def __init__(self, modules: tuple[str, ...] = PRELOAD, forkable=worker_module):
        self.forkable = forkable   # argv → the module to run forked, or None for a plain subprocess
        # Before the server starts: its environment (and so torch's) is this process's.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(modules))

    def warm(self) -> float:
        """Start the server and wait until its imports are done (a no-op child is forked after them),
        so that no spawn later blocks on them while the supervisor holds its lock. Returns seconds."""
        started = time.monotonic()
        process = self.context.Process(target=_noop, name="preload-warm-up")
        process.start()
        process.join()
        return time.monotonic() - started

    def __call__(self, argv: list[str], env: dict[str, str]):
        module = self.forkable(argv)
        if module is None:
            return subprocess.Popen(argv, env=env)
        process = self.context.Process(target=run_forked, args=(module, env, argv), name=module, daemon=False)
        process.start()
        return ForkedWorker(process)


def _noop() -> None:
    """The warm-up child: forked once the server's imports are done; nothing to do."""


def run_forked(module: str, env: dict[str, str], argv: list[str]) -> None:
    """In the forked child: the worker's environment, CUDA checked, then the module as `python -m` runs it."""
    from workers.worker_process import use_expandable_segments

    os.environ.clear()
    os.environ.update(env)
    use_expandable_segments()   # before the CUDA check starts CUDA: the allocator reads its settings once
    _name_process(module.rsplit(".", 1)[-1])
    if not _cuda_usable_after_fork():
        os.execve(argv[0], argv, env)   # a fresh interpreter in this process: the plain start
    sys.argv = [module, *argv[3:]]   # as `python -m module args...` would see them
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        # multiprocessing ends a forked child with os._exit: flush what the worker printed.
        sys.stdout.flush()
        sys.stderr.flush()


def _name_process(name: str) -> None:
    """`ps -o comm` and top show the worker, not the fork server's command line (Linux only)."""
    try:
        with open("/proc/self/comm", "w") as fh:
            fh.write(name[:15])
    except OSError:
        pass   # not Linux, or /proc not writable: only the name shown by ps differs


def _cuda_usable_after_fork() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return True
    try:
        if torch.cuda._is_in_bad_fork():   # the server initialised CUDA after all
            return False
        if torch.cuda.is_available():
            torch.cuda.init()
        return True
    except Exception as exc:  # noqa: BLE001 — any CUDA start-up error: fall back to a plain start
        print(f"preloaded worker cannot use CUDA after fork ({type(exc).__name__}: {exc}); "
              "starting a fresh interpreter", file=sys.stderr, flush=True)
        return False
