"""workers/pipelines/wan.py on tiny random-weight Wan checkpoints (tests/fixtures/tiny_wan.py), CPU,
real diffusers, loaded from disk by the production loader; and the memory plan it follows."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tools.small_catalog import small_catalog
from workers.job import parse_job
from workers.media import ImageLimits, VideoClip
from workers.pipelines.base import LoadOptions, ModelUnavailable
from workers.pipelines.wan import WanFamily
from workers.pipelines.wan_memory import MemoryPlan, decode_bytes, out_of_memory_reason, plan_memory

GIB = 2**30


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return small_catalog(tmp_path_factory.mktemp("catalog"), steps=2,
                         job_types={"video_i2v_fast": {"width": 96}})   # landscape, to see a portrait swap


@pytest.fixture(scope="module")
def families(tiny_wan):
    shared: dict = {}
    limits = ImageLimits(max_bytes=100_000, max_pixels=20_000, timeout=5)

    def load(folder, kind):
        options = LoadOptions(model_path=folder, config_path=None, device="cpu", cache_dir=None)
        return WanFamily.load(options, limits=limits, kind=kind, shared=shared)

    return {"wan": load(tiny_wan.t2v, "wan"), "wan_i2v": load(tiny_wan.i2v, "wan_i2v"),
            "wan_vace": load(tiny_wan.vace, "wan_vace")}


def make_job(catalog, job_type, **payload):
    base = {"jobId": "job-1", "userId": "user-1", "jobType": job_type, "prompt": "waves at night", "seed": 7}
    return parse_job({**base, **payload}, catalog)


def png_uri(size=(40, 64), color=(200, 40, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Progress:
    """An on_step like the runner's: steps, and the phases the family reports."""

    def __init__(self):
        self.steps, self.phases = [], []

    def __call__(self, step, total):
        self.steps.append((step, total))

    def phase(self, name):
        self.phases.append(name)


def run(family, job) -> tuple[object, Progress]:
    progress = Progress()
    family.check(job)
    return family.generate(job, progress), progress


def test_checkpoints_share_one_text_encoder_and_keep_the_vae_in_fp32(families):
    t2v, i2v, vace = families["wan"], families["wan_i2v"], families["wan_vace"]
    assert t2v.pipe.text_encoder is i2v.pipe.text_encoder is vace.pipe.text_encoder
    assert t2v.pipe.vae is vace.pipe.vae and t2v.pipe.vae.dtype == torch.float32
    assert (t2v.size_multiple, t2v.frame_multiple) == (16, 4)


def test_image_job_is_one_batch_of_single_frames_with_reproducible_seeds(families, catalog):
    family = families["wan"]
    images, progress = run(family, make_job(catalog, "image_fast", numImages=2))
    assert [im.size for im in images] == [(64, 64)] * 2
    assert progress.steps == [(1, 2), (2, 2)]
    assert progress.phases == ["encoding prompt", "generating", "decoding"]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))   # seeds 7 and 8
    alone, _ = run(family, make_job(catalog, "image_fast", numImages=1, seed=8))
    assert np.abs(np.asarray(alone[0], np.int16) - np.asarray(images[1], np.int16)).max() <= 2


def test_video_job_gives_a_clip_of_the_job_types_frames_and_fps(families, catalog):
    clip, progress = run(families["wan"], make_job(catalog, "video_fast"))
    assert isinstance(clip, VideoClip) and clip.fps == 16
    assert len(clip.frames) == 5 and {f.shape for f in clip.frames} == {(64, 64, 3)}
    assert clip.frames[0].dtype == np.uint8
    shorter = make_job(catalog, "video_fast", numFrames=1)
    with pytest.raises(ValueError, match="number of frames 1 must be 4k\\+1 between 5 and"):
        families["wan"].check(shorter)
    assert progress.steps[-1] == (2, 2)


def test_image_to_video_follows_the_reference_orientation(families, catalog):
    family = families["wan_i2v"]
    clip, _ = run(family, make_job(catalog, "video_i2v_fast", referenceImage=png_uri((40, 64))))
    assert len(clip.frames) == 5 and clip.frames[0].shape == (96, 64, 3)      # portrait: 64 wide, 96 high
    clip, _ = run(family, make_job(catalog, "video_i2v_fast", initImage=png_uri((90, 50))))
    assert clip.frames[0].shape == (64, 96, 3)
    explicit = make_job(catalog, "video_i2v_fast", referenceImage=png_uri((40, 64)), params={"width": 96, "height": 64})
    clip, _ = run(family, explicit)
    assert clip.frames[0].shape == (64, 96, 3)           # a size the payload sets wins over the photo's orientation


def test_reference_to_video_takes_several_references(families, catalog):
    refs = [png_uri((40, 64)), png_uri((64, 40), (20, 200, 20))]
    clip, _ = run(families["wan_vace"], make_job(catalog, "video_r2v", referenceImages=refs))
    assert len(clip.frames) == 5 and clip.frames[0].shape == (64, 64, 3)


@pytest.mark.parametrize("job_type, payload, overrides, message", [
    ("video_fast", {"numFrames": 6}, {"video_fast": {"frames": 9}}, "number of frames 6 must be 4k+1"),
    ("video_high", {}, {"video_high": {"frames": 7}}, "number of frames 7 must be 4k+1"),
    ("video_high", {}, {"video_high": {"height": 4096}}, "height 4096 must be a multiple of 16 between 64 and 2048"),
    ("video_r2v", {"referenceImages": [png_uri(), "data:image/png;base64,bm90IGFuIGltYWdl"]}, {},
     "reference image 2 is not a decodable image"),
    ("video_i2v_fast", {"referenceImage": png_uri((200, 200))}, {}, "reference image is 200x200 = 40000 pixels, over"),
    ("video_i2v_fast", {"referenceImage": "data:image/png;base64,"}, {}, "reference image: the data: URI is empty"),
])
def test_bad_inputs_fail_in_check_before_any_generation(families, tmp_path, job_type, payload, overrides, message):
    catalog = small_catalog(tmp_path, steps=2, job_types=overrides)
    job = make_job(catalog, job_type, **payload)
    family = families[{"video_r2v": "wan_vace", "video_i2v_fast": "wan_i2v"}.get(job_type, "wan")]
    with pytest.raises(ValueError) as info:
        family.check(job)
    assert message in str(info.value)


def test_a_job_type_on_the_wrong_checkpoint_is_model_unavailable(families, catalog):
    with pytest.raises(ModelUnavailable, match="cannot run on a Wan text-to-video checkpoint"):
        families["wan"].check(make_job(catalog, "video_r2v", referenceImages=[png_uri()]))


def test_missing_or_wrong_checkpoints_are_model_unavailable(tiny_wan, tmp_path):
    def load(folder, kind):
        WanFamily.load(LoadOptions(model_path=folder, config_path=None, device="cpu", cache_dir=None), kind=kind)

    with pytest.raises(ModelUnavailable, match="no Wan image-to-video checkpoint at .*model_index.json"):
        load(tmp_path / "absent", "wan_i2v")
    with pytest.raises(ModelUnavailable, match="holds a WanPipeline checkpoint; a Wan VACE reference-to-video one"):
        load(tiny_wan.t2v, "wan_vace")
    (tmp_path / "broken").mkdir()
    index = {"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"]}   # no vae folder
    (tmp_path / "broken" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelUnavailable, match="could not load the Wan text-to-video checkpoint"):
        load(tmp_path / "broken", "wan")


def test_out_of_memory_errors_are_told_apart():
    assert out_of_memory_reason(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")) \
        == "CUDA out of memory. Tried to allocate 2.00 GiB"
    host = RuntimeError("[enforce fail at alloc_cpu.cpp:118] err == 0. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 339738624 bytes. Error code 12 (Cannot allocate memory)")
    assert out_of_memory_reason(host).startswith("DefaultCPUAllocator: can't allocate memory")
    assert out_of_memory_reason(RuntimeError("shape mismatch")) is None
    assert out_of_memory_reason(ValueError("out of memory")) is None


@pytest.mark.parametrize("budget, base, te, expected", [
    (None, 30, 11, MemoryPlan("resident", False)),          # no budget: everything stays
    (48, 4, 11, MemoryPlan("resident", False)),             # 4 + 11 + 5 work fits
    (18, 4, 11, MemoryPlan("offload", False)),              # 15 fits, 20 does not: encode, then leave
    (12, 4, 11, MemoryPlan("cpu", False)),                  # the encoder never fits: it encodes on the CPU
    (8, 4, 11, MemoryPlan("cpu", True)),                    # and the decode is tiled
])
def test_memory_plan(budget, base, te, expected):
    plan = plan_memory(None if budget is None else budget * GIB, base * GIB, te * GIB, 5 * GIB, 4.5 * GIB)
    assert plan == expected


def test_decode_estimate_shrinks_with_tiles():
    full = decode_bytes(81, 480, 832, 96, tiled=False)
    assert 3 * GIB < full < 6 * GIB
    assert decode_bytes(81, 480, 832, 96, tiled=True) < full / 3


def test_running_out_of_memory_placing_the_model_makes_it_unavailable_not_a_crash(tiny_wan, monkeypatch):
    """On the GPU `_place` moves the weights (under VIDEO_VRAM_BUDGET_GIB): an out-of-memory there must
    leave the worker serving its other models. The CPU cannot run out, so the move raises as CUDA would."""
    def full_card(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(WanFamily, "_place", full_card)
    with pytest.raises(ModelUnavailable, match="out of memory placing the Wan text-to-video model on cpu.*Tried to allocate"):
        WanFamily.load(LoadOptions(model_path=tiny_wan.t2v, config_path=None, device="cpu", cache_dir=None), kind="wan")
