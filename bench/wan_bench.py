"""Wan 2.1 1.3B part: plain diffusers next to the project's WanFamily, same folder, seeds, sizes, prompts.

Real-size architecture (transformer 1.3 B, UMT5-XXL text encoder, Wan VAE), random weights, saved once
as a diffusers folder. Plain diffusers runs as its Wan docs show (bf16, VAE fp32, pipe(prompt=...)),
then encodes the same MP4 / PNGs as the worker (same encoder, so only the pipeline differs). The
project runs the whole job as the video worker does: check → generate (text encoding, denoising,
VAE decode, uint8 frames) → MP4 + thumbnail (or PNGs) → upload to local storage. Then the same
family with wan_accel (regional compile of the transformer blocks, warmed up) as in production.
Jobs: video_fast (the catalog's frames, steps, size) and image_fast at its default_images.
"""
from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import PEAK_TFLOPS, Report, peak_gib, rel_err, reset_peak, sync, timed

JOB_TYPES = ("video_fast", "image_fast")   # timed `runs` times, latents checked against plain
ONCE = ("video_high",)                     # quality tier: a 2-step warm-up, then one timed run
CACHED = "video_fast_cached"               # caching tier: against diffusers' own MagCache, drift vs video_fast
PROMPT = "a lighthouse at dusk, waves, slow camera pan"
MODEL_KEY = "wan_2_1_1_3b"


def build_real_wan(folder: Path, device: str) -> None:
    """Wan 2.1 T2V 1.3B's configs (transformer, UMT5-XXL, VAE, UniPC), random weights."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from tools.tiny_wan import tiny_umt5_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        te = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                         feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                         decoder_start_token_id=0, tie_word_embeddings=False)).to(torch.bfloat16)
        tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                   out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                                   added_kv_proj_dim=None, rope_max_seq_len=1024).to(torch.bfloat16)
        vae = AutoencoderKLWan()
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                    num_train_timesteps=1000)
    WanPipeline(tokenizer=tiny_umt5_tokenizer(), text_encoder=te, vae=vae, scheduler=sched,
                transformer=tr).save_pretrained(folder, safe_serialization=True)


def build_tiny_wan(folder: Path) -> None:
    from tools.tiny_wan import build_tiny_wan as build

    build(folder, "t2v")


def make_job(catalog, job_type: str, seed: int = 2000):
    from workers.job import parse_job

    n = catalog.job_types[job_type].default_images if catalog.job_types[job_type].content == "image" else 1
    return parse_job({"jobId": f"bench-{job_type}", "jobType": job_type, "userId": "bench-user", "prompt": PROMPT,
                      "numImages": n, "seed": seed}, catalog)


class Capture:
    """The latents entering the VAE decoder (one call per sliced batch item); nothing replaced."""

    def __init__(self, vae):
        self.parts: list[torch.Tensor] = []
        self._handle = vae.post_quant_conv.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.parts.append(args[0].detach().float().cpu())

    def result(self):
        self._handle.remove()
        return torch.cat(self.parts) if self.parts else None


def plain_call(pipe, job, device: str) -> torch.Tensor:
    """Plain WanPipeline, then the same encoding the worker does. Returns uint8 (B, F, H, W, 3)."""
    from workers import media

    image = job.spec.content == "image"
    gens = [torch.Generator(device).manual_seed(s) for s in job.seeds]
    frames = pipe(prompt=job.prompt, negative_prompt=job.negative_prompt, height=job.height, width=job.width,
                  num_frames=job.frames or 1, num_inference_steps=job.steps, guidance_scale=job.guidance,
                  num_videos_per_prompt=job.num_images if image else 1, generator=gens if image else gens[0],
                  output_type="np").frames
    array = (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)
    if image:
        from PIL import Image

        for frame in array[:, 0]:
            Image.fromarray(frame).save(io.BytesIO(), format="PNG")
    else:
        media.encode_mp4(list(array[0]), job.fps)
        media.encode_jpeg(array[0, 0])
    return torch.from_numpy(array)


def store(job, out, storage) -> None:
    """MP4 + thumbnail, or PNGs, uploaded to local storage as the worker does."""
    from bench.sdxl_bench import _runner_stub
    from workers.runner import Runner

    stub = _runner_stub(storage)
    stub._store_video = lambda j, clip: Runner._store_video(stub, j, clip)
    Runner._store(stub, job, out)


def project_call(family, job, storage) -> torch.Tensor:
    family.check(job)
    out = family.generate(job, lambda done, total: None)
    store(job, out, storage)
    if job.spec.content == "image":
        return torch.from_numpy(np.stack([np.asarray(im) for im in out]))[:, None]
    return torch.from_numpy(np.stack(out.frames))[None]


def count_flops(pipe, job, device: str) -> dict:
    """One CFG step (two transformer calls) and one VAE decode at the job's shape and batch."""
    tr = pipe.transformer
    batch = job.num_images if job.spec.content == "image" else 1
    lat_f = ((job.frames or 1) - 1) // 4 + 1
    x = torch.randn(batch, 16, lat_f, job.height // 8, job.width // 8, device=device, dtype=tr.dtype)
    emb = torch.randn(batch, 512, tr.config.text_dim, device=device, dtype=tr.dtype)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            for _ in range(2):
                tr(x, timestep=torch.tensor([500] * batch, device=device), encoder_hidden_states=emb, return_dict=False)
        step = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            pipe.vae.decode(x[:1].to(pipe.vae.dtype))
        vae = fc.get_total_flops() * batch
    return {"cfg_step": step, "vae_decode": vae}


def floor_s(flops: dict, job) -> float:
    return round((job.steps * flops["cfg_step"] + flops["vae_decode"]) / (PEAK_TFLOPS * 1e12), 3)


class PhaseClock:
    """An on_step that timestamps the family's phases (device synced at each boundary)."""

    def __init__(self):
        self.marks: list[tuple[str, float]] = []

    def __call__(self, done, total):
        pass

    def phase(self, name):
        sync()
        self.marks.append((name, time.perf_counter()))


def wan_phases(family, job, storage) -> dict:
    """Seconds of one job by phase: text encoding, denoising, VAE decode + uint8 frames, MP4 + upload."""
    clock = PhaseClock()
    family.check(job)
    clock.phase("start")
    out = family.generate(job, clock)
    clock.phase("store")
    store(job, out, storage)
    clock.phase("end")
    names = {"start": "check", "encoding prompt": "text", "generating": "denoise", "decoding": "vae_decode_uint8",
             "store": "mp4_thumb_upload"}
    marks = clock.marks
    return {names.get(a, a): round(tb - ta, 3) for (a, ta), (_, tb) in zip(marks, marks[1:]) if a in names}


def plain_magcache(pipe, job, calibrations):
    """diffusers' own MagCache hooks for the plain pipeline, with the tier's settings and calibration
    (one list for both CFG branches: its config takes one)."""
    from diffusers import MagCacheConfig

    from workers.pipelines.step_cache import calibration_for

    spec = job.spec.step_cache
    calibration = calibration_for(calibrations, pipe.transformer.config)
    return MagCacheConfig(threshold=spec.threshold, max_skip_steps=spec.max_skip_steps, retention_ratio=spec.retention,
                          num_inference_steps=job.steps, mag_ratios=list(calibration.cond))


def measure(report: Report, job, variant: str, fn, vae, runs: int, floor: float, **extra) -> tuple[dict, dict]:
    reset_peak()
    cap = Capture(vae)
    try:
        first = fn()
    finally:
        latents = cap.result()
    times, _ = timed(fn, runs=runs, warm=0)
    row = report.row(job.job_type + ("" if job.num_images == 1 else f" x{job.num_images}"), variant, times,
                     floor_s=floor, **peak_gib(), **extra)
    return row, {"latents": latents, "frames": first.float() / 255}


def measure_once(report: Report, job, variant: str, call, floor: float) -> dict:
    """A 2-step warm-up of the same shape (a first call's kernels, allocations and any compile), then
    one timed run of the whole job."""
    call(dataclasses.replace(job, steps=2))
    reset_peak()
    times, _ = timed(lambda: call(job), runs=1, warm=0)
    return report.row(job.job_type, variant, times, floor_s=floor, **peak_gib())


class StepProbe:
    """One transformer call at video_fast's shape (random latents and text embeddings, t = 500): the
    per-step numerics of compiled bf16 and eager bf16 against fp32 (TF32 off). Separates bf16
    rounding from anything compile changes before it is amplified over 15 steps."""

    def __init__(self, job, device: str, text_dim: int):
        gen = torch.Generator().manual_seed(11)
        lat_f = (job.frames - 1) // 4 + 1
        self.x = torch.randn(1, 16, lat_f, job.height // 8, job.width // 8, generator=gen).to(device)
        self.emb = torch.randn(1, 512, text_dim, generator=gen).to(device)
        self.t = torch.tensor([500], device=device)
        self.outputs: dict[str, torch.Tensor] = {}

    def run(self, name: str, transformer, dtype) -> None:
        with torch.no_grad():
            out = transformer(self.x.to(dtype), timestep=self.t, encoder_hidden_states=self.emb.to(dtype),
                              return_dict=False)[0]
        self.outputs[name] = out.float().cpu()

    def fp32(self, transformer) -> None:
        import copy

        reference = copy.deepcopy(transformer).float()
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            self.run("fp32", reference, torch.float32)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            del reference
            torch.cuda.empty_cache()

    def errors(self) -> dict:
        ref = self.outputs.get("fp32")
        out = {f"step_err_{k}_vs_fp32": rel_err(v, ref) for k, v in self.outputs.items() if k != "fp32"}
        if "compiled" in self.outputs and "eager" in self.outputs:
            out["step_err_compiled_vs_eager"] = rel_err(self.outputs["compiled"], self.outputs["eager"])
        return out


def add_errors(row: dict, out: dict, ref: dict | None, name: str = "plain") -> None:
    if ref:
        row[f"err_vs_{name}"] = rel_err(out["latents"], ref["latents"])
        row[f"img_err_vs_{name}"] = rel_err(out["frames"], ref["frames"])


def run_wan(report: Report, catalog, work: Path, device: str, storage, runs: int = 3, tiny: bool = False,
            eager: bool = False, quick: bool = False) -> None:
    """`eager`: also time the project's eager path (it matched plain diffusers bit for bit on
    2026-12-01), before the compiled one. `quick`: video_fast and its caching tier only (no image
    jobs, no video_high, no one-step numerics probe, only video_fast's shape warmed up)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    from workers.config import Settings
    from workers.pipelines import wan_accel
    from workers.pipelines.base import LoadOptions
    from workers.pipelines.wan import WanFamily

    folder = work / "wan"
    if not (folder / "model_index.json").exists():
        t0 = time.perf_counter()
        (build_tiny_wan if tiny else lambda f: build_real_wan(f, device))(folder)
        report.say(f"Wan folder built in {time.perf_counter() - t0:.0f}s")
    jobs = [make_job(catalog, t) for t in JOB_TYPES[:1 if quick else None]]
    once = [] if quick else [make_job(catalog, t) for t in ONCE]
    cached = make_job(catalog, CACHED)
    if tiny:   # the tiny catalog's 2 steps reuse none; at 4 the plan is CssC
        cached = dataclasses.replace(cached, steps=4)
    calibrations = catalog.models[MODEL_KEY].magcache
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    # Plain diffusers, as its Wan example: VAE in fp32, the rest bf16.
    t0 = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(folder / "vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(folder, vae=vae, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    report.say(f"plain Wan loaded in {time.perf_counter() - t0:.1f}s")
    flops, plain = {}, {}
    for job in jobs:
        flops[job.job_type] = count_flops(pipe, job, device)
        _, plain[job.job_type] = measure(report, job, "plain diffusers bf16, VAE fp32", lambda: plain_call(pipe, job, device),
                                         pipe.vae, runs, floor_s(flops[job.job_type], job))
    for job in once:
        flops[job.job_type] = count_flops(pipe, job, device)
        measure_once(report, job, "plain diffusers bf16, VAE fp32", lambda j: plain_call(pipe, j, device),
                     floor_s(flops[job.job_type], job))
    flops[CACHED] = flops["video_fast"]   # the floor of the uncached job: what the tier saves shows as >100%
    pipe.transformer.enable_cache(plain_magcache(pipe, cached, calibrations))
    row, plain[CACHED] = measure(report, cached, "plain diffusers + MagCacheConfig", lambda: plain_call(pipe, cached, device),
                                 pipe.vae, runs, floor_s(flops[CACHED], cached))
    add_errors(row, plain[CACHED], plain["video_fast"], "uncached")
    pipe.transformer.disable_cache()
    report.meta["wan_flops"] = {k: {n: round(v / 1e12, 2) for n, v in f.items()} for k, f in flops.items()}
    probe = None if quick else StepProbe(jobs[0], device, pipe.transformer.config.text_dim)
    if probe is not None:
        probe.run("eager", pipe.transformer, pipe.transformer.dtype)
    if probe is not None and device == "cuda":
        probe.fp32(pipe.transformer)
    del pipe, vae
    torch.cuda.empty_cache() if device == "cuda" else None

    t0 = time.perf_counter()
    family = WanFamily.load(LoadOptions(model_path=folder, config_path=None, device=device, cache_dir=None),
                            magcache=calibrations)
    report.meta["wan_project_load_s"] = round(time.perf_counter() - t0, 2)
    eager_out = {}
    for job in jobs if eager or device != "cuda" else ():
        row, eager_out[job.job_type] = measure(report, job, "project eager", lambda: project_call(family, job, storage),
                                               family.pipe.vae, runs, floor_s(flops[job.job_type], job))
        add_errors(row, eager_out[job.job_type], plain[job.job_type])
    if device != "cuda":
        measure_cached(report, family, cached, storage, runs, flops, plain, "project eager")
        if probe is not None:
            report.meta["wan_step_numerics"] = probe.errors()
        return
    settings = Settings.from_env({"DATA_DIR": str(work / "data")})
    accel = wan_accel.WanAcceleration.for_model(catalog, MODEL_KEY, settings)
    if accel.is_off:
        accel = wan_accel.WanAcceleration(compile="blocks", warmup=accel.warmup, cache_dir=work / "data" / "compile-cache")
    if quick:
        accel = dataclasses.replace(accel, warmup=accel.warmup[:1])   # videos come first: video_fast's shape
    family.accel_report = wan_accel.accelerate(family.pipe, accel)
    report.meta["wan_accel"] = family.accel_report
    report.say("Wan acceleration", family.accel_report)
    for job in jobs:
        row, out = measure(report, job, "project default: compile=blocks", lambda: project_call(family, job, storage),
                           family.pipe.vae, runs, floor_s(flops[job.job_type], job))
        add_errors(row, out, plain[job.job_type])
        add_errors(row, out, eager_out.get(job.job_type), "eager")
    report.meta["wan_phases"] = {"video_fast": wan_phases(family, jobs[0], storage)}
    report.say("Wan video_fast phases", report.meta["wan_phases"])
    measure_cached(report, family, cached, storage, runs, flops, plain, "project default: compile=blocks")
    for job in once:
        measure_once(report, job, "project default: compile=blocks", lambda j: project_call(family, j, storage),
                     floor_s(flops[job.job_type], job))
    if probe is None:
        return
    probe.run("compiled", family.pipe.transformer, family.pipe.transformer.dtype)
    report.meta["wan_step_numerics"] = probe.errors()
    report.row("wan one step at video_fast's shape", "numerics: compiled / eager bf16 vs fp32", None,
               **report.meta["wan_step_numerics"])
    del family


def measure_cached(report: Report, family, job, storage, runs: int, flops: dict, plain: dict, variant: str) -> None:
    """The caching tier: its time, the steps it ran, and its drift from the uncached job (plain
    diffusers' video_fast, same seed); err_vs_plain is against diffusers' own MagCache."""
    row, out = measure(report, job, variant + " + step cache", lambda: project_call(family, job, storage),
                       family.pipe.vae, runs, floor_s(flops[job.job_type], job))
    add_errors(row, out, plain[job.job_type])
    add_errors(row, out, plain["video_fast"], "uncached")
    base = report.baseline_of("video_fast")
    if base and row.get("s_median"):
        row["ratio_vs_plain_uncached"] = round(base["s_median"] / row["s_median"], 2)
    row["plan"] = family._step_plan(job).describe()
    row["blocks_run_reused"] = family.step_cache_stats
    if family.pipe.transformer.device.type == "cuda":
        row["phases"] = wan_phases(family, job, storage)
