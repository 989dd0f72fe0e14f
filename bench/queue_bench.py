"""CPU part: queue pickup latency and per-job overhead outside generation, with a tiny SDXL.

A real redis-server and the real Runner (claim → parse → records → processing callback → check →
generate → PNG + upload → completed record, outbox and ack → callback), serving in a thread as in the worker
process. The producer LPUSHes one job at a time, after the previous one was acknowledged and a short
random pause, so the worker is idle (blocked in BLMOVE) at every push. Two set-ups: local mode (local
storage, local status records) and Supabase mode (HTTP uploads and callbacks to the test stand-in on
loopback). Also: PNG encoding of 1024² images, one by one and in parallel (media.encode_pngs).
"""
from __future__ import annotations

import json
import random
import shutil
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from bench.common import Report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(data_dir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = _free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.02)


class Marks:
    """perf_counter() stamps per job id, written by wrappers around the queue and the family."""

    def __init__(self):
        self.at: dict[str, dict[str, float]] = {}
        self.done = threading.Event()

    def stamp(self, job_id: str | None, name: str) -> None:
        self.at.setdefault(job_id or "?", {})[name] = time.perf_counter()


class TimedFamily:
    def __init__(self, family, marks: Marks):
        self.family, self.marks = family, marks

    def check(self, job):
        self.marks.stamp(job.job_id, "check")
        return self.family.check(job)

    def generate(self, job, on_step):
        self.marks.stamp(job.job_id, "gen_start")
        try:
            return self.family.generate(job, on_step)
        finally:
            self.marks.stamp(job.job_id, "gen_end")


def _instrument(queue, marks: Marks) -> None:
    claim, ack = queue.claim, queue.ack

    def timed_claim(timeout, **kwargs):   # whatever the Runner passes on (e.g. prefer=)
        got = claim(timeout, **kwargs)
        if got is not None:
            marks.stamp(got.job_id, "claimed")
        return got

    def timed_ack(c, pipe=None):   # queued in the job's end transaction, which executes right after
        ack(c, pipe)
        marks.stamp(c.job_id, "acked")
        marks.done.set()

    queue.claim, queue.ack = timed_claim, timed_ack


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def serve_and_measure(env: dict, family, jobs: int) -> dict:
    from storage import make_storage
    from workers.callback import CallbackOutbox, make_callback_sink
    from workers.config import Settings, load_catalog
    from workers.queue import JobRecords, ReliableQueue, connect
    from workers.runner import Runner

    settings = Settings.from_env(env)
    catalog = load_catalog(settings.job_types_file)
    client = connect(settings.redis_url, settings.claim_timeout)
    client.flushall()
    queue = ReliableQueue(client, "sdxl_queue", "bench-worker", settings.heartbeat_ttl)
    queue.register({"state": "idle"})
    marks = Marks()
    _instrument(queue, marks)
    runner = Runner(catalog=catalog, settings=settings, queue=queue, records=JobRecords(client),
                    storage=make_storage(settings), outbox=CallbackOutbox(client, make_callback_sink(settings)),
                    families={"lustify_sdxl": TimedFamily(family, marks)}, load_errors={}, worker_type="SDXL")
    thread = threading.Thread(target=runner.serve, name="runner", daemon=True)
    thread.start()
    producer = redis.Redis.from_url(settings.redis_url)
    pushed = {}
    try:
        for i in range(jobs + 3):  # the first 3 warm up (imports, first PNG, first HTTP connection)
            time.sleep(random.uniform(0.01, 0.03))
            job_id = f"queue-bench-{i}"
            payload = {"jobId": job_id, "jobType": "sdxl_image_fast", "userId": "bench-user", "prompt": "a lighthouse",
                       "numImages": 1, "seed": i}
            marks.done.clear()
            pushed[job_id] = time.perf_counter()
            producer.lpush("sdxl_queue", json.dumps(payload))
            if not marks.done.wait(60):
                raise RuntimeError(f"job {job_id} was not acknowledged within 60 s")
    finally:
        runner.stop.graceful.set()
        thread.join(settings.claim_timeout + 10)
    rows = [dict(marks.at[j], pushed=t) for j, t in list(pushed.items())[3:]]
    ms = lambda a, b: [1e3 * (r[b] - r[a]) for r in rows]  # noqa: E731
    gen = ms("gen_start", "gen_end")
    overhead = [total - g for total, g in zip(ms("claimed", "acked"), gen)]
    series = {"pickup_lpush_to_claim_ms": ms("pushed", "claimed"), "pickup_lpush_to_job_start_ms": ms("pushed", "check"),
              "before_generation_ms": ms("claimed", "gen_start"), "after_generation_ms": ms("gen_end", "acked"),
              "overhead_outside_generation_ms": overhead, "generation_ms": gen}
    return {name: {"p50": round(pct(v, 50), 2), "p99": round(pct(v, 99), 2), "mean": round(statistics.mean(v), 2)}
            for name, v in series.items()} | {"jobs": len(rows)}


def png_encoding(report: Report) -> None:
    from workers import media

    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)) for _ in range(6)]
    ramp = np.linspace(0, 255, 1024, dtype=np.float32)
    smooth = [Image.fromarray(np.stack([np.add.outer(ramp, ramp * k / 6) % 256] * 3, -1).astype(np.uint8)) for k in range(6)]
    out = {}
    for kind, images in (("noise", noise), ("smooth", smooth)):
        for n in (1, 6):
            t0 = time.perf_counter()
            serial = [media.encode_png(im) for im in images[:n]]
            t1 = time.perf_counter()
            parallel = media.encode_pngs(images[:n])
            t2 = time.perf_counter()
            assert serial == parallel
            out[f"{kind} x{n}"] = {"serial_ms": round(1e3 * (t1 - t0), 1), "encode_pngs_ms": round(1e3 * (t2 - t1), 1)}
    report.meta["png_encode_1024"] = out
    report.say("PNG encoding of 1024² images (CPU)", json.dumps(out))


def run_queue(report: Report, work: Path, jobs: int = 100) -> None:
    from tests.supabase_standin import SupabaseStandin
    from tools.small_catalog import write_small_job_types
    from tools.tiny_models import build_tiny_sdxl
    from workers.pipelines.base import LoadOptions
    from workers.pipelines.sdxl import SDXLFamily

    work.mkdir(parents=True, exist_ok=True)
    png_encoding(report)
    tiny = build_tiny_sdxl(work / "models")
    catalog_file = write_small_job_types(work / "catalog", width=64, height=64, steps=1, frames=5)
    family = SDXLFamily.load(LoadOptions(model_path=tiny.folder, config_path=None, device="cpu", cache_dir=None))
    proc, url = start_redis(work / "redis")
    base = {"REDIS_URL": url, "JOB_TYPES_FILE": str(catalog_file), "DEVICE": "cpu", "MODELS_DIR": str(work / "models"),
            "CLAIM_TIMEOUT": "5", "MAINTENANCE_INTERVAL": "5", "HEARTBEAT_TTL": "30"}
    try:
        local = serve_and_measure({**base, "DATA_DIR": str(work / "data-local")}, family, jobs)
        with SupabaseStandin(service_key="bench-key") as cloud:
            remote = serve_and_measure({**base, "DATA_DIR": str(work / "data-http"), "SUPABASE_URL": cloud.url,
                                        "SUPABASE_SERVICE_KEY": "bench-key"}, family, jobs)
    finally:
        proc.terminate()
        proc.wait(10)
    for mode, res in (("local storage + local status", local), ("Supabase stand-in over HTTP", remote)):
        report.meta[f"queue {mode}"] = res
        report.say(f"queue ({mode})", json.dumps(res))
        report.row("queue pickup (idle worker, CPU)", mode, None, p50_ms=res["pickup_lpush_to_job_start_ms"]["p50"],
                   p99_ms=res["pickup_lpush_to_job_start_ms"]["p99"],
                   claim_p50_ms=res["pickup_lpush_to_claim_ms"]["p50"], jobs=res["jobs"])
        report.row("per-job overhead outside generation (CPU)", mode, None,
                   p50_ms=res["overhead_outside_generation_ms"]["p50"], p99_ms=res["overhead_outside_generation_ms"]["p99"],
                   before_gen_p50_ms=res["before_generation_ms"]["p50"], after_gen_p50_ms=res["after_generation_ms"]["p50"])
