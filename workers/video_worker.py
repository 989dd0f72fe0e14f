"""Video worker process: Wan on wan_queue (and the deprecated job_queue, drained into it).

Loads, once and before it reports ready, every Wan checkpoint its job types name: text-to-video
(also one-frame images), image-to-video, VACE reference-to-video. A checkpoint that is missing or
unreadable fails only the job types that need it, with the reason; the others are served.
Run by the orchestrator: python -m workers.video_worker
"""
from __future__ import annotations

import sys

from workers.config import Catalog, Settings
from workers.image_worker import pick_device
from workers.worker_process import run_worker


def load_models(catalog: Catalog, settings: Settings, model_keys: list[str]) -> tuple[dict, dict[str, str]]:
    from workers.media import ImageLimits
    from workers.pipelines.base import LoadOptions, ModelUnavailable
    from workers.pipelines.wan import KINDS, WanFamily
    from workers.pipelines.wan_accel import WanAcceleration

    device = pick_device(settings.device)
    budget = int(settings.video_vram_budget_gib * 2**30) if settings.video_vram_budget_gib else None
    limits = ImageLimits.from_catalog(catalog.limits, timeout=settings.http_timeout)
    shared: dict = {}   # one text encoder / VAE for every checkpoint that ships the same files
    families, errors = {}, {}
    for key in model_keys:
        model = catalog.models[key]
        if model.family not in KINDS:
            errors[key] = f"the video worker has no {model.family!r} pipeline"
            continue
        options = LoadOptions(model_path=settings.model_path(model), config_path=None, device=device,
                              cache_dir=None, vram_budget_bytes=budget)
        try:
            accel = WanAcceleration.for_model(catalog, key, settings) if str(device).startswith("cuda") else None
            families[key] = WanFamily.load(options, limits=limits, kind=model.family, shared=shared, accel=accel,
                                           magcache=model.magcache)
        except ModelUnavailable as exc:
            hint = f"; set {model.env} (absolute, or relative to MODELS_DIR)" if model.env else ""
            errors[key] = f"{exc}{hint}"
    return families, errors


if __name__ == "__main__":
    sys.exit(run_worker("video", load_models))
