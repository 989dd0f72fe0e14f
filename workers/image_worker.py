"""Image worker process on sdxl_queue: SDXL (single-file LUSTIFY checkpoint or a diffusers folder),
Qwen-Image 2512, Qwen-Image-Edit 2511 and Z-Image-Turbo (diffusers folders).

Identical text encoders and VAEs (Qwen-Image's and Qwen-Image-Edit's) are loaded once and shared.
The models share the GPU through workers/pipelines/residency.py: within IMAGE_VRAM_BUDGET_GIB the
most recently used stay on the GPU, the others wait in pinned CPU memory (or on disk). At start the
models that fit the budget together are loaded, in catalog order; the others load on their first
job. A missing checkpoint fails only its job types, with the path in the message.
Run by the orchestrator: python -m workers.image_worker
"""
from __future__ import annotations

import functools
import sys

from workers.config import Catalog, Settings
from workers.worker_process import run_worker

GIB = 2**30
DEFAULT_BUDGET_FRACTION = 0.7   # of the GPU's memory when IMAGE_VRAM_BUDGET_GIB is unset; the rest: activations


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_models(catalog: Catalog, settings: Settings, model_keys: list[str]) -> tuple[dict, dict[str, str]]:
    """Every model this worker's job types name, behind one Residency. Returns (families, errors)."""
    import torch

    from workers.pipelines.base import ModelUnavailable
    from workers.pipelines.residency import ResidentFamilies, Residency

    device = pick_device(settings.device)
    loaders, errors = {}, {}
    shared: dict = {}   # one text encoder / VAE for the models that ship the same files (Qwen-Image and -Edit)
    for key in model_keys:
        family = catalog.models[key].family
        if family not in ("sdxl", "qwen_image", "qwen_image_edit", "z_image"):
            errors[key] = f"the image worker has no {family!r} pipeline"
            continue
        loaders[key] = functools.partial(_load_one, catalog, settings, key, device, shared)
    budget = settings.image_vram_budget_gib
    if budget is None and device == "cuda":
        budget = torch.cuda.get_device_properties(0).total_memory * DEFAULT_BUDGET_FRACTION / GIB
    residency = Residency(loaders, device, int(budget * GIB) if budget else None)
    families = ResidentFamilies(residency)
    planned = 0   # bytes on disk of the models loaded so far: what fits is loaded now, the rest on demand
    counted: set = set()   # shared components (text encoders, VAEs) already in `planned`
    for key in [k for k in catalog.models if k in loaders]:   # catalog order: the first models are the main ones
        path = settings.model_path(catalog.models[key])
        seen = set(counted)
        size = disk_bytes(path, seen) if path.exists() else 0   # one pass over the files (and fingerprints)
        if not path.exists():
            try:
                loaders[key]()   # fails at once, with the family's own message naming the path and the variable
            except ModelUnavailable as exc:
                errors[key] = str(exc)
        elif budget is None or planned + size <= budget * GIB:
            planned += size
            counted |= seen
            try:
                residency.make_resident(key)
            except ModelUnavailable as exc:
                errors[key] = str(exc)
            except torch.cuda.OutOfMemoryError as exc:
                errors[key] = f"out of GPU memory loading it (set IMAGE_VRAM_BUDGET_GIB lower): {str(exc)[:200]}"
        if key in errors:
            del families[key]
            residency.forget(key)
    return families, errors


def disk_bytes(path, counted: set | None = None) -> int:
    """Weights on disk under `path` (a file or a folder): about what they take in memory at bf16. A
    text encoder or VAE folder whose content is in `counted` is shared (not counted again); the
    ones counted here are added to it."""
    from workers.pipelines.common import folder_fingerprint
    from workers.pipelines.dit import SHARED_PARTS

    if path.is_file():
        return path.stat().st_size
    by_part: dict[str, int] = {}   # weight bytes per top-level folder (text_encoder, vae, transformer, ...)
    for p in path.rglob("*"):
        if p.suffix in (".safetensors", ".bin"):
            part = p.relative_to(path).parts[0]
            by_part[part] = by_part.get(part, 0) + p.stat().st_size
    total = sum(by_part.values())
    for name in SHARED_PARTS if counted is not None else ():
        if (path / name).is_dir():
            key = (name, folder_fingerprint(path / name))
            total -= by_part.get(name, 0) if key in counted else 0
            counted.add(key)
    return total


def _load_one(catalog: Catalog, settings: Settings, key: str, device: str, shared: dict):
    from workers.media import ImageLimits
    from workers.pipelines.base import LoadOptions, ModelUnavailable

    model = catalog.models[key]
    limits = ImageLimits.from_catalog(catalog.limits, timeout=settings.http_timeout)
    options = LoadOptions(model_path=settings.model_path(model), config_path=settings.model_config_path(model),
                          device=device, cache_dir=settings.data_dir / "converted")
    from workers.pipelines.lora import LoraLibrary

    library = LoraLibrary(settings.lora_folder, settings.lora_url_hosts, catalog.limits.lora_max_bytes,
                          download_dir=settings.data_dir / "loras", timeout=10 * settings.http_timeout)
    try:
        if model.family == "sdxl":
            from workers.pipelines.sdxl import SDXLFamily

            extra = {"accel": SDXLFamily.acceleration_for(catalog, key, settings)} if device == "cuda" else {}
            return SDXLFamily.load(options, limits=limits, loras=library, **extra)
        if model.family == "z_image":
            from workers.pipelines.z_image import ZImageFamily

            return ZImageFamily.load(options, limits=limits, loras=library, shared=shared)
        from workers.pipelines.qwen_image import QwenImageFamily

        return QwenImageFamily.load(options, limits=limits, loras=library, kind=model.family, shared=shared,
                                    max_references=catalog.limits.max_reference_images)
    except ModelUnavailable as exc:
        hint = f"; set {model.env} (absolute, or relative to MODELS_DIR)" if model.env else ""
        raise ModelUnavailable(f"{exc}{hint}" if model.env and model.env not in str(exc) else str(exc)) from None


if __name__ == "__main__":
    sys.exit(run_worker("image", load_models))
