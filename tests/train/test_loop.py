"""The one training loop (medanomaly.train.loop): 2D and 3D runs through the same ``fit``, a NaN
validation epoch and a non-finite step handled alike in both, the learning-rate schedule, and the
training options that the CLI tests do not reach: ``--compile``."""

from __future__ import annotations

import csv
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from medanomaly.apps.cli import main
from medanomaly.config import schema as config
from medanomaly.config.schema import TrainConfig
from medanomaly.infer.predictor import Predictor
from medanomaly.train import loop, run, sources

TINY = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "2", "--batch-size", "4", "--precision", "fp32",
        "--no-plan", "--device", "cpu"]


def _rows(model_dir: Path) -> list[dict]:
    with (model_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _losses(model_dir: Path) -> list[float]:
    return [float(r["train_loss"]) for r in _rows(model_dir)]


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


def test_compile_is_refused_for_3d(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--dim", "3", "--compile", "--no-plan"]) == 2
    assert "--compile" in capsys.readouterr().err


# --- one loop for 2D and 3D: NaN validation epochs, non-finite steps ---------------------------------

def _cfg(dim: int, **changes) -> TrainConfig:
    """A tiny run on the phantoms (4 slices of 48 x 48 per case): 2D slices at 32 x 32, or 3D
    patches of 4 x 16 x 16 voxels of the stacked slices; fp32, no time budget (step-based schedule)."""
    base = {"size": 32, "model.width": 4, "model.depth": 2, "epochs": 1, "batch_size": 4, "precision": "fp32",
            "max_minutes": 0}
    if dim == 3:
        base.update({"model.dim": 3, "model.norm": "instance", "patches_per_epoch": 4, "patch": (4, 16, 16)})
    return config.load(None, {**base, **changes})


SOURCE = {2: sources.SliceSource, 3: sources.PatchSource}


def test_2d_and_3d_runs_go_through_the_same_fit(phantoms, tmp_path, monkeypatch):
    seen = []

    def spy(model, opt, source, *args, **kwargs):
        seen.append(type(source).__name__)
        return loop.fit(model, opt, source, *args, **kwargs)

    assert run.fit is loop.fit
    monkeypatch.setattr(run, "fit", spy)
    for dim in (2, 3):
        res = run.train(phantoms, tmp_path / f"{dim}d", _cfg(dim), progress=False)
        assert res.epochs_run == 1 and (tmp_path / f"{dim}d" / "model.pt").is_file()
    assert seen == ["SliceSource", "PatchSource"]


@pytest.mark.parametrize("dim", [2, 3])
def test_a_nan_first_epoch_is_kept_and_beaten_by_a_number(dim, phantoms, tmp_path, monkeypatch):
    """The first epoch is kept even when its validation score is NaN (model.pt always exists); any
    later number beats a NaN best; a later NaN epoch is no improvement."""
    scores = iter([(math.nan, math.nan), (0.5, 0.25), (math.nan, math.nan)])
    monkeypatch.setattr(SOURCE[dim], "validate", lambda self, model: next(scores))
    out = tmp_path / "m"
    res = run.train(phantoms, out, _cfg(dim), progress=False)
    assert res.best_epoch == 0 and math.isnan(res.best_val_score)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    kept = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(kept[k], state["model"][k]) for k in kept)
    res = run.train(phantoms, out, _cfg(dim, epochs=3), resume=True, progress=False)
    assert (res.best_epoch, res.best_val_score, res.epochs_run) == (1, 0.25, 3)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["bad_epochs"] == 1


@pytest.mark.parametrize("dim", [2, 3])
def test_a_step_with_non_finite_loss_or_gradients_is_skipped_with_one_warning(dim, phantoms, tmp_path, monkeypatch,
                                                                              caplog):
    real = SOURCE[dim].loss
    poisoned = {1}

    def loss(self, model, batch, gen, step):  # NaN loss, hence NaN gradients, at the poisoned steps
        value = real(self, model, batch, gen, step)
        return value * math.nan if step in poisoned else value

    monkeypatch.setattr(SOURCE[dim], "loss", loss)
    with caplog.at_level(logging.WARNING, logger="medanomaly.train.loop"):
        run.train(phantoms, tmp_path / "m", _cfg(dim), progress=False)
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warned == ["step 1: non-finite loss or gradients; step skipped"]
    state = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 + (dim == 2)  # every step counted: 3 batches of 12 slices, 2 steps of 2 patches
    assert all(bool(v.isfinite().all()) for v in state["model"].values() if v.is_floating_point())
    assert math.isfinite(float(_rows(tmp_path / "m")[0]["train_loss"]))  # the mean of the steps taken

    poisoned.update(range(10))  # every step non-finite: the optimizer never stepped
    run.train(phantoms, tmp_path / "all", _cfg(dim), progress=False)
    state = torch.load(tmp_path / "all" / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["state"] == {} and _rows(tmp_path / "all")[0]["train_loss"] == "nan"


def test_the_finite_check_changes_nothing_when_all_is_finite(phantoms, tmp_path, monkeypatch):
    run.train(phantoms, tmp_path / "checked", _cfg(2, epochs=2), progress=False)
    monkeypatch.setattr(loop, "finite", lambda loss, model: True)
    run.train(phantoms, tmp_path / "unchecked", _cfg(2, epochs=2), progress=False)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("checked", "unchecked"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    drop = ("seconds", "images_per_s")
    assert ([{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "checked")]
            == [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "unchecked")])


def test_finite_looks_at_the_loss_and_every_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.ones(1, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert loop.finite(torch.tensor(1.0), model)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # nothing changed
    assert not loop.finite(torch.tensor(math.inf), model)
    model[1].bias.grad[0] = math.nan
    assert not loop.finite(torch.tensor(1.0), model)
    model[1].bias.grad[0] = 1e30  # finite, though its squared norm overflows float32: not skipped
    assert loop.finite(torch.tensor(1.0), model)
    model[0].weight.grad[0, 0] = -math.inf
    assert not loop.finite(torch.tensor(1.0), model)


def test_the_learning_rate_warms_up_then_decays():
    cfg = config.load(None, {"lr": 0.01})
    assert loop.lr_at(cfg, 0, 4, 0.0) == pytest.approx(0.0025) and loop.lr_at(cfg, 3, 4, 0.0) == pytest.approx(0.01)
    assert loop.lr_at(cfg, 10, 4, 0.5) == pytest.approx(0.005) and loop.lr_at(cfg, 10, 4, 1.5) == pytest.approx(0.0)
