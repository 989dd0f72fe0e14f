"""`dual_orchestrator.py submit` for the new image job types: mask and LoRAs reach a payload the worker parses."""
from __future__ import annotations

import json

from PIL import Image

import dual_orchestrator
from workers.config import load_catalog
from workers.job import LoraRequest, parse_job


def test_submit_an_inpaint_job_with_a_mask_and_loras(tmp_path, redis_server, redis_client, monkeypatch, capsys):
    for name, color in (("photo.png", (200, 0, 0)), ("mask.png", (255, 255, 255))):
        Image.new("RGB", (64, 64), color).save(tmp_path / name)
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    code = dual_orchestrator.main(["submit", "qwen_image_inpaint_2511", "a red door", "--init-image",
                                   str(tmp_path / "photo.png"), "--mask-image", str(tmp_path / "mask.png"),
                                   "--lora", "character-anna:0.7", "--lora", "style"])
    assert code == 0
    payload = json.loads(redis_client.lindex("sdxl_queue", 0))
    assert payload["jobId"] == capsys.readouterr().out.strip()
    job = parse_job(payload, load_catalog())
    assert job.mask_image.startswith("data:image/png;base64,") and job.init_image != job.mask_image
    assert job.loras == (LoraRequest("character-anna", None, 0.7), LoraRequest("style", None, 1.0))
