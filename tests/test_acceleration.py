"""GPU acceleration settings (workers/pipelines/accel.py): configuration and the CPU path, which they
must leave unchanged. Speed is measured by bench/, never asserted here."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tools.small_catalog import small_catalog, write_small_job_types
from workers import media
from workers.config import ConfigError, Settings, load_catalog
from workers.pipelines.accel import Acceleration, GraphedUNet
from workers.pipelines.base import LoadOptions
from workers.pipelines.sdxl import SDXLFamily


def test_catalog_optimize_block_becomes_the_warm_up_plan(tmp_path):
    catalog = small_catalog(tmp_path, width=None, height=None, steps=None)
    accel = SDXLFamily.acceleration_for(catalog, "lustify_sdxl", Settings.from_env({"DATA_DIR": str(tmp_path)}))
    spec = catalog.models["lustify_sdxl"].optimize
    assert accel.compile == spec.compile and accel.cuda_graphs == spec.cuda_graphs
    sizes = [tuple(int(v) for v in s.split("x")) for s in spec.warmup_sizes]
    assert set(accel.warmup) == {(n, w, h) for n in spec.warmup_images for w, h in sizes}
    assert accel.cache_dir == tmp_path.resolve() / "compile-cache"


def test_optimize_env_turns_everything_off(tmp_path):
    catalog = small_catalog(tmp_path)
    accel = SDXLFamily.acceleration_for(catalog, "lustify_sdxl", Settings.from_env({"DATA_DIR": str(tmp_path), "OPTIMIZE": "0"}))
    assert accel.is_off


def test_without_warmup_sizes_every_job_size_is_warmed(tmp_path):
    path = write_small_job_types(tmp_path, width=None, height=None)
    raw = yaml.safe_load(path.read_text())
    del raw["models"]["lustify_sdxl"]["optimize"]["warmup_sizes"]
    path.write_text(yaml.safe_dump(raw))
    catalog = load_catalog(path)
    accel = SDXLFamily.acceleration_for(catalog, "lustify_sdxl", Settings.from_env({"DATA_DIR": str(tmp_path)}))
    assert {(w, h) for _, w, h in accel.warmup} == {(1024, 1024), (1280, 1280)}


def test_unknown_compile_mode_stops_start_up(tmp_path):
    path = write_small_job_types(tmp_path)
    text = path.read_text()
    assert re.search(r"\bcompile: \w+", text)
    path.write_text(re.sub(r"\bcompile: \w+", "compile: turbo", text, count=1))
    with pytest.raises(ConfigError, match="compile"):
        load_catalog(path)
    with pytest.raises(ValueError):
        Acceleration(compile="turbo")


def test_cpu_load_ignores_acceleration(tiny_sdxl):
    family = SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None),
                             accel=Acceleration(compile="unet", warmup=((1, 64, 64),)))
    assert family.graphed is None and family.accel_report == {"applied": "none"}
    assert "forward" not in vars(family.txt2img.unet)  # the UNet's own forward, no wrapper
    assert family.txt2img.unet.conv_in.weight.is_contiguous()  # no channels_last


def test_graph_wrapper_runs_cpu_tensors_eagerly():
    calls = []
    wrapper = GraphedUNet.__new__(GraphedUNet)
    wrapper.graphs, wrapper.capturing, wrapper.eager_calls = {}, True, 0
    wrapper.eager = wrapper.inner = lambda *a, **k: calls.append(k) or ("out",)
    x = torch.zeros(2, 4, 8, 8)
    assert wrapper(x, torch.tensor(1.0), encoder_hidden_states=x, return_dict=False) == ("out",)
    assert wrapper.eager_calls == 1 and wrapper.graphs == {}


def test_encode_pngs_matches_one_by_one():
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(5)]
    assert media.encode_pngs(images) == [media.encode_png(im) for im in images]
    assert media.encode_pngs(images[:1]) == [media.encode_png(images[0])]


def test_wan_warm_up_plan_puts_videos_first_and_off_switch_works(tmp_path):
    from workers.pipelines.wan_accel import WanAcceleration

    catalog = small_catalog(tmp_path, width=None, height=None, steps=None)
    accel = WanAcceleration.for_model(catalog, "wan_2_1_1_3b", Settings.from_env({"DATA_DIR": str(tmp_path)}))
    assert accel.compile == catalog.models["wan_2_1_1_3b"].optimize.compile and not accel.is_off
    types = [t for t in catalog.job_types.values() if t.model == "wan_2_1_1_3b"]
    videos = {(1, t.frames, t.width, t.height) for t in types if t.content == "video"}
    images = {(n, 1, t.width, t.height) for t in types if t.content == "image" for n in (1, t.default_images)}
    # The first shape compiles static (the long video job); the later ones share one dynamic graph.
    assert set(accel.warmup[:len(videos)]) == videos and set(accel.warmup) == videos | images
    assert len(accel.warmup) == len(videos | images)
    assert accel.cache_dir == tmp_path.resolve() / "compile-cache"
    off = WanAcceleration.for_model(catalog, "wan_2_1_1_3b", Settings.from_env({"DATA_DIR": str(tmp_path), "OPTIMIZE": "0"}))
    assert off.is_off


def test_cpu_wan_load_ignores_acceleration(tmp_path):
    from tools.tiny_wan import build_tiny_wan
    from workers.pipelines.wan import WanFamily
    from workers.pipelines.wan_accel import WanAcceleration

    folder = build_tiny_wan(tmp_path / "wan", "t2v")
    family = WanFamily.load(LoadOptions(model_path=folder, config_path=None, device="cpu", cache_dir=None),
                            accel=WanAcceleration(warmup=((1, 5, 64, 64),)))
    assert family.accel_report == {"applied": "none"}
    assert not any(getattr(m, "_compiled_call_impl", None) for m in family.pipe.transformer.modules())
