"""Tiny random LoRA files for a tiny pipeline, written with PEFT in diffusers' LoRA format.

    path = build_tiny_lora(pipe, folder / "character-anna.safetensors", seed=1)   # Qwen-Image, Z-Image, SDXL

The adapter covers the attention projections of the denoiser (transformer or UNet, or `targets`)
with rank 4 (or `rank`) and random A and B matrices (PEFT's default zero B would make the LoRA a
no-op), so loading it changes the outputs. The pipeline is left as it was: the adapter is removed after saving.
"""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

TARGETS = ("to_q", "to_k", "to_v")


def build_tiny_lora(pipe, path: Path, seed: int = 1, rank: int = 4, targets: tuple[str, ...] = TARGETS) -> Path:
    path = Path(path)
    denoiser_name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    denoiser = getattr(pipe, denoiser_name)
    torch.manual_seed(seed)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False),
                         adapter_name="tiny")
    try:
        layers = get_peft_model_state_dict(denoiser, adapter_name="tiny")
        path.parent.mkdir(parents=True, exist_ok=True)
        type(pipe).save_lora_weights(path.parent, weight_name=path.name, safe_serialization=True,
                                     **{f"{denoiser_name}_lora_layers": layers})
    finally:
        denoiser.delete_adapters("tiny")
    return path
