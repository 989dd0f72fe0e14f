"""The benchmark's own code on tiny models (CPU): every part it runs on the GPU machine runs here
too, so a GPU lease never finds it broken. Speed is not asserted; what the bench checks is."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_parts_run_on_tiny_models(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--json", str(out), "--runs", "1",
                           "--work-dir", str(tmp_path / "work"), "--parts", "build,plain,project,wan,preloaded,saturated,together,images,queue"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not [n for n in result["notes"] if "failed" in n or "skipped" in n], result["notes"]
    rows = result["rows"]

    def row(job, variant_start):
        return next(r for r in rows if r["job"] == job and r["variant"].startswith(variant_start))

    # Queue: pickup latency and per-job overhead through the real Runner (local and over HTTP).
    queue_rows = [r for r in rows if r["job"].startswith(("queue pickup", "per-job overhead"))]
    assert len(queue_rows) == 4 and all(0 < r["p50_ms"] <= r["p99_ms"] for r in queue_rows), queue_rows
    # SDXL: the project's 6-image job (decoded image by image) is checked against plain diffusers' latents.
    assert row("sdxl_image_fast x6", "project")["err_vs_plain"] < 1e-3
    # Image models: the project's whole job gives plain diffusers' pixels for the same seed (LoRA too).
    for job in ("z_image_turbo", "qwen_image_2512", "qwen_image_2512_fast", "qwen_image_edit_2511",
                "qwen_image_inpaint_2511"):
        assert row(job, "plain diffusers")["s_median"] > 0
        assert row(job, "project")["img_err_vs_plain"] == 0.0, job
    # Swaps under a budget that holds one large model: models really leave and come back.
    swaps = [r for r in rows if r["job"].startswith("swap")]
    assert len(swaps) == 9 and {r["residency"] for r in swaps} <= {"warm", "resident"}
    assert any(r["evicted"] != "-" for r in swaps)
    # Wan: the eager project path is plain diffusers bit for bit (CPU, fp32).
    assert row("video_fast", "project eager")["err_vs_plain"] == 0.0
    assert row("video_high", "plain diffusers")["runs"] == 1
    # The caching tier reuses 2 of 4 steps, exactly as diffusers' own MagCache hooks do (pixels equal).
    cached = row("video_fast_cached", "project eager + step cache")
    assert cached["plan"] == "CssC" and cached["blocks_run_reused"] == {"cond": [2, 2], "uncond": [2, 2]}
    assert cached["err_vs_plain"] == 0.0 and "err_vs_uncached" in cached
    for family in ("sdxl", "wan"):   # forked from the server that had imported the stack already
        assert row(f"{family} time to ready (preloaded fork)", "forked")["preimported"] is True
    together = row("both workers on one card", "concurrent")
    assert together["sdxl_ready_s"] > 0 and together["wan_ready_s"] > 0
    # Saturated queue: the real image worker process ran every queued job through redis-server.
    for images, count in ((1, 24), (6, 6)):
        saturated = row(f"saturated: sdxl_image_fast x{images}", f"{count} jobs")
        assert len(saturated["job_seconds"]) == count and saturated["window_s"] > 0


def test_cold_start_times_each_deferred_stage():
    """bench/cold_start runs the deferred compile one stage at a time and reports the longest: what a
    job arriving during the compile waits at most."""
    import time

    from bench.cold_start import accelerate_when_idle
    from workers.pipelines.accel import DeferredAcceleration

    class Family(DeferredAcceleration):
        accel_report = {"applied": "compile=blocks"}

        def _deferred_stages(self, accel):
            for seconds in accel:
                time.sleep(seconds)
                yield
            # the last stage ends the generator

    family, marks = Family(), {}
    family.deferred = (0.0, 0.2, 0.0)
    accelerate_when_idle(family, time.time(), marks)
    assert len(marks["stages_s"]) == 4 and family.deferred is None   # three yields, then the end
    assert marks["longest_stage_s"] == max(marks["stages_s"]) >= 0.2 and marks["accelerated"] >= 0.2
    idle, marks = Family(), {}
    accelerate_when_idle(idle, time.time(), marks)                    # nothing deferred: nothing timed
    assert marks == {}
