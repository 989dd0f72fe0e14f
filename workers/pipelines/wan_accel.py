"""Wan speed-up that keeps the numerics: regional torch.compile of the transformer blocks, warmed up at load.

    accel = WanAcceleration.for_model(catalog, "wan_2_1_1_3b", settings)   # the model's `optimize` block
    report = accelerate(pipe, accel)      # compiles each repeated block, runs the warm-up shapes now

`compile: blocks` (the default) compiles each WanTransformerBlock (diffusers' `_repeated_blocks`); the
30 blocks share one compiled graph. The first warm-up shape compiles static; the next different shape
recompiles once with dynamic sizes, so every later frame count, size or batch reuses that graph:
no compile inside a job. `compile: unet` means the same here (the transformer has no UNet).
channels_last, fused QKV and CUDA graphs are SDXL levers: a Wan step is one ~1 s GPU-bound
call, launch overhead is noise there. Only called on CUDA. Importing this module touches no GPU.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.pipelines.accel import _configure_dynamo, uncompile_blocks, use_compile_cache

log = logging.getLogger(__name__)

WARMUP_STEPS = 2   # UniPC's second step takes the multistep branch: both code paths compiled


@dataclass(frozen=True)
class WanAcceleration:
    compile: str = "blocks"                              # "none" | "blocks" ("unet" is read as "blocks")
    warmup: tuple[tuple[int, int, int, int], ...] = ()   # (batch, frames, width, height), in this order
    cache_dir: Path | None = None                        # persistent Inductor/Triton cache
    compile_at: str = "load"                             # "idle": WanFamily.accelerate_deferred does it

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
                   compile_at=spec.compile_at)


def _transformers(pipe) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None))
            if isinstance(m, torch.nn.Module)]


def compile_transformer_blocks(pipe) -> int:
    count = 0
    for module in _transformers(pipe):
        names = tuple(getattr(module, "_repeated_blocks", ()) or ())
        for sub in module.modules():
            if type(sub).__name__ in names:
                sub.compile(fullgraph=True)
                count += 1
    return count


def remove(pipe) -> None:
    for module in _transformers(pipe):
        uncompile_blocks(module)


def warm_up(pipe, shapes, steps: int = WARMUP_STEPS) -> dict:
    """Run each (batch, frames, width, height) for `steps` steps with CFG, latents out (no decode)."""
    times = {}
    transformer = _transformers(pipe)[0]
    text_dim, dtype = transformer.config.text_dim, transformer.dtype
    device = next(transformer.parameters()).device
    for n, frames, width, height in shapes:
        t0 = time.perf_counter()
        embeds = torch.randn(n, 512, text_dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        with torch.no_grad():
            pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=height, width=width, num_frames=frames,
                 num_inference_steps=steps, guidance_scale=5.0, output_type="latent")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[f"{n}x{frames}x{width}x{height}"] = round(time.perf_counter() - t0, 2)
    return times


def accelerate(pipe, accel: WanAcceleration) -> dict:
    """Compile and warm up now, before the worker reports ready. A failure leaves the eager
    transformer in place: the worker still serves, only slower."""
    if accel.is_off:
        return {"applied": "none"}
    started = time.perf_counter()
    report: dict = {"applied": "compile=blocks", "warmup": {}}
    try:
        use_compile_cache(accel.cache_dir)
        _configure_dynamo()
        report["blocks"] = compile_transformer_blocks(pipe)
        report["warmup"] = warm_up(pipe, accel.warmup)
    except Exception as exc:  # noqa: BLE001 — any compile failure: serve without it
        log.error("Wan acceleration failed, serving eager: %s: %s", type(exc).__name__, exc)
        remove(pipe)
        report = {"applied": "fallback", "error": f"{type(exc).__name__}: {exc}"[:300]}
    report["seconds"] = round(time.perf_counter() - started, 2)
    log.info("Wan acceleration %s ready in %.1fs (warm-ups: %s)", report["applied"], report["seconds"],
             report.get("warmup"))
    return report
