"""bench/gpu_gaps.py's interval arithmetic (the profiler part needs CUDA; this part runs anywhere)."""
from bench.gpu_gaps import _merge


def test_overlapping_and_touching_kernels_merge_into_busy_spans():
    spans = [(50, 60), (0, 10), (5, 20), (20, 30), (70, 71), (55, 58)]
    assert _merge(spans) == [(0, 30), (50, 60), (70, 71)]


def test_no_kernels_no_spans():
    assert _merge([]) == []
