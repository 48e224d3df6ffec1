"""U-Net with a ResNet-18/34 encoder (--encoder): shapes, torchvision key compatibility, --init of a
torchvision-format file, freezing, and train -> predict -> export through the CLI.

No torchvision here: the expected state-dict keys below are written out from torchvision's
``torchvision/models/resnet.py`` (ResNet, BasicBlock, _make_layer), and the fake torchvision files
are built from that table with torch.save.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from medanomaly.apps.cli import main
from medanomaly.config.schema import load as load_config
from medanomaly.core.errors import MedanomalyError
from medanomaly.infer.export import export_onnx
from medanomaly.models.build import build_model
from medanomaly.models.init import load_matching, set_encoder_trainable
from medanomaly.models.resnet_unet import ResNetUNet
from medanomaly.models.unet import UNetConfig

# torchvision resnet18().state_dict(), in order: "NAME.weight|bias d0,d1,..." is one tensor; any other
# "NAME C" is a BatchNorm2d (bn1, bn2, downsample.1): NAME.weight, .bias, .running_mean, .running_var of
# shape (C,) and NAME.num_batches_tracked of shape ().
TORCHVISION_RESNET18 = """
conv1.weight 64,3,7,7
bn1 64
layer1.0.conv1.weight 64,64,3,3
layer1.0.bn1 64
layer1.0.conv2.weight 64,64,3,3
layer1.0.bn2 64
layer1.1.conv1.weight 64,64,3,3
layer1.1.bn1 64
layer1.1.conv2.weight 64,64,3,3
layer1.1.bn2 64
layer2.0.conv1.weight 128,64,3,3
layer2.0.bn1 128
layer2.0.conv2.weight 128,128,3,3
layer2.0.bn2 128
layer2.0.downsample.0.weight 128,64,1,1
layer2.0.downsample.1 128
layer2.1.conv1.weight 128,128,3,3
layer2.1.bn1 128
layer2.1.conv2.weight 128,128,3,3
layer2.1.bn2 128
layer3.0.conv1.weight 256,128,3,3
layer3.0.bn1 256
layer3.0.conv2.weight 256,256,3,3
layer3.0.bn2 256
layer3.0.downsample.0.weight 256,128,1,1
layer3.0.downsample.1 256
layer3.1.conv1.weight 256,256,3,3
layer3.1.bn1 256
layer3.1.conv2.weight 256,256,3,3
layer3.1.bn2 256
layer4.0.conv1.weight 512,256,3,3
layer4.0.bn1 512
layer4.0.conv2.weight 512,512,3,3
layer4.0.bn2 512
layer4.0.downsample.0.weight 512,256,1,1
layer4.0.downsample.1 512
layer4.1.conv1.weight 512,512,3,3
layer4.1.bn1 512
layer4.1.conv2.weight 512,512,3,3
layer4.1.bn2 512
fc.weight 1000,512
fc.bias 1000
"""


def torchvision_shapes(table: str = TORCHVISION_RESNET18) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for line in table.strip().splitlines():
        name, dims = line.split()
        size = tuple(int(d) for d in dims.split(","))
        if name.split(".")[-1] in ("weight", "bias"):
            shapes[name] = size
        else:  # a BatchNorm2d
            for stat in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{name}.{stat}"] = size
            shapes[f"{name}.num_batches_tracked"] = ()
    return shapes


def fake_torchvision_file(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=gen) * 0.01)
             for k, s in torchvision_shapes().items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 1.0
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def fake_resnet18(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("tv") / "resnet18-fake.pth"
    return path, fake_torchvision_file(path)


def _encoder_keys(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if k.split(".")[0] in ResNetUNet.ENCODER}


# --- architecture ---------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder", ["resnet18", "resnet34"])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_matches_input(encoder, channels):
    torch.manual_seed(0)
    model = build_model(UNetConfig(in_channels=channels, out_channels=1, width=4, encoder=encoder))
    assert isinstance(model, ResNetUNet)
    for size in [(64, 64), (100, 77), (128, 128), (17, 23)]:
        model.train()
        assert model(torch.rand(2, channels, *size)).shape == (2, 1, *size)
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, channels, 40, 33)).shape == (1, 1, 40, 33)


def test_reconstruction_output_and_gradients_reach_the_stem():
    model = build_model(UNetConfig(in_channels=3, out_channels=3, width=4, encoder="resnet18"))
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3, 32, 32)
    out.mean().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.full[0].weight.grad.abs().sum() > 0  # the full-resolution skip


def test_invalid_encoder_dim_and_channels_are_clear_errors():
    with pytest.raises(ValueError, match="valid: plain, resnet18, resnet34"):
        UNetConfig(encoder="resnet50")
    with pytest.raises(ValueError, match="2D only"):
        UNetConfig(encoder="resnet18", dim=3)
    with pytest.raises(ValueError, match="got 2 channels.*--encoder plain"):
        build_model(UNetConfig(in_channels=2, encoder="resnet18"))
    with pytest.raises(MedanomalyError, match="unknown encoder"):  # a config file: a user error, exit 2
        load_config(None, {"model.encoder": "resnet50"})


def test_grey_is_repeated_onto_rgb_and_imagenet_statistics_are_constants():
    model = build_model(UNetConfig(in_channels=1, width=4, encoder="resnet18")).eval()
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()
    seen = {}
    model.conv1.register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
    with torch.no_grad():
        model(torch.full((1, 1, 32, 32), 0.5))
    x = seen["x"][0, :, 0, 0]  # the standardised RGB pixel that conv1 sees
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x, expected, atol=1e-6)


# --- torchvision compatibility -----------------------------------------------------------------------

def test_encoder_keys_and_shapes_are_torchvision_resnet18():
    expected = torchvision_shapes()
    assert len(expected) == 122  # torchvision resnet18: 120 encoder tensors + fc.weight, fc.bias
    encoder = {k: v for k, v in expected.items() if not k.startswith("fc.")}
    assert _encoder_keys(build_model(UNetConfig(width=4, encoder="resnet18"))) == encoder


def test_resnet34_encoder_has_torchvision_layout():
    keys = _encoder_keys(build_model(UNetConfig(width=4, encoder="resnet34")))
    assert len(keys) == 216  # 36 convs + 36 BatchNorms x 5 (torchvision resnet34 has 218 with fc)
    assert keys["layer1.2.conv2.weight"] == (64, 64, 3, 3)
    assert keys["layer2.3.bn1.num_batches_tracked"] == ()
    assert keys["layer3.5.bn2.running_var"] == (256,)
    assert keys["layer3.0.downsample.0.weight"] == (256, 128, 1, 1)
    assert "layer1.0.downsample.0.weight" not in keys and "layer4.2.conv1.weight" in keys


def test_init_from_a_torchvision_file_loads_the_encoder_and_lists_the_rest(fake_resnet18, caplog):
    path, state = fake_resnet18
    model = build_model(UNetConfig(width=4, encoder="resnet18"))
    with caplog.at_level(logging.INFO, logger="medanomaly.models.init"):
        report = load_matching(model, path)
    assert sorted(report["loaded"]) == sorted(k for k in state if not k.startswith("fc."))
    assert report["unused"] == ["fc.weight", "fc.bias"] and not report["shape_mismatch"]
    assert report["missing"] and all(k.startswith(("full.", "decoders.", "head.")) for k in report["missing"])
    own = model.state_dict()
    for k in ("conv1.weight", "layer2.0.downsample.1.running_var", "layer4.1.bn2.bias"):
        assert torch.equal(own[k], state[k])
    assert "fc.weight" in caplog.text and "decoders.0.0.weight" in caplog.text


def test_a_file_of_another_architecture_is_refused(tmp_path):
    torch.save({"backbone.stem.weight": torch.zeros(64, 3, 7, 7), "classifier.weight": torch.zeros(10, 64)},
               tmp_path / "other.pt")
    with pytest.raises(MedanomalyError, match="none of its 2 tensors.*--encoder resnet18"):
        load_matching(build_model(UNetConfig(width=4, encoder="resnet18")), tmp_path / "other.pt")


def test_freeze_encoder_freezes_the_resnet_and_its_batchnorm_statistics():
    model = build_model(UNetConfig(width=4, encoder="resnet18"))
    assert set_encoder_trainable(model, False) == sum(
        p.numel() for k, p in model.named_parameters() if k.split(".")[0] in ResNetUNet.ENCODER)
    frozen = {k.split(".")[0] for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(ResNetUNet.ENCODER)
    model.train()
    assert not model.bn1.training and not model.layer3[0].downsample[1].training
    assert model.decoders[0][1].training and model.full[1].training
    before = model.layer1[0].bn1.running_mean.clone()
    model(torch.rand(2, 1, 32, 32)).mean().backward()
    assert torch.equal(model.layer1[0].bn1.running_mean, before)
    assert model.conv1.weight.grad is None and model.head.weight.grad is not None
    set_encoder_trainable(model, True)
    assert model.bn1.training and all(p.requires_grad for p in model.parameters())


# --- through the CLI -------------------------------------------------------------------------------

TINY = ["--size", "64", "--width", "4", "--epochs", "1", "--batch-size", "4", "--max-minutes", "0.05",
        "--device", "cpu"]


def test_train_with_a_torchvision_init_then_predict_and_export(tmp_path, fake_resnet18, caplog, labelled_phantoms):
    data = labelled_phantoms(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="medanomaly.models.init"):
        rc = main(["-q", "train", str(data), "--out", str(tmp_path / "m"), "--encoder", "resnet18",
                   "--init", str(fake_resnet18[0]), "--freeze-encoder-epochs", "1", *TINY])
    assert rc == 0 and "unused: fc.weight, fc.bias" in caplog.text
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["model"]["encoder"] == "resnet18"
    rc = main(["-q", "predict", str(tmp_path / "m"), str(data / "case3"), "--out", str(tmp_path / "pred")])
    assert rc == 0 and len(list((tmp_path / "pred").rglob("*_pred.png"))) == 3
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    assert export_onnx(tmp_path / "m").is_file()  # verified against PyTorch inside


def test_train_with_weights_of_another_architecture_exits_2(tmp_path, capsys, labelled_phantoms):
    data = labelled_phantoms(tmp_path / "data")
    torch.save({"a.weight": torch.zeros(3, 3), "b.bias": torch.zeros(3)}, tmp_path / "random.pt")
    rc = main(["-q", "train", str(data), "--out", str(tmp_path / "m"), "--encoder", "resnet18",
               "--init", str(tmp_path / "random.pt"), *TINY])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "random.pt" in err and "none of its 2 tensors" in err and "Traceback" not in err
