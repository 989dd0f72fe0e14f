"""The adapter interface every model family implements (one file per family, same shape).

    family = SDXLFamily.load(model_spec, paths, device)   # once, at worker start; slow
    family.check(job)                                    # ValueError naming the bad value, no GPU work
    images = family.generate(job, on_step)               # image jobs: list of PIL images, one per job.seeds entry
                                                         # video jobs: a workers.media.VideoClip

Nothing here knows about Redis, storage or callbacks. Errors the runner must tell apart are the
exception classes below.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

# on_step(step_done, total_steps); it may raise to abort generation (deadline, shutdown).
# The runner's on_step also has `.phase(name)`, which records a phase ("encoding prompt", "decoding").
StepCallback = Callable[[int, int], None]


class GenerationOutOfMemory(Exception):
    """The accelerator ran out of memory; caches were freed, the worker can take the next job."""


class ModelUnavailable(Exception):
    """The job needs a model or mode this worker has not loaded (missing checkpoint, wrong worker)."""


@dataclass(frozen=True)
class LoadOptions:
    model_path: Path              # single .safetensors file or diffusers folder
    config_path: Path | None      # folder of component configs/tokenizers for single-file loads
    device: str                   # "cpu" or "cuda"
    cache_dir: Path | None        # where a converted single-file checkpoint is kept as a diffusers folder
    vram_budget_bytes: int | None = None  # GPU memory this worker may use (enforced on CUDA); None: no cap


class ModelFamily(Protocol):
    name: str

    def check(self, job) -> None: ...

    def generate(self, job, on_step: StepCallback) -> list: ...
