"""Several image models in one worker: which hold GPU memory, within a budget.

    residency = Residency({"qwen_image_2512": load_qwen, ...}, device, budget_bytes=60 * 2**30)
    family = residency.loaded(key)          # loads from disk when needed (cold); no GPU work for DiT families
    report = residency.make_resident(key)   # {"residency": "cold" | "warm" | "resident", "swap_ms": ...}

The most recently used models stay on the GPU while their weights fit `budget_bytes`; to make room,
the least recently used go to pinned CPU memory (a later swap back is a fast host-to-device copy),
or are dropped when that would leave less than `host_reserve_bytes` of RAM (they load from disk
again, cold). A model's pinned copy (host_copy.py) is made at its first eviction and kept: later
evictions copy only what changed on the GPU (nothing, or its LoRA adapters) and need no new RAM.
A model whose weights CUDA graphs point at (SDXL with graphs) is never moved.
`budget_bytes=None`: no limit, every model stays where it loaded. `states` (model → a short line)
is kept current for the worker's heartbeat, and so for /health and `dual_orchestrator.py queues`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch

from workers.pipelines.base import GenerationOutOfMemory
from workers.pipelines.host_copy import HostCopy, on_device

log = logging.getLogger(__name__)
GIB = 2**30


@dataclass
class _Entry:
    family: object | None = None
    where: str = "unloaded"           # "device", "host" or "unloaded"
    nbytes: int = 0
    load_ms: float | None = None      # a load from disk not yet reported to a job (cold)
    modules: list = field(default_factory=list)   # its components; a shared text encoder is in several entries


def family_modules(family) -> list[torch.nn.Module]:
    """Unique modules of a family's pipeline (DiT families say so; SDXL's is `txt2img`)."""
    if hasattr(family, "modules"):
        return family.modules()
    pipe = getattr(family, "txt2img", None) or getattr(family, "pipe")
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


def weight_bytes(modules: list[torch.nn.Module]) -> int:
    seen, total = set(), 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def pinned(family) -> bool:
    """CUDA graphs replay fixed weight addresses: a graphed SDXL must stay where it was captured."""
    return getattr(family, "graphed", None) is not None


class Residency:
    def __init__(self, loaders: dict[str, Callable[[], object]], device: torch.device | str,
                 budget_bytes: int | None = None, host_reserve_bytes: int = 8 * GIB,
                 states: dict[str, str] | None = None, host_copies: bool | None = None):
        self.loaders = loaders
        self.device = torch.device(device)
        # Kept host copies (host_copy.py): on CUDA by default; on the CPU for tests only.
        self.host_copies = self.device.type == "cuda" if host_copies is None else host_copies
        self.budget = budget_bytes
        self.host_reserve = host_reserve_bytes
        self.entries: OrderedDict[str, _Entry] = OrderedDict((key, _Entry()) for key in loaders)  # LRU first
        self.states = {} if states is None else states
        self.evictions: list[str] = []     # keys, in the order they left the GPU (tests, logs)
        # id(module) → (module, its pinned copy), kept from the module's first eviction on; per module,
        # so a component two models share (workers/pipelines/common.py) has one copy.
        self.hosts: dict[int, tuple[torch.nn.Module, HostCopy]] = {}
        self._lock = threading.Lock()      # the heartbeat thread reads `states` while jobs move models
        self._publish()

    # --- what the worker calls ------------------------------------------------------------
    def loaded(self, key: str):
        """The family, loaded from disk if it is not in memory (then its next job reports cold)."""
        entry = self.entries[key]
        if entry.family is None:
            started = time.perf_counter()
            family = full = None
            try:
                family = self.loaders[key]()   # ModelUnavailable propagates: the job fails with the reason
            except torch.cuda.OutOfMemoryError as exc:
                full = str(exc)   # not the exception: its traceback would keep the first try's tensors
            if family is None:
                # A loader that places its model on the device (SDXL) met the others there: move every
                # movable one out (here, outside the except block: the first try's tensors are freed)
                # and try once more; a second failure reaches the job.
                if not self._evict_all(key):
                    raise torch.cuda.OutOfMemoryError(full)
                self.free_cache()
                family = self.loaders[key]()
            entry.family, entry.modules = family, family_modules(family)
            entry.nbytes = weight_bytes(entry.modules)
            entry.where = self._where(family)
            entry.load_ms = (time.perf_counter() - started) * 1000
            log.info("model %s loaded (%.1f GiB) in %.0f ms", key, entry.nbytes / GIB, entry.load_ms)
            self._publish()
        return entry.family

    def make_resident(self, key: str) -> dict:
        """Put `key` on the device, moving others out as the budget needs. Returns what the job reports."""
        family = self.loaded(key)
        entry = self.entries[key]
        started = time.perf_counter()
        cold_ms, entry.load_ms = entry.load_ms, None
        state = "cold" if cold_ms is not None else ("resident" if entry.where == "device" else "warm")
        evicted = self._make_room(key)   # also after a load straight onto the device (SDXL)
        if entry.where != "device":
            try:
                self._move(key, entry, to_device=True)
            except torch.cuda.OutOfMemoryError:   # not half on the GPU: the next job tries again
                held = self._device_modules(key)      # (what a resident model shares stays)
                self._move(key, entry, to_device=False, modules=[m for m in entry.modules if id(m) not in held])
                self._publish()
                raise
            entry.where = "device"
        self.entries.move_to_end(key)
        swap_ms = (time.perf_counter() - started) * 1000 + (cold_ms or 0.0)
        self._publish()
        if state != "resident":
            log.info("model %s %s in %.0f ms (moved out: %s)", key, state, swap_ms, ", ".join(evicted) or "none")
        return {"residency": state, "swap_ms": round(swap_ms, 1), "evicted": evicted}

    def forget(self, key: str) -> None:
        """A model that cannot load (missing checkpoint): its jobs fail with the reason instead."""
        self.loaders.pop(key, None)
        entry = self.entries.pop(key, None)
        if entry is not None:
            self._release_hosts(key, entry)
        self.states.pop(key, None)

    def publish_to(self, states: dict[str, str]) -> None:
        """Keep `states` (model → "resident, 12.30 GiB", "warm (CPU memory), …", "not loaded") current."""
        self.states = states
        self._publish()

    def free_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resident_keys(self) -> list[str]:
        return [key for key, entry in self.entries.items() if entry.where == "device"]

    # --- moving weights -------------------------------------------------------------------
    def _make_room(self, key: str) -> list[str]:
        if self.budget is None:
            return []
        evicted, keep = [], {id(m) for m in self.entries[key].modules}
        for other in list(self.entries):   # least recently used first
            used, needed = self._used(key), self._needed(key)
            if used + needed <= self.budget:
                break
            entry = self.entries[other]
            if other == key or entry.where != "device" or pinned(entry.family):
                continue
            self._evict(other, entry, keep)
            evicted.append(other)
        used, needed = self._used(key), self._needed(key)
        if used + needed > self.budget:
            log.warning("model %s (%.1f GiB) does not fit the %.1f GiB budget beside what cannot move (%.1f GiB)",
                        key, needed / GIB, self.budget / GIB, used / GIB)
        return evicted

    def _evict_all(self, key: str) -> list[str]:
        evicted = []
        for other, entry in list(self.entries.items()):
            if other != key and entry.where == "device" and not pinned(entry.family):
                self._evict(other, entry)
                evicted.append(other)
        return evicted

    def _device_modules(self, exclude: str) -> dict[int, torch.nn.Module]:
        """Components of the models on the device, `exclude` left out (each shared one once)."""
        return {id(m): m for k, e in self.entries.items() if e.where == "device" and k != exclude for m in e.modules}

    def _used(self, key: str) -> int:
        return weight_bytes(list(self._device_modules(key).values()))

    def _needed(self, key: str) -> int:
        """What `key` adds on the device: its components no other resident model holds there."""
        held = self._device_modules(key)
        return weight_bytes([m for m in self.entries[key].modules if id(m) not in held])

    def _evict(self, key: str, entry: _Entry, keep: set[int] = frozenset()) -> None:
        """Move `key`'s components off the device, except those a resident model (or `keep`) uses."""
        held = self._device_modules(key)
        moving = [m for m in entry.modules if id(m) not in held and id(m) not in keep]
        shared = {id(m) for k, e in self.entries.items() if k != key and e.family is not None for m in e.modules}
        new_ram = weight_bytes([m for m in moving if id(m) not in self.hosts])
        if new_ram and psutil.virtual_memory().available - new_ram < self.host_reserve:
            # RAM is short: read from disk next time; what another model shares still moves out.
            self._move(key, entry, to_device=False, modules=[m for m in moving if id(m) in shared])
            self._release_hosts(key, entry)   # a reload brings new modules: their old copies would leak
            entry.family, entry.modules, entry.where = None, [], "unloaded"
            log.info("model %s dropped (RAM short: %.1f GiB would leave less than %.1f GiB)",
                     key, new_ram / GIB, self.host_reserve / GIB)
        else:
            self._move(key, entry, to_device=False, modules=moving)
            entry.where = "host"
        self.evictions.append(key)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _move(self, key: str, entry: _Entry, to_device: bool, modules: list | None = None) -> None:
        started = time.perf_counter()
        modules = entry.modules if modules is None else modules
        device = self.device if to_device else torch.device("cpu")
        copied = 0
        for module in modules:
            kept = self.hosts.get(id(module), (None, None))[1]
            if self.host_copies and (kept is not None or HostCopy.supports([module])):
                if to_device:   # without a host copy yet: from the CPU tensors (a first move, no copy kept)
                    copied += (kept or HostCopy(self.device)).restore([module])
                elif kept is None and not any(on_device(t, self.device) for t in module.parameters()):
                    continue    # never left the CPU (a first move that failed): nothing to keep
                else:
                    kept = kept or self.hosts.setdefault(id(module), (module, HostCopy(self.device)))[1]
                    copied += kept.store([module])
            else:   # a CPU-only worker (no-op), or weights a flat buffer cannot hold
                module.to(device, non_blocking=device.type == "cuda")
                if not to_device and self.device.type == "cuda":
                    for tensor in list(module.parameters()) + list(module.buffers()):
                        tensor.data = tensor.data.pin_memory()   # page-locked: the way back is a fast DMA copy
                copied += weight_bytes([module]) if self.device.type == "cuda" else 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        where = str(device) if to_device else "pinned CPU memory" if self.device.type == "cuda" else "CPU memory"
        total = weight_bytes(modules)
        current = ": host copy current" if not to_device and modules and copied == 0 else ""
        log.info("model %s moved to %s in %.0f ms (%.2f of %.1f GiB copied%s)", key, where,
                 (time.perf_counter() - started) * 1000, copied / GIB, total / GIB, current)

    def release_host_copies(self, key: str) -> None:
        self._release_hosts(key, self.entries[key])

    def _release_hosts(self, key: str, entry: _Entry) -> None:
        """Give back the host copies of `key`'s components that no other model holds."""
        others = {id(m) for k, e in self.entries.items() if k != key for m in e.modules}
        for module in entry.modules:
            if id(module) not in others and id(module) in self.hosts:
                self.hosts.pop(id(module))[1].release()

    def _where(self, family) -> str:
        """Right after a load. On a CPU-only worker weights count as on the device once a job made
        them resident, so the bookkeeping (budget, order, reports) is the same as on a GPU."""
        params = [p for m in family_modules(family) for p in m.parameters()]
        # all of it: a component shared with a resident model is on the device before the rest
        return "device" if self.device.type == "cuda" and params and all(p.is_cuda for p in params) else "host"

    def _publish(self) -> None:
        with self._lock:
            for key, entry in self.entries.items():
                where = {"device": "resident", "host": "warm (CPU memory)", "unloaded": "not loaded"}[entry.where]
                size = f", {entry.nbytes / GIB:.2f} GiB" if entry.family is not None else ""
                self.states[key] = f"{where}{size}"


class ResidentFamily:
    """A model as the runner sees it: `check` runs on the model in memory (loaded if need be, no GPU
    work), `generate` once it is on the device; the job's record gets how it got there."""

    def __init__(self, residency: Residency, key: str):
        self.residency = residency
        self.key = key

    def check(self, job) -> None:
        try:
            family = self.residency.loaded(self.key)
        except torch.cuda.OutOfMemoryError as exc:
            raise self._out_of_memory(f"loading {self.key}", exc) from None
        if job.loras and not hasattr(family, "slots"):
            raise ValueError(f"{job.job_type} takes no LoRAs")
        family.check(job)

    def generate(self, job, on_step):
        try:
            report = self.residency.make_resident(self.key)
        except torch.cuda.OutOfMemoryError as exc:
            raise self._out_of_memory(f"moving {self.key} onto the GPU", exc) from None
        record = getattr(on_step, "record", None)
        if record is not None:   # the runner's job record: cold / warm / resident and the swap time
            record(residency=report["residency"], swap_ms=report["swap_ms"], evicted=report["evicted"] or None)
        return self.residency.loaded(self.key).generate(job, on_step)

    def _out_of_memory(self, doing: str, exc: BaseException) -> GenerationOutOfMemory:
        self.residency.free_cache()
        first = str(exc).splitlines()[0][:200] if str(exc) else "CUDA out of memory"
        return GenerationOutOfMemory(f"out of GPU memory {doing}: {first}")

    @property
    def deferred(self):
        """The model's deferred compile (compile_at: idle), only while it is on the device: asking, or
        running it, never loads or moves a model."""
        entry = self.residency.entries.get(self.key)
        if entry is None or entry.family is None or entry.where != "device":
            return None
        return getattr(entry.family, "deferred", None)

    def accelerate_deferred(self, pause=lambda: False) -> dict | None:
        if self.deferred is None:
            return None
        entry = self.residency.entries[self.key]
        report = entry.family.accelerate_deferred(pause)
        if pinned(entry.family):   # graphed: it never leaves the device again, its host copy is dead weight
            self.residency.release_host_copies(self.key)
        return report


class ResidentFamilies(dict):
    """model key → ResidentFamily, with the Residency behind them (the worker publishes its states)."""

    def __init__(self, residency: Residency):
        super().__init__((key, ResidentFamily(residency, key)) for key in residency.loaders)
        self.residency = residency
