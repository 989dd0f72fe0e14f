"""What the flow-matching transformer image families (Qwen-Image, Z-Image) share.

    family = QwenImageFamily.load(opts, limits=..., loras=LoraLibrary(...), kind="qwen_image")
    family.check(job)                  # ValueError naming the bad input; decodes images, finds and checks LoRAs
    images = family.generate(job, on_step)

A subclass names its variants (mode → pipeline, built once with `from_pipe`, so the weights exist
once) and the call arguments of each. Per-job LoRAs (the job type's own, then the payload's) are
active for the job's call only (workers/pipelines/lora.py). `modules()` and `place()` let the
residency manager (workers/pipelines/residency.py) move the weights. Importing touches no GPU.
"""
from __future__ import annotations

import abc
import json
import logging
from pathlib import Path

import torch
from PIL import Image

from workers.media import ImageLimits, load_labelled_image
from workers.pipelines.base import GenerationOutOfMemory, LoadOptions, ModelUnavailable, StepCallback
from workers.pipelines.common import check_batch, free_device_memory, shared_components, to_pil
from workers.pipelines.lora import LoraLibrary, LoraSlots, ResolvedLora, resolve_job_loras
from workers.pipelines.wan_memory import out_of_memory_reason

log = logging.getLogger(__name__)
MIN_SIZE, MAX_SIZE = 64, 4096
SHARED_PARTS = ("text_encoder", "vae")   # loaded once per distinct content across the worker's models


class DiTFamily(abc.ABC):
    """Shared by the Qwen-Image and Z-Image families; each subclass supplies the three abstract hooks."""
    name = "dit"
    what = "image model"                 # for messages
    pipeline_classes: tuple[str, ...] = ()   # model_index.json `_class_name`s this family loads

    def __init__(self, pipe, variants: dict, device: torch.device, limits: ImageLimits,
                 loras: LoraLibrary | None, kind: str):
        self.pipe = pipe                  # the loaded pipeline; `variants` share its modules
        self.variants = variants          # mode → pipeline
        self.device = device
        self.limits = limits
        self.library = loras
        self.kind = kind
        self.slots = LoraSlots(pipe, kind)
        self.size_multiple = pipe.vae_scale_factor * 2   # VAE downscale × the transformer's 2×2 patches
        self._prepared: tuple[str, dict] | None = None   # (job_id, inputs) from check()
        for variant in variants.values():
            variant.set_progress_bar_config(disable=True)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, opts: LoadOptions, limits: ImageLimits | None = None, loras: LoraLibrary | None = None,
             kind: str | None = None, shared: dict | None = None, **options) -> "DiTFamily":
        """`shared`: one dict for every model of a worker; a text encoder or VAE whose files another
        model already loaded is that model's module (Qwen-Image and Qwen-Image-Edit ship the same
        Qwen2.5-VL-7B: 16.6 GiB once instead of twice)."""
        folder = Path(opts.model_path)
        index = folder / "model_index.json"
        if not index.is_file():
            raise ModelUnavailable(f"no {cls.what} checkpoint at {folder} (a diffusers folder with model_index.json)")
        index_data = _read_index(index)
        class_name, accepted = index_data.get("_class_name"), cls.classes_for(kind or cls.name)
        if class_name not in accepted:
            raise ModelUnavailable(f"{folder} holds a {class_name} checkpoint; a {cls.what} one "
                                   f"({' or '.join(accepted)}) is needed")
        device = torch.device(opts.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            parts = shared_components(folder, index_data, SHARED_PARTS, dtype, {} if shared is None else shared)
            pipe = cls._from_folder(folder, class_name, dtype, parts)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise ModelUnavailable(f"could not load the {cls.what} checkpoint at {folder}: "
                                   f"{type(exc).__name__}: {exc}"[:600]) from exc
        family = cls(pipe, cls._variants(pipe), device, limits or ImageLimits(), loras, kind or cls.name, **options)
        log.info("%s loaded from %s (%s)", cls.what, folder, dtype)
        return family

    @classmethod
    def classes_for(cls, kind: str) -> tuple[str, ...]:
        return cls.pipeline_classes

    @classmethod
    @abc.abstractmethod
    def _from_folder(cls, folder: Path, class_name: str, dtype: torch.dtype, parts: dict):
        """The family's diffusers pipeline, loaded from `folder` (`parts`: components already loaded)."""

    @classmethod
    @abc.abstractmethod
    def _variants(cls, pipe) -> dict:
        """Mode → pipeline, the others built from `pipe` with `from_pipe` (shared weights)."""

    # ------------------------------------------------------------------ residency

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    def place(self, device: torch.device | str) -> None:
        for module in self.modules():
            module.to(device)

    # ------------------------------------------------------------------ validation

    def check(self, job) -> None:
        """Reject a job before any GPU work: sizes, modes, input images (downloaded and decoded here),
        LoRAs (found, and matched against this model's layers). Keeps what it decoded for generate()."""
        self._validate(job)
        self._prepared = (job.job_id, self._inputs(job))

    def _validate(self, job) -> None:
        mode = job.spec.mode
        if mode not in self.variants:
            raise ModelUnavailable(f"{job.job_type} ({mode}) cannot run on a {self.what} checkpoint "
                                   f"(it runs {', '.join(self.variants)})")
        for what, value in (("width", job.width), ("height", job.height)):
            if not MIN_SIZE <= value <= MAX_SIZE or value % self.size_multiple:
                raise ValueError(f"{what} {value} must be a multiple of {self.size_multiple} between {MIN_SIZE} "
                                 f"and {MAX_SIZE} for {self.what}")
        check_batch(job)

    def _inputs(self, job) -> dict:
        inputs = {"loras": self._resolve_loras(job)}
        inputs.update(self._images(job))
        return inputs

    def _images(self, job) -> dict:
        return {}   # families with image inputs decode them here

    def _image(self, source: str | None, what: str) -> Image.Image:
        if not source:
            raise ValueError(f"{what} is missing")
        return load_labelled_image(source, self.limits, what)

    def _resolve_loras(self, job) -> list[ResolvedLora]:
        return resolve_job_loras(job, self.library, self.slots)

    # ------------------------------------------------------------------ generation

    def generate(self, job, on_step: StepCallback) -> list[Image.Image]:
        """One batch of job.num_images, image i seeded with job.seeds[i]. Exceptions from on_step propagate."""
        self._validate(job)
        prepared, self._prepared = self._prepared, None
        inputs = prepared[1] if prepared and prepared[0] == job.job_id else self._inputs(job)
        phase = getattr(on_step, "phase", None) or (lambda name: None)

        def step_end(pipeline, step_index, timestep, callback_kwargs):
            on_step(step_index + 1, pipeline.num_timesteps)
            if step_index + 1 == pipeline.num_timesteps:
                phase("decoding")
            return callback_kwargs

        oom = None
        width, height = self.output_size(job, inputs)
        try:
            self.slots.activate(inputs["loras"])
            phase("generating")
            generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in job.seeds]
            kwargs = self._call_kwargs(job, inputs, (width, height))
            result = self.variants[job.spec.mode](
                prompt=job.prompt, height=height, width=width, num_inference_steps=job.steps,
                num_images_per_prompt=job.num_images, generator=generators, output_type="pt",
                callback_on_step_end=step_end, **kwargs)
            images = to_pil(result.images)
        except Exception as exc:  # noqa: BLE001 — only out-of-memory is handled; the rest propagates
            oom = out_of_memory_reason(exc)
            if oom is None:
                raise
        finally:
            self.slots.deactivate()   # never active for a later job, whatever happened here
        if oom is not None:
            self.free_memory()   # outside the except block: the traceback's tensors are gone
            where = "GPU memory" if self.device.type == "cuda" else "memory"
            raise GenerationOutOfMemory(f"out of {where} generating {job.num_images} image(s) of "
                                        f"{width}x{height}: {oom}")
        return images

    def output_size(self, job, inputs: dict) -> tuple[int, int]:
        """(width, height) of the images; families whose inputs have a shape may follow it."""
        return job.width, job.height

    @abc.abstractmethod
    def _call_kwargs(self, job, inputs: dict, size: tuple[int, int]) -> dict:
        """The pipeline call's keyword arguments for this job (besides callbacks and generators)."""

    def free_memory(self) -> None:
        free_device_memory(self.device)


def _read_index(index: Path) -> dict:
    """model_index.json, or {} when unreadable (the class check then names the folder)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
