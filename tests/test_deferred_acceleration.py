"""compile_at: idle — a worker reports ready before compiling, and its Runner runs the deferred
compile and warm-ups between jobs, when the queue is empty. On the CPU the GPU levers are off, so
the deferred part here is a real warm-up run of a tiny SDXL pipeline through the same code path."""
from __future__ import annotations

import threading
import time

import torch

from storage.local import LocalStorage
from tools.small_catalog import small_catalog
from workers.callback import CallbackOutbox, LocalStatusSink
from workers.config import Settings
from workers.pipelines.accel import Acceleration
from workers.pipelines.base import LoadOptions
from workers.pipelines.residency import ResidentFamilies, Residency
from workers.pipelines.sdxl import SDXLFamily
from workers.queue import JobRecords, ReliableQueue
from workers.runner import Runner

CPU_SAFE = dict(channels_last=False, fuse_qkv=False, cuda_graphs=False, cudnn_benchmark=False)


def test_split_defers_the_whole_block_when_idle_and_nothing_at_load():
    accel = Acceleration(compile="blocks", warmup=((1, 1024, 1024), (6, 1024, 1024)), compile_at="idle")
    assert accel.split() == (None, accel)        # ready on the loaded weights; everything once idle
    at_load = Acceleration(compile="blocks", warmup=((1, 512, 512), (2, 512, 512)), compile_at="load")
    assert at_load.split() == (at_load, None)


def test_catalog_defers_by_default(tmp_path):
    catalog = small_catalog(tmp_path)
    accel = SDXLFamily.acceleration_for(catalog, "lustify_sdxl", Settings.from_env({"DATA_DIR": str(tmp_path)}))
    assert accel.compile_at == "idle" and accel.split()[1] is not None


def _runner(tmp_path, redis_client, families, claim_timeout: float = 0.2) -> Runner:
    catalog = small_catalog(tmp_path / "catalog")
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data"), "CLAIM_TIMEOUT": str(claim_timeout), "DEVICE": "cpu"})
    queue = ReliableQueue(redis_client, "sdxl_queue", "deferred-test", 5.0)
    queue.register({"state": "ready"})
    return Runner(catalog=catalog, settings=settings, queue=queue, records=JobRecords(redis_client),
                  storage=LocalStorage(tmp_path / "storage"), outbox=CallbackOutbox(redis_client, LocalStatusSink(tmp_path / "jobs")),
                  families=families, load_errors={}, worker_type="sdxl")


def test_an_idle_runner_runs_the_deferred_part_once(tmp_path, redis_client, tiny_sdxl):
    family = SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None))
    family.deferred = Acceleration(compile="none", warmup=((1, 64, 64),), **CPU_SAFE)
    runner = _runner(tmp_path, redis_client, {"lustify_sdxl": family})
    seen = []   # what the heartbeat would report while the warm-up runs the UNet
    hook = family.txt2img.unet.register_forward_pre_hook(lambda *_: seen.append(runner.compiling))
    loop = threading.Thread(target=runner.serve, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        # "before" is written by the last stage; the runner clears `deferred`, then `compiling`, after it
        while not ("before" in family.accel_report and family.deferred is None and runner.compiling is None) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert family.deferred is None, "the idle runner never ran the deferred acceleration"
        assert "1x64x64" in family.accel_report["warmup"]        # the warm-up really ran the pipeline
        assert family.accel_report["before"]["applied"] == "none"
        runner.accelerate_deferred()                               # nothing left: a no-op
        assert family.deferred is None
        assert seen and set(seen) == {"lustify_sdxl"} and runner.compiling is None
    finally:
        hook.remove()
        runner.stop.graceful.set()
        loop.join(10)


def unet_calls(family, runner) -> tuple[list, object]:
    """Who runs the UNet, call by call: the model key during its deferred warm-up, else the jobId."""
    events: list = []
    hook = family.txt2img.unet.register_forward_pre_hook(lambda *_: events.append(runner.compiling or runner.current_job))
    return events, hook


def serve_until(runner, done, seconds: float = 60) -> None:
    loop = threading.Thread(target=runner.serve, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop.graceful.set()
        loop.join(15)


def submit(redis_client, runner, n: int = 1) -> list[str]:
    from workers.submit import enqueue, new_payload

    ids = []
    for i in range(n):
        payload = new_payload(runner.catalog, "sdxl_image_fast", "a lighthouse",
                              f"5f1b9d2c-0000-4000-8000-00000000abc{i}", num_images=1)
        enqueue(redis_client, runner.catalog, payload)
        ids.append(payload["jobId"])
    return ids


def test_a_job_arriving_during_the_deferred_warm_up_goes_before_its_next_stage(tmp_path, redis_client, tiny_sdxl):
    family = SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None))
    family.deferred = Acceleration(compile="none", warmup=((1, 64, 64), (2, 64, 64), (1, 128, 128)), **CPU_SAFE)
    runner = _runner(tmp_path, redis_client, {"lustify_sdxl": family})
    events, hook = unet_calls(family, runner)
    arrived: list[str] = []

    def job_comes_in(*_):   # during the first warm-up
        if not arrived:
            arrived.extend(submit(redis_client, runner))

    second = family.txt2img.unet.register_forward_pre_hook(job_comes_in)
    records = JobRecords(redis_client)
    try:
        serve_until(runner, lambda: family.deferred is None and arrived and records.status(arrived[0]) == "completed")
    finally:
        hook.remove()
        second.remove()
    order = [who for i, who in enumerate(events) if i == 0 or events[i - 1] != who]
    assert order == ["lustify_sdxl", arrived[0], "lustify_sdxl"], order   # one stage, the job, the rest
    assert list(family.accel_report["warmup"]) == ["1x64x64", "2x64x64", "1x128x128",   # each shape once,
                                                   "vae 64x64", "vae 128x128"]       # then each size's decode


def test_a_worker_busy_for_long_runs_one_stage_between_two_jobs(tmp_path, redis_client, tiny_sdxl):
    from workers.runner import ACCELERATE_AFTER_BUSY_SECONDS

    family = SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None))
    family.deferred = Acceleration(compile="none", warmup=((1, 64, 64), (2, 64, 64)), **CPU_SAFE)
    runner = _runner(tmp_path, redis_client, {"lustify_sdxl": family}, claim_timeout=8.0)  # never idle here
    runner.busy_since -= ACCELERATE_AFTER_BUSY_SECONDS + 1     # as if the queue had not been empty since
    jobs = submit(redis_client, runner, 3)   # three stages: two UNet shapes, then the decode of their size
    events, hook = unet_calls(family, runner)
    records = JobRecords(redis_client)
    try:
        serve_until(runner, lambda: family.deferred is None and records.status(jobs[2]) == "completed", 30)
    finally:
        hook.remove()
    order = [who for i, who in enumerate(events) if i == 0 or events[i - 1] != who]
    assert order == [jobs[0], "lustify_sdxl", jobs[1], "lustify_sdxl", jobs[2]], order
    assert "before" in family.accel_report and [records.status(j) for j in jobs] == ["completed"] * 3


def test_a_paused_acceleration_goes_on_where_it_stopped(tiny_sdxl):
    family = SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None))
    family.deferred = Acceleration(compile="none", warmup=((1, 64, 64), (2, 64, 64)), **CPU_SAFE)
    shapes = []
    hook = family.txt2img.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        assert family.accelerate_deferred(pause=lambda: True) is None
        first, shapes[:] = set(shapes), []
        assert family.deferred is not None and family.accel_report == {"applied": "none"}
        assert family.accelerate_deferred(pause=lambda: True) is None   # the second shape
        report = family.accelerate_deferred(pause=lambda: True)   # the decode, the last stage: no pause after it
    finally:
        hook.remove()
    assert report is not None and family.deferred is None
    assert list(report["warmup"]) == ["1x64x64", "2x64x64", "vae 64x64"]
    assert len(first) == 1 and shapes and not first & set(shapes)    # the first shape did not run again


def test_a_model_not_on_the_device_is_never_loaded_for_it(tmp_path, redis_client, tiny_sdxl):
    loads = []

    def load():
        loads.append(1)
        return SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None))

    families = ResidentFamilies(Residency({"lustify_sdxl": load}, torch.device("cpu")))
    runner = _runner(tmp_path, redis_client, families)
    runner.accelerate_deferred()
    assert loads == []                                             # not loaded: left alone
    family = families.residency.loaded("lustify_sdxl")
    family.deferred = Acceleration(compile="none", warmup=((1, 64, 64),), **CPU_SAFE)
    families.residency.make_resident("lustify_sdxl")
    runner.accelerate_deferred()
    assert loads == [1] and family.deferred is None


def test_nothing_compiles_inside_a_job():
    from workers.pipelines.accel import no_compile_in_jobs

    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(tuple(example_inputs[-1].shape))   # parameters first, then the input
        return graph.forward

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.linear(x)) * 2

    block = Block()
    block.compile(backend=counting_backend, dynamic=False)
    warm, other = torch.randn(2, 8), torch.randn(5, 8)
    with torch.no_grad():
        block(warm)                                    # the warm-up compiles this shape
        with no_compile_in_jobs():
            assert torch.equal(block(warm), torch.relu(block.linear(warm)) * 2)
            out = block(other)                         # not warmed: eager, no compile
        assert compiles == [(2, 8)]
        assert torch.equal(out, torch.relu(block.linear(other)) * 2)
        block(other)                                   # outside a job the compiler works as usual
        assert compiles == [(2, 8), (5, 8)]


def test_the_deferred_part_does_not_fuse_qkv_twice(tiny_sdxl):
    from workers.pipelines import accel as acceleration

    family = SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None))
    pipe = family.txt2img
    levers = dict(CPU_SAFE, fuse_qkv=True)
    acceleration.apply(pipe, Acceleration(compile="none", **levers))      # before ready
    fused = [m.to_qkv.weight for m in pipe.unet.modules() if hasattr(m, "to_qkv")]
    acceleration.apply(pipe, Acceleration(compile="none", **levers))      # the deferred part, later
    after = [m.to_qkv.weight for m in pipe.unet.modules() if hasattr(m, "to_qkv")]
    assert fused and len(after) == len(fused) and all(a is b for a, b in zip(after, fused))


def test_a_stage_that_raises_is_dropped_not_retried():
    from workers.pipelines.accel import DeferredAcceleration

    class Family(DeferredAcceleration):
        accel_report = {"applied": "none"}
        runs: list = []

        def _deferred_stages(self, accel):
            self.runs.append("first")
            yield
            raise RuntimeError("compiler crashed")

    family = Family()
    family.deferred = "the optimize block"
    assert family.accelerate_deferred(pause=lambda: True) is None and family.deferred is not None
    try:
        family.accelerate_deferred()
    except RuntimeError as exc:
        assert "compiler crashed" in str(exc)
    else:
        raise AssertionError("the stage's error was swallowed")
    assert family.deferred is None and family.accelerate_deferred() is None and family.runs == ["first"]


def test_the_decode_stage_feeds_the_decoder_what_a_job_does(tiny_sdxl, tmp_path):
    """The decoder is compiled with static shapes: its warm-up must see a job's shape and dtype, or
    the job would run it eagerly."""
    from workers.job import parse_job

    family = SDXLFamily.load(LoadOptions(model_path=tiny_sdxl.folder, config_path=None, device="cpu", cache_dir=None))
    seen = []
    hook = family.txt2img.vae.decoder.register_forward_pre_hook(
        lambda module, args: seen.append((tuple(args[0].shape), args[0].dtype)))
    catalog = small_catalog(tmp_path)
    job = parse_job({"jobId": "j", "userId": "u", "jobType": "sdxl_image_fast", "prompt": "a lighthouse",
                     "metadata": {"num_images": 2}}, catalog)
    try:
        family.accelerate(Acceleration(compile="none", warmup=((2, job.width, job.height),), **CPU_SAFE))
        warmed, seen[:] = set(seen), []
        family.generate(job, lambda done, total: None)
    finally:
        hook.remove()
    assert len(warmed) == 1 and set(seen) == warmed and len(seen) == 2    # sliced: one image at a time
