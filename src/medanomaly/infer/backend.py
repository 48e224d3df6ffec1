"""The network behind the predictor: a backend maps a batch (N, C, *S) float32 (normalised
images at the model size, or 3D patches) to the network's output (N, out_channels, *S) float32
on the CPU. :class:`TorchBackend` runs the PyTorch model in its precision on its device;
:class:`medanomaly.infer.onnx_runtime.OnnxBackend` runs the exported graph with ONNX Runtime.

:func:`load_weights` builds the network of a model file and loads ``model.pt`` without unpickling
code (``weights_only=True``), with one clear error for each way the file can be wrong: missing,
truncated, code-carrying, of another network, changed since calibration (its SHA-256 differs from
the one model.json records) or holding non-finite values (NaN or infinite weights).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Protocol

import torch

from medanomaly.config.sections import UNetConfig
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.runtime import autocast, match_layout
from medanomaly.models.build import build_model


class Backend(Protocol):
    """(N, C, *S) float32 tensor -> (N, out_channels, *S) float32 tensor on the CPU."""

    precision: str  # 'fp32' or 'bf16': what the network computes in

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    """The PyTorch network on ``device``, under autocast for ``precision`` ('bf16' or 'fp32'; a
    caller may set it, e.g. to compare with an fp32 runtime)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str):
        self.model, self.device, self.precision = model, device, precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = match_layout(x.to(self.device), self.model)  # channels-last 2D networks get channels-last input
        with autocast(self.device, self.precision):
            return self.model(x).float().cpu()


def load_weights(model_dir: Path, cfg: UNetConfig, device: torch.device,
                 sha256: str | None = None) -> torch.nn.Module:
    """The network ``cfg`` with the weights of ``model_dir/model.pt``, in eval mode on ``device``
    (2D: channels-last). MedanomalyError for a missing, damaged, foreign or code-carrying file, for
    one whose SHA-256 is not ``sha256`` (None: not recorded, version 1 directories) and for
    non-finite weights."""
    path = model_dir / "model.pt"
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise MedanomalyError(f"{path} is missing; the model directory is incomplete: retrain") from exc
    state = _unpickle(raw, path)
    if sha256 is not None and (found := hashlib.sha256(raw).hexdigest()) != sha256:
        raise MedanomalyError(f"{path} is not the weights file this model was calibrated with: its SHA-256 is "
                              f"{found[:12]}..., {model_dir / 'model.json'} records {sha256[:12]}...; it was "
                              "changed or damaged after training. Restore model.pt from the training run (or a "
                              "backup) or retrain")
    try:
        model = build_model(cfg)
        model.load_state_dict(state)
    except Exception as exc:  # weights of another architecture, or not a state dict
        raise MedanomalyError(f"the weights {path} do not fit the network described in {model_dir / 'model.json'} "
                              f"({_first_line(exc, skip='Error(s) in loading')}); the two files come from different "
                              "models: restore the pair from one training run or retrain") from exc
    _check_finite(state, path)
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if cfg.dim == 2 else model


def _unpickle(raw: bytes, path: Path) -> dict:
    """The state dict in the bytes of ``path``, loaded without running code (``weights_only``)."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # code or objects other than tensors: refused, nothing ran
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(exc))
        raise MedanomalyError(f"refused to load {path}: it is not a plain weights file ("
                              f"{found.group(0) if found else 'it holds objects other than tensors'}); it was not "
                              "executed. Use the model.pt written by 'medanomaly train' (restore it or retrain)") from exc
    except Exception as exc:  # truncated or not a PyTorch file at all
        raise MedanomalyError(f"cannot read weights {path} ({type(exc).__name__}: {_first_line(exc)}); the file is "
                              "truncated or damaged: restore it or retrain") from exc


def _check_finite(state: dict, path: Path) -> None:
    """Refuse weights with NaN or infinite values: they score every pixel NaN (a diverged run, or a
    damaged file that still unpickles)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise MedanomalyError(f"{path} holds non-finite weights (NaN or infinite values in {len(bad)} of its "
                              f"{len(state)} tensors, e.g. {bad[0]!r}); it would score every pixel NaN. Restore "
                              "model.pt from the training run, or retrain (a diverged run: lower --lr)")


def _first_line(exc: Exception, skip: str = "") -> str:
    """The first informative line of an exception message (torch's are long and multi-line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not (skip and ln.strip().startswith(skip))]
    return (lines[0] if lines else repr(exc))[:300]
