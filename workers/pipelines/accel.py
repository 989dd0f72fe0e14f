"""GPU speed-ups for the diffusers families that keep the numerics (bf16 rounding at most).

    accel = Acceleration(compile="blocks", cuda_graphs=True, warmup=((1, 1024, 1024),), cache_dir=data / "compile-cache")
    graphed = apply(pipe, accel)           # channels_last, fused QKV, torch.compile, CUDA-graph wrapper
    with graphed.capture():                 # warm-up at load: every UNet shape it sees is captured
        pipe(...)

What each lever does:
- channels_last: NHWC convolutions in the UNet (cuDNN's fast path for bf16). Not the VAE: its eager
  GroupNorms made the decode slower in NHWC (0.14 s instead of 0.09 s at 1024², H100).
- fuse_qkv: one GEMM for Q, K and V (self-attention) or K and V (cross-attention).
- compile "blocks": regional torch.compile of the UNet's repeated transformer blocks, dynamic
  activation shapes, so one compile per block width serves every batch and size;
  "unet": the whole UNet forward, static shapes (faster kernels, one long compile per warmed shape;
  any other shape runs the plain eager UNet, never a compile inside a job).
  Inductor/Triton caches live under `cache_dir`, so a restart loads instead of recompiling.
- compile_vae: the VAE decoder compiled too (static shapes: one graph per warmed size).
- cuda_graphs: the UNet forward of each (batch, size) captured at warm-up is replayed as one CUDA
  graph: no per-kernel launch cost, no CPU work inside a step. Shapes not captured run eagerly.

Only called on CUDA: on the CPU nothing here runs. Importing this module touches no GPU.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "blocks", "unet")
# Classes compiled by compile="blocks": diffusers' UNet2DConditionModel._repeated_blocks. ResNet blocks
# are left out: dynamo specializes on parameter shapes, so each of their ~16 channel layouts (UNet and
# VAE) compiled on its own; with them a cold start took 178 s instead of about a minute (H100, run 1).
BLOCK_CLASSES = ("BasicTransformerBlock",)


@dataclasses.dataclass(frozen=True)
class Acceleration:
    channels_last: bool = True
    fuse_qkv: bool = True
    compile: str = "blocks"                 # one of COMPILE_MODES
    cuda_graphs: bool = True
    cudnn_benchmark: bool = True            # pick the fastest conv algorithm per shape (at warm-up)
    warmup: tuple[tuple[int, int, int], ...] = ()   # (images, width, height) run and captured at load
    cache_dir: Path | None = None           # persistent Inductor/Triton cache
    compile_at: str = "load"                # "idle": see split()
    compile_vae: bool = True                # with compile != "none": the VAE decoder, static per warmed size

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, not {self.compile!r}")

    def split(self) -> tuple["Acceleration | None", "Acceleration | None"]:
        """(before ready, deferred). With compile_at="idle" the worker is ready once its weights are
        loaded and serves the plain pipeline; all of this (fusing, compile, cuDNN autotuning, the
        CUDA-graph captures, 40 s with a warm cache) runs when the runner first finds the queue empty.
        Capturing even one graph before ready cost 3.9 s of a 7.1 s start (H200, 2026-12-02)."""
        return (None, self) if self.compile_at == "idle" else (self, None)

    @classmethod
    def off(cls) -> "Acceleration":
        return cls(channels_last=False, fuse_qkv=False, compile="none", cuda_graphs=False, cudnn_benchmark=False)

    @property
    def is_off(self) -> bool:
        flags = (self.channels_last, self.fuse_qkv, self.cuda_graphs, self.cudnn_benchmark)
        return not any(flags) and self.compile == "none"

    def describe(self) -> str:
        parts = [name for name in ("channels_last", "fuse_qkv", "cuda_graphs", "cudnn_benchmark") if getattr(self, name)]
        vae = ["compile_vae"] if self.compile != "none" and self.compile_vae else []
        return ", ".join(parts + [f"compile={self.compile}"] + vae)


class DeferredAcceleration(abc.ABC):
    """Mixed into a family whose optimize block may wait for idle moments (compile_at: idle).
    `deferred` is what still waits; the family's `_deferred_stages(deferred)` is a generator that
    runs it and yields between its stages (after each warm-up shape), where a job that arrived in
    the meantime goes first. A long compile then delays a waiting job by one stage, not all of it."""

    deferred = None
    _stages: Iterator[None] | None = None   # the started generator while it is paused

    @abc.abstractmethod
    def _deferred_stages(self, accel) -> Iterator[None]:
        """A generator running `accel`, yielding between its stages."""

    def accelerate_deferred(self, pause: Callable[[], bool] = lambda: False) -> dict | None:
        """Run, or go on with, the deferred acceleration. Returns its report once all of it ran;
        None when nothing is deferred or when `pause()` said, between two stages, that a job waits."""
        if self.deferred is None:
            return None
        if self._stages is None:
            self._stages = self._deferred_stages(self.deferred)
        try:
            for _ in self._stages:
                if pause():
                    return None
        except BaseException:
            self.deferred = self._stages = None   # a broken stage is not tried again
            raise
        self.deferred = self._stages = None
        return self.accel_report


def warm_up_decode(vae, latent_shape: tuple[int, ...]) -> float:
    """Decode seeded random latents of `latent_shape` in the VAE's dtype, as a job's decode receives
    them: compiles (and autotunes) the decoder for that shape. Returns the seconds it took."""
    device = next(vae.parameters()).device
    t0 = time.perf_counter()
    latents = torch.randn(*latent_shape, generator=torch.Generator().manual_seed(0)).to(device, vae.dtype)
    with torch.no_grad():
        vae.decode(latents, return_dict=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round(time.perf_counter() - t0, 2)


def use_compile_cache(cache_dir: Path | None) -> None:
    """Point Inductor and Triton at a persistent folder (read lazily at the first compile)."""
    if cache_dir is None:
        return
    cache_dir = Path(cache_dir)
    (cache_dir / "inductor").mkdir(parents=True, exist_ok=True)
    (cache_dir / "triton").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))


def _configure_dynamo(limit: int = 64) -> None:
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def compile_blocks(module: torch.nn.Module, classes=BLOCK_CLASSES) -> int:
    """torch.compile each submodule whose class is in `classes`, in place. Instances of one class
    share the compiled code (parameters are graph inputs), and dynamic shapes mean a new batch or
    size does not recompile."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    # Dynamo guards on the identity of each attention's processor object: give all the same one.
    processors = {type(m.processor) for m in module.modules() if isinstance(m, Attention)}
    if processors == {AttnProcessor2_0}:
        shared = AttnProcessor2_0()
        for m in module.modules():
            if isinstance(m, Attention):
                m.set_processor(shared)
    count = 0
    for sub in module.modules():
        if type(sub).__name__ in classes:
            sub.compile(fullgraph=True, dynamic=True)
            count += 1
    return count


def uncompile_blocks(module: torch.nn.Module) -> None:
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None


class _Captured:
    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph, inputs, output):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphedUNet:
    """Installed as `unet.forward`. A call whose inputs match a captured shape copies them into the
    graph's static buffers, replays it and returns a copy of the output; any other call (new shape,
    extra conditioning, autograd) runs `eager` (the UNet's own forward, or the regionally compiled one).
    Graphs share one memory pool: they never run at the same time and each output is copied out at once."""

    PASS_THROUGH = ("added_cond_kwargs", "return_dict")

    def __init__(self, unet: torch.nn.Module, inner, eager=None):
        self.unet, self.inner = unet, inner
        self.eager = eager or inner  # what runs a shape that was not captured
        self.graphs: dict[tuple, _Captured | None] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capturing = False
        self.replays = 0
        self.eager_calls = 0

    @contextlib.contextmanager
    def capture(self):
        self.capturing = True
        try:
            yield self
        finally:
            self.capturing = False

    @staticmethod
    def _key(sample, timestep, encoder_hidden_states, kwargs):
        if any(v is not None for k, v in kwargs.items() if k not in GraphedUNet.PASS_THROUGH):
            return None
        added = kwargs.get("added_cond_kwargs") or {}
        names = tuple(sorted(added))
        tensors = [sample, timestep, encoder_hidden_states, *(added[n] for n in names)]
        if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors) or timestep.numel() != 1:
            return None
        return names, tuple((tuple(t.shape), t.stride(), t.dtype) for t in tensors)

    def __call__(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        key = None if torch.is_grad_enabled() else self._key(sample, timestep, encoder_hidden_states, kwargs)
        entry = self.graphs.get(key) if key is not None else None
        if entry is None and key is not None and self.capturing and key not in self.graphs:
            entry = self._capture(key, sample, timestep, encoder_hidden_states, kwargs.get("added_cond_kwargs") or {})
        if entry is None:
            self.eager_calls += 1
            return self.eager(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        added = kwargs.get("added_cond_kwargs") or {}
        for static, new in zip(entry.inputs, [sample, timestep, encoder_hidden_states, *(added[n] for n in key[0])]):
            static.copy_(new)
        entry.graph.replay()
        self.replays += 1
        out = entry.output.clone()
        if kwargs.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def _capture(self, key, sample, timestep, encoder_hidden_states, added) -> _Captured | None:
        names = key[0]
        inputs = [t.clone() for t in (sample, timestep, encoder_hidden_states, *(added[n] for n in names))]

        def run():
            s, t, e, *rest = inputs
            return self.inner(s, t, encoder_hidden_states=e, added_cond_kwargs=dict(zip(names, rest)), return_dict=False)[0]

        started = time.perf_counter()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles, autotunes and allocates outside the capture
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = run()
        except Exception as exc:  # never fail a job over a graph: this shape runs eagerly
            log.warning("CUDA graph capture of UNet %s failed (%s: %s); it runs eagerly", key[1][0][0], type(exc).__name__, exc)
            self.graphs[key] = None
            return None
        entry = self.graphs[key] = _Captured(graph, inputs, output)
        log.info("captured the UNet for input %s in %.1fs", tuple(sample.shape), time.perf_counter() - started)
        return entry


def apply(pipe, accel: Acceleration) -> GraphedUNet | None:
    """Apply `accel` to a CUDA pipeline with .unet and .vae, in place. Returns the graph wrapper
    (or None without cuda_graphs); run the warm-up inside `wrapper.capture()`."""
    if accel.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if accel.fuse_qkv and not getattr(pipe, "fusing_unet", False):   # fusing again would copy the weights
        pipe.fuse_qkv_projections()
    if accel.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    eager = inner = pipe.unet.forward
    if accel.compile != "none":
        use_compile_cache(accel.cache_dir)
        _configure_dynamo()
    if accel.compile == "blocks":
        count = compile_blocks(pipe.unet)
        log.info("compile=blocks: %d blocks (compiled at the first call)", count)
    elif accel.compile == "unet":
        inner = torch.compile(pipe.unet.forward, fullgraph=False, dynamic=False)
    if accel.compile != "none" and accel.compile_vae:
        # Decoding is sliced (one image at a time), so each warmed size is one static graph; any other
        # size runs eagerly inside jobs (no_compile_in_jobs).
        pipe.vae.decoder.compile(dynamic=False)
    if not accel.cuda_graphs:
        if inner is not pipe.unet.forward:
            pipe.unet.forward = inner
        return None
    graphed = GraphedUNet(pipe.unet, inner, eager)
    pipe.unet.forward = graphed
    return graphed


def no_compile_in_jobs():
    """Context for a job: code the warm-up compiled runs compiled, and whatever would need a new
    compile (a size or batch no warm-up ran, an adapter changing a block) runs eagerly instead of
    compiling for tens of seconds inside the job (torch.compiler stance, torch >= 2.6)."""
    return torch.compiler.set_stance("eager_on_recompile")


def remove(pipe) -> None:
    """Undo compile and CUDA graphs (fused QKV and channels_last stay: they keep the numerics)."""
    if "forward" in vars(pipe.unet):
        del pipe.unet.forward
    uncompile_blocks(pipe.unet)
    uncompile_blocks(pipe.vae)
