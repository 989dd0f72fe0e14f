"""Qwen-Image family: Qwen-Image 2512 (text-to-image, inpainting) and Qwen-Image-Edit 2511 (instruction
editing with 1 to N pictures, inpainting), each a diffusers folder, diffusers' own pipelines inside.

    family = QwenImageFamily.load(LoadOptions(...), limits=..., loras=LoraLibrary(...), kind="qwen_image")
    family.check(job)                  # ValueError: missing/undecodable image, mask of another size, bad LoRA
    images = family.generate(job, on_step)

kind "qwen_image": a `QwenImagePipeline` folder; txt2img, and inpaint through
`QwenImageInpaintPipeline.from_pipe`. kind "qwen_image_edit": a `QwenImageEditPlusPipeline` folder;
edit, and inpaint through the same `from_pipe`. The variants share every module: the weights exist
once. `guidance` is Qwen's `true_cfg_scale`: above 1 the negative prompt runs as a second pass; at
1 or below (the Lightning fast tier) it does not. Importing this module touches no GPU.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import QwenImageEditPlusPipeline, QwenImageInpaintPipeline, QwenImagePipeline
from PIL import Image

from workers.pipelines.dit import MAX_SIZE, DiTFamily
from workers.pipelines.qwen_processor import QwenImageTextProcessor

MAX_SEQUENCE_LENGTH = 512   # the pipelines' default and maximum prompt length in tokens


class QwenImageFamily(DiTFamily):
    name = "qwen_image"
    what = "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline", "QwenImageEditPlusPipeline")

    def __init__(self, *args, max_references: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_references = max_references

    @classmethod
    def classes_for(cls, kind: str) -> tuple[str, ...]:
        return ("QwenImageEditPlusPipeline",) if kind == "qwen_image_edit" else ("QwenImagePipeline",)

    @classmethod
    def _from_folder(cls, folder: Path, class_name: str, dtype: torch.dtype, parts: dict):
        if class_name == "QwenImageEditPlusPipeline":
            # The checkpoint's processor/ folder, read without the video processor (see qwen_processor.py).
            processor = QwenImageTextProcessor.from_folder(folder / "processor")
            return QwenImageEditPlusPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                             processor=processor, **parts)
        return QwenImagePipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **parts)

    @classmethod
    def _variants(cls, pipe) -> dict:
        # from_pipe casts shared modules to `dtype` (float32 when not given): pass the loaded one through.
        inpaint = QwenImageInpaintPipeline.from_pipe(pipe, dtype=pipe.transformer.dtype)
        if isinstance(pipe, QwenImageEditPlusPipeline):
            return {"edit": pipe, "inpaint": inpaint}
        return {"txt2img": pipe, "inpaint": inpaint}

    def _validate(self, job) -> None:
        super()._validate(job)
        if job.spec.mode == "edit" and not 1 <= len(job.reference_images) <= self.max_references:
            raise ValueError(f"{job.job_type} takes 1 to {self.max_references} pictures to edit, "
                             f"got {len(job.reference_images)}")
        if job.spec.mode == "inpaint" and (job.strength is None or not 0 < job.strength <= 1):
            raise ValueError(f"strength {job.strength} must be in (0, 1]")

    def _images(self, job) -> dict:
        if job.spec.mode == "edit":
            many = len(job.reference_images) > 1
            return {"images": [self._image(source, f"picture {i}" if many else "picture to edit")
                               for i, source in enumerate(job.reference_images, 1)]}
        if job.spec.mode == "inpaint":
            image = self._image(job.init_image, "init image")
            mask = self._image(job.mask_image, "mask")
            if mask.size != image.size:
                raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x"
                                 f"{image.size[1]}: they must be the same size")
            return {"image": image, "mask": mask.convert("L")}
        return {}

    def output_size(self, job, inputs: dict) -> tuple[int, int]:
        """Editing and inpainting keep the picture's shape (the first picture's, when several) at the
        job type's pixel count, unless the payload set a size."""
        picture = inputs["images"][0] if job.spec.mode == "edit" else inputs.get("image")
        if picture is None or job.size_given:
            return job.width, job.height
        return same_shape(picture.size, job.width * job.height, self.size_multiple)

    def _call_kwargs(self, job, inputs: dict, size: tuple[int, int]) -> dict:
        cfg = job.guidance > 1.0
        kwargs = {"true_cfg_scale": job.guidance, "negative_prompt": job.negative_prompt if cfg else None,
                  "max_sequence_length": MAX_SEQUENCE_LENGTH}
        if job.spec.mode == "edit":
            kwargs["image"] = list(inputs["images"])
        elif job.spec.mode == "inpaint":
            kwargs.update(image=_fit(inputs["image"], size), mask_image=_fit(inputs["mask"], size),
                          strength=job.strength)
        return kwargs


def same_shape(size: tuple[int, int], pixels: int, multiple: int) -> tuple[int, int]:
    """The largest (width, height) in multiples of `multiple` with `size`'s aspect and at most `pixels`."""
    scale = (pixels / (size[0] * size[1])) ** 0.5
    largest = MAX_SIZE // multiple * multiple
    width, height = (min(largest, max(multiple, int(side * scale) // multiple * multiple)) for side in size)
    if width * height > pixels:   # a side held at `multiple`: the other gives way
        if width > height:
            width = pixels // height // multiple * multiple
        else:
            height = pixels // width // multiple * multiple
    return width, height


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The output size: the pipeline preprocesses image and mask to it; resizing both alike keeps them aligned."""
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)
