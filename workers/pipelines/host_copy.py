"""A model's weights kept in host memory for its whole lifetime, so moving it off the GPU is nearly free.

    host = HostCopy(torch.device("cuda"))
    host.store(modules)     # first time: one pinned buffer for every weight, each copied into it (D2H)
    host.restore(modules)   # one H2D copy per tensor, from pinned memory
    host.store(modules)     # later: only tensors changed on the device, or new ones (LoRA adapters), are copied

Weights are not modified in place on the device, so a tensor the modules still hold exactly as
`restore` left it (same tensor, same storage, same version counter) equals its host copy. Writes
through `.data` (`p.data += x`, as PEFT's merge / diffusers' fuse_lora do) bump no version counter:
call `invalidate()` after such edits, or the next `store` keeps the old host values.
With `device` the CPU the same logic runs on plain memory (tests; no CUDA needed).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
ALIGN = 64      # bytes: each tensor's offset in the shared buffer
_PAGE = 4096    # cudaHostRegister wants whole pages


@dataclass(eq=False)
class _Slot:
    host: torch.Tensor                  # the host copy: a view into the shared buffer, or its own tensor
    ref: weakref.ref                    # the tensor the modules hold (ids are reused, so checked by identity)
    device: torch.Tensor | None = None  # what `restore` put there, kept so its address cannot be reused
    version: int | None = None          # the holder's version counter right after `restore`


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version   # inference tensors keep no counter: always copied


def _plain(t: torch.Tensor) -> bool:
    """A dense tensor whose bytes can live in a uint8 buffer (not a subclass, sparse or quantized)."""
    return type(t.data) is torch.Tensor and t.layout == torch.strided and not t.is_quantized


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """t's strides when it is dense (channels_last stays channels_last), else a dense layout in its order."""
    return torch.empty_like(t, device="meta").stride()


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def _holders(modules) -> dict[int, tuple[torch.Tensor, list]]:
    """id → (tensor, [(module, name, is_param), ...]) for every unique parameter and buffer."""
    seen, holders = set(), {}
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, t in table.items():
                    if t is not None:
                        holders.setdefault(id(t), (t, []))[1].append((module, name, is_param))
    return holders


def _point(t: torch.Tensor, sites: list, new: torch.Tensor) -> torch.Tensor:
    """Make the modules use `new`; returns the tensor they now hold."""
    if isinstance(t, torch.nn.Parameter):
        t.data = new        # the same Parameter object: tied weights stay tied, optimizers keep it
        return t
    for module, name, is_param in sites:
        (module._parameters if is_param else module._buffers)[name] = new
    return new


def on_device(t: torch.Tensor, device: torch.device) -> bool:
    """`device` without an index ("cuda") means any of its kind."""
    return t.device.type == device.type and device.index in (None, t.device.index)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class HostCopy:
    """Host copies of one model's weights; `store` and `restore` return the bytes they copied."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self._buffer: torch.Tensor | None = None
        self._unpin: weakref.finalize | None = None
        self._slots: dict[int, _Slot] = {}
        self.buffer_bytes = 0

    @property
    def nbytes(self) -> int:
        """Host memory held: the shared buffer and tensors stored outside it."""
        own = sum(_nbytes(s.host) for s in self._slots.values() if not self._in_buffer(s.host))
        return self.buffer_bytes + own

    def store(self, modules) -> int:
        """Point every weight at its host copy, copying only what the host copy lacks."""
        with torch.inference_mode(False), torch.no_grad():
            holders = _holders(modules)
            if self._buffer is None:
                self._allocate(holders)
            copied, moves = 0, []
            for t, sites in holders.values():
                slot = self._slot(t)
                if self._current(t, slot):
                    moves.append((t, sites, slot))
                    continue
                if slot is None or not _same_layout(slot.host, t):   # new, or reshaped/retyped since
                    slot = _Slot(host=self._own_host(t), ref=weakref.ref(t))
                slot.host.copy_(t.detach(), non_blocking=self.pinned)
                copied += _nbytes(t)
                moves.append((t, sites, slot))
            if copied and self.pinned:
                torch.cuda.synchronize(self.device)   # once, for all the copies above
            slots = {}
            for t, sites, slot in moves:
                holder = _point(t, sites, slot.host)
                slot.ref, slot.device, slot.version = weakref.ref(holder), None, _version(holder)
                slots[id(holder)] = slot
            self._slots = slots          # tensors the modules no longer hold (deleted adapters) are let go
            return copied

    def restore(self, modules) -> int:
        """Put every weight on the device: one copy per tensor from its host copy."""
        with torch.inference_mode(False), torch.no_grad():
            copied, moves = 0, []
            for t, sites in _holders(modules).values():
                slot = self._slot(t)
                if slot is not None and self._is_host(t, slot):
                    source = slot.host
                elif not on_device(t, self.device):
                    source, slot = t.detach(), None      # no host copy yet (loaded on the CPU)
                else:
                    continue                             # already there
                new = source.to(self.device, non_blocking=self.pinned, copy=True)
                copied += _nbytes(new)
                moves.append((t, sites, slot, new))
            if copied and self.pinned:
                torch.cuda.synchronize(self.device)
            # Pointed only now: an OOM above leaves every module on its host copy, as it was.
            for t, sites, slot, new in moves:
                holder = _point(t, sites, new)
                if slot is not None:
                    slot.ref, slot.device, slot.version = weakref.ref(holder), new, _version(holder)
                    self._slots.pop(id(t), None)
                    self._slots[id(holder)] = slot
            return copied

    @staticmethod
    def supports(modules) -> bool:
        """Dense tensors only: subclasses (quantized weights), sparse ones move with `module.to`."""
        return all(_plain(t) for t, _ in _holders(modules).values())

    def needs_copy(self, modules) -> int:
        """Bytes the next `store` would copy (for tests and logs)."""
        return sum(_nbytes(t) for t, _ in _holders(modules).values() if not self._current(t, self._slot(t)))

    def invalidate(self) -> None:
        """Forget what is current: the next `store` copies every tensor (after edits through `.data`)."""
        for slot in self._slots.values():
            slot.device = slot.version = None

    def release(self) -> None:
        """Give the host memory back. Call only once no module points at it any more."""
        self._slots = {}
        self._buffer, self.buffer_bytes = None, 0
        if self._unpin is not None:
            self._unpin()        # unregister before the buffer's memory can be freed
            self._unpin = None

    # ----------------------------------------------------------------------------------
    def _slot(self, t: torch.Tensor) -> _Slot | None:
        slot = self._slots.get(id(t))
        return slot if slot is not None and slot.ref() is t else None

    def _current(self, t: torch.Tensor, slot: _Slot | None) -> bool:
        """The host copy holds `t`'s values: `t` is that copy, or what `restore` left, untouched."""
        return (slot is not None and _same_layout(slot.host, t)
                and (self._is_host(t, slot) or self._unchanged(t, slot)))

    @staticmethod
    def _is_host(t: torch.Tensor, slot: _Slot) -> bool:
        """`t` is its host copy already (stored, or a restore that did not happen)."""
        return t.device.type == "cpu" and t.data_ptr() == slot.host.data_ptr() and _same_layout(t, slot.host)

    @staticmethod
    def _unchanged(t: torch.Tensor, slot: _Slot) -> bool:
        """Still what `restore` put there, untouched since: the host copy is current."""
        return (slot.device is not None and slot.version is not None and _version(t) == slot.version
                and t.data_ptr() == slot.device.data_ptr() and _same_layout(t, slot.device))

    def _in_buffer(self, host: torch.Tensor) -> bool:
        if self._buffer is None:
            return False
        start = self._buffer.data_ptr()
        return start <= host.data_ptr() < start + self.buffer_bytes

    def _allocate(self, holders: dict) -> None:
        """One buffer for every plain tensor, each at a 64-byte aligned offset."""
        layout, total = [], 0
        for t, _ in holders.values():
            layout.append((t, total))
            total += -(-_nbytes(t) // ALIGN) * ALIGN
        self._buffer, self._unpin = _host_buffer(total, self.pinned)
        self.buffer_bytes = total
        for t, offset in layout:
            view = self._buffer[offset:offset + _nbytes(t)].view(t.dtype).as_strided(t.shape, _strides(t))
            self._slots[id(t)] = _Slot(host=view, ref=weakref.ref(t))

    def _own_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor for one weight added after the buffer was made (a LoRA adapter)."""
        return torch.empty_strided(t.shape, _strides(t), dtype=t.dtype, pin_memory=self.pinned)


def _host_buffer(nbytes: int, pinned: bool) -> tuple[torch.Tensor, weakref.finalize | None]:
    """`nbytes` of host memory, page-locked for CUDA. Registered by hand rather than through
    pin_memory=True: PyTorch's pinned allocator rounds up to a power of two (17 GiB locked 32 GiB on
    torch 2.11) and keeps freed blocks cached, hidden from psutil's `available`. PyTorch's is_pinned()
    says False for such memory, yet copies run at pinned speed (about 55 GB/s on an H200)."""
    if not pinned or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8), None
    locked = -(-nbytes // _PAGE) * _PAGE     # whole pages of our own: no page shared with another block
    raw = torch.empty(locked + _PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % _PAGE
    buffer = raw[start:start + nbytes]
    buffer.zero_()   # faults the pages in on every core: registering untouched ones took 4x longer
    cudart = torch.cuda.cudart()
    code = int(cudart.cudaHostRegister(buffer.data_ptr(), locked, 0))
    if code != 0:
        log.warning("cudaHostRegister of %.1f GiB failed (error %d): using PyTorch's pinned allocator",
                    nbytes / 2**30, code)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None
    # `raw` rides along in the finalizer, so the memory outlives its registration.
    return buffer, weakref.finalize(buffer, _unregister, cudart, buffer.data_ptr(), raw)


def _unregister(cudart, ptr: int, raw: torch.Tensor) -> None:
    code = int(cudart.cudaHostUnregister(ptr))
    if code != 0:
        log.warning("cudaHostUnregister failed (error %d)", code)
