"""Wan 2.2 checkpoint layouts through the production loader (workers/pipelines/wan.py), on tiny
random-weight folders: A14B (a high-noise and a low-noise transformer, switched at boundary_ratio)
and TI2V-5B (one WanPipeline folder with a 48-channel VAE, for text- and image-to-video)."""
from __future__ import annotations

import pytest

from tests.test_wan_pipeline import make_job, png_uri, run
from tools.small_catalog import small_catalog
from tools.tiny_wan import build_tiny_wan
from workers.media import ImageLimits
from workers.pipelines.base import LoadOptions, ModelUnavailable
from workers.pipelines.wan import WanFamily


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return small_catalog(tmp_path_factory.mktemp("catalog"), steps=4)


def load(folder, kind):
    options = LoadOptions(model_path=folder, config_path=None, device="cpu", cache_dir=None)
    return WanFamily.load(options, limits=ImageLimits(max_bytes=100_000, max_pixels=20_000, timeout=5), kind=kind)


def count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a14b_runs_both_experts(tmp_path, catalog):
    family = load(build_tiny_wan(tmp_path / "a14b", "a14b"), "wan")
    high_noise, low_noise = count_calls(family.pipe.transformer), count_calls(family.pipe.transformer_2)
    clip, progress = run(family, make_job(catalog, "video_fast"))
    assert len(clip.frames) == 5 and clip.frames[0].shape == (64, 64, 3)
    assert progress.steps[-1] == (4, 4)
    assert high_noise[0] > 0 and low_noise[0] > 0     # the first steps on one expert, the last on the other
    images, _ = run(family, make_job(catalog, "image_fast", numImages=2))
    assert [im.size for im in images] == [(64, 64)] * 2


def test_a14b_has_no_step_cache_calibration(tmp_path, catalog):
    """The tiny A14B's experts have the tiny calibration's dimensions; two experts still refuse the tier."""
    options = LoadOptions(model_path=build_tiny_wan(tmp_path / "a14b", "a14b"), config_path=None, device="cpu",
                          cache_dir=None)
    family = WanFamily.load(options, kind="wan", magcache=catalog.models["wan_2_1_1_3b"].magcache)
    with pytest.raises(ModelUnavailable, match=r"none for this checkpoint \(2 layers, 2 heads, two transformers\)"):
        family.check(make_job(catalog, "video_fast_cached"))


def test_ti2v_5b_serves_text_and_image_to_video(tmp_path, catalog):
    folder = build_tiny_wan(tmp_path / "ti2v", "ti2v")
    clip, _ = run(load(folder, "wan"), make_job(catalog, "video_fast"))
    assert len(clip.frames) == 5 and clip.frames[0].shape == (64, 64, 3)
    i2v = load(folder, "wan_i2v")          # the same folder, accepted as image-to-video
    clip, _ = run(i2v, make_job(catalog, "video_i2v_fast", referenceImage=png_uri((64, 64))))
    assert len(clip.frames) == 5 and clip.frames[0].shape == (64, 64, 3)
