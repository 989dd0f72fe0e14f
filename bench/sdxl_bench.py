"""SDXL part: plain diffusers next to the project's SDXLFamily, same weights, seeds, sizes, prompts.

Real-size SDXL architecture (the reference's configs), random weights, saved once as a diffusers
folder (bf16) that both sides load. Plain diffusers runs as a user would (fp16, VAE upcast to fp32,
default settings, PIL output). The project runs the whole job as the worker does: check → generate
(text encoding, denoising, VAE decode) → PNG encoding and upload to local storage (Runner._store).
"""
from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from bench.common import PEAK_TFLOPS, Report, compile_stats, peak_gib, rel_err, reset_peak, sync, timed
from bench.gpu_gaps import gpu_gaps

PROMPT = "t1 t2 t3 a lighthouse at dusk"
JOBS = (("sdxl_image_fast", 1), ("sdxl_image_high", 1), ("sdxl_image_fast", 6))


def label(job_type: str, n: int) -> str:
    return job_type if n == 1 else f"{job_type} x{n}"


# ------------------------------------------------------------------ models and jobs

def build_real_sdxl(folder: Path, device: str) -> None:
    """The reference's real-size SDXL (UNet 2.6 B, CLIP-L, OpenCLIP-bigG, VAE), random weights, bf16."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_dir = folder.parent / "vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 49406, "<|endoftext|>": 49407, **{f"t{i}</w>": i for i in range(49406)}}
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    torch.manual_seed(0)
    with torch.device(device):
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
                                                         projection_dim=1280))
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
                            force_upcast=True)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                     unet=unet, scheduler=sched).to(torch.bfloat16)
    pipe.save_pretrained(folder, safe_serialization=True)
    os.sync()  # 7 GB of dirty pages would otherwise slow every later fsync (the local storage's uploads)


def build_tiny_sdxl(folder: Path) -> None:
    from tools.tiny_models import tiny_sdxl_pipeline

    tiny_sdxl_pipeline(folder.parent / "vocab").to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)


def make_job(catalog, job_type: str, n: int, seed: int = 1000):
    from workers.job import parse_job

    return parse_job({"jobId": f"bench-{job_type}-{n}", "jobType": job_type, "userId": "bench-user",
                      "prompt": PROMPT, "numImages": n, "seed": seed}, catalog)


class Capture:
    """The latents entering the VAE decoder (a forward pre-hook; nothing is replaced). A sliced
    decode (the project's, image by image) calls it once per image: the parts are joined."""

    def __init__(self, vae):
        self._parts: list[torch.Tensor] = []
        self._handle = vae.post_quant_conv.register_forward_pre_hook(self._hook)

    @property
    def latents(self) -> torch.Tensor | None:
        return torch.cat(self._parts) if self._parts else None

    def _hook(self, module, args):
        self._parts.append(args[0].detach().float().cpu())

    def remove(self):
        self._handle.remove()


def as_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).float() / 255


def plain_call(pipe, job, device: str):
    gens = [torch.Generator(device).manual_seed(s) for s in job.seeds]
    n = job.num_images
    return pipe(prompt=[job.prompt] * n, negative_prompt=[job.negative_prompt] * n, num_inference_steps=job.steps,
                guidance_scale=job.guidance, width=job.width, height=job.height, generator=gens, output_type="pil").images


def _runner_stub(storage):  # what Runner._store uses of the runner: storage, and records (a Redis write)
    return SimpleNamespace(storage=storage, records=SimpleNamespace(update=lambda *a, **k: None))


def project_call(family, job, storage):
    from workers.runner import Runner

    getattr(family, "prompt_cache", {}).clear()   # every timed job encodes its prompts, as a new prompt does
    family.check(job)
    images = family.generate(job, lambda done, total: None)
    Runner._store(_runner_stub(storage), job, images)  # encode PNGs (threads) + upload, as the worker
    return images


def measure(report: Report, job, variant: str, fn, vae, runs: int, floor_s: float | None, **extra):
    """First call (not timed) records latents and images for the numerics check, then `runs` timed calls."""
    reset_peak()
    capture = Capture(vae)
    try:
        first = fn()
    finally:
        capture.remove()
    times, _ = timed(fn, runs=runs, warm=0)
    row = report.row(label(job.job_type, job.num_images), variant, times, floor_s=floor_s, **peak_gib(), **extra)
    return row, {"latents": capture.latents, "images": as_tensor(first)}


def add_errors(row: dict, out: dict, plain: dict | None, fp32: dict | None) -> None:
    for name, ref in (("plain", plain), ("fp32", fp32)):
        if ref:
            row[f"err_vs_{name}"] = rel_err(out["latents"], ref["latents"])
            row[f"img_err_vs_{name}"] = rel_err(out["images"], ref["images"])
    print("NUMERICS", json.dumps({k: v for k, v in row.items() if "err" in k or k in ("job", "variant")}), flush=True)


def probe(pipe, job, device: str) -> dict:
    """One CFG UNet step and one VAE decode on fixed random inputs (seeded on the CPU), in the
    pipeline's dtype and layout, through whatever unet.forward is installed (CUDA graph included):
    per-step numerics without the chaotic amplification a random-weight 15-step trajectory has."""
    h, w = job.height // 8, job.width // 8
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, h, w, generator=g)
    emb = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=g)
    ids = torch.tensor([[job.height, job.width, 0, 0, job.height, job.width]] * 2, dtype=torch.float32)
    lat = torch.randn(1, 4, h, w, generator=g) / 0.13025
    dt, vdt = pipe.unet.dtype, pipe.vae.dtype
    upcast = vdt == torch.float16 and pipe.vae.config.force_upcast  # plain diffusers decodes in fp32 then
    if upcast:
        pipe.vae.to(torch.float32)
        vdt = torch.float32
    with torch.no_grad():
        eps = pipe.unet(x.to(device, dt), torch.tensor(500.0, device=device), encoder_hidden_states=emb.to(device, dt),
                        added_cond_kwargs={"text_embeds": pooled.to(device, dt), "time_ids": ids.to(device, dt)},
                        return_dict=False)[0]
        image = pipe.vae.decode(lat.to(device, vdt), return_dict=False)[0]
    if upcast:
        pipe.vae.to(torch.float16)
    return {"unet": eps.float().cpu(), "vae": image.float().cpu()}


def add_probe_errors(row: dict, got: dict, ref: dict | None) -> None:
    if ref:
        row["step_err_vs_fp32"] = rel_err(got["unet"], ref["unet"])
        row["vae_err_vs_fp32"] = rel_err(got["vae"], ref["vae"])


def count_flops(pipe, job, device: str) -> dict:
    """FLOPs of text encoding (prompt + negative), one CFG UNet step (batch 2) and one VAE decode, 1 image."""
    h, w = job.height // 8, job.width // 8
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            pe, ne, ppe, npe = pipe.encode_prompt(prompt=job.prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True, negative_prompt=job.negative_prompt)
        te = fc.get_total_flops()
        dt = pipe.unet.dtype
        x = torch.randn(2, 4, h, w, device=device, dtype=dt)
        ids = torch.tensor([[job.height, job.width, 0, 0, job.height, job.width]] * 2, device=device, dtype=dt)
        with FlopCounterMode(display=False) as fc:
            pipe.unet(x, torch.tensor(500.0, device=device), encoder_hidden_states=torch.cat([ne, pe]),
                      added_cond_kwargs={"text_embeds": torch.cat([npe, ppe]), "time_ids": ids})
        unet = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            pipe.vae.decode(torch.randn(1, 4, h, w, device=device, dtype=pipe.vae.dtype))
        vae = fc.get_total_flops()
    return {"text_encoders": te, "unet_cfg_step": unet, "vae_decode": vae}


def floor_seconds(flops: dict | None, job) -> float | None:
    if not flops:   # the `plain` part counts the FLOPs; without it there is no floor
        return None
    total = job.num_images * (flops["text_encoders"] + job.steps * flops["unet_cfg_step"] + flops["vae_decode"])
    return round(total / (PEAK_TFLOPS * 1e12), 4)


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ the sections

def run_plain(report: Report, folder: Path, jobs: list, device: str, runs: int) -> tuple[dict, dict, dict]:
    """Plain diffusers, fp16 + VAE upcast (as the reference). Returns outputs by label and FLOPs by size."""
    from diffusers import StableDiffusionXLPipeline

    dtype = torch.float16 if device == "cuda" else torch.float32  # CPU smoke runs: no fp16 kernels there
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    flops = count_flops(pipe, jobs[0], device)
    report.meta["sdxl_flops"] = flops
    report.say("SDXL FLOPs", {k: f"{v / 1e12:.2f} TFLOP" for k, v in flops.items()})
    outs = {}
    for job in jobs:
        _, outs[label(job.job_type, job.num_images)] = measure(
            report, job, "plain diffusers fp16 (VAE fp32)", lambda: plain_call(pipe, job, device), pipe.vae, runs,
            floor_seconds(flops, job))
    plain_probe = probe(pipe, jobs[0], device)
    x6 = next((j for j in jobs if j.num_images > 1), None)
    if x6 is not None:  # what a plain script adds to save them: PIL's default PNG (level 6), one by one
        arrays = (outs[label(x6.job_type, x6.num_images)]["images"] * 255).round().to(torch.uint8).numpy()
        images = [Image.fromarray(a) for a in arrays]
        t0 = time.perf_counter()
        for im in images:
            im.save(folder.parent / "plain.png")
        report.meta["plain_png_save_x6_s"] = round(time.perf_counter() - t0, 3)
    del pipe
    cleanup()
    return outs, flops, plain_probe


def run_references(report: Report, folder: Path, job, device: str, plain: dict, plain_probe: dict) -> dict:
    """The same job in fp32 (TF32 off) and in plain bf16: which precision explains the differences."""
    from diffusers import StableDiffusionXLPipeline

    key = label(job.job_type, job.num_images)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    cudnn_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        row, fp32 = measure(report, job, "reference fp32 (no TF32)", lambda: plain_call(pipe, job, device), pipe.vae, 1, None)
        fp32["probe"] = probe(pipe, job, device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32
    plain_row = next(r for r in report.rows if r["job"] == key and r["variant"].startswith("plain"))
    add_errors(plain_row, plain[key], None, fp32)
    add_probe_errors(plain_row, plain_probe, fp32["probe"])
    pipe.to(torch.bfloat16)  # weights are bf16 values: exact
    row, bf16 = measure(report, job, "plain diffusers bf16 (no upcast)", lambda: plain_call(pipe, job, device), pipe.vae, 2, None)
    add_errors(row, bf16, plain[key], fp32)
    add_probe_errors(row, probe(pipe, job, device), fp32["probe"])
    del pipe
    cleanup()
    return fp32


def project_options(folder: Path, device: str):
    from workers.pipelines.base import LoadOptions

    return LoadOptions(model_path=folder, config_path=None, device=device, cache_dir=None)


def run_project_stages(report: Report, folder: Path, job, device: str, storage, plain: dict, fp32: dict | None,
                       flops: dict, runs: int) -> None:
    """Attribution on sdxl_image_fast: the project's path as loaded, then each lever without compile."""
    from workers.pipelines import accel as A
    from workers.pipelines.sdxl import SDXLFamily

    key = label(job.job_type, job.num_images)
    floor_s = floor_seconds(flops, job)
    family = SDXLFamily.load(project_options(folder, device))
    row, out = measure(report, job, "project bf16, no optimize", lambda: project_call(family, job, storage),
                       family.txt2img.vae, runs, floor_s)
    add_errors(row, out, plain.get(key), fp32)
    add_probe_errors(row, probe(family.txt2img, job, device), fp32 and fp32["probe"])
    row["phases"] = breakdown(family, job, storage)
    A.apply(family.txt2img, A.Acceleration(compile="none", cuda_graphs=False))
    row, out = measure(report, job, "+ channels_last, fused QKV, cudnn", lambda: project_call(family, job, storage),
                       family.txt2img.vae, runs, floor_s)
    add_errors(row, out, plain.get(key), fp32)
    add_probe_errors(row, probe(family.txt2img, job, device), fp32 and fp32["probe"])
    row["phases"] = breakdown(family, job, storage)
    graphed = A.GraphedUNet(family.txt2img.unet, family.txt2img.unet.forward)
    family.txt2img.unet.forward = graphed
    with graphed.capture():
        project_call(family, job, storage)
    row, out = measure(report, job, "+ CUDA graphs (eager kernels)", lambda: project_call(family, job, storage),
                       family.txt2img.vae, runs, floor_s)
    row["graph_replays"], row["eager_unet_calls"] = graphed.replays, graphed.eager_calls
    add_errors(row, out, plain.get(key), fp32)
    add_probe_errors(row, probe(family.txt2img, job, device), fp32 and fp32["probe"])
    row["phases"] = breakdown(family, job, storage)
    report.say("stage phases", json.dumps({r["variant"]: r.get("phases") for r in report.rows if "phases" in r}))
    del family, graphed
    cleanup()


def breakdown(family, job, storage) -> dict:
    """Wall-clock phases of one job, with a device sync at each boundary (slightly slower than untimed)."""
    from workers import media
    from workers.runner import Runner

    marks: dict[str, float] = {}
    pipe = family.txt2img

    def mark(name):
        def hook(*_):
            sync()
            marks.setdefault(name, time.perf_counter())
        return hook

    handles = [pipe.text_encoder.register_forward_pre_hook(mark("text")), pipe.unet.register_forward_pre_hook(mark("denoise")),
               pipe.vae.post_quant_conv.register_forward_pre_hook(mark("vae")), pipe.vae.decoder.register_forward_hook(mark("to_pil"))]
    getattr(family, "prompt_cache", {}).clear()
    try:
        sync()
        t0 = time.perf_counter()
        family.check(job)
        images = family.generate(job, lambda *_: None)
        marks["png_upload"] = time.perf_counter()
        Runner._store(_runner_stub(storage), job, images)
        marks["end"] = time.perf_counter()
    finally:
        for h in handles:
            h.remove()
    order = ["start", "text", "denoise", "vae", "to_pil", "png_upload", "end"]
    marks["start"] = t0
    phases = {order[i]: round(marks[order[i + 1]] - marks[order[i]], 4) for i in range(len(order) - 1)}
    t1 = time.perf_counter()
    media.encode_pngs(images)  # again, alone: how much of png_upload is the encoding
    phases["png_encode_alone"] = round(time.perf_counter() - t1, 4)
    return phases


def run_project(report: Report, folder: Path, jobs: list, device: str, storage, plain: dict, fp32: dict | None,
                flops: dict, runs: int, accel, variant: str, check_job: str | None = None) -> dict:
    """The production path: SDXLFamily.load with acceleration (compile + warm-up inside load)."""
    from workers.pipelines.sdxl import SDXLFamily

    t0 = time.perf_counter()
    family = SDXLFamily.load(project_options(folder, device), accel=accel)
    ready_s = time.perf_counter() - t0
    family.accelerate_deferred()   # compile_at: idle — as a worker does at its first empty queue
    load_s = time.perf_counter() - t0
    report.say(f"{variant}: ready in {ready_s:.1f}s, fully accelerated in {load_s:.1f}s")
    report.say(f"{variant}: loaded + accelerated in {load_s:.1f}s", json.dumps(family.accel_report))
    report.meta.setdefault("project_load", {})[variant] = {"load_and_warmup_s": round(load_s, 2), "ready_s": round(ready_s, 2),
                                                            **family.accel_report,
                                                            "compile_stats": compile_stats()}
    report.say("compile stats", json.dumps(report.meta["project_load"][variant]["compile_stats"])[:2500])
    for job in jobs:
        key = label(job.job_type, job.num_images)
        before = (family.graphed.replays, family.graphed.eager_calls) if family.graphed else (0, 0)
        row, out = measure(report, job, variant, lambda: project_call(family, job, storage), family.txt2img.vae, runs,
                           floor_seconds(flops, job))
        if family.graphed:
            row["graph_replays"] = family.graphed.replays - before[0]
            row["eager_unet_calls"] = family.graphed.eager_calls - before[1]
        add_errors(row, out, plain.get(key), fp32 if key == check_job else None)
        if key == check_job:
            add_probe_errors(row, probe(family.txt2img, job, device), fp32 and fp32["probe"])
    fast = next((j for j in jobs if j.num_images == 1), None)
    if fast is not None:
        phases = breakdown(family, fast, storage)
        report.meta.setdefault("breakdown", {})[variant] = phases
        report.say("phases of one", label(fast.job_type, 1), json.dumps(phases))
        pipe = family.txt2img
        try:
            prompts = getattr(family, "prompt_cache", {})
            gaps = gpu_gaps(lambda: (prompts.clear(), family.check(fast), family.generate(fast, lambda *_: None)),
                            phases={"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2,
                                    "unet": pipe.unet, "vae": pipe.vae.decoder})
        except Exception as exc:  # noqa: BLE001 — a diagnostic must not lose the part's rows
            gaps = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        if gaps is not None:
            report.meta.setdefault("gaps", {})[variant] = gaps
            report.say("GPU gaps in one", label(fast.job_type, 1), "(check + generate)", json.dumps(gaps))
    del family
    cleanup()
    return report.meta["project_load"][variant]
