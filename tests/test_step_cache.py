"""workers/pipelines/step_cache.py: MagCache's skip rule, and the caching tier on a tiny random-weight
Wan (tests/fixtures/tiny_wan.py) through the production WanFamily, CPU, real diffusers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tools.small_catalog import small_catalog
from workers.config import ConfigError
from workers.job import parse_job
from workers.media import ImageLimits
from workers.pipelines import step_cache
from workers.pipelines.base import LoadOptions, ModelUnavailable
from workers.pipelines.step_cache import StepPlan, magcache_skips, nearest
from workers.pipelines.wan import WanFamily

CACHED = "video_fast_cached"


def test_skip_rule_by_hand():
    # step 1: ratio 0.9, error 0.1 < 0.15 → reuse; step 2: ratio 0.81, error 0.29 → run and reset;
    # step 3: like step 1.
    assert magcache_skips([1.0, 0.9, 0.9, 0.9], 4, threshold=0.15, max_skip_steps=2, retention=0) == (
        False, True, False, True)
    # max_skip_steps caps a run of reuses even when the error stays small
    assert magcache_skips([1.0] * 8, 8, threshold=0.5, max_skip_steps=2, retention=0) == (
        False, True, True, False, True, True, False, True)
    # the retention share always runs; a tiny threshold never reuses
    assert magcache_skips([1.0] * 10, 10, threshold=0.5, max_skip_steps=9, retention=0.5)[:5] == (False,) * 5
    assert not any(magcache_skips([0.99] * 20, 20, threshold=1e-9, max_skip_steps=3, retention=0.2))


def test_nearest_resampling_keeps_the_ends():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert nearest(values, 5) == values and nearest(values, 3) == [1.0, 3.0, 5.0]
    assert nearest(values, 1) == [5.0] and nearest(values, 9)[-1] == 5.0


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return small_catalog(tmp_path_factory.mktemp("catalog"), steps=4)


def test_the_catalog_tier_reuses_7_of_15_steps_with_the_13b_calibration():
    from workers.config import load_catalog

    real = load_catalog()
    plan = StepPlan.magcache(real.models["wan_2_1_1_3b"].magcache[0], real.job_types[CACHED].step_cache, 15)
    assert plan.describe() == plan.describe("uncond") == "CCCssCssCssCsCC"
    assert plan.computed() == 8


def test_step_cache_needs_a_calibrated_wan_model(tmp_path):
    with pytest.raises(ConfigError, match="step_cache: needs a `wan` model with a `magcache` calibration"):
        small_catalog(tmp_path, job_types={CACHED: {"model": "wan_2_1_vace_1_3b"}})


@pytest.fixture(scope="module")
def family(tiny_wan):
    limits = ImageLimits(max_bytes=100_000, max_pixels=20_000, timeout=5)
    options = LoadOptions(model_path=tiny_wan.t2v, config_path=None, device="cpu", cache_dir=None)
    from tools.small_catalog import TINY_WAN_TRANSFORMER

    catalog = small_catalog(tiny_wan.t2v.parent.parent / "catalog-for-step-cache")
    calibrations = catalog.models["wan_2_1_1_3b"].magcache
    loaded = WanFamily.load(options, limits=limits, kind="wan", magcache=calibrations)
    config = loaded.pipe.transformer.config
    assert {"num_layers": config.num_layers, "num_attention_heads": config.num_attention_heads} == TINY_WAN_TRANSFORMER
    return loaded


def job(catalog, job_type=CACHED, **payload):
    return parse_job({"jobId": f"job-{job_type}", "userId": "u", "jobType": job_type, "prompt": "waves",
                      "seed": 3, **payload}, catalog)


def frames(family, the_job) -> np.ndarray:
    family.check(the_job)
    return np.stack(family.generate(the_job, lambda done, total: None).frames).astype(np.int16)


def count_block_calls(family):
    calls = []
    handle = family.pipe.transformer.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_cached_job_runs_the_planned_blocks_and_nothing_leaks_into_the_next_job(family, catalog):
    plain_before = frames(family, job(catalog, "video_fast"))
    calls, handle = count_block_calls(family)
    try:
        cached = frames(family, job(catalog))
    finally:
        handle.remove()
    plan = StepPlan.magcache(family.magcache, catalog.job_types[CACHED].step_cache, 4)
    assert plan.describe() == "CssC"
    assert family.step_cache_stats == {"cond": [2, 2], "uncond": [2, 2]}
    assert len(calls) == 4                      # 2 computed steps × (cond + uncond), not 8
    assert cached.shape == plain_before.shape and np.abs(cached - plain_before).max() > 0
    assert np.array_equal(frames(family, job(catalog, "video_fast")), plain_before)


def test_a_plan_that_reuses_nothing_changes_no_pixel(family, tmp_path):
    never = small_catalog(tmp_path, steps=4, job_types={CACHED: {"step_cache": {
        "method": "magcache", "threshold": 1e-9, "max_skip_steps": 2, "retention": 0.2}}})
    assert np.array_equal(frames(family, job(never)), frames(family, job(never, "video_fast")))
    assert family.step_cache_stats == {}   # the last job was not cached
    frames(family, job(never))
    assert family.step_cache_stats == {"cond": [4, 0], "uncond": [4, 0]}


def test_a_reused_step_adds_the_cached_residual(family):
    """Same input at step 0 (blocks run) and step 1 (reused): the same output, without the blocks."""
    transformer = family.pipe.transformer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=gen)
    text = torch.randn(1, 6, transformer.config.text_dim, generator=gen)
    plan = StepPlan({"cond": (False, True)})
    outputs = []
    with torch.no_grad(), transformer.blocks.active(plan) as blocks:
        for step in (0, 1):
            with transformer.cache_context("cond", step_index=step):
                outputs.append(transformer(x, timestep=torch.tensor([500]), encoder_hidden_states=text,
                                           return_dict=False)[0])
    assert blocks.stats == {"cond": [1, 1]}
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)   # x + (y − x) = y, up to rounding
    assert not torch.equal(outputs[0], torch.zeros_like(outputs[0]))
    assert list(transformer.blocks) == list(transformer.blocks._modules.values())   # outside a job: plain blocks


def test_install_is_idempotent_and_keeps_the_weights(family):
    transformer = family.pipe.transformer
    keys = set(transformer.state_dict())
    assert step_cache.install(transformer) is transformer.blocks
    assert set(transformer.state_dict()) == keys and any(k.startswith("blocks.0.") for k in keys)


def test_a_checkpoint_without_a_matching_calibration_fails_the_job_before_generation(tiny_wan, catalog):
    options = LoadOptions(model_path=tiny_wan.t2v, config_path=None, device="cpu", cache_dir=None)
    real_only = [c for c in catalog.models["wan_2_1_1_3b"].magcache if c.num_layers == 30]
    uncalibrated = WanFamily.load(options, kind="wan", magcache=real_only)
    assert uncalibrated.magcache is None and not isinstance(uncalibrated.pipe.transformer.blocks, step_cache.CachedBlocks)
    with pytest.raises(ModelUnavailable, match=r"video_fast_cached caches steps with a MagCache calibration.*"
                                               r"none for this checkpoint \(2 layers, 2 heads\)"):
        uncalibrated.check(job(catalog))
    uncalibrated.check(job(catalog, "video_fast"))   # the other types still run


def test_compiled_blocks_stay_compiled_in_a_cached_job(tiny_wan, catalog):
    """The reason for CachedBlocks: diffusers' MagCacheConfig hooks wrap each block in
    torch.compiler.disable (the same fullgraph compile then raises "call torch._dynamo.disable()
    wrapped function"); here a computed step runs the blocks' compiled code."""
    options = LoadOptions(model_path=tiny_wan.t2v, config_path=None, device="cpu", cache_dir=None)
    compiled = WanFamily.load(options, kind="wan", magcache=catalog.models["wan_2_1_1_3b"].magcache)
    compiles, graph_calls = [], []

    def counting_backend(graph_module, example_inputs):
        compiles.append(1)

        def run(*args):
            graph_calls.append(1)
            return graph_module(*args)
        return run

    from workers.pipelines.wan_accel import warm_up

    torch._dynamo.reset()
    for block in compiled.pipe.transformer.blocks:
        block.compile(backend=counting_backend, fullgraph=True, dynamic=False)
    try:
        the_job = job(catalog)
        warm_up(compiled.pipe, [(1, the_job.frames, the_job.width, the_job.height)])   # compiles, as at idle
        graph_calls.clear()
        frames(compiled, the_job)   # in a job nothing compiles (no_compile_in_jobs)
    finally:
        torch._dynamo.reset()
    assert compiled.step_cache_stats == {"cond": [2, 2], "uncond": [2, 2]}
    # 2 blocks × 2 computed steps × 2 branches, every one through the compiled graph
    assert compiles and len(graph_calls) == 8
