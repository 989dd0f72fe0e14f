"""Cold start, measured in a fresh process: process start → family ready → first job finished.

    python -m bench.cold_start --t0 WALLCLOCK --model FOLDER --data-dir DIR [--compile blocks] [--size 1024]
    python -m bench.cold_start --family wan --t0 WALLCLOCK --model FOLDER --data-dir DIR

SDXL: one sdxl_image_fast image, then (--all-jobs) the 6-image job. With compile_at: idle the first
job runs before the deferred compile and warm-ups, which run next (`accelerated`), as in a worker
that found its queue empty. Wan (the video worker's load:
the catalog's optimize block): video_fast, then image_fast at its default_images. Peak GPU memory
of the process (allocated and reserved by PyTorch) is reported: one worker's share of the card.

Prints one line `COLD {json}` with seconds since --t0 (the parent's time.time() just before it
started this process, so interpreter start and imports count). Run by bench.run after the
in-process part has filled DATA_DIR/compile-cache (the warm-cache case).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t0", type=float, default=None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--compile", default="config", choices=("config", "off", "none", "blocks", "unet"),
                    help="config: the model's optimize block in the catalog, as the worker does")
    ap.add_argument("--size", type=int, default=1024, help="warm-up size when --compile is not config")
    ap.add_argument("--batches", default="1,6", help="warm-up batch sizes when --compile is not config")
    ap.add_argument("--steps", type=int, default=None, help="override the job's steps (tiny smoke runs)")
    ap.add_argument("--job-types", default=None, help="catalog file (default: the repository's)")
    ap.add_argument("--family", default="sdxl", choices=("sdxl", "wan"))
    ap.add_argument("--all-jobs", action="store_true", help="SDXL: also the 6-image job after the first")
    ap.add_argument("--out", default=None, help="also write the result JSON here (a forked child's stdout is not a pipe)")
    args = ap.parse_args(argv)
    t0 = args.t0 if args.t0 is not None else time.time()
    marks = {"preimported": "torch" in sys.modules}   # forked from the preloaded server (workers/preload.py)
    from workers.worker_process import use_expandable_segments

    use_expandable_segments()   # as workers/worker_process.py does

    import torch
    from pathlib import Path

    from storage.local import LocalStorage
    from workers.config import Settings, load_catalog
    from workers.pipelines.accel import Acceleration
    from workers.pipelines.base import LoadOptions
    from workers.pipelines.sdxl import SDXLFamily
    from bench.common import compile_stats
    from bench.sdxl_bench import make_job, project_call

    marks["imports"] = time.time() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = Path(args.data_dir)
    catalog = load_catalog(args.job_types)
    if args.family == "wan":
        return wan_main(args, t0, marks, catalog, device, data)
    job = make_job(catalog, "sdxl_image_fast", 1)
    accel = None
    if args.compile == "config":
        accel = SDXLFamily.acceleration_for(catalog, job.spec.model, Settings.from_env({"DATA_DIR": str(data)}))
    elif args.compile != "off":
        batches = [int(b) for b in args.batches.split(",")]
        accel = Acceleration(compile=args.compile, warmup=tuple((b, args.size, args.size) for b in batches),
                             cache_dir=data / "compile-cache")
    family = SDXLFamily.load(LoadOptions(model_path=Path(args.model), config_path=None, device=device, cache_dir=None),
                             accel=accel)
    if device == "cuda":
        torch.cuda.synchronize()
    marks["ready"] = time.time() - t0
    if args.steps:
        import dataclasses
        job = dataclasses.replace(job, steps=args.steps)
    project_call(family, job, LocalStorage(data / "storage"))
    marks["first_job_done"] = time.time() - t0
    accelerate_when_idle(family, t0, marks)
    if args.all_jobs:
        t1 = time.time()
        project_call(family, make_job(catalog, "sdxl_image_fast", 6), LocalStorage(data / "storage"))
        marks["x6_job_s"] = time.time() - t1
    marks.update(peak_memory())
    marks["accel"] = family.accel_report
    marks["compile_stats"] = compile_stats()
    return emit(args, marks)


def accelerate_when_idle(family, t0: float, marks: dict) -> None:
    """compile_at: idle — what the worker does once its queue is empty after the first job; the
    jobs after this run fully accelerated (`accelerated`: seconds since process start). Run one
    stage at a time, as when jobs keep arriving: `stages_s` are their seconds, and the longest is
    the most a job that arrives during the compile waits (`longest_stage_s`)."""
    import torch

    stages = []
    while family.deferred is not None:
        t1 = time.time()
        report = family.accelerate_deferred(pause=lambda: True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stages.append(round(time.time() - t1, 2))
        if report is not None:
            marks["accelerated"] = time.time() - t0
    if stages:
        marks["stages_s"], marks["longest_stage_s"] = stages, max(stages)


def emit(args, marks: dict) -> int:
    line = json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in marks.items()})
    print("COLD " + line, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(line)
    return 0


def peak_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "card_used_now_gib": (total - free) / 2**30}


def wan_main(args, t0: float, marks: dict, catalog, device: str, data) -> int:
    from pathlib import Path

    import torch

    from bench.wan_bench import MODEL_KEY, make_job, project_call
    from storage.local import LocalStorage
    from workers.config import Settings
    from workers.pipelines.base import LoadOptions
    from workers.pipelines.wan import WanFamily
    from workers.pipelines.wan_accel import WanAcceleration

    accel = WanAcceleration.for_model(catalog, MODEL_KEY, Settings.from_env({"DATA_DIR": str(data)}))
    family = WanFamily.load(LoadOptions(model_path=Path(args.model), config_path=None, device=device, cache_dir=None),
                            accel=accel)
    if device == "cuda":
        torch.cuda.synchronize()
    marks["ready"] = time.time() - t0
    storage = LocalStorage(data / "storage")
    for name in ("video_fast", "image_fast"):
        t1 = time.time()
        project_call(family, make_job(catalog, name), storage)
        marks[f"{name}_job_s"] = time.time() - t1
        if name == "video_fast":
            marks["first_job_done"] = time.time() - t0
            accelerate_when_idle(family, t0, marks)
    marks["accel"] = family.accel_report
    marks.update(peak_memory())
    return emit(args, marks)


if __name__ == "__main__":
    sys.exit(main())
