"""Which scaled-dot-product-attention kernel is fastest at this project's shapes, and how far each is
from an fp32 reference (GPU only; prints ROW lines and a table).

    python3 -m bench.attention_probe --json OUT.json

Shapes are the attention calls of a job: Wan 2.1 1.3B video_fast (one sequence of 21×30×52 latent
patches, 12 heads of 128) and image_fast (6 frames of 30×52), SDXL at 1024² (the 64² and 32²
levels, 10 and 20 heads of 64, CFG batch 2), Qwen-Image at 1024² (4096 image + 64 text tokens, 24
heads of 128). Backends: PyTorch's default choice, then each one forced (flash, memory-efficient,
cuDNN). TFLOP/s counts 4·L²·d per head (QKᵀ and PV).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {   # name → (batch, heads, sequence, head dim)
    "wan video_fast 81f 480x832": (1, 12, 21 * 30 * 52, 128),
    "wan image_fast x6 832x480": (6, 12, 30 * 52, 128),
    "sdxl 1024 level 64x64 (cfg)": (2, 10, 4096, 64),
    "sdxl 1024 level 32x32 (cfg)": (2, 20, 1024, 64),
    "qwen-image 1024 joint": (1, 24, 4096 + 64, 128),
}
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    rows = []
    for name, (b, h, length, d) in SHAPES.items():
        gen = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, length, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):   # fp32 reference on the same (bf16-rounded) inputs
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flops = 4 * b * h * length * length * d
        for backend, kind in BACKENDS.items():
            def call(kind=kind):
                if kind is None:
                    return F.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel(kind):
                    return F.scaled_dot_product_attention(q, k, v)
            try:
                out = call()
                ms = time_ms(call, args.reps)
            except RuntimeError as exc:
                rows.append({"shape": name, "backend": backend, "error": str(exc).splitlines()[0][:160]})
                continue
            err = float((out.double() - ref.double()).norm() / ref.double().norm())
            rows.append({"shape": name, "backend": backend, "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                         "rel_err_vs_fp32": err})
            print("ROW", json.dumps(rows[-1]), flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name(0)}  torch {torch.__version__}  cuDNN {torch.backends.cudnn.version()}")
    print(f"{'shape':32} {'backend':10} {'ms':>9} {'TFLOP/s':>8} {'err/fp32':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:32} {r['backend']:10} {'-':>9} {'-':>8}  {r['error']}")
        else:
            print(f"{r['shape']:32} {r['backend']:10} {r['ms']:9.3f} {r['tflops']:8.1f} {r['rel_err_vs_fp32']:9.2e}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
