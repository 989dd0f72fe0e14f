"""workers/pipelines/wan_accel.py on a tiny random-weight Wan (CPU, real diffusers): the stages that
compile the transformer blocks and the VAE decoder's residual blocks, and a job running that code.
torch.compile gets counting backends here (Inductor is the GPU's), so each graph and each call of
compiled code is seen."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from tools.small_catalog import small_catalog
from workers.job import parse_job
from workers.pipelines import wan_accel
from workers.pipelines.base import LoadOptions
from workers.pipelines.wan import WanFamily
from workers.pipelines.wan_accel import WanAcceleration


class CountingBackend:
    """A torch.compile backend that runs each captured graph as is and counts graphs and calls."""

    def __init__(self):
        self.graphs = 0
        self.calls = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return graph_module(*args)
        return run


@pytest.fixture()
def family(tiny_wan):
    torch._dynamo.reset()
    yield WanFamily.load(LoadOptions(model_path=tiny_wan.t2v, config_path=None, device="cpu", cache_dir=None))
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def video_job(tmp_path_factory):
    catalog = small_catalog(tmp_path_factory.mktemp("catalog"), steps=2)
    return parse_job({"jobId": "job-accel", "userId": "u", "jobType": "video_fast", "prompt": "waves", "seed": 3},
                     catalog)


def frames(family, job) -> np.ndarray:
    family.check(job)
    return np.stack(family.generate(job, lambda done, total: None).frames).astype(np.int16)


def residual_blocks(family) -> list[torch.nn.Module]:
    return [m for m in family.pipe.vae.decoder.modules() if type(m).__name__ in wan_accel.VAE_BLOCK_CLASSES]


def test_a_job_decodes_through_the_compiled_vae_blocks_with_the_same_frames(family, video_job):
    eager = frames(family, video_job)
    transformer, vae = CountingBackend(), CountingBackend()
    assert wan_accel.compile_transformer_blocks(family.pipe, transformer) == len(family.pipe.transformer.blocks)
    assert wan_accel.compile_vae_decoder(family.pipe, vae) == len(residual_blocks(family)) > 0
    shape = (1, video_job.frames, video_job.width, video_job.height)
    wan_accel.warm_up(family.pipe, [shape])
    wan_accel.warm_up_decoder(family.pipe, shape)
    assert transformer.graphs and vae.graphs           # the warm-up compiled both, outside any job
    graphs, vae.calls = vae.graphs, 0
    compiled = frames(family, video_job)
    assert vae.graphs == graphs                        # nothing compiled inside the job
    # every residual block of the decoder ran compiled code, once per latent frame at least
    latent_frames = (video_job.frames - 1) // family.frame_multiple + 1
    assert vae.calls >= len(residual_blocks(family)) * latent_frames
    assert np.abs(compiled - eager).max() <= 1
    wan_accel.remove(family.pipe)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in family.pipe.vae.modules())


def test_the_stages_pause_between_warm_up_shapes_and_go_on(family, video_job):
    shapes = ((1, video_job.frames, video_job.width, video_job.height), (1, 1, video_job.width, video_job.height),
              (2, 1, video_job.width, video_job.height))
    accel = WanAcceleration(warmup=shapes, backend=CountingBackend(), compile_at="idle")
    family.deferred = accel
    assert family.accelerate_deferred(pause=lambda: True) is None       # a job waits: one shape warmed
    assert family.deferred is accel and family.accel_report == {"applied": "none"}
    # a job runs here, on what is compiled so far (the video shape), and nothing compiles in it
    backend = accel.backend
    graphs = backend.graphs
    frames(family, video_job)
    assert backend.graphs == graphs and backend.calls
    report = family.accelerate_deferred(pause=lambda: False)
    assert family.deferred is None and report is family.accel_report
    assert report["applied"] == "compile=blocks, compile_vae"
    # each shape once, then the decode of the video shape
    video = "{}x{}x{}x{}".format(*shapes[0])
    assert list(report["warmup"]) == ["{}x{}x{}x{}".format(*shape) for shape in shapes] + [f"vae {video}"]
    assert report["vae_blocks"] == len(residual_blocks(family)) and report["seconds"] >= 0
    assert family.accelerate_deferred() is None                          # nothing left


def test_a_failing_compile_leaves_the_eager_model(family, video_job):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    eager = frames(family, video_job)
    report = wan_accel.accelerate(family.pipe, WanAcceleration(
        warmup=((1, video_job.frames, video_job.width, video_job.height),), backend=broken_backend))
    assert report["applied"] == "fallback" and "no compiler here" in report["error"]
    assert not any(getattr(m, "_compiled_call_impl", None) for m in family.pipe.transformer.modules())
    assert not any(getattr(m, "_compiled_call_impl", None) for m in family.pipe.vae.modules())
    assert np.array_equal(frames(family, video_job), eager)


def landscape_png_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (90, 50), (200, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("kind, job_type, field", [
    ("i2v", "video_i2v_fast", "referenceImage"),
    ("vace", "video_r2v", "referenceImages"),
])
def test_image_and_reference_to_video_compile_with_a_job_shaped_warm_up(tiny_wan, tmp_path, kind, job_type, field):
    """Their warm-up passes the conditioning a job does (a picture of the job size), so the job runs
    the graphs it compiled, and nothing compiles inside the job."""
    picture = landscape_png_uri()
    payload = {field: [picture] if field == "referenceImages" else picture}
    catalog = small_catalog(tmp_path, steps=2)
    job = parse_job({"jobId": f"job-{kind}", "userId": "u", "jobType": job_type, "prompt": "waves", "seed": 3,
                     **payload}, catalog)
    torch._dynamo.reset()
    try:
        family = WanFamily.load(LoadOptions(model_path=getattr(tiny_wan, kind), config_path=None, device="cpu",
                                            cache_dir=None), kind=f"wan_{kind}")
        eager = frames(family, job)
        backend = CountingBackend()
        report = wan_accel.accelerate(family.pipe, WanAcceleration(
            warmup=((1, job.frames, job.width, job.height),), backend=backend), family.warm_up_inputs)
        assert report["applied"] == "compile=blocks, compile_vae", report
        graphs, backend.calls = backend.graphs, 0
        compiled = frames(family, job)
    finally:
        torch._dynamo.reset()
    assert backend.graphs == graphs and backend.calls > 0
    assert np.abs(compiled - eager).max() <= 1


def test_a_failing_decoder_warm_up_leaves_only_the_vae_eager(family, video_job, monkeypatch):
    def out_of_memory(pipe, shape):
        raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(wan_accel, "warm_up_decoder", out_of_memory)
    shape = (1, video_job.frames, video_job.width, video_job.height)
    report = wan_accel.accelerate(family.pipe, WanAcceleration(warmup=(shape, (1, 9, video_job.width, video_job.height)),
                                                               backend=CountingBackend()))
    assert report["applied"] == "compile=blocks" and "out of memory" in report["vae_error"]
    assert all(getattr(block, "_compiled_call_impl", None) for block in family.pipe.transformer.blocks)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in family.pipe.vae.modules())
    assert list(report["warmup"]) == ["{}x{}x{}x{}".format(*shape), f"1x9x{video_job.width}x{video_job.height}"]
