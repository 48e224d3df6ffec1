"""Training options of medanomaly.train.loop that the CLI tests do not reach: ``--compile``."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from medanomaly.core import runtime as runtime
from medanomaly.apps.cli import main
from medanomaly.core.errors import MedanomalyError
from medanomaly.infer.predictor import Predictor

TINY = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "2", "--batch-size", "4", "--precision", "fp32",
        "--no-plan", "--device", "cpu"]


def _losses(model_dir: Path) -> list[float]:
    with (model_dir / "metrics.csv").open() as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh)]


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler for Inductor")
def test_compiled_training_matches_eager_and_saves_a_plain_model(phantoms, tmp_path):
    """Same seed, same batches: the compiled network computes the same losses up to float rounding
    (Inductor fuses and reorders; the first step is identical to ~1e-6, Adam then amplifies tiny
    differences of near-zero gradients, so the epoch means are compared to 1e-3), and model.pt is
    the eager network's state dict (no '_orig_mod.' prefix), loadable by predict."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(["-q", "train", str(phantoms), "--out", str(eager), *TINY]) == 0
    assert main(["-q", "train", str(phantoms), "--out", str(compiled), "--compile", *TINY]) == 0
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-3)
    state = torch.load(compiled / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state)
    assert Predictor(compiled).model is not None


def test_compile_without_a_cpp_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MedanomalyError, match="--compile needs a C\\+\\+ compiler"):
        runtime.compile_model(torch.nn.Linear(2, 1))


def test_compile_is_refused_for_3d(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--dim", "3", "--compile", "--no-plan"]) == 2
    assert "--compile" in capsys.readouterr().err
