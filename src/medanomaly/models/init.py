"""Start training from local weights (``train --init PATH``); nothing is ever downloaded.

``PATH`` is a medanomaly model directory (for example one written by ``medanomaly pretrain`` or an
anomaly model, which is a self-supervised model of normal anatomy) or a ``.pt``/``.pth`` file holding
a plain state dict, such as a torchvision ResNet-18/34 state dict for ``--encoder resnet18|resnet34``
(:mod:`medanomaly.models.resnet_unet` uses torchvision's names). Tensors whose name and shape match the new
network are loaded; the others are listed by name in the log; a file with no matching tensor is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from medanomaly.core.errors import MedanomalyError

log = logging.getLogger(__name__)
# the contracting path: of models.UNet, and of resnet_unet.ResNetUNet (torchvision's ResNet names)
ENCODER_PREFIXES = ("encoders.", "downs.", "conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict at ``path`` (a model directory or a weights file), loaded without running
    code (``weights_only=True``). Returns it and the file it came from."""
    path = Path(path)
    file = path / "model.pt" if path.is_dir() else path
    if not file.is_file():
        raise MedanomalyError(f"--init {path}: no such file or model directory (a model directory holds model.pt); "
                              "pass a medanomaly model directory or a .pt state dict")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - foreign, truncated or code-carrying files
        raise MedanomalyError(f"--init {file} is not a readable weights file ({type(exc).__name__}); pass a "
                              "medanomaly model directory or a state dict saved with torch.save") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedanomalyError(f"--init {file} does not hold a state dict (a mapping of names to tensors)")
    return state, file


def load_matching(model: torch.nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Copy into ``model`` every tensor of ``path`` whose name and shape match; log the rest.

    Returns {"loaded": [...], "shape_mismatch": [...], "missing": [...], "unused": [...]} (names).
    """
    state, file = read_state_dict(path)
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if not loaded:
        raise MedanomalyError(f"--init {file}: none of its {len(state)} tensors matches this network by name and "
                              f"shape (e.g. {sorted(state)[:3]}); it is another architecture, width or depth: "
                              "use weights of a medanomaly model with the same --width/--depth, or a torchvision "
                              "ResNet-18/34 state dict with --encoder resnet18/resnet34")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    report = {"loaded": loaded, "shape_mismatch": mismatch, "missing": [k for k in own if k not in state],
              "unused": [k for k in state if k not in own]}
    log.info("--init %s: loaded %d of %d tensors", file, len(loaded), len(own))
    for kind in ("shape_mismatch", "missing", "unused"):
        if report[kind]:
            log.info("--init: %s: %s", kind.replace("_", " "), ", ".join(report[kind]))
    return report


def set_encoder_trainable(model: torch.nn.Module, trainable: bool) -> int:
    """Freeze or unfreeze the contracting path; returns the number of parameters changed."""
    n = 0
    for name, p in model.named_parameters():
        if name.startswith(ENCODER_PREFIXES):
            p.requires_grad_(trainable)
            n += p.numel()
    model.train(model.training)  # a model may switch the normalisation of frozen layers (ResNetUNet.train)
    return n
