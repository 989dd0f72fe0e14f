"""Step caching (MagCache) for a Wan transformer: a quality tier that skips the transformer blocks
on planned denoising steps and reuses the blocks' last residual instead.

    plan = StepPlan.magcache(calibration, job.spec.step_cache, job.steps)   # which steps reuse
    blocks = install(pipe.transformer)          # once, at load: the blocks stay the same modules
    with blocks.active(plan):                   # one job
        pipe(...)
    blocks.stats                                # {"cond": [computed, reused], "uncond": [...]}

MagCache (Ma et al., 2025) measured, for each checkpoint, how the norm of the blocks' residual
(output − input of the 30 blocks) changes from one step to the next (`mag_ratios`, one list per CFG
branch). A step may reuse the previous residual while the error accumulated from those ratios stays
under `threshold`, at most `max_skip_steps` in a row, never in the first `retention` share of steps.
The decision depends only on the calibration and the step count, not on the activations, so a job's
plan (and its speed) is known before it runs and is the same on random test weights.

Why not diffusers' own MagCacheConfig hooks: they wrap each block's forward in
`torch.compiler.disable`, so the regionally compiled blocks (fullgraph) stop compiling ("call
torch._dynamo.disable() wrapped function", torch 2.6) or, without fullgraph, run eagerly. Here the block
list itself decides: on a reused step the pipeline's `for block in self.blocks` loop sees one step
that adds the cached residual instead of the 30 compiled blocks. The CFG branch and step index come
from diffusers' `cache_context("cond" | "uncond", step_index=...)`, which every Wan pipeline opens
around each transformer call. Outside `active()` the blocks run as usual. Importing touches no GPU.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import chain

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.hooks.mag_cache import nearest_interp

PROBE_HOOK = "step_cache_context"


def nearest(values: list[float] | tuple[float, ...], length: int) -> list[float]:
    """`values` resampled to `length` entries by nearest index: diffusers' MagCache resampling of a
    calibration to another step count."""
    return nearest_interp(torch.tensor(values, dtype=torch.float64), length).tolist()


def calibration_for(calibrations, transformer_config):
    """The calibration (config.MagCacheCalibration) measured on a transformer of this shape, or None."""
    shape = (transformer_config.num_layers, transformer_config.num_attention_heads)
    return next((c for c in calibrations if (c.num_layers, c.num_attention_heads) == shape), None)


def magcache_skips(ratios: list[float] | tuple[float, ...], steps: int, threshold: float, max_skip_steps: int,
                   retention: float) -> tuple[bool, ...]:
    """True for each step whose blocks are skipped (the cached residual reused)."""
    scaled = nearest(ratios, steps)
    first = max(1, int(retention * steps + 0.5))   # step 0 has no residual to reuse
    ratio, run, error = 1.0, 0, 0.0
    skips = []
    for step in range(steps):
        skip = False
        if step >= first:
            ratio *= scaled[step]
            run += 1
            error += abs(1.0 - ratio)
            skip = error < threshold and run <= max_skip_steps
            if not skip:
                ratio, run, error = 1.0, 0, 0.0
        skips.append(skip)
    return tuple(skips)


@dataclass(frozen=True)
class StepPlan:
    """Which steps reuse the residual, per CFG branch (cache context name)."""
    skips: dict[str, tuple[bool, ...]]

    @classmethod
    def magcache(cls, calibration, spec, steps: int) -> "StepPlan":
        """`calibration`: config.MagCacheCalibration; `spec`: config.StepCacheSpec."""
        return cls({branch: magcache_skips(getattr(calibration, branch), steps, spec.threshold, spec.max_skip_steps,
                                           spec.retention)
                    for branch in ("cond", "uncond")})

    def computed(self, branch: str = "cond") -> int:
        return sum(not s for s in self.skips[branch])

    def describe(self, branch: str = "cond") -> str:
        """'CCCssCss…': C computed, s reused."""
        return "".join("s" if s else "C" for s in self.skips[branch])


class _Residual(BaseState):
    def __init__(self) -> None:
        self.blocks_input: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def reset(self) -> None:
        self.blocks_input = self.residual = None


class _ContextProbe(ModelHook):
    """Changes nothing in the forward; being stateful, it receives the pipeline's cache_context."""
    _is_stateful = True

    def __init__(self) -> None:
        super().__init__()
        self.contexts = StateManager(_Residual)

    def reset_state(self, module):
        self.contexts.reset()
        return module


def _enter(state: _Residual, hidden_states, *block_args):
    state.blocks_input = hidden_states
    return hidden_states


def _leave(state: _Residual, hidden_states, *block_args):
    state.residual = hidden_states - state.blocks_input
    state.blocks_input = None
    return hidden_states


def _reuse(state: _Residual, hidden_states, *block_args):
    return hidden_states + state.residual


class CachedBlocks(torch.nn.ModuleList):
    """The transformer's block list (the same modules, the same state_dict keys) that, inside
    `active(plan)`, yields either the blocks framed by residual bookkeeping or one reuse step."""

    def __init__(self, blocks, probe: _ContextProbe) -> None:
        super().__init__(blocks)
        self._probe = probe
        self._plan: StepPlan | None = None
        self.stats: dict[str, list[int]] = {}

    def __iter__(self):
        blocks = super().__iter__()
        context = self._probe.contexts._context
        if self._plan is None or context is None or context.step_index is None:
            return blocks
        state = self._probe.contexts.get_state()
        skips = self._plan.skips.get(context.name, ())
        counts = self.stats.setdefault(context.name, [0, 0])
        if context.step_index < len(skips) and skips[context.step_index] and state.residual is not None:
            counts[1] += 1
            return iter((partial(_reuse, state),))
        counts[0] += 1
        return chain((partial(_enter, state),), blocks, (partial(_leave, state),))

    @contextmanager
    def active(self, plan: StepPlan):
        """One job's plan; cached residuals never outlive it."""
        self._probe.contexts.reset()
        self._plan, self.stats = plan, {}
        try:
            yield self
        finally:
            self._plan = None
            self._probe.contexts.reset()


def install(transformer: torch.nn.Module) -> CachedBlocks:
    """Swap the transformer's `blocks` ModuleList for a CachedBlocks holding the same modules (their
    compiled state included). Idempotent."""
    if isinstance(transformer.blocks, CachedBlocks):
        return transformer.blocks
    probe = _ContextProbe()
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(probe, PROBE_HOOK)
    transformer.blocks = CachedBlocks(transformer.blocks, probe)
    return transformer.blocks
