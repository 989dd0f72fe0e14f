"""Start real worker processes against a real redis-server, and wait for what they do."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
USER = "5f1b9d2c-0000-4000-8000-00000000abcd"


def contract_payload(job_type: str = "sdxl_image_fast", **extra) -> dict:
    """A payload shaped like the live queue-job's (CONTRACT.md)."""
    job_id = str(uuid.uuid4())
    queue = "wan_queue" if not job_type.startswith("sdxl") else "sdxl_queue"
    body = {"jobId": job_id, "jobType": job_type, "userId": USER, "prompt": "a lighthouse at dusk",
            "imageId": None, "videoId": None, "format": "image", "quality": "fast", "modelType": job_type,
            "modelVariant": "lustify_sdxl", "isSDXL": job_type.startswith("sdxl"), "numImages": 2,
            "bucket": None, "characterId": None, "metadata": {"num_images": 2, "queue": queue},
            "timestamp": "2026-11-22T05:00:00Z"}
    body.update(extra)
    return body


@dataclass
class WorkerProcess:
    name: str
    env: dict
    log_path: Path
    proc: subprocess.Popen | None = None
    ready_file: Path | None = None
    log: object = field(default=None, repr=False)

    def start(self, timeout: float = 120) -> "WorkerProcess":
        self.ready_file = self.log_path.with_suffix(f".{uuid.uuid4().hex[:6]}.ready")
        env = {**os.environ, **self.env, "WORKER_READY_FILE": str(self.ready_file), "PYTHONPATH": str(REPO)}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", f"workers.{self.name}_worker"], env=env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} worker did not become ready:\n{self.output()}")
            time.sleep(0.05)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def worker_env(redis_url: str, data_dir: Path, job_types: Path, model_file: Path, config_dir: Path, **extra) -> dict:
    return {"REDIS_URL": redis_url, "DATA_DIR": str(data_dir), "JOB_TYPES_FILE": str(job_types),
            "MODELS_DIR": str(data_dir / "models"), "SDXL_MODEL_PATH": str(model_file),
            "SDXL_CONFIG_PATH": str(config_dir), "DEVICE": "cpu", "HEARTBEAT_TTL": "1.5",
            "CLAIM_TIMEOUT": "0.5", "MAINTENANCE_INTERVAL": "0.2", "HTTP_TIMEOUT": "5",
            "WORKER_ID": f"test-{uuid.uuid4().hex[:8]}", "STOP_GRACE": "20", **extra}


def wait_for(client: redis.Redis, job_id: str, statuses=("completed", "failed"), timeout: float = 120, field="status"):
    """Poll the job record until `field` takes one of `statuses`; returns the record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = client.hgetall(f"job:{job_id}")
        record = {k.decode(): v.decode() for k, v in raw.items()}
        if record.get(field) in statuses:
            return record
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} never reached {statuses}: {record}")


TERMINAL = ("completed", "failed")


def delivered_callbacks(read, job_id: str, timeout: float = 10) -> list[dict]:
    """The callback bodies `read()` holds for a job, once its terminal one arrived. The worker commits
    the record and the outbox entry in one transaction and delivers just after, so a test that saw the
    record turn terminal may look at the receiver a moment before that delivery."""
    deadline = time.monotonic() + timeout
    while True:
        bodies = [b for b in read() if b.get("jobId") == job_id]
        if (bodies and bodies[-1].get("status") in TERMINAL) or time.monotonic() > deadline:
            return bodies
        time.sleep(0.02)


def local_callbacks(tmp_path: Path, job_id: str) -> list[dict]:
    """Callbacks the local sink logged (DATA_DIR=tmp_path/data), waiting for the terminal one."""
    log = tmp_path / "data" / "jobs" / "callbacks.jsonl"
    return delivered_callbacks(lambda: [json.loads(line) for line in log.read_text().splitlines()]
                               if log.exists() else [], job_id)


def push(client: redis.Redis, payload: dict | str | bytes, queue: str = "sdxl_queue") -> None:
    client.lpush(queue, payload if isinstance(payload, (str, bytes)) else json.dumps(payload))


class WorkerStarter:
    """Starts worker processes on tiny SDXL (and whatever `**env` adds) for one test; `stop_all` at the end."""

    def __init__(self, tmp_path: Path, redis_url: str, tiny_sdxl):
        self.tmp_path, self.redis_url, self.tiny_sdxl = tmp_path, redis_url, tiny_sdxl
        self.started: list[WorkerProcess] = []

    def start(self, name: str = "image", job_types: Path | None = None, **env) -> WorkerProcess:
        from tools.small_catalog import write_small_job_types

        job_types = job_types or write_small_job_types(self.tmp_path / "catalog", steps=2)
        full_env = worker_env(self.redis_url, self.tmp_path / "data", job_types, self.tiny_sdxl.single_file,
                              self.tiny_sdxl.folder, **env)
        worker = WorkerProcess(name, full_env, self.tmp_path / f"{name}-{len(self.started)}.log")
        self.started.append(worker)
        return worker.start()

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.proc and worker.proc.poll() is None:
                worker.stop()
