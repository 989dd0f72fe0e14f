"""Shared helpers of the benchmark: timing, relative error, records, the final table."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field

import torch

PEAK_TFLOPS = 800.0  # bf16 dense rate of an H100/H200 SXM (798 TFLOP/s measured on an 8192³ GEMM)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, runs: int = 3, warm: int = 1) -> tuple[list[float], object]:
    """Seconds of `runs` calls after `warm` calls, device synchronized around each; last result."""
    result = None
    for _ in range(warm):
        result = fn()
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times, result


def rel_err(a, b) -> float | None:
    """‖a − b‖ / ‖b‖ in float64 (b is the reference); None when either is missing."""
    if a is None or b is None:
        return None
    a = torch.as_tensor(a).double().flatten()
    b = torch.as_tensor(b).double().flatten()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def peak_gib() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def compile_stats() -> dict:
    """Dynamo's counters (graphs, recompiles) and compile-time summary, when anything was compiled."""
    try:
        from torch._dynamo.utils import compile_times, counters

        stats = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break")}
        stats["compile_times"] = str(compile_times(repr="str", aggregate=True))[:1500]
        return stats
    except Exception as exc:  # noqa: BLE001 — diagnostics only
        return {"error": repr(exc)}


@dataclass
class Report:
    started: float = field(default_factory=time.perf_counter)
    budget_s: float = 540.0
    meta: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def say(self, *parts) -> None:
        print(f"[{self.elapsed():6.1f}s]", *parts, flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.say("NOTE", text)

    def row(self, job: str, variant: str, times: list[float] | None = None, **extra) -> dict:
        r = {"job": job, "variant": variant, **extra}
        if times:
            r.update(s_median=round(statistics.median(times), 4), s_min=round(min(times), 4),
                     s_max=round(max(times), 4), runs=len(times))
        self.rows.append(r)
        print("ROW", json.dumps(r), flush=True)
        return r

    def baseline_of(self, job: str) -> dict | None:
        return next((r for r in self.rows if r["job"] == job and r["variant"].startswith("plain") and "s_median" in r), None)

    def finish(self) -> None:
        for r in self.rows:
            base = self.baseline_of(r["job"])
            if base and "s_median" in r and r is not base:
                r["ratio_vs_plain"] = round(base["s_median"] / r["s_median"], 2)
            if r.get("floor_s") and "s_median" in r:
                r["floor_fraction"] = round(r["floor_s"] / r["s_median"], 3)

    def table(self) -> str:
        cols = [("job", 26), ("variant", 34), ("s_median", 9), ("s_min", 8), ("s_max", 8), ("ratio_vs_plain", 7),
                ("peak_alloc_gib", 7), ("peak_reserved_gib", 7), ("floor_s", 8), ("floor_fraction", 7), ("err_vs_fp32", 9), ("err_vs_plain", 9), ("err_vs_eager", 9),
                ("step_err_vs_fp32", 9), ("img_err_vs_plain", 9),
                ("p50_ms", 7), ("p99_ms", 7)]
        heads = {"ratio_vs_plain": "×plain", "peak_alloc_gib": "GiB", "peak_reserved_gib": "resvGiB", "floor_fraction": "floor%",
                 "err_vs_fp32": "traj/fp32", "err_vs_plain": "traj/plain", "err_vs_eager": "traj/eager",
                 "step_err_vs_fp32": "step/fp32", "img_err_vs_plain": "img/plain"}
        lines = ["  ".join(heads.get(c, c)[:w].ljust(w) for c, w in cols)]
        for r in self.rows:
            cells = []
            for c, w in cols:
                v = r.get(c, "")
                if c == "floor_fraction" and v != "":
                    v = f"{100 * v:.0f}%"
                elif isinstance(v, float):
                    v = f"{v:.2e}" if "err" in c else f"{v:g}"
                cells.append(str(v)[:w].ljust(w))
            lines.append("  ".join(cells))
        return "\n".join(lines)
