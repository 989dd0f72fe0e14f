"""Wan family (Wan 2.1 / 2.2 diffusers folders): text-to-video, one-frame text-to-image (N per job, one
batch), image-to-video and reference-to-video (VACE). One checkpoint per family instance, loaded once.

    family = WanFamily.load(LoadOptions(...), limits=ImageLimits(...), kind="wan")  # or "wan_i2v", "wan_vace"
    family.check(job)                       # ValueError naming the bad value; decodes reference images
    output = family.generate(job, on_step)  # image jobs: list of PIL images; video jobs: media.VideoClip

bf16 transformer(s) and text encoder on CUDA, fp32 on the CPU; the VAE and Wan 2.1's CLIP image
encoder stay fp32 (diffusers' advice for Wan's decoding quality). Families loaded with the same
`shared` dict reuse one copy of identical text encoder / VAE folders (every Wan 2.1 checkpoint ships
the same UMT5-XXL, 11 GB in bf16). With a VRAM budget the process is capped at it on CUDA and each
job follows a wan_memory.MemoryPlan: the text encoder stays resident, visits the GPU only to encode,
or encodes on the CPU; the VAE decodes in tiles when a full-frame decode would not fit. A CUDA (or
host) out-of-memory error becomes GenerationOutOfMemory after the caches are freed. Importing this
module touches no GPU.
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline, WanVACEPipeline
from PIL import Image, ImageOps

from workers.media import ImageLimits, VideoClip, load_labelled_image
from workers.pipelines import step_cache, wan_accel
from workers.pipelines.accel import DeferredAcceleration, no_compile_in_jobs
from workers.pipelines.wan_accel import WanAcceleration
from workers.pipelines.base import GenerationOutOfMemory, LoadOptions, ModelUnavailable, StepCallback
from workers.pipelines.common import check_batch, free_device_memory, shared_components
from workers.pipelines.wan_memory import (MemoryPlan, cap_process_memory, decode_bytes, denoise_bytes,
                                          latent_tokens, module_bytes, out_of_memory_reason, plan_memory)

log = logging.getLogger(__name__)

MIN_SIZE, MAX_SIZE = 64, 2048
MIN_VIDEO_FRAMES, MAX_FRAMES = 5, 257      # 257 = 16 s at 16 fps; Wan 2.1 is trained on 81
MAX_SEQUENCE_LENGTH = 512                  # UMT5 tokens, the pipelines' default
SHARED_PARTS = ("text_encoder", "tokenizer", "vae", "image_encoder")
FP32_PARTS = ("vae", "image_encoder")


@dataclass(frozen=True)
class Kind:
    pipeline: type
    modes: tuple[str, ...]
    classes: tuple[str, ...]   # model_index.json `_class_name`s this kind loads
    what: str


KINDS = {
    "wan": Kind(WanPipeline, ("txt2img", "txt2video"), ("WanPipeline",), "text-to-video"),
    "wan_i2v": Kind(WanImageToVideoPipeline, ("img2video",), ("WanImageToVideoPipeline",), "image-to-video"),
    "wan_vace": Kind(WanVACEPipeline, ("ref2video",), ("WanVACEPipeline",), "VACE reference-to-video"),
}


class WanFamily(DeferredAcceleration):
    name = "wan"

    def __init__(self, pipe, kind: str, device: torch.device, limits: ImageLimits, budget: int | None):
        self.pipe = pipe
        self.kind = kind
        self.device = device
        self.limits = limits
        self.budget = budget
        self.dtype = pipe.transformer.dtype
        self.size_multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
        self.frame_multiple = pipe.vae_scale_factor_temporal
        self._prepared: tuple[str, list[Image.Image]] | None = None  # (job_id, references) from check()
        self.accel_report: dict = {"applied": "none"}
        self.deferred: WanAcceleration | None = None   # compile_at: idle — run by accelerate_deferred()
        self.magcache = None        # the config.MagCacheCalibration matching this transformer, if any
        self.step_cache_stats: dict = {}   # the last job's {branch: [blocks run, reused]}; {} uncached

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, opts: LoadOptions, limits: ImageLimits | None = None, kind: str = "wan",
             shared: dict | None = None, accel: WanAcceleration | None = None,
             magcache: list | tuple = ()) -> "WanFamily":
        if kind not in KINDS:
            raise ModelUnavailable(f"unknown Wan kind {kind!r} (known: {', '.join(KINDS)})")
        spec = KINDS[kind]
        folder = Path(opts.model_path)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise ModelUnavailable(f"no Wan {spec.what} checkpoint at {folder} (a diffusers folder with model_index.json)")
        index = json.loads(index_file.read_text(encoding="utf-8"))
        # Wan 2.2 TI2V-5B is one WanPipeline folder (expand_timesteps) for text- and image-to-video.
        accepted = spec.classes + (("WanPipeline",) if kind == "wan_i2v" and index.get("expand_timesteps") else ())
        if index.get("_class_name") not in accepted:
            raise ModelUnavailable(f"{folder} holds a {index.get('_class_name')} checkpoint; a Wan {spec.what} "
                                   f"one ({' or '.join(accepted)}) is needed")
        device = torch.device(opts.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if device.type == "cuda" and opts.vram_budget_bytes:
            cap_process_memory(device, opts.vram_budget_bytes)
        try:
            parts = shared_components(folder, index, SHARED_PARTS, dtype, {} if shared is None else shared, FP32_PARTS)
            pipe = spec.pipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **parts)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise ModelUnavailable(f"could not load the Wan {spec.what} checkpoint at {folder}: "
                                   f"{type(exc).__name__}: {exc}"[:600]) from exc
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.enable_slicing()   # one clip/image at a time through the VAE: the decode peak of one item
        family = cls(pipe, kind, device, limits or ImageLimits(), opts.vram_budget_bytes)
        oom = None
        try:
            family._place()
        except Exception as exc:   # noqa: BLE001 — only running out of memory is this model's problem
            oom = out_of_memory_reason(exc)
            if oom is None:
                raise
        if oom is not None:        # outside the except block: the traceback's tensors are gone
            del family, pipe, parts
            free_device_memory(device)
            raise ModelUnavailable(f"out of memory placing the Wan {spec.what} model on {device} "
                                   f"(VIDEO_VRAM_BUDGET_GIB, other models on the card): {oom}")
        family._install_step_cache(magcache)
        if device.type == "cuda" and accel is not None and not accel.is_off:
            now, family.deferred = accel.split()
            family.accel_report = (wan_accel.accelerate(pipe, now, family.warm_up_inputs) if now is not None else
                                   {"applied": "none", "deferred": f"compile={accel.compile}"})
        log.info("Wan %s loaded from %s (%s, text encoder on %s)", spec.what, folder, dtype, family._text_encoder_device())
        return family

    def _deferred_stages(self, accel: WanAcceleration):
        """Compile and warm up now that the worker is idle (compile_at: idle), via accelerate_deferred()."""
        report: dict = {}
        yield from wan_accel.accelerate_stages(self.pipe, accel, report, self.warm_up_inputs)
        self.accel_report = report

    def warm_up_inputs(self, width: int, height: int) -> dict:
        """A warm-up's conditioning, shaped as a job's: image-to-video gets one picture of the job
        size, VACE one reference image (mid-grey: the warm-up compiles, its output is thrown away)."""
        picture = Image.new("RGB", (width, height), (128, 128, 128))
        return {"wan_i2v": {"image": picture}, "wan_vace": {"reference_images": [picture]}}.get(self.kind, {})

    def _install_step_cache(self, calibrations) -> None:
        """Find the MagCache calibration measured on this transformer; with one, the block list can
        run a job type's step_cache plan (step_cache.py). Two-expert Wan 2.2 has none."""
        if getattr(self.pipe, "transformer_2", None) is not None:
            return
        self.magcache = step_cache.calibration_for(calibrations, self.pipe.transformer.config)
        if self.magcache is not None:
            step_cache.install(self.pipe.transformer)

    def _step_plan(self, job) -> "step_cache.StepPlan | None":
        if job.spec.step_cache is None:
            return None
        if self.magcache is None:
            config = self.pipe.transformer.config
            experts = ", two transformers" if getattr(self.pipe, "transformer_2", None) is not None else ""
            raise ModelUnavailable(f"{job.job_type} caches steps with a MagCache calibration, and job_types.yaml "
                                   f"has none for this checkpoint ({config.num_layers} layers, "
                                   f"{config.num_attention_heads} heads{experts})")
        return step_cache.StepPlan.magcache(self.magcache, job.spec.step_cache, job.steps)

    def _place(self) -> None:
        for name in ("transformer", "transformer_2", "vae", "image_encoder"):
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(self.device)
        # Over the budget the text encoder waits on the CPU; each job's plan moves it as needed.
        fits = self.device.type != "cuda" or not self.budget or (
            torch.cuda.memory_allocated(self.device) + module_bytes(self.pipe.text_encoder) <= self.budget)
        if fits:
            self.pipe.text_encoder.to(self.device)

    def _text_encoder_device(self) -> torch.device:
        return next(self.pipe.text_encoder.parameters()).device

    # ------------------------------------------------------------------ validation

    def check(self, job) -> None:
        """Reject a job before any GPU work; download and decode its reference images now, so a bad
        one fails here, and keep them for the following generate() of the same job."""
        self._validate(job)
        self._prepared = (job.job_id, self._load_references(job)) if job.reference_images else None

    def _validate(self, job) -> None:
        spec = KINDS[self.kind]
        mode = job.spec.mode
        if mode not in spec.modes:
            raise ModelUnavailable(f"{job.job_type} ({mode}) cannot run on a Wan {spec.what} checkpoint "
                                   f"(it runs {', '.join(spec.modes)})")
        multiple = self.size_multiple
        for what, value in (("width", job.width), ("height", job.height)):
            if not MIN_SIZE <= value <= MAX_SIZE or value % multiple:
                raise ValueError(f"{what} {value} must be a multiple of {multiple} between {MIN_SIZE} and {MAX_SIZE} "
                                 "for Wan")
        frames = job.frames or 1
        if job.spec.content == "image":
            if frames != 1:
                raise ValueError(f"a Wan image is one frame, the job type says {frames}")
        else:
            step = self.frame_multiple
            if not MIN_VIDEO_FRAMES <= frames <= MAX_FRAMES or (frames - 1) % step:
                raise ValueError(f"number of frames {frames} must be {step}k+1 between {MIN_VIDEO_FRAMES} and "
                                 f"{MAX_FRAMES} for Wan (e.g. 49, 81)")
            if not job.fps:
                raise ValueError(f"{job.job_type} has no fps")
        check_batch(job)
        self._step_plan(job)
        count = len(job.reference_images)
        if mode == "img2video" and count != 1:
            raise ValueError(f"{job.job_type} needs exactly one reference image, got {count}")
        if mode == "ref2video" and count < 1:
            raise ValueError(f"{job.job_type} needs at least one reference image")

    def _load_references(self, job) -> list[Image.Image]:
        many = len(job.reference_images) > 1
        return [load_labelled_image(source, self.limits, f"reference image {i}" if many else "reference image")
                for i, source in enumerate(job.reference_images, 1)]

    def output_size(self, job, references: list[Image.Image]) -> tuple[int, int]:
        """(width, height). Image-to-video follows the reference's orientation: a portrait photo on a
        landscape job type renders portrait, at the same size swapped (unless the payload set a size)."""
        width, height = job.width, job.height
        if self.kind == "wan_i2v" and references and not job.size_given:
            ref_w, ref_h = references[0].size
            if (ref_h > ref_w) != (height > width) and ref_h != ref_w:
                width, height = height, width
        return width, height

    # ------------------------------------------------------------------ memory

    def memory_plan(self, job, width: int, height: int) -> MemoryPlan:
        if self.device.type != "cuda" or not self.budget:
            return MemoryPlan()
        te_bytes = module_bytes(self.pipe.text_encoder)
        on_gpu = self._text_encoder_device().type == "cuda"
        base = torch.cuda.memory_allocated(self.device) - (te_bytes if on_gpu else 0)
        frames = job.frames or 1
        references = len(job.reference_images) if self.kind == "wan_vace" else 0   # one latent frame each
        latent_frames = (frames - 1) // self.frame_multiple + 1 + references
        batch = job.num_images if job.spec.content == "image" else 1
        config = self.pipe.transformer.config
        tokens = latent_tokens(batch, latent_frames, height, width, self.size_multiple)
        denoise = denoise_bytes(tokens, config.num_attention_heads * config.attention_head_dim, config.ffn_dim,
                                torch.finfo(self.dtype).bits // 8)
        decode = decode_bytes(frames, height, width, self.pipe.vae.config.base_dim, tiled=False)
        plan = plan_memory(self.budget, base, te_bytes, denoise, decode)
        log.info("memory plan for %s: %s (GPU base %.1f GiB, text encoder %.1f GiB, denoise ~%.1f GiB, "
                 "decode ~%.1f GiB, budget %.1f GiB)", job.job_id, plan, base / 2**30, te_bytes / 2**30,
                 denoise / 2**30, decode / 2**30, self.budget / 2**30)
        return plan

    # ------------------------------------------------------------------ generation

    def generate(self, job, on_step: StepCallback) -> list[Image.Image] | VideoClip:
        """Image jobs: one batch of job.num_images one-frame generations, image i seeded with
        job.seeds[i]. Video jobs: one clip. Exceptions from on_step propagate (deadline, shutdown)."""
        self._validate(job)
        prepared, self._prepared = self._prepared, None
        references = prepared[1] if prepared and prepared[0] == job.job_id else (
            self._load_references(job) if job.reference_images else [])
        phase = getattr(on_step, "phase", None) or (lambda name: None)
        width, height = self.output_size(job, references)
        plan = self.memory_plan(job, width, height)
        oom = None
        try:
            phase("encoding prompt")
            embeds = self._encode_prompt(job, plan)
            phase("generating")
            with no_compile_in_jobs():   # a shape the warm-up did not compile runs eagerly
                frames = self._denoise_and_decode(job, width, height, embeds, references, plan, on_step, phase)
            outputs = self._outputs(job, frames)   # the uint8 conversion allocates on the device too
            del frames
        except Exception as exc:   # noqa: BLE001 — only out-of-memory is handled; the rest propagates
            oom = out_of_memory_reason(exc)
            if oom is None:
                raise
        if oom is not None:
            # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
            frames = embeds = None   # the decoded clip, when the conversion ran out
            self.free_memory()
            where = "GPU memory" if self.device.type == "cuda" else "memory"
            what = (f"{job.num_images} image(s) of {width}x{height}" if job.spec.content == "image"
                    else f"a {job.frames}-frame {width}x{height} video")
            raise GenerationOutOfMemory(f"out of {where} generating {what}: {oom}")
        return outputs

    def _encode_prompt(self, job, plan: MemoryPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoder = self.pipe.text_encoder
        encoder.to(torch.device("cpu") if plan.text_encoder == "cpu" else self.device)
        try:
            with torch.no_grad():
                return self.pipe.encode_prompt(
                    prompt=job.prompt, negative_prompt=job.negative_prompt,
                    do_classifier_free_guidance=job.guidance > 1.0,
                    num_videos_per_prompt=job.num_images if job.spec.content == "image" else 1,
                    max_sequence_length=MAX_SEQUENCE_LENGTH, device=self.device, dtype=self.dtype)
        finally:
            if plan.text_encoder == "offload":
                encoder.to("cpu")
                torch.cuda.empty_cache()

    def _denoise_and_decode(self, job, width, height, embeds, references, plan, on_step, phase) -> torch.Tensor:
        def step_end(pipeline, step_index, timestep, callback_kwargs):
            on_step(step_index + 1, pipeline.num_timesteps)
            if step_index + 1 == pipeline.num_timesteps:
                phase("decoding")
            return callback_kwargs

        if plan.vae_tiling:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()
        kwargs = {}
        if self.kind == "wan_i2v":
            kwargs["image"] = ImageOps.fit(references[0], (width, height), Image.Resampling.LANCZOS)
        elif self.kind == "wan_vace":
            kwargs["reference_images"] = references   # the pipeline scales each into the frame, keeping its shape
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in job.seeds]
        if job.spec.content == "video":   # one clip; the VACE pipeline refuses a list of generators
            generators = generators[0]
        plan = self._step_plan(job)
        with self.pipe.transformer.blocks.active(plan) if plan else nullcontext() as cached:
            result = self.pipe(
                prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=height, width=width,
                num_frames=job.frames or 1, num_inference_steps=job.steps, guidance_scale=job.guidance,
                generator=generators, output_type="pt", callback_on_step_end=step_end,
                max_sequence_length=MAX_SEQUENCE_LENGTH, **kwargs)
        self.step_cache_stats = {} if cached is None else {b: list(n) for b, n in cached.stats.items()}
        if cached is not None:
            log.info("%s: step cache plan %s, blocks run/reused per branch %s", job.job_id, plan.describe(),
                     self.step_cache_stats)
        return result.frames

    @staticmethod
    def _outputs(job, frames: torch.Tensor) -> list[Image.Image] | VideoClip:
        # (batch, frames, 3, H, W) in [0, 1] → uint8 on the device: a quarter of the float32 copy to the host.
        # In place on the decoded frames (not needed after): one float32 copy at most, not three.
        scaled = frames.float().mul_(255).round_().clamp_(0, 255)
        array = scaled.to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
        if job.spec.content == "image":
            return [Image.fromarray(clip[0]) for clip in array]
        return VideoClip(frames=[np.ascontiguousarray(frame) for frame in array[0]], fps=job.fps)

    def free_memory(self) -> None:
        free_device_memory(self.device)
