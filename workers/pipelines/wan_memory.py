"""The video worker's GPU memory budget: estimates, the per-job plan, the process cap, OOM detection.

    cap_process_memory(device, budget)        # CUDA: the caching allocator refuses to grow past the budget
    plan = plan_memory(budget, base, text_encoder, denoise, decode)
    plan.text_encoder                          # "resident" | "offload" (on the GPU only to encode) | "cpu"
    plan.vae_tiling                            # decode in spatial tiles
    reason = out_of_memory_reason(exc)         # str for CUDA or host OOM, None otherwise

The estimates are deliberately simple upper bounds from the model configs; the cap is the hard
guarantee (an allocation past it raises CUDA OOM, which fails the job, not the worker).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TILE = 256                # diffusers' Wan VAE tile (tile_sample_min_height/width)
DECODE_COPIES = 6         # live full-resolution activations of the decoder's last stage
CHUNK_FRAMES = 4          # Wan's VAE decodes one latent frame = four output frames at a time


@dataclass(frozen=True)
class MemoryPlan:
    text_encoder: str = "resident"   # "resident", "offload" or "cpu"
    vae_tiling: bool = False


def module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def latent_tokens(batch: int, latent_frames: int, height: int, width: int, spatial_multiple: int) -> int:
    """Transformer sequence length: latent frames × patches per frame, for each batch item."""
    return batch * latent_frames * (height // spatial_multiple) * (width // spatial_multiple)


def denoise_bytes(tokens: int, inner_dim: int, ffn_dim: int, dtype_bytes: int) -> int:
    """Peak activations of one transformer block: a few copies of the hidden states and the FFN's
    intermediate. Attention goes through SDPA kernels that never hold the tokens² matrix."""
    return tokens * (8 * inner_dim + 2 * ffn_dim) * dtype_bytes


def decode_bytes(frames: int, height: int, width: int, channels: int, tiled: bool) -> int:
    """fp32 VAE decode of one clip: the last decoder stage over one chunk (a tile of it when tiled)
    plus the decoded clip and its post-processed copy."""
    h, w = (min(height, TILE), min(width, TILE)) if tiled else (height, width)
    return CHUNK_FRAMES * h * w * channels * 4 * DECODE_COPIES + 2 * frames * 3 * height * width * 4


def plan_memory(budget: int | None, base: int, text_encoder: int, denoise: int, decode: int) -> MemoryPlan:
    """`base`: bytes on the GPU without the text encoder (every loaded transformer, VAE, image encoder).
    The text encoder runs before denoising, so when it leaves the GPU after encoding the peak is
    max(base + text_encoder, base + work) instead of their sum; when even base + text_encoder does
    not fit, it encodes on the CPU (slow, but the job runs)."""
    if budget is None:
        return MemoryPlan()
    if base + text_encoder + max(denoise, decode) <= budget:
        mode = "resident"
    elif base + text_encoder <= budget:
        mode = "offload"
    else:
        mode = "cpu"
    kept = base + (text_encoder if mode == "resident" else 0)
    return MemoryPlan(text_encoder=mode, vae_tiling=kept + decode > budget)


def cap_process_memory(device: torch.device, budget: int) -> float:
    """Cap this process's CUDA allocations at `budget` bytes; returns the fraction set. The image
    worker shares the GPU: past the cap this worker gets an OOM instead of starving the other one."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def out_of_memory_reason(exc: BaseException) -> str | None:
    """The first line of a CUDA or host out-of-memory error, None for any other exception."""
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else ""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return first or "CUDA out of memory"
    if isinstance(exc, MemoryError):
        return first or "host out of memory"
    if isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text):
        # torch's CPU allocator: "[enforce fail at alloc_cpu.cpp:…] … DefaultCPUAllocator: can't allocate…"
        return first[first.find("DefaultCPUAllocator"):] if "DefaultCPUAllocator" in first else first
    return None
