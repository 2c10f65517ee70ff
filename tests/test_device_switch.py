"""The ``VOLD_TEST_DEVICE`` switch of tests/conftest.py and the engine list of tests/helpers.py."""

from __future__ import annotations

import pytest
import torch
from conftest import _TestDevice
from helpers import TRITON, _impls


def test_device_switch_makes_tensors_on_the_device_and_draws_on_the_cpu():
    """Factories follow the test device (``meta`` here, as ``cuda`` on a GPU); random ones draw on the CPU with
    the test's CPU generator, so the numbers are those of a CPU run; explicit devices are kept."""
    g_cpu, g_dev = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = [torch.randn(4, generator=g_cpu), torch.randint(0, 9, (5,), generator=g_cpu)]
    with _TestDevice(torch.device("meta")):
        drawn = [torch.randn(4, generator=g_dev), torch.randint(0, 9, (5,), generator=g_dev)]
        made = [torch.zeros(3), torch.tensor([1.0, 2.0]), torch.rand(2), torch.randperm(4)]
        kept = torch.ones(2, device="cpu")
    assert all(t.device.type == "meta" for t in drawn + made)
    assert [t.shape for t in drawn] == [t.shape for t in expected] and drawn[1].dtype == torch.int64
    assert kept.device.type == "cpu" and torch.zeros(1).device.type == "cpu"  # restored on exit
    # the CPU generator advanced exactly as in the CPU run: its next numbers agree
    assert torch.equal(torch.randn(3, generator=g_cpu), torch.randn(3, generator=g_dev))


def test_engines_from_the_environment(monkeypatch):
    monkeypatch.delenv("VOLD_TEST_IMPLS", raising=False)
    assert _impls()[:2] == ["torch", TRITON]
    monkeypatch.setenv("VOLD_TEST_IMPLS", "torch_compile,triton")
    assert _impls() == ["torch_compile", TRITON]
    monkeypatch.setenv("VOLD_TEST_IMPLS", "cuda")
    with pytest.raises(ValueError, match="VOLD_TEST_IMPLS"):
        _impls()
