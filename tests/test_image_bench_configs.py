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


def test_real_size_text_encoder_knows_the_tokenizers_image_tokens(tmp_path):
    """The edit pipeline's prompt carries `<|image_pad|>` tokens that the vision features replace:
    with the released config's ids (a 152k vocabulary) and the bench's byte-level tokenizer they
    never matched ("tokens: 0, features: 196" on the GPU)."""
    from bench.image_models import qwen25_vl_7b_config
    from tools.tiny_qwen import tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer(tmp_path)
    config = qwen25_vl_7b_config(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.image_token_id != qwen25_vl_7b_config().image_token_id


def test_as_family_wraps_an_in_memory_pipeline_like_the_worker(tmp_path):
    """The bench times the production family on pipelines it built in memory; here on the tiny ones."""
    from bench.image_models import as_family
    from tools.small_catalog import small_catalog
    from tools.tiny_qwen import tiny_qwen_pipeline
    from tools.tiny_zimage import tiny_zimage_pipeline
    from workers.job import parse_job

    catalog = small_catalog(tmp_path / "catalog", steps=1)
    for pipe, kind, job_type in ((tiny_qwen_pipeline("t2i", tmp_path / "q"), "qwen_image", "qwen_image_2512"),
                                 (tiny_zimage_pipeline(tmp_path / "z"), "z_image", "z_image_turbo")):
        family = as_family(pipe, kind)
        job = parse_job({"jobId": "j", "userId": "u", "jobType": job_type, "prompt": "x", "seed": 1}, catalog)
        family.check(job)
        assert [image.size for image in family.generate(job, lambda step, total: None)] == [(64, 64)]
