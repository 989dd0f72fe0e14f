"""Where the GPU waits inside one job: torch.profiler's kernel timeline, its idle gaps, and what the
CPU was doing in each (the job's phase and the innermost operations running then).

    gaps = gpu_gaps(lambda: project_call(family, job, storage), phases={"unet": pipe.unet, ...})

Returns busy and idle milliseconds, idle time per phase, and the largest gaps; None without CUDA.
A diagnostic for choosing the next optimisation, not a timing (the profiler slows the CPU side).
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter, defaultdict

import torch


def _span(event) -> tuple[int, int]:
    start = event.start_ns() if hasattr(event, "start_ns") else int(event.start_us() * 1000)
    duration = event.duration_ns() if hasattr(event, "duration_ns") else int(event.duration_us() * 1000)
    return start, start + duration


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


@contextlib.contextmanager
def _phase_ranges(phases: dict):
    """A record_function range around each named module's call, so a gap can name its phase."""
    handles, open_ranges = [], {}
    for name, module in phases.items():
        def enter(_module, _args, name=name):
            open_ranges[name] = torch.autograd.profiler.record_function(f"phase:{name}")
            open_ranges[name].__enter__()

        def leave(_module, _args, _out, name=name):
            open_ranges.pop(name).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def gpu_gaps(fn, phases: dict | None = None, min_gap_ms: float = 0.05, top: int = 12) -> dict | None:
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with _phase_ranges(phases or {}), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3
    events = list(prof.profiler.kineto_results.events())
    device = [_span(e) for e in events if "cuda" in str(e.device_type()).lower()]
    host = [(e.name(), *_span(e)) for e in events if "cpu" in str(e.device_type()).lower()]
    busy = _merge([s for s in device if s[1] > s[0]])
    if not busy:
        return {"wall_ms": round(wall_ms, 1), "error": "no kernels recorded"}
    window = (min(start for _, start, _ in host) if host else busy[0][0], busy[-1][1])
    gaps = [(a, b) for a, b in zip([window[0]] + [end for _, end in busy], [start for start, _ in busy] + [window[1]])
            if (b - a) / 1e6 >= min_gap_ms]
    phase_spans = [(name[6:], a, b) for name, a, b in host if name.startswith("phase:")]
    by_phase: dict[str, float] = defaultdict(float)
    described = []
    for a, b in gaps:
        middle = (a + b) // 2
        phase = next((name for name, s, e in phase_spans if s <= middle <= e), "outside modules")
        by_phase[phase] += (b - a) / 1e6
        inner = sorted((e - s, name) for name, s, e in host if s < b and e > a and not name.startswith("phase:"))
        names = Counter(name for _, name in inner[:40])
        described.append({"at_ms": round((a - window[0]) / 1e6, 2), "ms": round((b - a) / 1e6, 2), "phase": phase,
                          "cpu_ops": [name for name, _ in names.most_common(4)]})
    busy_ms = sum(b - a for a, b in busy) / 1e6
    span_ms = (window[1] - window[0]) / 1e6
    return {"wall_ms": round(wall_ms, 1), "span_ms": round(span_ms, 1), "gpu_busy_ms": round(busy_ms, 1),
            "gpu_busy_pct": round(100 * busy_ms / span_ms, 1),
            "idle_by_phase_ms": {k: round(v, 1) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
            "largest_gaps": sorted(described, key=lambda g: -g["ms"])[:top]}
