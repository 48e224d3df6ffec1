"""--tensorboard without the tensorboard package: refused before any work (exit 2, nothing written)."""

from __future__ import annotations

import importlib.util

real_find_spec = importlib.util.find_spec


def test_bad_tensorboard_not_installed(cli, labelled_phantoms, tmp_path, monkeypatch, tiny_train_flags):
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    data = labelled_phantoms(tmp_path / "data")
    out = tmp_path / "out"
    cli.refuses("train", data, "--out", out, *tiny_train_flags, "--no-plan", "--tensorboard",
                says=r"--tensorboard needs the tensorboard package.*pip install tensorboard",
                untouched=(data, tmp_path))
    assert not out.exists()
