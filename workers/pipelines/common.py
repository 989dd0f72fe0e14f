"""Small pieces every model family uses the same way (torch and PIL; no diffusers)."""
from __future__ import annotations

import gc

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
