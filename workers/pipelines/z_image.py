"""Z-Image family: Z-Image-Turbo text-to-image, a `ZImagePipeline` diffusers folder.

    family = ZImageFamily.load(LoadOptions(...), limits=..., loras=LoraLibrary(...))
    family.check(job)
    images = family.generate(job, on_step)

The Turbo checkpoint is distilled for about 8 steps without classifier-free guidance (guidance 0);
a guidance above 1 runs the negative prompt as a second pass. Importing this module touches no GPU.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ZImagePipeline

from workers.pipelines.dit import DiTFamily

MAX_SEQUENCE_LENGTH = 512


class ZImageFamily(DiTFamily):
    name = "z_image"
    what = "Z-Image"
    pipeline_classes = ("ZImagePipeline",)

    @classmethod
    def _from_folder(cls, folder: Path, class_name: str, dtype: torch.dtype, parts: dict):
        return ZImagePipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **parts)

    @classmethod
    def _variants(cls, pipe) -> dict:
        return {"txt2img": pipe}

    def _call_kwargs(self, job, inputs: dict, size: tuple[int, int]) -> dict:
        cfg = job.guidance > 1.0
        return {"guidance_scale": job.guidance, "negative_prompt": job.negative_prompt if cfg else None,
                "max_sequence_length": MAX_SEQUENCE_LENGTH}
