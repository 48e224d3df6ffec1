"""The network behind the predictor: a backend maps a batch (N, C, *S) float32 (normalised
images at the model size, or 3D patches) to the network's output (N, out_channels, *S) float32
on the CPU. :class:`TorchBackend` runs the PyTorch model in its precision on its device;
:class:`medanomaly.infer.onnx_runtime.OnnxBackend` runs the exported graph with ONNX Runtime.

:func:`load_weights` builds the network of a model file and loads ``model.pt`` without unpickling
code (``weights_only=True``), with one clear error for each way the file can be wrong.
"""

from __future__ import annotations

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


def load_weights(model_dir: Path, cfg: UNetConfig, device: torch.device) -> torch.nn.Module:
    """The network ``cfg`` with the weights of ``model_dir/model.pt``, in eval mode on ``device``
    (2D: channels-last). MedanomalyError for a missing, damaged, foreign or code-carrying file."""
    path = model_dir / "model.pt"
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise MedanomalyError(f"{path} is missing; the model directory is incomplete: retrain") from exc
    except pickle.UnpicklingError as exc:  # code or objects other than tensors: refused, nothing ran
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(exc))
        raise MedanomalyError(f"refused to load {path}: it is not a plain weights file ("
                              f"{found.group(0) if found else 'it holds objects other than tensors'}); it was not "
                              "executed. Use the model.pt written by 'medanomaly train' (restore it or retrain)") from exc
    except Exception as exc:  # truncated or not a PyTorch file at all
        raise MedanomalyError(f"cannot read weights {path} ({type(exc).__name__}: {_first_line(exc)}); the file is "
                              "truncated or damaged: restore it or retrain") from exc
    try:
        model = build_model(cfg)
        model.load_state_dict(state)
    except Exception as exc:  # weights of another architecture, or not a state dict
        raise MedanomalyError(f"the weights {path} do not fit the network described in {model_dir / 'model.json'} "
                              f"({_first_line(exc, skip='Error(s) in loading')}); the two files come from different "
                              "models: restore the pair from one training run or retrain") from exc
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if cfg.dim == 2 else model


def _first_line(exc: Exception, skip: str = "") -> str:
    """The first informative line of an exception message (torch's are long and multi-line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not (skip and ln.strip().startswith(skip))]
    return (lines[0] if lines else repr(exc))[:300]
