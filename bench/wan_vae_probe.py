"""How fast the Wan 2.1 VAE decodes video_fast's latents (21×60×104 → 81 frames of 480×832) in each
setup, and how far each is from the fp32 eager decode (GPU only; prints ROW lines, writes JSON).

    python3 -m bench.wan_vae_probe --json OUT.json [--limit 240]

The decode is about 2.5 s of a 19.0 s video_fast job (bench/results/2026-12-02-h200-wan-vae-blocks.json).
Variants: fp32 eager (diffusers' advice), the residual blocks compiled as the worker does (with and
without cuDNN autotuning), only the RMS norms compiled (far fewer graphs: no cache-index
specialization), and bf16 (changes numerics: only a quality tier could use it). Real-size VAE
config, random weights, seeded latents.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench.common import rel_err
from workers.pipelines.accel import uncompile_blocks

VARIANTS = (   # name, dtype, cudnn.benchmark, the decoder's module classes compiled (static shapes)
    ("fp32 eager", torch.float32, False, ()),
    ("bf16 eager, cudnn.benchmark", torch.bfloat16, True, ()),
    ("fp32 compiled residual blocks (the worker's)", torch.float32, False, ("WanResidualBlock",)),
    ("fp32 compiled residual blocks, cudnn.benchmark", torch.float32, True, ("WanResidualBlock",)),
    ("fp32 compiled RMS norms", torch.float32, False, ("WanRMS_norm",)),
    ("bf16 compiled residual blocks, cudnn.benchmark", torch.bfloat16, True, ("WanResidualBlock",)),
)
# Measured once and left out (2026-12-02, H200): the whole decoder compiled recompiles at every call
# (47.5 s a decode fp32, 51.6 s bf16); cudnn.benchmark alone changes nothing eager (2.786 vs 2.785 s).
PROFILE_TOP = 15   # kernels listed in the fp32 eager profile


def decode_seconds(vae, latents, reps: int = 2) -> tuple[float, float, torch.Tensor]:
    """(first call, median of `reps` later calls, frames of the last)."""
    times = []
    out = None
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    later = sorted(times[1:])
    return times[0], later[len(later) // 2], out.float()


def main(argv=None) -> int:
    from diffusers import AutoencoderKLWan

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--limit", type=float, default=240, help="seconds; later variants are skipped past it")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    torch.manual_seed(0)
    vae32 = AutoencoderKLWan().to("cuda").eval()
    latents = torch.randn(1, 16, 21, 60, 104, generator=torch.Generator().manual_seed(1)).cuda()
    rows, reference, profile = [], None, {}
    from workers.pipelines.accel import _configure_dynamo
    _configure_dynamo(256)   # per-shape compiles of the residual blocks
    for name, dtype, benchmark, compiled in VARIANTS:
        if time.perf_counter() - started > args.limit:
            rows.append({"variant": name, "skipped": "time limit"})
            continue
        torch._dynamo.reset()
        vae = vae32 if dtype == torch.float32 else AutoencoderKLWan().to("cuda", dtype).eval()
        if dtype != torch.float32:
            vae.load_state_dict(vae32.state_dict())
        torch.backends.cudnn.benchmark = benchmark
        for module in vae.decoder.modules():
            if type(module).__name__ in compiled:
                module.compile(dynamic=False)
        try:
            first, median, frames = decode_seconds(vae, latents)
        except Exception as exc:  # noqa: BLE001 — a probe reports what failed and goes on
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
            print("ROW", json.dumps(rows[-1]), flush=True)
            continue
        finally:
            uncompile_blocks(vae.decoder)
        if reference is None:
            reference = frames.cpu()
            try:
                profile = kernel_profile(vae, latents)
            except Exception as exc:  # noqa: BLE001 — the timings matter more than the breakdown
                profile = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print("PROFILE", json.dumps(profile), flush=True)
        rows.append({"variant": name, "first_s": round(first, 3), "s_median": round(median, 3),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     "rel_err_vs_fp32_eager": rel_err(frames.cpu(), reference)})
        print("ROW", json.dumps(rows[-1]), flush=True)
        write(args.json, latents, rows, profile)   # after each variant: a run cut short keeps what it measured
        del frames
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    write(args.json, latents, rows, profile)
    return 0


def kernel_profile(vae, latents) -> dict:
    """Where one eager decode's GPU time goes: the top CUDA kernels and their share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
        vae.decode(latents.to(vae.dtype), return_dict=False)
        torch.cuda.synchronize()
    events = list(prof.key_averages())
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:PROFILE_TOP]
    return {"kernel_ms": round(total / 1e3, 1),
            "top": [{"name": e.key[:90], "ms": round(e.self_device_time_total / 1e3, 1), "calls": e.count,
                     "share": round(e.self_device_time_total / total, 3)} for e in top]}


def write(path: str, latents, rows: list[dict], profile: dict) -> None:
    result = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "latents": list(latents.shape),
              "rows": rows, "fp32_eager_profile": profile}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
