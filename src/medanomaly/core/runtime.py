"""Devices, precision and seeds: passed in explicitly, decided in one place."""

from __future__ import annotations

import contextlib
import random
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from medanomaly.core.errors import MedanomalyError


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU runs bf16 convolutions natively (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(requested: str, device: torch.device) -> str:
    """'bf16' or 'fp32'. 'auto' picks bf16 autocast on CUDA with bf16 support and on CPUs with
    native bf16 (measured ~2-3x faster there, see bench/speed.py), fp32 elsewhere."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for the precision; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)`` (Inductor, default mode): a module sharing ``model``'s parameters
    whose forward and backward are compiled on the first call (about a minute on 2 CPU cores) and
    on each new input shape. Inductor builds C++ kernels on the CPU, so a compiler must exist."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise MedanomalyError("--compile needs a C++ compiler (g++ or clang++) on the PATH for Inductor's CPU "
                              "kernels; install one (e.g. apt install g++) or train without --compile")
    return torch.compile(model)


#: the device names resolve_device takes (medanomaly.config.options.DEVICE_PATTERN says the same for the CLI)
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise the named device (cpu, cuda, cuda:N, mps),
    checked: an unknown name, an absent GPU or a GPU index beyond those present is a MedanomalyError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as exc:  # torch's own text lists its dozen backends
        raise MedanomalyError(f"unknown device {name!r}; valid: {DEVICE_NAMES}") from exc
    if dev.type not in ("cpu", "cuda", "mps"):
        raise MedanomalyError(f"unknown device {name!r}; valid: {DEVICE_NAMES}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MedanomalyError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    count = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.index is not None and 0 < count <= dev.index:
        raise MedanomalyError(f"device {name!r} requested but this machine has {count} CUDA GPU(s), cuda:0 to "
                              f"cuda:{count - 1}; use one of those")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MedanomalyError(f"device {name!r} requested but no Apple GPU (MPS) is available; use --device cpu")
    return dev


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def match_layout(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """``x`` in the memory format of ``model``'s weights: channels-last for a 2D batch (N, C, H, W)
    when the network was converted with ``.to(memory_format=torch.channels_last)``, else as is."""
    if x.ndim == 4 and next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x
