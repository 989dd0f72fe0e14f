"""Image worker process: SDXL (single-file LUSTIFY checkpoint or a diffusers folder) on sdxl_queue.

Run by the orchestrator: python -m workers.image_worker
"""
from __future__ import annotations

import sys

from workers.config import Catalog, Settings
from workers.worker_process import run_worker


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_models(catalog: Catalog, settings: Settings, model_keys: list[str]) -> tuple[dict, dict[str, str]]:
    """Load every model this worker's job types name, once. A missing one fails its jobs, not the worker."""
    from workers.pipelines.base import LoadOptions, ModelUnavailable
    from workers.pipelines.sdxl import ImageLimits, SDXLFamily

    classes = {"sdxl": SDXLFamily}
    device = pick_device(settings.device)
    families, errors = {}, {}
    for key in model_keys:
        model = catalog.models[key]
        family_class = classes.get(model.family)
        if family_class is None:
            errors[key] = f"the image worker has no {model.family!r} pipeline"
            continue
        options = LoadOptions(model_path=settings.model_path(model), config_path=settings.model_config_path(model),
                              device=device, cache_dir=settings.data_dir / "converted")
        try:
            extra = {"accel": family_class.acceleration_for(catalog, key, settings)} if device == "cuda" else {}
            families[key] = family_class.load(options, limits=ImageLimits.from_catalog(catalog.limits), **extra)
        except ModelUnavailable as exc:
            errors[key] = str(exc)
    return families, errors


if __name__ == "__main__":
    sys.exit(run_worker("image", load_models))
