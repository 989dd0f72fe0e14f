"""workers/pipelines/host_copy.py on the CPU (the "device" and the host both CPU memory): store and
restore are bit-exact, ties survive, unchanged weights are not copied again, changed and new ones are."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.pipelines.host_copy import HostCopy
from workers.pipelines.residency import weight_bytes


class Net(nn.Module):
    """Linear layers, a tied weight, a buffer registered twice, a channels_last conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
        self.tied = nn.Linear(8, 16)
        self.tied.weight = self.a.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))
        self.inner = nn.Module()
        self.inner.register_buffer("scale", self.scale)
        self.conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)

    def forward(self, x):
        h = self.a(x) + self.tied(x)
        return self.b(h.to(torch.bfloat16)).float() * self.scale


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict(keep_vars=True).items()}


def assert_bits_equal(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict(keep_vars=True)
    assert state.keys() == expected.keys()
    for name, t in state.items():
        want = expected[name]
        assert t.dtype == want.dtype and t.shape == want.shape, name
        assert torch.equal(t.detach().flatten().view(torch.uint8), want.flatten().view(torch.uint8)), name


def in_buffer(host: HostCopy, t: torch.Tensor) -> bool:
    return host._in_buffer(t)


def test_store_then_restore_is_bit_identical_and_ties_stay():
    model, x = net(), torch.randn(2, 8)
    before, output, weight = snapshot(model), model(x), model.a.weight
    host = HostCopy("cpu")
    assert host.store([model]) == weight_bytes([model]) <= host.buffer_bytes == host.nbytes
    assert all(in_buffer(host, t) for t in list(model.parameters()) + list(model.buffers()))
    assert model.inner.scale is model.scale and model.tied.weight is model.a.weight is weight
    assert_bits_equal(model, before)

    assert host.restore([model]) == weight_bytes([model])
    assert not any(in_buffer(host, t) for t in list(model.parameters()) + list(model.buffers()))
    assert model.tied.weight is model.a.weight is weight      # the same Parameter object, tied
    assert model.inner.scale is model.scale                   # one buffer, in both places
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_bits_equal(model, before)
    assert torch.equal(model(x), output)


def test_second_eviction_after_unchanged_restore_copies_nothing():
    model = net()
    before, host = snapshot(model), HostCopy("cpu")
    host.store([model])
    for _ in range(2):
        host.restore([model])
        assert host.needs_copy([model]) == 0
        assert host.store([model]) == 0
        assert all(in_buffer(host, t) for t in model.parameters())
        assert_bits_equal(model, before)     # what the modules hold now is the host copy itself
    assert host.store([model]) == 0          # already on the host: nothing to do


def test_in_place_change_on_the_device_is_copied_on_the_next_eviction():
    model, host = net(), HostCopy("cpu")
    host.store([model])
    host.restore([model])
    with torch.no_grad():
        model.b.weight.add_(1)
        model.scale.mul_(2)                  # a buffer, registered in two modules
    changed = snapshot(model)
    changed_bytes = weight_bytes([model.b]) + model.scale.numel() * model.scale.element_size()
    assert host.needs_copy([model]) == changed_bytes
    assert host.store([model]) == changed_bytes
    assert_bits_equal(model, changed)
    host.restore([model])
    assert_bits_equal(model, changed)
    assert model.inner.scale is model.scale


def test_replaced_storage_is_copied_and_invalidate_catches_writes_through_data():
    model, host = net(), HostCopy("cpu")
    host.store([model])
    host.restore([model])
    model.a.weight.data = model.a.weight.data * 2     # a new storage
    assert host.store([model]) == model.a.weight.numel() * 4
    host.restore([model])
    model.a.bias.data.add_(3)                         # bumps no version counter on the Parameter
    assert host.needs_copy([model]) == 0
    host.invalidate()
    expected = snapshot(model)
    assert host.store([model]) == weight_bytes([model])
    assert_bits_equal(model, expected)


def test_a_lora_added_after_the_first_store_is_stored_and_restored():
    model, host = net(), HostCopy("cpu")
    host.store([model])
    buffer_bytes = host.buffer_bytes
    host.restore([model])
    torch.manual_seed(1)
    model.a.lora_A = nn.Linear(8, 4, bias=False)       # what PEFT adds on the device
    model.a.lora_B = nn.Linear(4, 16, bias=False)
    with_lora = snapshot(model)
    lora_bytes = weight_bytes([model.a.lora_A, model.a.lora_B])
    assert host.store([model]) == lora_bytes
    assert host.nbytes == buffer_bytes + lora_bytes and host.buffer_bytes == buffer_bytes
    assert not in_buffer(host, model.a.lora_A.weight)  # its own host tensor
    assert_bits_equal(model, with_lora)
    assert host.restore([model]) == weight_bytes([model])
    assert_bits_equal(model, with_lora)
    assert host.store([model]) == 0

    host.restore([model])
    del model.a.lora_A, model.a.lora_B                 # adapter deleted: its host tensors are let go
    assert host.store([model]) == 0 and host.nbytes == buffer_bytes


def test_several_modules_sharing_a_submodule_store_it_once():
    shared = nn.Linear(4, 4)
    first, second = nn.Sequential(shared, nn.Linear(4, 2)), nn.Sequential(shared, nn.Linear(4, 3))
    host = HostCopy("cpu")
    assert host.store([first, second]) == weight_bytes([first, second]) < weight_bytes([first]) + weight_bytes([second])
    host.restore([first, second])
    assert first[0].weight is second[0].weight and not in_buffer(host, shared.weight)


def test_release_gives_the_buffer_back():
    model, host = net(), HostCopy("cpu")
    host.store([model])
    host.restore([model])
    host.release()
    assert host.nbytes == 0 and host.needs_copy([model]) == weight_bytes([model])
    assert host.store([model]) == weight_bytes([model])   # a fresh buffer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_through_pinned_memory():
    model = net().cuda()
    before, host = snapshot(model), HostCopy("cuda")
    assert host.store([model]) == weight_bytes([model])
    assert model.a.weight.device.type == "cpu" and in_buffer(host, model.a.weight)
    assert_bits_equal(model, {name: t.cpu() for name, t in before.items()})
    assert host.restore([model]) == weight_bytes([model]) and model.a.weight.is_cuda
    assert host.store([model]) == 0
    host.restore([model])
    assert_bits_equal(model, before)
