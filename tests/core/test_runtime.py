"""Tests for medanomaly.core.runtime: the precision chosen for a device, autocast, torch.compile's
compiler check, device names, seeds, and the memory layout of a model's input."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from medanomaly.core import runtime
from medanomaly.core.errors import MedanomalyError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_an_explicit_precision_is_kept() -> None:
    for device in (CPU, CUDA):
        assert runtime.choose_precision("fp32", device) == "fp32"
        assert runtime.choose_precision("bf16", device) == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_the_cpu_is_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    assert runtime.choose_precision("auto", CPU) == ("bf16" if native else "fp32")


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_cuda_asks_the_gpu(monkeypatch: pytest.MonkeyPatch, supported: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: not supported)  # not asked for a GPU
    assert runtime.choose_precision("auto", CUDA) == ("bf16" if supported else "fp32")


@pytest.mark.parametrize("flags,expected", [("fpu sse avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                                            ("fpu sse avx2", False), (None, False)])
def test_cpu_bf16_is_read_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: str | None,
                                             expected: bool) -> None:
    class CpuInfo:
        def __init__(self, path: str) -> None:
            assert path == "/proc/cpuinfo"

        def read_text(self) -> str:
            if flags is None:
                raise OSError("no /proc here")
            return f"processor : 0\nflags : {flags}\n"

    runtime.cpu_has_bf16.cache_clear()
    monkeypatch.setattr(runtime, "Path", CpuInfo)
    try:
        assert runtime.cpu_has_bf16() is expected
    finally:
        runtime.cpu_has_bf16.cache_clear()  # the real answer for the other tests


def test_autocast_is_bf16_or_nothing() -> None:
    a, b = torch.ones(2, 3), torch.ones(3, 2)
    with runtime.autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with runtime.autocast(CPU, "fp32"):
        assert (a @ b).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def test_compile_without_a_cpp_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MedanomalyError, match="--compile needs a C\\+\\+ compiler"):
        runtime.compile_model(torch.nn.Linear(2, 1))


def test_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.resolve_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == CPU
    with pytest.raises(MedanomalyError, match="'cuda:1' requested but no CUDA GPU is available; use --device cpu"):
        runtime.resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto") == CUDA and runtime.resolve_device("cuda:1") == torch.device("cuda", 1)


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_set_seed_makes_python_numpy_and_torch_reproducible() -> None:
    runtime.set_seed(3)
    first = _draws()
    runtime.set_seed(3)
    assert _draws() == first
    runtime.set_seed(4)
    assert all(a != b for a, b in zip(_draws(), first))
    runtime.set_seed(2**32 + 3)  # numpy takes seeds below 2**32: the seed is reduced for it, not refused
    assert _draws()[1] == first[1]


def test_match_layout_follows_the_weights() -> None:
    x = torch.rand(2, 3, 5, 6)
    plain = torch.nn.Conv2d(3, 4, 3)
    assert runtime.match_layout(x, plain) is x
    last = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    y = runtime.match_layout(x, last)
    assert y.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, x)  # the same values, another memory layout
    volume = torch.rand(1, 3, 4, 5, 6)
    assert runtime.match_layout(volume, last) is volume  # channels-last is for 2D batches only


def test_unknown_devices_and_absent_gpus_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tpu", "cuda:x", "meta", "xla", ""):
        with pytest.raises(MedanomalyError, match=f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N or mps"):
            runtime.resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MedanomalyError, match="'cuda:2' requested but this machine has 2 CUDA GPU"):
        runtime.resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(MedanomalyError, match="no Apple GPU"):
        runtime.resolve_device("mps")
