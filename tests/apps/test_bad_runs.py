"""Inputs that a run can only use after its minutes of loading or training, refused before them:
each check that the options and the data listing allow happens before any image is loaded
(``train``), before the generator is trained (``synthesize``) or before the model is trained
(``demo``). Each is exit 2 with a clear message and nothing created or changed (``cli.refuses``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FLAGS = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "4", "--precision", "fp32",
         "--no-plan", "--device", "cpu"]


@pytest.fixture
def trained(phantoms, tmp_path, cli) -> Path:
    """A finished tiny run on the phantoms (its checkpoint.pt is what --resume continues)."""
    rc, err = cli("train", phantoms, "--out", tmp_path / "run", *FLAGS)
    assert rc == 0, err
    return tmp_path / "run"


def test_bad_run_resumed_with_another_network(trained, phantoms, cli, tmp_path):
    # before: the data were loaded, config.json rewritten with --width 8, then a traceback
    cli.refuses("train", phantoms, "--out", trained, "--resume", "--width", "8", "--epochs", "2",
                says=f"--resume: {trained / 'checkpoint.pt'} holds a run of another network.*size mismatch",
                untouched=(tmp_path, phantoms))


def test_bad_run_init_with_nan_weights(trained, phantoms, cli, tmp_path):
    state = torch.load(trained / "model.pt", weights_only=True)
    state["head.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "diverged.pt")
    cli.refuses("train", phantoms, "--out", tmp_path / "new", "--init", tmp_path / "diverged.pt", *FLAGS,
                says="--init .*diverged.pt holds non-finite weights.*'head.weight'", untouched=(tmp_path, phantoms))


def test_bad_run_synthesize_without_lesion_free_slices(labelled_phantoms, cli, tmp_path):
    data = labelled_phantoms(tmp_path / "data")  # every slice has a lesion: nothing to paint into
    # before: the generator was trained, generator.pt written into --out, then the error
    cli.refuses("synthesize", data, "--out", tmp_path / "synth", "--n", "2", "--size", "32", "--max-steps", "2",
                "--device", "cpu", says="no lesion-free slice to paint lesions into", untouched=(tmp_path,))


def test_bad_run_demo_data_without_test_images(labelled_phantoms, cli, tmp_path):
    data = labelled_phantoms(tmp_path / "data")
    (data / "splits.json").write_text(json.dumps({"train": ["case0", "case1"], "val": ["case2", "case3"], "test": []}))
    # before: a model was trained into --out, then the evaluation found no test image
    cli.refuses("demo", "--data", data, "--out", tmp_path / "demo", "--max-minutes", "0.05", "--device", "cpu",
                says="leaves no labelled test image", untouched=(tmp_path,))
