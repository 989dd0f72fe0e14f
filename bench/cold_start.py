"""Cold start, measured in a fresh process: process start → SDXL family ready → first job finished.

    python -m bench.cold_start --t0 WALLCLOCK --model FOLDER --data-dir DIR [--compile blocks] [--size 1024]

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
    args = ap.parse_args(argv)
    t0 = args.t0 if args.t0 is not None else time.time()
    marks = {}

    import torch
    from pathlib import Path

    from storage.local import LocalStorage
    from workers.config import Settings, load_catalog
    from workers.pipelines.accel import Acceleration
    from workers.pipelines.base import LoadOptions
    from workers.pipelines.sdxl import SDXLFamily
    from bench.sdxl_bench import compile_stats, make_job, project_call

    marks["imports"] = time.time() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = Path(args.data_dir)
    catalog = load_catalog(args.job_types)
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
    marks["accel"] = family.accel_report
    marks["compile_stats"] = compile_stats()
    print("COLD " + json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in marks.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
