"""The RYLA gateway as a real process (python -m gateway) next to real workers, for tests."""
from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from PIL import Image

from tests.conftest import free_port
from tools.small_catalog import write_small_job_types

REPO = Path(__file__).resolve().parent.parent


@dataclass
class GatewayProcess:
    env: dict
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "GatewayProcess":
        ready = self.log_path.with_suffix(f".{uuid.uuid4().hex[:6]}.ready")
        env = {**os.environ, **self.env, "GATEWAY_PORT": str(self.port), "WORKER_READY_FILE": str(ready),
               "PYTHONPATH": str(REPO)}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=REPO, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not become ready:\n{self.output()}")
            time.sleep(0.05)
        return self

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 15 s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode


def image_uri(size=(48, 80), color=(200, 30, 30), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def decoded(response: httpx.Response) -> Image.Image:
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


SERVED_FAMILIES = ("sdxl", "wan", "wan_i2v", "wan_vace")   # what the test workers load


def sdxl_and_wan_catalog(directory: Path, served=SERVED_FAMILIES, **overrides) -> Path:
    """A small catalog (tools/small_catalog.py) whose RYLA endpoints serve only the job types of the
    model families the test workers load (`served`); the others answer 501, as on a pod without them."""
    path = write_small_job_types(directory, **overrides)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for entry in raw.get("ryla", {}).values():
        spec = raw["job_types"].get(entry.get("job_type"))
        if spec is not None and raw["models"][spec["model"]]["family"] not in served:
            entry["needs"] = entry.get("needs") or f"{entry['job_type']}'s model (not in the test workers)"
            entry["job_type"] = entry["job_type"] + "_not_loaded"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path
