"""Shared test settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medanomaly.calibrate.search import model_meta
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import AnomalyConfig, PostprocessParams, UNetConfig
from medanomaly.models.unet import UNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a busy 2-core machine: one intra-op thread avoids costly oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """medanomaly's demo phantoms, 5 cases x 4 slices of 48x48: 12 training slices (3 steps of 4),
    4 val, 4 test."""
    from medanomaly.apps.demo import make_phantoms

    return make_phantoms(tmp_path_factory.mktemp("phantoms"), n_cases=5, slices=4, size=48)


def _labelled_phantoms(root: Path, n_cases: int = 4, rgb: bool = False) -> Path:
    """Tiny 32x32 image/mask pairs (a bright 8x8 lesion) in case folders, with a 2/1/1 splits.json."""
    rng = np.random.default_rng(0)
    for c in range(n_cases):
        d = root / f"case{c}"
        d.mkdir(parents=True)
        for k in range(3):
            img = (rng.random((32, 32) + ((3,) if rgb else ())) * 100).astype(np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            mask[8:16, 8:16] = 255
            img[8:16, 8:16] = 220
            PILImage.fromarray(img).save(d / f"case{c}_{k}.png")
            PILImage.fromarray(mask).save(d / f"case{c}_{k}_mask.png")
    (root / "splits.json").write_text(json.dumps({"train": ["case0", "case1"], "val": ["case2"], "test": ["case3"]}))
    return root


@pytest.fixture
def labelled_phantoms():
    """The builder of tiny labelled phantoms: ``labelled_phantoms(root, n_cases=4, rgb=False) -> root``."""
    return _labelled_phantoms


def _make_model_dir(path: Path, task: str = "supervised", method: str = "denoise", size: int = 32,
                   in_channels: int = 1, depth: int = 2, seed: int = 0, norm: str = "batch") -> Path:
    """A model directory as train writes it, with random weights (BatchNorm statistics included,
    so eval-mode export is tested) and precision fp32 (the torch reference runs in fp32)."""
    cfg = TrainConfig(size=size, model=UNetConfig(width=4, depth=depth, norm=norm), task=task, precision="fp32",
                      anomaly=AnomalyConfig(method=method))
    meta = model_meta(cfg, in_channels, PostprocessParams(), {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.json").write_text(json.dumps(meta))
    if method != "intensity":
        torch.manual_seed(seed)
        net = UNet(UNetConfig(**meta["model"]))
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        torch.save(net.state_dict(), path / "model.pt")
    return path


@pytest.fixture(scope="session")
def make_model_dir():
    """The builder of model directories with random weights: ``make_model_dir(path, task=..., ...) -> path``."""
    return _make_model_dir
