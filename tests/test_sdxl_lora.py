"""Per-job LoRAs on SDXL (workers/pipelines/sdxl.py + lora.py), tiny random SDXL and a PEFT-built adapter, CPU."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tools.small_catalog import small_catalog
from tools.tiny_lora import build_tiny_lora
from workers.job import LoraRequest, parse_job
from workers.pipelines.base import LoadOptions
from workers.pipelines.lora import LoraLibrary
from workers.pipelines.sdxl import SDXLFamily


@pytest.fixture(scope="module")
def setup(tiny_sdxl, tiny_image_models, tmp_path_factory):
    catalog = small_catalog(tmp_path_factory.mktemp("catalog"), steps=2)
    folder = tmp_path_factory.mktemp("sdxl-loras")
    family = SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None))
    build_tiny_lora(family.txt2img, folder / "sdxl-character.safetensors", seed=5)
    (folder / "qwen-character.safetensors").write_bytes((tiny_image_models.loras / "qwen-character.safetensors").read_bytes())
    family.job_loras.library = LoraLibrary(folder)
    return catalog, family


def run(setup, loras=()):
    """The catalog keeps SDXL jobs LoRA-free (the GPU worker runs SDXL fused and graphed, where adapters
    cannot apply: workers/job.py LORA_FAMILIES); the family itself serves them on the plain pipeline."""
    catalog, family = setup
    job = parse_job({"jobId": "j", "userId": "u", "jobType": "sdxl_image_fast", "prompt": "a boat", "seed": 9,
                     "numImages": 1}, catalog)
    job = dataclasses.replace(job, loras=tuple(LoraRequest(name=l["name"], url=None, weight=l.get("weight", 1.0))
                                               for l in loras))
    family.check(job)
    return np.asarray(family.generate(job, lambda step, total: None)[0])


def test_sdxl_lora_is_active_for_its_job_only(setup):
    before = run(setup)
    with_lora = run(setup, loras=[{"name": "sdxl-character", "weight": 1.5}])
    after = run(setup)
    assert np.array_equal(before, after) and not np.array_equal(before, with_lora)


def test_sdxl_refuses_a_qwen_lora_and_loras_while_accelerated(setup):
    with pytest.raises(ValueError, match="does not fit sdxl"):
        run(setup, loras=[{"name": "qwen-character"}])
    catalog, family = setup
    family.accel_report = {"applied": "compile=unet+graphs"}   # what accelerate() leaves on a GPU worker
    try:
        with pytest.raises(ValueError, match="OPTIMIZE=0 serves SDXL LoRAs"):
            run(setup, loras=[{"name": "sdxl-character"}])
        with pytest.raises(ValueError, match="OPTIMIZE=0 serves SDXL LoRAs"):   # a job type's own LoRA too
            job = parse_job({"jobId": "j", "userId": "u", "jobType": "sdxl_image_fast", "prompt": "a boat",
                             "numImages": 1}, catalog)
            spec = job.spec.model_copy(update={"loras": [{"name": "sdxl-character", "weight": 1.0}]})
            family.check(dataclasses.replace(job, spec=spec))
    finally:
        family.accel_report = {"applied": "none"}
