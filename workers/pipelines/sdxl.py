"""SDXL family: txt2img and img2img on one set of weights (LUSTIFY or any SDXL checkpoint).

    family = SDXLFamily.load(LoadOptions(...), limits=ImageLimits.from_catalog(catalog.limits))
    family.check(job)                   # ValueError naming the bad value; decodes an img2img init image
    images = family.generate(job, on_step)

A single `.safetensors` file (original LDM layout) is converted by diffusers at every
`from_single_file` load; the converted pipeline is therefore kept once as a diffusers folder under
`cache_dir` and later cold starts read that instead. On CUDA, `accel` (workers/pipelines/accel.py:
channels_last, fused QKV, torch.compile, CUDA graphs) is applied and warmed up inside `load`, before
the worker reports ready; on the CPU it is ignored. Importing this module touches no GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image

from workers.media import ImageLimits, load_input_image
from workers.pipelines import accel as acceleration
from workers.pipelines.accel import Acceleration, DeferredAcceleration
from workers.pipelines.base import GenerationOutOfMemory, LoadOptions, ModelUnavailable, StepCallback
from workers.pipelines.common import check_batch, free_device_memory, to_pil
from workers.pipelines.lora import JobLoras, LoraLibrary

log = logging.getLogger(__name__)

MIN_SIZE, MAX_SIZE = 64, 4096
PROMPT_CACHE_SIZE = 32   # (prompt, negative) embeddings kept on the device: about 0.7 MB each
MODES = ("txt2img", "img2img")


def _cache_key(path: Path, config_path: Path | None, dtype: torch.dtype) -> str:
    """Names the converted folder after everything the conversion depends on: the file (name, size,
    mtime), the config folder, the dtype and the diffusers version. A changed input → a new folder."""
    stat = path.stat()
    parts = [path.name, str(stat.st_size), str(stat.st_mtime_ns), str(config_path and config_path.resolve()),
             str(dtype), diffusers.__version__]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:80]
    return f"{stem}-{digest}"


class SDXLFamily(DeferredAcceleration):
    name = "sdxl"
    # The variables that point at the files (job_types.yaml: models.lustify_sdxl.env / config_env).
    MODEL_ENV = "SDXL_MODEL_PATH"
    CONFIG_ENV = "SDXL_CONFIG_PATH"

    def __init__(self, txt2img: StableDiffusionXLPipeline, device: torch.device, limits: ImageLimits,
                 source: str):
        self.txt2img = txt2img
        # Same modules, no second copy of the weights; only the call logic differs. from_pipe casts
        # every shared module to `dtype`, float32 when not given: pass the loaded dtype through.
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(txt2img, dtype=txt2img.dtype, add_watermarker=False)
        for pipe in (self.txt2img, self.img2img):
            pipe.set_progress_bar_config(disable=True)
        # Decode a batch image by image: a 6-image job's VAE peak is a sixth, at the same speed (the
        # decode at 1024² is compute-bound), which keeps both workers on one card.
        txt2img.vae.enable_slicing()
        self.device = device
        self.limits = limits
        self.source = source  # "folder", "single_file" or "converted_cache": how the weights were read
        self._prepared: tuple[str, Image.Image] | None = None  # (job_id, decoded init image) from check()
        self.prompt_cache: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.graphed: acceleration.GraphedUNet | None = None
        self.deferred: Acceleration | None = None   # compile_at: idle — run by accelerate_deferred()
        self.accel_report: dict = {"applied": "none"}
        self.job_loras = JobLoras(txt2img, "sdxl")   # per-job adapters on the shared UNet and text encoders
        self.slots = self.job_loras.slots

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, opts: LoadOptions, limits: ImageLimits | None = None,
             accel: Acceleration | None = None, loras: LoraLibrary | None = None) -> "SDXLFamily":
        device = torch.device(opts.device)
        # bf16 on CUDA: fp16's range overflows in the SDXL VAE, bf16's does not, so no fp32 upcast.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        path = Path(opts.model_path)
        if path.is_dir():
            pipe, source = cls._from_folder(path, dtype), "folder"
        elif path.is_file() and path.suffix == ".safetensors":
            pipe, source = cls._from_single_file(path, opts.config_path, opts.cache_dir, dtype)
        elif path.is_file():
            raise ModelUnavailable(f"SDXL checkpoint {path} is not a .safetensors file or a diffusers folder")
        else:
            raise ModelUnavailable(f"SDXL checkpoint not found at {path}; set {cls.MODEL_ENV} (absolute, or relative to MODELS_DIR)")
        if dtype == torch.bfloat16:
            # img2img's VAE encode upcasts to fp32 whenever force_upcast is set; bf16 does not need it.
            pipe.vae.register_to_config(force_upcast=False)
        pipe.to(device)
        family = cls(pipe, device, limits or ImageLimits(), source)
        family.job_loras.library = loras
        if device.type == "cuda" and accel is not None and not accel.is_off:
            now, family.deferred = accel.split()
            if now is not None:
                family.accelerate(now)
        return family

    @staticmethod
    def acceleration_for(catalog, model_key: str, settings) -> Acceleration:
        """The model's `optimize` block (job_types.yaml) as an Acceleration. Warm-up shapes: the sizes
        (`warmup_sizes`, default every size of the model's job types) × the batch sizes (`warmup_images`,
        default 1 and each job type's default_images). `compile_at` says what waits until the worker is idle."""
        spec = catalog.models[model_key].optimize
        if not settings.optimize:
            return Acceleration.off()
        types = [t for t in catalog.job_types.values() if t.model == model_key]
        batches = spec.warmup_images if spec.warmup_images is not None else sorted({1, *(t.default_images for t in types)})
        sizes = sorted({(t.width, t.height) for t in types} if spec.warmup_sizes is None else
                       {tuple(int(v) for v in size.split("x")) for size in spec.warmup_sizes})
        return Acceleration(channels_last=spec.channels_last, fuse_qkv=spec.fuse_qkv, compile=spec.compile,
                            cuda_graphs=spec.cuda_graphs, cudnn_benchmark=spec.cudnn_benchmark,
                            warmup=tuple((n, w, h) for w, h in sizes for n in batches),
                            cache_dir=settings.data_dir / "compile-cache", compile_at=spec.compile_at,
                            compile_vae=spec.compile_vae)

    def accelerate(self, accel: Acceleration) -> dict:
        """Apply `accel` and run every warm-up (compiles, CUDA-graph captures) now, not in a job."""
        for _ in self._acceleration_stages(accel):
            pass
        return self.accel_report

    def _acceleration_stages(self, accel: Acceleration):
        """accelerate() as a generator that yields between warm-up shapes (a job may run there: the
        shapes not yet warmed run eagerly). A failure falls back to the plain pipeline: the worker
        still serves, only slower."""
        started = time.perf_counter()
        report = {"applied": accel.describe(), "warmup": {}}
        try:
            self.graphed = acceleration.apply(self.txt2img, accel)
            for i, (n, width, height) in enumerate(accel.warmup):
                if i:
                    yield
                t0 = time.perf_counter()
                with self.graphed.capture() if self.graphed else contextlib.nullcontext():
                    self.txt2img(prompt=["warm-up"] * n, negative_prompt=[""] * n, num_inference_steps=2,
                                 guidance_scale=5.0, width=width, height=height, output_type="latent")
                report["warmup"][f"{n}x{width}x{height}"] = round(time.perf_counter() - t0, 2)
            # The VAE decode of each size is a stage of its own: with compile_vae it compiles (about
            # 20 s of what was a 35 s first stage, H200), and the shortest stages keep waiting jobs short.
            for width, height in dict.fromkeys((w, h) for _, w, h in accel.warmup):
                yield
                # sliced decode: one image at a time whatever the batch
                factor = self.txt2img.vae_scale_factor
                report["warmup"][f"vae {width}x{height}"] = acceleration.warm_up_decode(
                    self.txt2img.vae, (1, self.txt2img.vae.config.latent_channels, height // factor, width // factor))
        except Exception as exc:  # noqa: BLE001 — any compile/capture failure: serve without it
            log.error("acceleration (%s) failed: %s: %s", accel.describe(), type(exc).__name__, exc)
            acceleration.remove(self.txt2img)
            self.graphed = None
            if accel.compile != "none":  # the usual suspect: try once more without torch.compile
                yield from self._acceleration_stages(dataclasses.replace(accel, compile="none"))
                self.accel_report["error"] = f"compile={accel.compile}: {type(exc).__name__}: {exc}"[:300]
                return
            report["applied"], report["error"] = "fallback", f"{type(exc).__name__}: {exc}"[:300]
        report["seconds"] = round(time.perf_counter() - started, 2)
        log.info("acceleration %s ready in %.1fs (warm-ups: %s)", report["applied"], report["seconds"], report["warmup"])
        self.accel_report = report

    def _deferred_stages(self, accel: Acceleration):
        """The deferred part of the optimize block (compile, every warm-up shape), run by
        accelerate_deferred() when the worker is idle. Any earlier CUDA graphs are dropped first and
        captured again on the compiled UNet."""
        before = self.accel_report
        acceleration.remove(self.txt2img)
        self.graphed = None
        yield from self._acceleration_stages(accel)
        self.accel_report["before"] = {k: before.get(k) for k in ("applied", "seconds")}

    @staticmethod
    def _from_folder(folder: Path, dtype: torch.dtype) -> StableDiffusionXLPipeline:
        return StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                         add_watermarker=False)

    @classmethod
    def _from_single_file(cls, path: Path, config_path: Path | None, cache_dir: Path | None,
                          dtype: torch.dtype) -> tuple[StableDiffusionXLPipeline, str]:
        # Offline, from_single_file needs the component configs and tokenizers as a local folder;
        # without `config` it would try to fetch them from the Hub.
        if config_path is None or not (Path(config_path) / "model_index.json").is_file():
            raise ModelUnavailable(
                f"loading the single file {path} needs a diffusers config folder (model_index.json, component "
                f"configs, tokenizers); {config_path or 'none'} is not one; set {cls.CONFIG_ENV}")
        cached = Path(cache_dir) / _cache_key(path, Path(config_path), dtype) if cache_dir else None
        if cached is not None and cached.is_dir():
            try:
                return cls._from_folder(cached, dtype), "converted_cache"
            except Exception as exc:  # a damaged cache must not stop the worker: convert again
                log.warning("converted cache %s is unreadable (%s); converting %s again", cached, exc, path.name)
                shutil.rmtree(cached, ignore_errors=True)
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(config_path), dtype=dtype, local_files_only=True, add_watermarker=False)
        if cached is not None:
            cls._save_converted(pipe, cached)
        return pipe, "single_file"

    @staticmethod
    def _save_converted(pipe: StableDiffusionXLPipeline, target: Path) -> None:
        """Write into a temp folder, then rename: a crash never leaves a half folder under the final name."""
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by an earlier crash
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
            os.rename(tmp, target)
            log.info("converted %s into %s", target.name, target.parent)
        except OSError as exc:  # disk full, another worker renamed first: the loaded pipe is fine
            log.warning("could not keep the converted model at %s: %s", target, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ validation

    def check(self, job) -> None:
        """Reject a job before any GPU work. For img2img also download/decode the init image and keep
        it for the following generate() of the same job (so a bad image fails here, not mid-batch)."""
        self._validate(job)
        if _has_loras(job) and (self.accel_report.get("applied", "none") != "none" or self.deferred is not None):
            # Fused projections and captured CUDA graphs would ignore (or refuse) an adapter.
            raise ValueError(f"{job.job_type} cannot take LoRAs on this worker: SDXL runs accelerated "
                             "(fused layers, CUDA graphs); OPTIMIZE=0 serves SDXL LoRAs")
        self.job_loras.check(job)
        if job.spec.mode == "img2img":
            self._prepared = (job.job_id, self._load_init_image(job))

    def _validate(self, job) -> None:
        mode = job.spec.mode
        if mode not in MODES:
            raise ModelUnavailable(f"the SDXL worker cannot run {job.job_type} (mode {mode}; it runs {', '.join(MODES)})")
        for what, value in (("width", job.width), ("height", job.height)):
            if not MIN_SIZE <= value <= MAX_SIZE or value % 8:
                raise ValueError(f"{what} {value} must be a multiple of 8 between {MIN_SIZE} and {MAX_SIZE}")
        check_batch(job)
        if mode == "img2img":
            if not job.init_image:
                raise ValueError(f"{job.job_type} needs an init image")
            if job.strength is None or not 0 < job.strength <= 1:
                raise ValueError(f"strength {job.strength} must be in (0, 1]")
            if int(job.steps * job.strength) < 1:
                raise ValueError(f"steps {job.steps} × strength {job.strength} leaves no denoising step")

    def _load_init_image(self, job) -> Image.Image:
        image = load_input_image(job.init_image, self.limits.max_bytes, self.limits.max_pixels, self.limits.timeout)
        if image.size != (job.width, job.height):
            image = image.resize((job.width, job.height), Image.Resampling.LANCZOS)
        return image

    @staticmethod
    def denoising_steps(job) -> int:
        """Denoising steps actually run: img2img skips the first (1 - strength) of the schedule."""
        if job.spec.mode == "img2img":
            return min(int(job.steps * job.strength), job.steps)
        return job.steps

    # ------------------------------------------------------------------ generation

    def generate(self, job, on_step: StepCallback) -> list[Image.Image]:
        """One batch of job.num_images. Image i uses its own generator seeded with job.seeds[i], so it
        can be reproduced alone. Exceptions from on_step propagate (deadlines, shutdown). img2img uses
        the image check() decoded for this job, or decodes it now if check() was skipped."""
        self._validate(job)
        kwargs = {}
        if job.spec.mode == "img2img":
            prepared, self._prepared = self._prepared, None
            image = prepared[1] if prepared and prepared[0] == job.job_id else self._load_init_image(job)
            kwargs.update(image=image, strength=job.strength)
            pipe = self.img2img
        else:
            kwargs.update(width=job.width, height=job.height)
            pipe = self.txt2img

        def step_end(pipeline, step_index, timestep, callback_kwargs):
            # num_timesteps is the length of the loop really run (img2img: the strength-cut schedule).
            on_step(step_index + 1, pipeline.num_timesteps)
            return callback_kwargs

        n = job.num_images
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in job.seeds]
        oom = None
        try:
            with self.job_loras.active(job), acceleration.no_compile_in_jobs():
                embeds, pooled = self._encode(job)
                result = pipe(
                    prompt_embeds=embeds[:1].expand(n, -1, -1), negative_prompt_embeds=embeds[1:].expand(n, -1, -1),
                    pooled_prompt_embeds=pooled[:1].expand(n, -1),
                    negative_pooled_prompt_embeds=pooled[1:].expand(n, -1),
                    num_inference_steps=job.steps,
                    guidance_scale=job.guidance,
                    generator=generators,
                    callback_on_step_end=step_end,
                    output_type="pt",
                    **kwargs,
                )
            images = to_pil(result.images)
        except torch.cuda.OutOfMemoryError as exc:
            oom = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        except RuntimeError as exc:
            if "out of memory" not in str(exc):
                raise
            oom = str(exc).splitlines()[0]
        if oom is not None:
            # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
            self.free_memory()
            raise GenerationOutOfMemory(f"out of GPU memory generating {n} image(s) of {job.width}x{job.height}: {oom}")
        return images

    def _encode(self, job) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, negative prompt) embeddings and pooled embeddings, two rows each, through diffusers'
        own encode_prompt in one batch per text encoder (2 calls instead of the pipeline's 4). Kept in
        a small LRU keyed by the two texts, since negative prompts and retried prompts repeat; a job
        with LoRAs (which may change the text encoders) is never cached."""
        key = (job.prompt, job.negative_prompt)
        cached = None if _has_loras(job) else self.prompt_cache.get(key)
        if cached is not None:
            self.prompt_cache.move_to_end(key)
            return cached
        embeds, _, pooled, _ = self.txt2img.encode_prompt(
            prompt=[job.prompt, job.negative_prompt], device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False)
        if not _has_loras(job):
            self.prompt_cache[key] = (embeds, pooled)
            while len(self.prompt_cache) > PROMPT_CACHE_SIZE:
                self.prompt_cache.popitem(last=False)
        return embeds, pooled

    def free_memory(self) -> None:
        free_device_memory(self.device)


def _has_loras(job) -> bool:
    """The payload's adapters or the job type's own: either changes the text encoders and the UNet."""
    return bool(job.loras or job.spec.loras)
