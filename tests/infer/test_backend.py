"""Tests for medanomaly.infer.backend: the PyTorch backend (the network's float32 output on the CPU,
channels-last input for a channels-last network, autocast for bf16) and load_weights, with one clear
error for each way model.pt can be wrong and nothing in a file ever executed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from medanomaly.config.sections import UNetConfig
from medanomaly.core.atomic import file_sha256
from medanomaly.core.errors import MedanomalyError
from medanomaly.infer.backend import TorchBackend, load_weights
from medanomaly.models.unet import UNet

CPU = torch.device("cpu")
CFG = UNetConfig(width=4, depth=2)


def _weights(folder: Path, cfg: UNetConfig = CFG, seed: int = 0) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = UNet(cfg).state_dict()
    torch.save(state, folder / "model.pt")
    return state


class _RunsCode:
    """Pickles as a call of os.system: loading it with plain pickle would run the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_torch_backend_is_the_networks_float32_output_on_the_cpu() -> None:
    torch.manual_seed(0)
    net = UNet(CFG).eval()
    x = torch.rand(2, 1, 16, 16)
    backend = TorchBackend(net, CPU, "fp32")
    with torch.no_grad():
        got, expected = backend(x), net(x)
    assert backend.precision == "fp32" and got.dtype == torch.float32 and got.device == CPU
    torch.testing.assert_close(got, expected)
    backend.precision = "bf16"  # a caller may change it
    with torch.no_grad():
        low = backend(x)
    assert low.dtype == torch.float32 and not torch.equal(low, expected)
    torch.testing.assert_close(low, expected, atol=0.1, rtol=0.1)


def test_a_channels_last_network_gets_channels_last_input() -> None:
    net = UNet(CFG).eval().to(memory_format=torch.channels_last)
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        TorchBackend(net, CPU, "fp32")(torch.rand(1, 1, 16, 16))
    assert seen == [True]


def test_load_weights_builds_the_network_in_eval_mode(tmp_path) -> None:
    state = _weights(tmp_path)
    model = load_weights(tmp_path, CFG, CPU)
    assert not model.training and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last)  # 2D: channels-last
    cfg3d = UNetConfig(dim=3, width=4, depth=1, norm="instance")
    _weights(tmp_path / "3d", cfg3d)
    model3d = load_weights(tmp_path / "3d", cfg3d, CPU)
    assert isinstance(model3d.encoders[0][0], torch.nn.Conv3d) and not model3d.training


def test_weights_are_checked_against_the_recorded_hash(tmp_path) -> None:
    _weights(tmp_path)
    digest = file_sha256(tmp_path / "model.pt")
    assert digest == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    load_weights(tmp_path, CFG, CPU, sha256=digest)
    _weights(tmp_path, seed=1)  # retrained since: same network, other weights
    with pytest.raises(MedanomalyError, match=f"not the weights file this model was calibrated with.*{digest[:12]}"):
        load_weights(tmp_path, CFG, CPU, sha256=digest)


def test_missing_truncated_and_foreign_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(MedanomalyError, match=r"model\.pt is missing; the model directory is incomplete"):
        load_weights(tmp_path, CFG, CPU)
    _weights(tmp_path)
    raw = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MedanomalyError, match="cannot read weights .* truncated or damaged"):
        load_weights(tmp_path, CFG, CPU)
    _weights(tmp_path, UNetConfig(width=8, depth=2))  # another network's weights
    with pytest.raises(MedanomalyError, match="do not fit the network described in"):
        load_weights(tmp_path, CFG, CPU)


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path) -> None:
    marker = tmp_path / "ran"
    torch.save({"w": _RunsCode(marker)}, tmp_path / "model.pt")
    with pytest.raises(MedanomalyError, match="refused to load .*not a plain weights file.*it was not executed"):
        load_weights(tmp_path, CFG, CPU)
    assert not marker.exists()


def test_non_finite_weights_are_refused(tmp_path) -> None:
    state = _weights(tmp_path)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name][0] = float("nan")  # a diverged run
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(MedanomalyError, match=f"non-finite weights .*{name}"):
        load_weights(tmp_path, CFG, CPU)
