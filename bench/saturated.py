"""GPU busy under a saturated queue: the real image worker process (workers.image_worker, the
production settings, the Finisher on) fed a queue of jobs at once through a real redis-server.

    run_saturated(report, state)     # part `saturated` of bench.run

For each batch (N one-image jobs, then N six-image jobs): the window from the first job's start to
the last job's completion (the workers' own records), seconds per job in that window, and the
card's mean utilisation in it (`nvidia-smi utilization.gpu`: the share of time a kernel ran, sampled
every 100 ms), and for one-image jobs the kernel time of one profiled job (the `project` part's
GPU timeline) over the seconds a job takes here. With the Finisher, PNG encoding, upload and
callback of one job overlap the next job's generation, so the card should hardly wait between jobs. The worker reads the compile cache
under the bench's data folder, as the `project` part left it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
USER = "0c5a7e11-5a70-4a7e-9000-00000000b0b0"


class UtilisationSampler:
    """nvidia-smi's utilization.gpu every 100 ms, stamped with time.time(); empty without nvidia-smi."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            first = line.strip().split(",")[0].strip()
            if first.isdigit():
                self.samples.append((time.time(), float(first)))

    def mean(self, start: float, end: float) -> float | None:
        inside = [value for stamp, value in self.samples if start <= stamp <= end]
        return round(sum(inside) / len(inside), 1) if inside else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)


def _start_worker(state: dict, redis_url: str, log_path: Path, timeout: float) -> subprocess.Popen:
    ready = log_path.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)
    env = {**os.environ, "REDIS_URL": redis_url, "DATA_DIR": str(state["work"] / "data"),
           "SDXL_MODEL_PATH": str(state["folder"]), "MODELS_DIR": str(state["work"] / "models"),
           "WORKER_READY_FILE": str(ready), "ALLOW_UNPINNED_STACK": "1", "WORKER_ID": f"bench-{uuid.uuid4().hex[:6]}", "CLAIM_TIMEOUT": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if state.get("catalog_file"):
        env["JOB_TYPES_FILE"] = str(state["catalog_file"])
    if state["device"] == "cpu":
        env["DEVICE"] = "cpu"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "workers.image_worker"], env=env, cwd=REPO,
                                stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"image worker not ready: {log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return proc


def _wait_for_line(log_path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker never logged {text!r}")
        time.sleep(0.2)


def _run_batch(client, catalog, sampler: UtilisationSampler, count: int, images: int, timeout: float) -> dict:
    from workers.queue import JobRecords
    from workers.submit import enqueue, new_payload

    payloads = [new_payload(catalog, "sdxl_image_fast", f"a lighthouse at dusk, study {i}", USER, num_images=images)
                for i in range(count)]
    for payload in payloads:
        enqueue(client, catalog, payload)
    records, deadline = JobRecords(client), time.monotonic() + timeout
    while True:
        done = [records.get(p["jobId"]) for p in payloads]
        if all(r.get("status") in ("completed", "failed") for r in done):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"saturated: {sum(r.get('status') == 'completed' for r in done)}/{count} done in time")
        time.sleep(0.1)
    failed = [r.get("error") or r.get("errorMessage") or r for r in done if r["status"] != "completed"]
    if failed:
        raise RuntimeError(f"saturated: {len(failed)} job(s) failed: {str(failed[0])[:300]}")
    start = min(float(r["started_at"]) for r in done)
    end = max(float(r["completed_at"]) for r in done)
    return {"window_s": round(end - start, 3), "per_job_s": round((end - start) / count, 4),
            # Each nvidia-smi sample covers the period before it (up to 1 s): skip the first second,
            # whose samples also saw the idle card before the batch.
            "gpu_busy_pct": sampler.mean(start + 1.0, end),
            "job_seconds": sorted(round(float(r["seconds"]), 3) for r in done)}


def run_saturated(report, state: dict, count: int = 24) -> None:
    import redis

    from bench.queue_bench import start_redis

    catalog = state["catalog"]
    server, url = start_redis(state["work"] / "saturated-redis")
    sampler = UtilisationSampler()
    proc = None
    try:
        t0 = time.monotonic()
        log_path = state["work"] / "saturated-worker.log"
        proc = _start_worker(state, url, log_path, max(60, report.left() - 60))
        report.say(f"saturated: image worker ready in {time.monotonic() - t0:.1f}s")
        client = redis.Redis.from_url(url)
        _run_batch(client, catalog, sampler, 2, 1, max(30, report.left() - 30))   # warm: first-job effects out
        if state["device"] == "cuda":   # compile_at: idle — the worker compiles once its queue is empty
            _wait_for_line(log_path, "accelerated while idle", max(30, report.left() - 60))
            report.say(f"saturated: image worker fully accelerated {time.monotonic() - t0:.1f}s after its start")
        # Kernel time of one profiled sdxl_image_fast job (the `project` part, when it ran): a second
        # busy measure, independent of nvidia-smi's sampling.
        profiled = next((g["gpu_busy_ms"] for g in report.meta.get("gaps", {}).values() if "gpu_busy_ms" in g), None)
        for images, n in ((1, count), (6, max(2, count // 4))):
            r = _run_batch(client, catalog, sampler, n, images, max(30, report.left() - 30))
            if images == 1 and profiled:
                r["kernel_share_pct"] = round(100 * profiled / 1000 / r["per_job_s"], 1)
            report.row(f"saturated: sdxl_image_fast x{images}", f"{n} jobs queued at once, image worker process",
                       [r["per_job_s"]], **r)
    finally:
        sampler.stop()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.terminate()
        server.wait(10)
