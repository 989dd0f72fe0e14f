"""workers/pipelines/sdxl.py on a tiny random-weight SDXL (tests/fixtures/tiny_sdxl.py), CPU, real diffusers."""
from __future__ import annotations

import base64
import dataclasses
import io
import os

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from PIL import Image
from safetensors.torch import load_file

from tools.small_catalog import small_catalog
from workers.job import parse_job
from workers.media import ImageLimits
from workers.pipelines.base import GenerationOutOfMemory, LoadOptions, ModelUnavailable
from workers.pipelines.sdxl import SDXLFamily

PROMPT = "a lighthouse at dusk"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    # 64×64 and 2 steps everywhere; img2img gets 4 steps so strength 0.75 leaves 3 denoising steps.
    return small_catalog(tmp_path_factory.mktemp("catalog"), steps=2, job_types={"sdxl_img2img": {"steps": 4}})


@pytest.fixture(scope="module")
def family(tiny_sdxl):
    return SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None),
                           limits=ImageLimits(max_bytes=1_000_000, max_pixels=1_000_000, timeout=5))


def make_job(catalog, job_type="sdxl_image_fast", **payload):
    base = {"jobId": "job-1", "userId": "user-1", "jobType": job_type, "prompt": PROMPT, "numImages": 2, "seed": 42}
    return parse_job({**base, **payload}, catalog)


def png_uri(size=(80, 48), color=(30, 140, 220)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


class UnetCalls:
    """Counts real UNet forward passes (a forward pre-hook; nothing is replaced)."""

    def __init__(self, unet):
        self.count = 0
        self._handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


# ---------------------------------------------------------------- loading

def test_single_file_is_detected_as_sdxl_base(tiny_sdxl):
    assert infer_diffusers_model_type(load_file(str(tiny_sdxl.single_file))) == "xl_base"


def test_single_file_and_folder_load_the_same_weights(tiny_sdxl, family, catalog):
    single = SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.single_file, config_path=tiny_sdxl.folder,
                                         device="cpu", cache_dir=None))
    assert (family.source, single.source) == ("folder", "single_file")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a = getattr(family.txt2img, name).state_dict()
        b = getattr(single.txt2img, name).state_dict()
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    job = make_job(catalog, numImages=1)
    assert np.array_equal(pixels(family.generate(job, lambda *_: None)[0]),
                          pixels(single.generate(job, lambda *_: None)[0]))


def test_converted_cache_is_written_once_then_used(tiny_sdxl, tmp_path):
    cache = tmp_path / "converted"
    opts = LoadOptions(model_path=tiny_sdxl.single_file, config_path=tiny_sdxl.folder, device="cpu", cache_dir=cache)
    first = SDXLFamily.load(opts)
    assert first.source == "single_file"
    folders = list(cache.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("tiny-sdxl-single-")  # no temp folder left behind
    assert (folders[0] / "model_index.json").is_file()
    assert list(folders[0].glob("unet/*.safetensors"))
    second = SDXLFamily.load(opts)
    assert second.source == "converted_cache"
    a, b = first.txt2img.unet.state_dict(), second.txt2img.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A replaced checkpoint (new mtime) gets a new conversion, never the stale folder.
    stat = tiny_sdxl.single_file.stat()
    try:
        os.utime(tiny_sdxl.single_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert SDXLFamily.load(opts).source == "single_file"
        assert len(list(cache.iterdir())) == 2
    finally:
        os.utime(tiny_sdxl.single_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_missing_checkpoint_or_config_is_model_unavailable(tiny_sdxl, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelUnavailable, match="SDXL_MODEL_PATH") as info:
        SDXLFamily.load(LoadOptions(model_path=missing, config_path=None, device="cpu", cache_dir=None))
    assert str(missing) in str(info.value)
    with pytest.raises(ModelUnavailable, match="SDXL_CONFIG_PATH"):
        SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.single_file, config_path=tmp_path, device="cpu", cache_dir=None))


# ---------------------------------------------------------------- txt2img

def test_txt2img_makes_n_images_of_the_job_size_with_progress(family, catalog):
    job = make_job(catalog, numImages=3)
    calls = []
    images = family.generate(job, lambda done, total: calls.append((done, total)))
    assert len(images) == 3
    assert all(isinstance(im, Image.Image) and im.size == (64, 64) and im.mode == "RGB" for im in images)
    assert calls == [(1, 2), (2, 2)]


def test_seeds_make_images_reproducible_one_by_one(family, catalog):
    pair = family.generate(make_job(catalog, seed=100, numImages=2), lambda *_: None)
    again = family.generate(make_job(catalog, seed=100, numImages=2), lambda *_: None)
    alone = family.generate(make_job(catalog, seed=101, numImages=1), lambda *_: None)
    assert np.array_equal(pixels(pair[0]), pixels(again[0]))
    assert np.array_equal(pixels(pair[1]), pixels(again[1]))
    assert not np.array_equal(pixels(pair[0]), pixels(pair[1]))
    # image i of a batch is the image of seed + i generated alone (batching may differ by rounding)
    assert np.abs(pixels(pair[1]) - pixels(alone[0])).max() <= 2


def test_on_step_exception_aborts_generation(family, catalog):
    class Deadline(Exception):
        pass

    def on_step(done, total):
        raise Deadline(f"stop after {done}/{total}")

    with UnetCalls(family.txt2img.unet) as unet, pytest.raises(Deadline, match="stop after 1/2"):
        family.generate(make_job(catalog), on_step)
    assert unet.count == 1  # the second step never ran


def test_out_of_memory_becomes_generation_out_of_memory(family, catalog):
    def on_step(done, total):  # the exception CUDA raises, surfacing from inside the denoising loop
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(GenerationOutOfMemory, match="out of GPU memory generating 2 image"):
        family.generate(make_job(catalog), on_step)
    assert len(family.generate(make_job(catalog, numImages=1), lambda *_: None)) == 1  # still usable


# ---------------------------------------------------------------- img2img

def test_img2img_shares_the_weights_with_txt2img(family):
    assert family.img2img.unet is family.txt2img.unet
    assert family.img2img.vae is family.txt2img.vae and family.img2img.text_encoder_2 is family.txt2img.text_encoder_2
    for a, b in zip(family.txt2img.unet.parameters(), family.img2img.unet.parameters()):
        assert a.data_ptr() == b.data_ptr()


def test_img2img_pipeline_keeps_the_loaded_dtype(tiny_sdxl):
    # from_pipe casts shared modules to float32 unless told otherwise; on CUDA the family runs bf16.
    pipe = SDXLFamily._from_folder(tiny_sdxl.folder, torch.bfloat16)
    bf16 = SDXLFamily(pipe, torch.device("cpu"), ImageLimits(), "folder")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(bf16.img2img, name).dtype == torch.bfloat16, name
        assert getattr(bf16.txt2img, name).dtype == torch.bfloat16, name


def test_img2img_from_data_uri(family, catalog):
    job = make_job(catalog, "sdxl_img2img", initImage=png_uri(), strength=0.75)
    assert job.steps == 4 and SDXLFamily.denoising_steps(job) == int(4 * 0.75) == 3
    family.check(job)
    calls = []
    images = family.generate(job, lambda done, total: calls.append((done, total)))
    assert len(images) == 2 and all(im.size == (64, 64) for im in images)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    # generate without a prior check() decodes the image itself and gives the same result
    again = family.generate(job, lambda *_: None)
    assert np.array_equal(pixels(images[0]), pixels(again[0]))


# ---------------------------------------------------------------- check()

@pytest.mark.parametrize("change, message", [
    ({"width": 65}, "width 65"),
    ({"height": 32}, "height 32"),
    ({"width": 8192}, "width 8192"),
    ({"steps": 0}, "steps 0"),
])
def test_check_rejects_bad_values(family, catalog, change, message):
    job = dataclasses.replace(make_job(catalog), **change)
    with pytest.raises(ValueError, match=message):
        family.check(job)


def test_check_rejects_missing_or_undecodable_init_image_before_any_unet_step(family, catalog):
    job = make_job(catalog, "sdxl_img2img", initImage=png_uri())
    not_an_image = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    with UnetCalls(family.txt2img.unet) as unet:
        with pytest.raises(ValueError, match="needs an init image"):
            family.check(dataclasses.replace(job, init_image=None))
        with pytest.raises(ValueError, match="not a decodable image"):
            family.check(dataclasses.replace(job, init_image=not_an_image))
        with pytest.raises(ValueError, match="pixel limit"):
            family.check(dataclasses.replace(job, init_image=png_uri(size=(2000, 1000))))
        with pytest.raises(ValueError, match="leaves no denoising step"):
            family.check(dataclasses.replace(job, strength=0.1))
    assert unet.count == 0


def test_check_refuses_modes_it_does_not_serve(family, catalog):
    with pytest.raises(ModelUnavailable, match="txt2video"):
        family.check(make_job(catalog, "video_fast"))


def test_batched_cached_prompt_encoding_gives_the_pipelines_images(catalog, family):
    """generate() encodes (prompt, negative) in one batch per text encoder and keeps the result; the
    images are those of the pipeline's own prompt path, and a repeated prompt skips the encoders."""
    job = make_job(catalog, jobId="enc-1", negativePrompt="blurry, low quality", numImages=2)
    family.prompt_cache.clear()
    ours = torch.stack([torch.from_numpy(pixels(im)) for im in family.generate(job, lambda *_: None)])
    generators = [torch.Generator().manual_seed(seed) for seed in job.seeds]
    theirs = family.txt2img(prompt=[job.prompt] * 2, negative_prompt=[job.negative_prompt] * 2,
                            num_inference_steps=job.steps, guidance_scale=job.guidance, generator=generators,
                            width=job.width, height=job.height, output_type="pil").images
    assert (ours - torch.stack([torch.from_numpy(pixels(im)) for im in theirs])).abs().max() == 0   # fp32, CPU
    calls = []
    handle = family.txt2img.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        again = family.generate(dataclasses.replace(job, job_id="enc-2"), lambda *_: None)
    finally:
        handle.remove()
    assert calls == [] and list(family.prompt_cache) == [(job.prompt, job.negative_prompt)]
    assert torch.equal(torch.stack([torch.from_numpy(pixels(im)) for im in again]), ours)
