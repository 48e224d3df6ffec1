"""Checkpoint and resume (medanomaly.train.checkpoint): checkpoint.pt round trip, metrics.csv rows
kept on resume, the model-directory checks, stale temporary files."""

from __future__ import annotations

import math

import pytest
import torch

from medanomaly.core.errors import MedanomalyError
from medanomaly.train import checkpoint as ckpt
from medanomaly.train.checkpoint import METRIC_FIELDS, RunState


def _net_and_opt(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def _row(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 0.5, "val_loss": 0.25, "val_dice": math.nan, "lr": 1e-3, "seconds": 2.0,
            "images_per_s": 10.0}


def test_a_checkpoint_restores_model_optimizer_generator_and_state(tmp_path):
    model, opt = _net_and_opt(0)
    gen = torch.Generator().manual_seed(7)
    torch.randperm(5, generator=gen)
    state = RunState(epoch=3, step=12, best=0.75, best_epoch=2, elapsed=30.5, bad_epochs=1, images_seen=48,
                     val_seconds=1.5)
    ckpt.save_state(tmp_path / "checkpoint.pt", model, opt, gen, state, {"teacher": model.state_dict()})
    saved = ckpt.load_state(tmp_path / "checkpoint.pt")
    assert set(saved) == {"model", "optimizer", "rng", "epoch", "step", "best", "best_epoch", "elapsed", "bad_epochs",
                          "images_seen", "val_seconds", "teacher"}
    other, other_opt = _net_and_opt(1)
    other_gen = torch.Generator().manual_seed(0)
    resumed = ckpt.resume_state(tmp_path / "checkpoint.pt", other, other_opt, other_gen, tmp_path / "metrics.csv")
    assert resumed == state
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    assert other_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert torch.equal(torch.randperm(9, generator=other_gen), torch.randperm(9, generator=gen))


def test_a_checkpoint_of_an_earlier_release_loads_without_the_new_fields():
    saved = {"epoch": 3, "step": 12, "best": 0.75, "best_epoch": 2, "elapsed": 30.5, "bad_epochs": 1}
    assert ckpt.state_of(saved) == RunState(3, 12, 0.75, 2, 30.5, 1, images_seen=0, val_seconds=0.0)
    with pytest.raises(KeyError):  # an original field missing: not a checkpoint of medanomaly train
        ckpt.state_of({k: v for k, v in saved.items() if k != "best"})


def test_resume_keeps_the_rows_the_checkpoint_covers(tmp_path):
    metrics = tmp_path / "metrics.csv"
    for epoch in range(4):
        ckpt.append_metrics(metrics, _row(epoch))
    lines = metrics.read_text().splitlines(keepends=True)
    assert lines[0] == ",".join(METRIC_FIELDS) + "\n" and lines[1].startswith("0,0.5,0.25,nan,0.001,2,10")
    metrics.write_text("".join(lines) + "4,0.5,0.2")  # a row cut off by a kill
    model, opt = _net_and_opt(0)
    gen = torch.Generator()
    ckpt.save_state(tmp_path / "checkpoint.pt", model, opt, gen, RunState(epoch=1))
    ckpt.resume_state(tmp_path / "checkpoint.pt", model, opt, gen, metrics)
    assert metrics.read_text() == "".join(lines[:3])  # header, epochs 0 and 1
    metrics.write_text("epoch,train_lo")  # cut off in its header: started again by the next append
    ckpt.resume_state(tmp_path / "checkpoint.pt", model, opt, gen, metrics)
    assert not metrics.exists()


def test_a_fresh_state_drops_an_interrupted_runs_metrics(tmp_path):
    metrics = tmp_path / "metrics.csv"
    ckpt.append_metrics(metrics, _row(0))
    assert ckpt.fresh_state(metrics) == RunState() and not metrics.exists()
    assert RunState().best == -math.inf and RunState().best_epoch == -1


def test_a_foreign_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedanomalyError, match="(?s)cannot resume from .*delete it to start afresh"):
        ckpt.load_state(tmp_path / "checkpoint.pt")


def test_the_model_directory_checks(tmp_path):
    with pytest.raises(MedanomalyError, match="--resume: no checkpoint.pt"):
        ckpt.check_out_dir(tmp_path, resume=True)
    assert ckpt.check_out_dir(tmp_path, resume=False) == tmp_path / "checkpoint.pt"
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(MedanomalyError, match="already holds a trained model; pass --resume"):
        ckpt.check_out_dir(tmp_path, resume=False)


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / ".tmp-model.pt-1").write_bytes(b"half")
    (tmp_path / ".tmp-dir").mkdir()
    (tmp_path / "model.pt").write_bytes(b"whole")
    ckpt.remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-dir", "model.pt"]
    ckpt.remove_stale_temp_files(tmp_path / "absent")  # no folder yet: nothing to do
