"""Qwen-Image, Qwen-Image-Edit and Z-Image part: plain diffusers next to the project's families, and
the residency manager's swap times between them (and SDXL) under a VRAM budget.

Real size: the modules of bench/image_models.py (random weights, built on the GPU; the outputs are
noise, the times are the released models'). Tiny (`--tiny`): the tests' tiny folders, loaded by the
production families. Plain diffusers is the pipeline call its docs show (true CFG with the negative
prompt, the Lightning LoRA through `load_lora_weights`) and the same PNG encoding the worker does;
the project is the whole job as the image worker runs it: check (LoRAs resolved and checked, input
images decoded) → generate (LoRA active for the job only) → PNGs uploaded to local storage. The
quality tiers (50 and 40 steps) are timed once after a 2-step warm-up; the fast ones `runs` times.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import Report, peak_gib, rel_err, reset_peak, timed

PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"
LIGHTNING = "Qwen-Image-2512-Lightning-4steps-V1.0-bf16"   # the fast tier's LoRA in job_types.yaml
# Every linear layer of the transformer blocks, as the Lightning LoRAs cover them (rank 64).
LIGHTNING_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1",
                     "txt_mod.1")


def data_url(size: tuple[int, int], seed: int, mode: str = "RGB") -> str:
    rng = np.random.default_rng(seed)
    if mode == "L":   # a mask: the right half repainted
        array = np.zeros((size[1], size[0]), np.uint8)
        array[:, size[0] // 2:] = 255
    else:
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_job(catalog, job_type: str, seed: int = 3000):
    from workers.job import parse_job

    spec = catalog.job_types[job_type]
    payload = {"jobId": f"bench-{job_type}", "jobType": job_type, "userId": "bench-user", "prompt": PROMPT,
               "numImages": 1, "seed": seed}
    size = (spec.width, spec.height)
    if spec.mode == "edit":
        payload["referenceImages"] = [data_url(size, seed)]
    elif spec.mode == "inpaint":
        payload.update(initImage=data_url(size, seed), maskImage=data_url(size, seed, "L"))
    return parse_job(payload, catalog)


def png_bytes(images) -> None:
    for image in images:
        image.save(io.BytesIO(), format="PNG")


def plain_call(pipe, family, job) -> list[Image.Image]:
    """The pipeline as its docs call it (the family only decodes the job's input images), then PNGs."""
    inputs = family._images(job)
    kwargs = {"true_cfg_scale": job.guidance} if "true_cfg_scale" in _params(pipe) else {"guidance_scale": job.guidance}
    if job.guidance > 1:
        kwargs["negative_prompt"] = job.negative_prompt
    if job.spec.mode == "edit":
        kwargs["image"] = inputs["images"]
    elif job.spec.mode == "inpaint":
        kwargs.update(image=inputs["image"], mask_image=inputs["mask"], strength=job.strength)
    images = pipe(prompt=job.prompt, height=job.height, width=job.width, num_inference_steps=job.steps,
                  generator=torch.Generator(family.device).manual_seed(job.seeds[0]), **kwargs).images
    png_bytes(images)
    return images


def _params(pipe) -> set:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def project_call(family, job, storage) -> list[Image.Image]:
    from bench.sdxl_bench import _runner_stub
    from workers.runner import Runner

    family.check(job)
    images = family.generate(job, lambda done, total: None)
    Runner._store(_runner_stub(storage), job, images)
    return images


def as_array(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images]))


def bench_pair(report: Report, family, plain_pipe, job, storage, runs: int, quality: bool,
               plain_lora: Path | None = None) -> None:
    """Plain then project, same seed, each after one warm-up call (2 steps for a quality tier, timed
    once; a fast tier `runs` times). `plain_lora`: loaded with load_lora_weights for the plain runs only."""
    warm = dataclasses.replace(job, steps=2) if quality else job
    dtype = str(next(plain_pipe.transformer.parameters()).dtype).replace("torch.", "")
    plain_name = f"plain diffusers {dtype}" + (" + load_lora_weights" if plain_lora else "")
    variants = ((plain_name, lambda j: plain_call(plain_pipe, family, j)),
                ("project (job as the worker runs it)", lambda j: project_call(family, j, storage)))
    reference = None
    for variant, call in variants:
        if plain_lora and reference is None:
            t0 = time.perf_counter()
            plain_pipe.load_lora_weights(str(plain_lora), adapter_name="plain")
            report.meta[f"{job.job_type}_plain_lora_load_s"] = round(time.perf_counter() - t0, 2)
        call(warm)
        reset_peak()
        times, images = timed(lambda: call(job), runs=1 if quality else runs, warm=0)
        row = report.row(job.job_type, variant, times, steps=job.steps, **peak_gib())
        out = as_array(images)
        if reference is None:
            reference = out
            if plain_lora:
                plain_pipe.delete_adapters("plain")
        else:
            row["img_err_vs_plain"] = rel_err(out, reference)


def qwen_t2i(report: Report, state: dict) -> None:
    catalog, runs = state["catalog"], state["runs"]
    pipe, family = load(state, "qwen_image", "t2i")
    state["families"]["qwen_image_2512"] = family
    bench_pair(report, family, pipe, make_job(catalog, "qwen_image_2512"), state["storage"], runs, quality=True)
    # Fast tier: the Lightning LoRA; plain through load_lora_weights, the project through its LoRA slots.
    lora = lightning_lora(pipe, state["work"] / "loras", state["tiny"])
    bench_pair(report, family, pipe, make_job(catalog, "qwen_image_2512_fast"), state["storage"], runs, quality=False,
               plain_lora=lora)


def qwen_edit(report: Report, state: dict) -> None:
    from diffusers import QwenImageInpaintPipeline

    catalog = state["catalog"]
    pipe, family = load(state, "qwen_image_edit", "edit")
    state["families"]["qwen_image_edit_2511"] = family
    bench_pair(report, family, pipe, make_job(catalog, "qwen_image_edit_2511"), state["storage"], state["runs"], True)
    inpaint = QwenImageInpaintPipeline.from_pipe(pipe, dtype=pipe.transformer.dtype)
    bench_pair(report, family, inpaint, make_job(catalog, "qwen_image_inpaint_2511"), state["storage"], state["runs"],
               True)


def z_image(report: Report, state: dict) -> None:
    pipe, family = load(state, "z_image", None)
    state["families"]["z_image_turbo"] = family
    bench_pair(report, family, pipe, make_job(state["catalog"], "z_image_turbo"), state["storage"], state["runs"], False)


def load(state: dict, kind: str, qwen_kind: str | None):
    """(plain pipeline, production family around the same modules): real size built in memory, or
    the tiny folder loaded by the production loader."""
    from bench import image_models as M
    from workers.pipelines.base import LoadOptions
    from workers.pipelines.lora import LoraLibrary

    library = LoraLibrary(state["work"] / "loras")
    t0 = time.perf_counter()
    if state["tiny"]:
        from tools.tiny_qwen import build_tiny_qwen
        from tools.tiny_zimage import build_tiny_zimage
        from workers.pipelines.qwen_image import QwenImageFamily
        from workers.pipelines.z_image import ZImageFamily

        folder = state["work"] / kind
        if not (folder / "model_index.json").exists():
            build_tiny_zimage(folder) if kind == "z_image" else build_tiny_qwen(folder, qwen_kind)
        cls = ZImageFamily if kind == "z_image" else QwenImageFamily
        family = cls.load(LoadOptions(model_path=folder, config_path=None, device=state["device"], cache_dir=None),
                          loras=library, kind=kind)
    else:
        pipe = M.zimage_pipeline(state["device"]) if kind == "z_image" else M.qwen_image_pipeline(qwen_kind, state["device"])
        family = M.as_family(pipe, kind, library)
    state["report"].say(f"{kind} ready in {time.perf_counter() - t0:.1f}s")
    return family.pipe, family


def lightning_lora(pipe, folder: Path, tiny: bool) -> Path:
    from tools.tiny_lora import build_tiny_lora

    path = folder / f"{LIGHTNING}.safetensors"
    if not path.exists():
        rank, targets = (4, ("to_q", "to_k", "to_v")) if tiny else (64, LIGHTNING_TARGETS)
        build_tiny_lora(pipe, path, seed=7, rank=rank, targets=targets)
    return path


def swaps(report: Report, state: dict) -> None:
    """The residency manager with a budget that holds the largest model alone: each step makes one
    model resident and reports cold / warm / resident, the time and what it moved out. SDXL joins
    (without CUDA graphs, which would pin it) when bench.run's build part made its folder."""
    from workers.pipelines.residency import GIB, Residency, family_modules, weight_bytes

    families = dict(state["families"])
    sdxl = state["work"] / "sdxl"   # bench.run's build part: the real-size SDXL folder (tiny with --tiny)
    if (sdxl / "model_index.json").exists():
        from workers.pipelines.base import LoadOptions
        from workers.pipelines.sdxl import SDXLFamily

        families["lustify_sdxl"] = SDXLFamily.load(LoadOptions(model_path=sdxl, config_path=None,
                                                               device=state["device"], cache_dir=None))
    if len(families) < 2:
        report.note("swaps skipped: fewer than two models built")
        return
    sizes = {k: weight_bytes(family_modules(f)) for k, f in families.items()}
    budget = max(sizes.values()) + min(sizes.values()) // 2   # the largest alone, or the others together
    residency = Residency({k: (lambda f=f: f) for k, f in families.items()}, state["device"], budget_bytes=budget)
    keys = list(families)
    for key in keys:   # already in memory: the first visits report resident or a swap, not a load
        residency.loaded(key)
        residency.entries[key].load_ms = None
    order = keys * 3   # round robin: with room for one large model, every visit after the first swaps
    report.meta["swap_budget_gib"] = round(budget / GIB, 2)
    report.meta["swap_model_gib"] = {k: round(v / GIB, 2) for k, v in sizes.items()}
    for key in order:
        t0 = time.perf_counter()
        result = residency.make_resident(key)
        seconds = time.perf_counter() - t0
        report.row(f"swap → {key}", f"{result['residency']}, budget {budget / GIB:.1f} GiB", [seconds],
                   residency=result["residency"],
                   evicted=",".join(result["evicted"]) or "-", model_gib=round(sizes[key] / GIB, 2))


STEPS = ("z_image", "qwen_t2i", "swaps", "qwen_edit")


def run_images(report: Report, catalog, work: Path, device: str, storage, runs: int = 3, tiny: bool = False,
               which: tuple[str, ...] = STEPS) -> None:
    state = {"catalog": catalog, "work": work, "device": device, "storage": storage, "runs": runs, "tiny": tiny,
             "families": {}, "report": report}
    steps = {"z_image": z_image, "qwen_t2i": qwen_t2i, "swaps": swaps, "qwen_edit": qwen_edit}
    for name in which:
        if name == "qwen_edit" and state["families"].pop("qwen_image_2512", None) is not None:
            torch.cuda.empty_cache() if device == "cuda" else None   # 20B more: the text-to-image model goes first
        report.say(f"--- images: {name}")
        try:
            steps[name](report, state)
        except Exception as exc:  # noqa: BLE001 — report it, run the next step
            import traceback

            traceback.print_exc()
            report.note(f"images {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
