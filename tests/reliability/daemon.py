"""The real daemon under test: `dual_orchestrator.py run` in a subprocess, on its embedded
redis-server (AOF), local storage or a Supabase stand-in, tiny random SDXL, a shrunk catalog."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

import redis

from tools.small_catalog import write_small_job_types
from tools.tiny_models import TinySDXL

REPO = Path(__file__).resolve().parents[2]
USER = "5f1b9d2c-0000-4000-8000-00000000abcd"
# Settings that keep the suite fast: second-scale heartbeats, short claims, short HTTP timeouts.
FAST = {"DEVICE": "cpu", "CLAIM_TIMEOUT": "0.5", "HEARTBEAT_TTL": "1.5", "MAINTENANCE_INTERVAL": "0.2",
        "HTTP_TIMEOUT": "2", "STOP_GRACE": "10", "LOG_LEVEL": "INFO",
        # One compute thread per worker: torch's default spins a thread per core, and two busy
        # processes on a small CI machine then slow each other down many times over.
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
UNSET = ("REDIS_URL", "UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN", "SUPABASE_URL", "SUPABASE_SERVICE_KEY",
         "SUPABASE_SERVICE_ROLE_KEY", "CALLBACK_SECRET", "FAULT_INJECTION", "WORKER_ID")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> dict[int, str]:
    """Processes below `pid` (children, and the workers its fork server forked) → "command line
    [name]" (Linux /proc; a forked worker names itself, e.g. [image_worker])."""
    parent_of, text = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent_of[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            text[int(entry.name)] = f"{cmd} [{(entry / 'comm').read_text().strip()}]"
        except (OSError, ValueError):
            continue  # exited while we looked
    found, frontier = {}, {pid}
    while frontier:
        frontier = {child for child, parent in parent_of.items() if parent in frontier and child not in found}
        found.update({child: text.get(child, "") for child in frontier})
    return found


def payload(job_type: str = "sdxl_image_fast", num_images: int = 1, **extra) -> dict:
    """A payload shaped like the live queue-job's (CONTRACT.md)."""
    queue = "sdxl_queue" if job_type.startswith("sdxl") else "wan_queue"
    body = {"jobId": str(uuid.uuid4()), "jobType": job_type, "userId": USER, "prompt": "a lighthouse at dusk",
            "imageId": None, "videoId": None, "format": "image", "quality": "fast", "modelType": job_type,
            "isSDXL": job_type.startswith("sdxl"), "numImages": num_images, "bucket": None, "characterId": None,
            "metadata": {"num_images": num_images, "queue": queue}, "timestamp": "2026-11-22T05:00:00Z"}
    body.update(extra)
    return body



def eventually(condition: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return False

class Daemon:
    def __init__(self, root: Path, tiny: TinySDXL, *, steps: int = 1, job_types: dict | None = None,
                 data_dir: Path | None = None, redis_port: int | None = None, **env):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir or self.root / "data"
        catalog = write_small_job_types(self.root / "catalog", steps=steps, job_types=job_types)
        self.redis_port = redis_port or free_port()
        self.health_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if k not in UNSET}
        # The diffusers folder, not the single file: no conversion at each fresh DATA_DIR.
        self.env.update(FAST, DATA_DIR=str(self.data_dir), EMBEDDED_REDIS_PORT=str(self.redis_port),
                        HEALTH_PORT=str(self.health_port), JOB_TYPES_FILE=str(catalog),
                        MODELS_DIR=str(self.root / "models"), SDXL_MODEL_PATH=str(tiny.folder),
                        SDXL_CONFIG_PATH=str(tiny.folder), PYTHONPATH=str(REPO))
        self.env.update({k: str(v) for k, v in env.items()})
        self.log_path = self.root / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.client = redis.Redis(port=self.redis_port, socket_timeout=10)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 120, ready: Callable[["Daemon"], bool] | None = None) -> "Daemon":
        """Start and wait until /health says 200, or until `ready(self)` holds when given."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "dual_orchestrator.py", "run"], cwd=REPO, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            if ready is None:
                self.wait_healthy(timeout)
            else:
                self.wait_until(lambda: ready(self), timeout)
        except BaseException:   # no orphans: the caller has no daemon to stop yet
            self.kill()
            raise
        return self

    def wait_healthy(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            code, report = self.health()
            if code == 200:
                return report
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon is not healthy ({code}): {report}\n{self.log_tail()}")
            time.sleep(0.1)

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not get there in {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 90) -> tuple[int | None, float]:
        """SIGTERM the orchestrator; returns (exit code, seconds it took to exit)."""
        if self.proc is None or self.proc.poll() is not None:
            return (self.proc.returncode if self.proc else None), 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        return code, time.monotonic() - started

    def kill(self) -> None:
        """Last resort at cleanup: SIGKILL the orchestrator and the processes it started."""
        if self.proc is None or self.proc.poll() is not None:
            return
        kids = descendants(self.proc.pid)
        self.proc.kill()
        self.proc.wait(10)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    # --- the daemon's own endpoints ------------------------------------------------------------
    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            return 0, json.dumps({"error": str(exc)}).encode()

    def health(self) -> tuple[int, dict]:
        code, body = self._get("/health")
        try:
            return code, json.loads(body)
        except ValueError:
            return code, {"error": body[:200].decode(errors="replace")}

    def metrics(self) -> dict[str, float]:
        """/metrics as {"name{labels}": value}."""
        _, body = self._get("/metrics")
        samples = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def processes(self) -> dict:
        return self.health()[1].get("processes", {})

    # --- processes ------------------------------------------------------------------------------
    def worker_pid(self, name: str) -> int | None:
        """The pid of worker `name` when the supervisor reports it running, checked in /proc."""
        info = self.processes().get(name, {})
        pid = info.get("pid")
        if info.get("state") != "running" or pid is None:
            return None
        return pid if f"{name}_worker" in descendants(self.proc.pid).get(pid, "") else None

    def kill9(self, pid: int) -> bool:
        return self.signal_child(pid, signal.SIGKILL)

    def signal_child(self, pid: int | None, sig: int) -> bool:
        """Signal one of the orchestrator's processes (checked by ancestry: never a stranger)."""
        if pid is None or pid not in descendants(self.proc.pid):
            return False
        os.kill(pid, sig)
        return True

    def redis_pid(self) -> int | None:
        return next((pid for pid, cmd in descendants(self.proc.pid).items() if "redis-server" in cmd), None)

    # --- jobs -----------------------------------------------------------------------------------
    def push(self, body: dict | bytes | str, queue: str | None = None) -> None:
        if queue is None:
            queue = body["metadata"]["queue"]
        raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
        self.client.lpush(queue, raw)
