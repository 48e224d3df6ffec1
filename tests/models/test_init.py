"""train --init (local weights only), --freeze-encoder-epochs, and pretrain."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from medanomaly.apps.cli import main
from medanomaly.core.errors import MedanomalyError
from medanomaly.models.init import load_matching, read_state_dict, set_encoder_trainable
from medanomaly.models.unet import UNet, UNetConfig


def test_load_matching_loads_same_shapes_and_reports_the_others(tmp_path, caplog):
    src = UNet(UNetConfig(in_channels=1, out_channels=1, width=4, depth=2))
    dst = UNet(UNetConfig(in_channels=1, out_channels=2, width=4, depth=2))  # another head
    torch.save(src.state_dict(), tmp_path / "w.pt")
    with caplog.at_level(logging.INFO):
        report = load_matching(dst, tmp_path / "w.pt")
    assert "head.weight" in report["shape_mismatch"] and "head.bias" in report["shape_mismatch"]
    assert "encoders.0.0.weight" in report["loaded"]
    assert torch.equal(dst.state_dict()["encoders.0.0.weight"], src.state_dict()["encoders.0.0.weight"])
    assert "head.weight" in caplog.text  # the tensors not loaded are named in the log


def test_a_file_without_any_matching_tensor_is_an_error(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(MedanomalyError, match="none of its 1 tensors"):
        load_matching(UNet(UNetConfig(width=4, depth=2)), tmp_path / "other.pt")


@pytest.mark.parametrize("content", [b"not a torch file", b""])
def test_not_a_state_dict_is_an_error(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(MedanomalyError, match="--init"):
        read_state_dict(tmp_path / "bad.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(MedanomalyError, match="state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_freeze_encoder_only_touches_the_contracting_path():
    model = UNet(UNetConfig(width=4, depth=2))
    n = set_encoder_trainable(model, False)
    assert n > 0
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(k.startswith(("encoders.", "downs.")) for k in frozen)
    assert model.head.weight.requires_grad
    set_encoder_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


TINY = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]


def test_pretrain_then_train_init_from_it(tmp_path, caplog, labelled_phantoms):
    data = labelled_phantoms(tmp_path / "data")
    assert main(["-q", "pretrain", str(data), "--out", str(tmp_path / "pre"), *TINY]) == 0
    meta = json.loads((tmp_path / "pre" / "model.json").read_text())
    assert meta["task"] == "anomaly" and meta["anomaly"]["normal_only"] is False
    with caplog.at_level(logging.INFO, logger="medanomaly.models.init"):
        rc = main(["train", str(data), "--out", str(tmp_path / "sup"), "--init", str(tmp_path / "pre"),
                   "--freeze-encoder-epochs", "1", *TINY])
    assert rc == 0
    assert "loaded" in caplog.text
    saved = json.loads((tmp_path / "sup" / "config.json").read_text())
    assert saved["init"] == str(tmp_path / "pre") and saved["freeze_encoder_epochs"] == 1


def test_init_with_a_model_of_another_channel_count_is_refused(tmp_path, capsys, labelled_phantoms):
    grey = labelled_phantoms(tmp_path / "grey")
    rgb = labelled_phantoms(tmp_path / "rgb", rgb=True)
    assert main(["-q", "train", str(rgb), "--out", str(tmp_path / "rgb-model"), *TINY]) == 0
    rc = main(["-q", "train", str(grey), "--out", str(tmp_path / "m"), "--init", str(tmp_path / "rgb-model"), *TINY])
    assert rc == 2 and "3-channel images but these have 1" in " ".join(capsys.readouterr().err.split())


def test_init_with_a_missing_path_is_a_clear_error(tmp_path, capsys, labelled_phantoms):
    data = labelled_phantoms(tmp_path / "data")
    rc = main(["-q", "train", str(data), "--out", str(tmp_path / "m"), "--init", str(tmp_path / "nope.pt"), *TINY])
    assert rc == 2 and "no such file or model directory" in " ".join(capsys.readouterr().err.split())
