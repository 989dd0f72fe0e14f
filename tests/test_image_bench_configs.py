"""bench/image_models.py builds the released model sizes: parameter counts on the meta device (no memory)."""
from __future__ import annotations

import pytest
import torch

from bench.image_models import building, qwen_image_parts, zimage_parts


def billions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def test_real_size_configs_match_the_released_models():
    with building("meta", torch.bfloat16):
        qwen, zimage = qwen_image_parts("t2i"), zimage_parts()
    assert next(qwen["transformer"].parameters()).dtype == torch.bfloat16
    assert billions(qwen["transformer"]) == pytest.approx(20.4, abs=0.2)      # Qwen-Image: 20B MMDiT
    assert billions(qwen["text_encoder"]) == pytest.approx(8.3, abs=0.2)      # Qwen2.5-VL-7B with its vision tower
    assert billions(zimage["transformer"]) == pytest.approx(6.15, abs=0.1)    # Z-Image: 6B single-stream DiT
    assert billions(zimage["text_encoder"]) == pytest.approx(4.0, abs=0.1)    # Qwen3-4B
    assert torch.get_default_dtype() == torch.float32
