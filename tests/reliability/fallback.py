"""Fallback routing (seed 004 phase 2): sdxl jobs whose image worker cannot serve them complete on
the video worker as their job type's fallback, keep their jobId, and say so; sdxl_img2img (no
fallback) fails with the reason. Three daemons, each with a tiny Wan text-to-video model:

  missing checkpoint   the image worker runs but its SDXL file is absent: jobs reroute one by one
  worker given up      the image worker exits at start for good (FATAL): the orchestrator empties sdxl_queue
  fail fast            the same with FALLBACK_ROUTING=0: every sdxl job fails with the reason
"""
from __future__ import annotations

import base64
import io
import time
from pathlib import Path

from PIL import Image

from tests.reliability import Config
from tests.reliability.daemon import USER, Daemon, payload
from tests.reliability.figures import Figures, settle_local, tally_local
from tools.tiny_wan import build_tiny_wan

FALLBACK_OF = {"sdxl_image_fast": "image_fast", "sdxl_image_high": "image_high", "sdxl_image_premium": "image_high"}


def _init_image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 40, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _jobs(count: int) -> list[dict]:
    kinds = list(FALLBACK_OF) * count
    return [payload(kind) for kind in kinds[:count]] + [payload("sdxl_img2img", initImage=_init_image())]


def _image_fatal(daemon: Daemon) -> bool:
    processes = daemon.processes()
    return processes.get("image", {}).get("state") == "fatal" and processes.get("video", {}).get("state") == "running"


def fallback_routing(cfg: Config, root: Path, tiny) -> list[Figures]:
    wan = build_tiny_wan(root / "wan-t2v", "t2v")
    parts = (
        ("missing checkpoint", {"SDXL_MODEL_PATH": str(root / "no-such-checkpoint.safetensors")}, None, True),
        ("worker given up", {"FAULT_INJECTION": 1, "FAULT_EXIT_AT_START": "image"}, _image_fatal, True),
        ("fail fast", {"FAULT_INJECTION": 1, "FAULT_EXIT_AT_START": "image", "FALLBACK_ROUTING": 0}, _image_fatal, False),
    )
    figures = []
    for name, env, ready, routed in parts:
        fig = Figures(f"fallback: {name}", cfg.name)
        started = time.monotonic()
        daemon = Daemon(root / name.replace(" ", "-"), tiny, steps=1, WAN_MODEL_PATH=wan, **env)
        try:
            daemon.start(ready=ready)
            jobs = _jobs(cfg.fallback_jobs)
            for body in jobs:
                daemon.push(body, "sdxl_queue")
            ids = [b["jobId"] for b in jobs]
            settle_local(fig, daemon, ids, cfg.settle_seconds)
            fig.seconds = time.monotonic() - started
            tally_local(fig, daemon, ids)
            _check(fig, daemon, jobs, routed)
        finally:
            daemon.stop()
        figures.append(fig)
    return figures


def _check(fig: Figures, daemon: Daemon, jobs: list[dict], routed: bool) -> None:
    on_video = 0
    for body in jobs:
        job_id, job_type = body["jobId"], body["jobType"]
        record = {k.decode(): v.decode() for k, v in daemon.client.hgetall(f"job:{job_id}").items()}
        outcome = fig.outcomes.get(job_id, {})
        target = FALLBACK_OF.get(job_type) if routed else None
        if target is None:
            fig.require(outcome.get("status") == "failed", f"{job_type} {job_id} should fail, got {outcome.get('status')}")
            continue
        files = sorted(p.name for p in (daemon.data_dir / "storage" / target / USER).glob(f"{job_id}*"))
        fig.require(outcome.get("status") == "completed", f"{job_type} {job_id} did not complete as {target}")
        fig.require(record.get("jobType") == target and record.get("fallback_from") == job_type,
                    f"{job_id}: record says jobType {record.get('jobType')}, fallback_from {record.get('fallback_from')}")
        fig.require(outcome.get("bucket") == target and outcome.get("fallback", {}).get("from") == job_type,
                    f"{job_id}: the completed callback does not say it fell back into {target}: {outcome}")
        fig.require(files == [f"{job_id}_0.png"], f"{job_id}: outputs in {target}/{USER}: {files}")
        on_video += record.get("worker", "").startswith("video")
    fig.notes["completed on the video worker"] = f"{on_video} of {len(jobs)} sdxl jobs"
