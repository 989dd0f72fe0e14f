"""Wan 2.1 1.3B part: plain diffusers, composed from measured pieces (as the reference script).

A whole 15-step 81-frame job would take about 20 s a run; four runs do not fit the device time, so
the job time is composed: steps × (one CFG step, measured) + VAE decode (measured) + MP4 encoding
(measured, OpenCV's mp4v). Text encoding (UMT5-XXL, about 0.03 s) is not included. The project's
Wan family is benchmarked here once workers/pipelines/wan.py exists (WAN_PROJECT below).
"""
from __future__ import annotations

import importlib.util
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import PEAK_TFLOPS, Report, peak_gib, reset_peak, timed


def project_wan_available() -> bool:
    return importlib.util.find_spec("workers.pipelines.wan") is not None


def build_transformer(device: str, tiny: bool):
    from diffusers import WanTransformer3DModel

    if tiny:
        kw = dict(num_attention_heads=2, attention_head_dim=12, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2)
    else:
        kw = dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)
    torch.manual_seed(0)
    with torch.device(device):
        return WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
                                     qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                                     rope_max_seq_len=1024, **kw).to(torch.bfloat16).eval()


def mp4_seconds(frames_uint8) -> float | None:
    """Encode (T, H, W, 3) uint8 RGB frames to an MP4 with OpenCV; None without cv2."""
    try:
        import cv2
    except ImportError:
        return None
    t, h, w, _ = frames_uint8.shape
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        t0 = time.perf_counter()
        writer = cv2.VideoWriter(f.name, cv2.VideoWriter_fourcc(*"mp4v"), 16, (w, h))
        for frame in frames_uint8:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        return time.perf_counter() - t0


def run_wan(report: Report, catalog, device: str, tiny: bool = False) -> None:
    from diffusers import AutoencoderKLWan

    tr = build_transformer(device, tiny)
    with torch.device(device):
        vae = AutoencoderKLWan().to(torch.float32).eval()
    text_dim = tr.config.text_dim
    for job_type in ("video_fast", "image_fast"):
        spec = catalog.job_types[job_type]
        frames = spec.frames or 1
        lat_f, h, w = (frames - 1) // 4 + 1, spec.height // 8, spec.width // 8
        x = torch.randn(1, 16, lat_f, h, w, device=device, dtype=torch.bfloat16)
        pe = torch.randn(1, 512, text_dim, device=device, dtype=torch.bfloat16)
        ne = torch.randn(1, 512, text_dim, device=device, dtype=torch.bfloat16)
        t = torch.tensor([500], device=device)

        def cfg_step():
            with torch.no_grad():
                a = tr(x, timestep=t, encoder_hidden_states=pe, return_dict=False)[0]
                b = tr(x, timestep=t, encoder_hidden_states=ne, return_dict=False)[0]
            return b + spec.guidance * (a - b)

        with FlopCounterMode(display=False) as fc:
            cfg_step()
        step_flops = fc.get_total_flops()
        reset_peak()
        step_times, _ = timed(cfg_step, runs=3, warm=1)
        step_mem = peak_gib()
        lat = torch.randn(1, 16, lat_f, h, w, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            vae.decode(lat)
        vae_flops = fc.get_total_flops()
        reset_peak()
        with torch.no_grad():
            vae_times, video = timed(lambda: vae.decode(lat).sample, runs=2 if frames > 1 else 3, warm=1)
        vae_mem = peak_gib()
        frames_u8 = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
        enc = mp4_seconds(frames_u8) if frames > 1 else 0.0
        step_med, vae_med = sorted(step_times)[1], sorted(vae_times)[len(vae_times) // 2]
        total = [spec.steps * s + vae_med + (enc or 0.0) for s in step_times]
        floor_s = round((spec.steps * step_flops + vae_flops) / (PEAK_TFLOPS * 1e12), 3)
        variant = "plain diffusers bf16, VAE fp32 (composed)"
        report.row(job_type, variant, total, floor_s=floor_s,
                   peak_alloc_gib=max(step_mem.get("peak_alloc_gib", 0), vae_mem.get("peak_alloc_gib", 0)),
                   cfg_step_s=round(step_med, 4), cfg_step_tflop=round(step_flops / 1e12, 1),
                   cfg_step_tflops_achieved=round(step_flops / step_med / 1e12, 1), vae_decode_s=round(vae_med, 3),
                   vae_tflop=round(vae_flops / 1e12, 1), mp4_encode_s=None if enc is None else round(enc, 3),
                   steps=spec.steps, frames=frames, size=f"{spec.width}x{spec.height}")
        del x, pe, ne, lat, video
    if not project_wan_available():
        report.note("project Wan family (workers/pipelines/wan.py) not present: Wan rows are plain diffusers only")
    del tr, vae
