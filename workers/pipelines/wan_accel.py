"""Wan speed-up that keeps the numerics: regional torch.compile of the transformer blocks and of the
VAE decoder's residual blocks, warmed up before any job needs them.

    accel = WanAcceleration.for_model(catalog, "wan_2_1_1_3b", settings)   # the model's `optimize` block
    report = accelerate(pipe, accel)      # compiles each repeated block, runs the warm-up shapes now
    stages = accelerate_stages(pipe, accel, report)   # the same, pausing between warm-up shapes

`compile: blocks` (the default) compiles each WanTransformerBlock (diffusers' `_repeated_blocks`); the
30 blocks share one compiled graph. The first warm-up shape compiles static; the next different shape
recompiles once with dynamic sizes, so every later frame count, size or batch reuses that graph:
no compile inside a job. `compile: unet` means the same here (the transformer has no UNet).
`compile_vae`: each WanResidualBlock of the VAE decoder, static shapes, warmed by decoding each video
shape (stages of their own, after the transformer's): the RMS norms, SiLUs and cache copies fuse
around the convolutions (video_fast's decode 2.79 → 2.21 s, fp32, 1e-3 from eager, H200; the whole
decoder compiled recompiled at every call: 47 s).
channels_last, fused QKV and CUDA graphs are SDXL levers: a Wan step is one ~1 s GPU-bound
call, launch overhead is noise there. Only called on CUDA. Importing this module touches no GPU.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch

from workers.pipelines.accel import _configure_dynamo, uncompile_blocks, use_compile_cache, warm_up_decode

log = logging.getLogger(__name__)

WARMUP_STEPS = 2   # UniPC's second step takes the multistep branch: both code paths compiled
VAE_BLOCK_CLASSES = ("WanResidualBlock",)
# Graphs per compiled code object. Dynamo specializes the VAE's residual blocks on their causal-conv
# cache index (`feat_idx[0]`, a Python int): one graph per block and chunk layout, 42 per video shape.
VAE_RECOMPILE_LIMIT = 256
Inputs = Callable[[int, int], dict]   # (width, height) → a warm-up's conditioning kwargs


@dataclass(frozen=True)
class WanAcceleration:
    compile: str = "blocks"                              # "none" | "blocks" ("unet" is read as "blocks")
    warmup: tuple[tuple[int, int, int, int], ...] = ()   # (batch, frames, width, height), in this order
    cache_dir: Path | None = None                        # persistent Inductor/Triton cache
    compile_at: str = "load"                             # "idle": WanFamily.accelerate_deferred does it
    compile_vae: bool = True                             # the VAE decoder's residual blocks too
    backend: object = "inductor"                         # torch.compile backend (tests count with their own)

    @property
    def is_off(self) -> bool:
        return self.compile == "none"

    def split(self) -> tuple["WanAcceleration | None", "WanAcceleration | None"]:
        """(before ready, deferred), as Acceleration.split: with compile_at="idle" all of it waits
        (the worker serves eager until its queue is first empty)."""
        return (None, self) if self.compile_at == "idle" else (self, None)

    @classmethod
    def for_model(cls, catalog, model_key: str, settings) -> "WanAcceleration":
        """Warm-up shapes: each job type of the model, videos first (their shape compiles static),
        then one-frame images at batch 1 and the type's default_images (or `warmup_images`)."""
        spec = catalog.models[model_key].optimize
        if not settings.optimize:
            return cls(compile="none")
        types = [t for t in catalog.job_types.values() if t.model == model_key]
        shapes: list[tuple[int, int, int, int]] = []
        for t in sorted(types, key=lambda t: t.content != "video"):
            if t.content == "video":
                batches = [1]
            else:
                batches = spec.warmup_images if spec.warmup_images is not None else sorted({1, t.default_images})
            for n in batches:
                shape = (n, t.frames or 1, t.width, t.height)
                if shape not in shapes:
                    shapes.append(shape)
        return cls(compile=spec.compile, warmup=tuple(shapes), cache_dir=settings.data_dir / "compile-cache",
                   compile_at=spec.compile_at, compile_vae=spec.compile_vae)


def _transformers(pipe) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None))
            if isinstance(m, torch.nn.Module)]


def compile_transformer_blocks(pipe, backend="inductor") -> int:
    count = 0
    for module in _transformers(pipe):
        names = tuple(getattr(module, "_repeated_blocks", ()) or ())
        for sub in module.modules():
            if type(sub).__name__ in names:
                sub.compile(backend=backend, fullgraph=True)
                count += 1
    return count


def compile_vae_decoder(pipe, backend="inductor") -> int:
    """The decoder's residual blocks, static shapes (not fullgraph: they write the causal-conv cache list)."""
    _configure_dynamo(VAE_RECOMPILE_LIMIT)
    count = 0
    for sub in pipe.vae.decoder.modules():
        if type(sub).__name__ in VAE_BLOCK_CLASSES:
            sub.compile(backend=backend, dynamic=False)
            count += 1
    return count


def remove(pipe) -> None:
    for module in [*_transformers(pipe), pipe.vae]:
        uncompile_blocks(module)


def warm_up(pipe, shapes, steps: int = WARMUP_STEPS, inputs: Inputs | None = None) -> dict:
    """Run each (batch, frames, width, height) for `steps` steps with CFG, latents out (no decode).
    `inputs(width, height)`: the pipeline's conditioning (an image for image-to-video, reference
    images for VACE), as the family passes it in a job."""
    times = {}
    transformer = _transformers(pipe)[0]
    text_dim, dtype = transformer.config.text_dim, transformer.dtype
    device = next(transformer.parameters()).device
    for n, frames, width, height in shapes:
        t0 = time.perf_counter()
        embeds = torch.randn(n, 512, text_dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        with torch.no_grad():
            pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=height, width=width, num_frames=frames,
                 num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                 **(inputs(width, height) if inputs else {}))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[f"{n}x{frames}x{width}x{height}"] = round(time.perf_counter() - t0, 2)
    return times


def warm_up_decoder(pipe, shape) -> dict:
    """Decode random latents of one clip of a video shape, as a job's decode: compiles the VAE
    decoder's residual blocks for it."""
    _, frames, width, height = shape
    spatial = pipe.vae_scale_factor_spatial
    latent_shape = (1, pipe.vae.config.z_dim, (frames - 1) // pipe.vae_scale_factor_temporal + 1, height // spatial,
                    width // spatial)
    return {f"vae 1x{frames}x{width}x{height}": warm_up_decode(pipe.vae, latent_shape)}


def _decoder_stage(pipe, shape, report: dict) -> dict:
    """warm_up_decoder, as an add-on: when it fails (out of memory under a VRAM budget, a compile
    error) only the VAE goes back to eager; the compiled transformer stays."""
    if "vae_error" in report:
        return {}
    try:
        return warm_up_decoder(pipe, shape)
    except Exception as exc:  # noqa: BLE001 — logged and reported; the worker serves on
        report["vae_error"] = f"{type(exc).__name__}: {exc}"[:300]
    # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
    log.error("Wan VAE decoder compile failed, it decodes eagerly: %s", report["vae_error"])
    uncompile_blocks(pipe.vae)
    report["applied"] = report["applied"].replace(", compile_vae", "")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {}


def accelerate(pipe, accel: WanAcceleration, inputs: Inputs | None = None) -> dict:
    """Compile and warm up now, before the worker reports ready."""
    report: dict = {}
    for _ in accelerate_stages(pipe, accel, report, inputs):
        pass
    return report


def accelerate_stages(pipe, accel: WanAcceleration, report: dict, inputs: Inputs | None = None) -> Iterator[None]:
    """accelerate() as a generator that fills `report` and yields between its stages (the transformer
    at each warm-up shape, then the VAE decode of each video shape), where a job may run: a shape not
    warmed yet runs eagerly, no compile inside a job. A failure leaves the eager transformer and VAE in
    place: the worker still serves, only slower."""
    if accel.is_off:
        report["applied"] = "none"
        return
    started = time.perf_counter()
    report.update(applied="compile=blocks" + (", compile_vae" if accel.compile_vae else ""), warmup={})
    try:
        use_compile_cache(accel.cache_dir)
        _configure_dynamo()
        report["blocks"] = compile_transformer_blocks(pipe, accel.backend)
        if accel.compile_vae:
            report["vae_blocks"] = compile_vae_decoder(pipe, accel.backend)
        stages = [partial(warm_up, pipe, [shape], inputs=inputs) for shape in accel.warmup]
        if accel.compile_vae:
            stages += [partial(_decoder_stage, pipe, shape, report) for shape in accel.warmup if shape[1] > 1]
        for i, stage in enumerate(stages):
            if i:
                yield
            report["warmup"].update(stage())
    except Exception as exc:  # noqa: BLE001 — any compile failure: serve without it
        log.error("Wan acceleration failed, serving eager: %s: %s", type(exc).__name__, exc)
        remove(pipe)
        report.clear()
        report.update(applied="fallback", error=f"{type(exc).__name__}: {exc}"[:300])
    report["seconds"] = round(time.perf_counter() - started, 2)
    log.info("Wan acceleration %s ready in %.1fs (warm-ups: %s)", report["applied"], report["seconds"],
             report.get("warmup"))
