"""Small pieces every model family uses the same way (torch and PIL; no diffusers)."""
from __future__ import annotations

import functools
import gc
import hashlib
import importlib
from pathlib import Path

import torch
from PIL import Image


def check_batch(job) -> None:
    """The checks every family makes on a job: steps, one seed per image, guidance."""
    if job.steps < 1:
        raise ValueError(f"steps {job.steps} must be at least 1")
    if job.num_images < 1 or len(job.seeds) != job.num_images:
        raise ValueError(f"number of images {job.num_images} needs as many seeds (got {len(job.seeds)})")
    if job.guidance < 0:
        raise ValueError(f"guidance {job.guidance} must not be negative")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[0, 1] image batch (N, C, H, W) → RGB PIL images, with diffusers' own arithmetic ((x * 255).round()
    in float32) done on the device: one uint8 copy to the host instead of a float32 one."""
    array = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(frame) for frame in array]


def free_device_memory(device: torch.device) -> None:
    """After an out-of-memory error or a finished job: drop what Python still holds, return cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def folder_fingerprint(folder: Path) -> str:
    """Same files (names, sizes, first and last 64 KiB): the same component. Cheap even for 16 GB,
    and read once per process while the files' sizes and times stay the same (the image worker's
    start-up plan and the load that follows both ask)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    stats = tuple((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(Path(folder), stats)


@functools.lru_cache(maxsize=64)
def _fingerprint(folder: Path, stats: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, size, _ in stats:
        digest.update(f"{name}\0{size}\0".encode())
        with open(folder / name, "rb") as handle:
            digest.update(handle.read(65536))
            if size > 65536:
                handle.seek(max(65536, size - 65536))
                digest.update(handle.read())
    return digest.hexdigest()


def shared_components(folder: Path, index: dict, names: tuple[str, ...], dtype: torch.dtype, shared: dict,
                      fp32: tuple[str, ...] = ()) -> dict:
    """The pipeline components `names` of a diffusers folder, each loaded once per distinct content:
    checkpoints that ship identical text encoders or VAEs (Wan 2.1's, Qwen-Image's and
    Qwen-Image-Edit's) get the same module object, so its weights are in memory once."""
    parts = {}
    for name in names:
        library, class_name = (index.get(name) or [None, None])[:2]
        if not library or not class_name or not (folder / name).is_dir():
            continue
        key = (name, class_name, folder_fingerprint(folder / name), str(dtype))
        if key not in shared:
            component = getattr(importlib.import_module(library), class_name)
            kwargs = {} if name in ("tokenizer", "processor") else {"dtype": torch.float32 if name in fp32 else dtype}
            shared[key] = component.from_pretrained(folder / name, local_files_only=True, **kwargs)
        parts[name] = shared[key]
    return parts
