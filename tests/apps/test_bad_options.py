"""Bad option values, end to end: each example of issue 15's "Tracebacks instead of errors" and
"Accepted silently" lists about flags and config values, and their neighbours, run through the
in-process CLI. Each ends with one clear message naming the flag or key, the value and what is
allowed, exit code 2, no traceback, and nothing created or changed in the inputs or the output's
parent (``cli.refuses``), because every value is checked before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medanomaly.config.schema import load


@pytest.fixture
def world(tmp_path: Path, labelled_phantoms, make_model_dir) -> dict[str, Path]:
    """Tiny labelled data (4 cases with a splits.json), a model directory, and where outputs would go."""
    data = labelled_phantoms(tmp_path / "data")
    model = make_model_dir(tmp_path / "model")
    outs = tmp_path / "outs"
    outs.mkdir()
    return {"data": data, "model": model, "outs": outs, "out": outs / "out", "root": tmp_path}


def _config(world: dict[str, Path], content: object, raw: bytes | None = None) -> Path:
    path = world["root"] / "cfg.json"
    path.write_bytes(raw if raw is not None else json.dumps(content).encode())
    return path


def _train_refuses(cli, world, *flags: str, says: str) -> str:
    """``train DATA --out OUT FLAGS`` is refused as ``says``; the data and the outputs' folder untouched."""
    return cli.refuses("train", world["data"], "--out", world["out"], *flags, says=says,
                       untouched=(world["data"], world["outs"], world["model"]))


# --- the examples: tracebacks before ------------------------------------------------------------

def test_bad_config_lr_string(cli, world) -> None:
    cfg = _config(world, {"lr": "fast"})
    _train_refuses(cli, world, "--config", cfg, says=r"config file .*cfg\.json: lr must be a number in \(0, 10\] "
                                                   r"\(got 'fast'\)")


def test_bad_config_batch_size_float(cli, world) -> None:
    cfg = _config(world, {"batch_size": 2.5})
    _train_refuses(cli, world, "--config", cfg, says=r"batch_size must be an integer in \[1, 4096\] \(got 2\.5\)")


def test_bad_width_zero(cli, world) -> None:
    _train_refuses(cli, world, "--width", "0", says=r"argument --width: must be an integer in \[1, 1024\] \(got 0\)")


def test_bad_depth_zero(cli, world) -> None:
    _train_refuses(cli, world, "--depth", "0", says=r"argument --depth: must be an integer in \[1, 10\] \(got 0\)")


def test_bad_lr_negative(cli, world) -> None:
    _train_refuses(cli, world, "--lr", "-1", says=r"argument --lr: must be a number in \(0, 10\] \(got -1\.0\)")


def test_bad_lr_nan(cli, world) -> None:
    _train_refuses(cli, world, "--lr", "nan", says=r"argument --lr: must be a number in \(0, 10\] \(got nan\)")


def test_bad_noise_res_zero(cli, world) -> None:
    _train_refuses(cli, world, "--task", "anomaly", "--noise-res", "0",
                   says=r"argument --noise-res: must be an integer in \[1, 4096\] \(got 0\)")


def test_bad_device_tpu(cli, world) -> None:
    _train_refuses(cli, world, "--device", "tpu",
                   says=r"argument --device: must be auto, cpu, cuda, cuda:N or mps \(got 'tpu'\)")


def test_bad_evaluate_split_bogus(cli, world) -> None:
    cli.refuses("evaluate", "--model", world["model"], "--data", world["data"], "--split", "bogus", "--out",
                world["out"], says=r"--split 'bogus' is not a split of .*splits\.json; valid: all, train, val, test",
                untouched=(world["data"], world["model"], world["outs"]))


def test_bad_serve_port_70000(cli, world) -> None:
    cli.refuses("serve", world["model"], "--port", "70000",
                says=r"argument --port: must be an integer in \[0, 65535\] \(got 70000\)",
                untouched=(world["model"],))


def test_bad_resume_config_not_utf8(cli, world) -> None:
    out = world["out"]
    out.mkdir()
    (out / "config.json").write_bytes(b'{"lr": "\xff\xfe fast"}')
    cli.refuses("train", world["data"], "--out", out, "--resume",
                says=r"cannot read config file .*config\.json: it is not UTF-8 text \(byte 0xff at position 8\)",
                untouched=(world["data"], world["outs"]))


# --- the examples: accepted silently before -------------------------------------------------------

def test_bad_max_minutes_negative(cli, world) -> None:
    _train_refuses(cli, world, "--max-minutes", "-1",
                   says=r"argument --max-minutes: must be a number in \[0, 1000000\] \(got -1\.0\)")


def test_bad_noise_std_negative(cli, world) -> None:
    _train_refuses(cli, world, "--task", "anomaly", "--noise-std", "-1",
                   says=r"argument --noise-std: must be a number in \[0, 100\] \(got -1\.0\)")


def test_bad_synthetic_lesions_above_one(cli, world) -> None:
    _train_refuses(cli, world, "--synthetic-lesions", "2",
                   says=r"argument --synthetic-lesions: must be a number in \[0, 1\] \(got 2\.0\)")


def test_bad_config_epochs_bool(cli, world) -> None:
    cfg = _config(world, {"epochs": True})
    _train_refuses(cli, world, "--config", cfg, says=r"epochs must be an integer in \[1, 1000000\] \(got True\)")


def test_bad_config_model_null(cli, world) -> None:
    cfg = _config(world, {"model": None})
    _train_refuses(cli, world, "--config", cfg, says=r"model must be an object of model settings \(got None\)")


def test_bad_patience_zero(cli, world) -> None:
    """Decided: --patience 0 is refused (it stopped before the first epoch, leaving no model.pt); the
    message says how to train without early stopping."""
    _train_refuses(cli, world, "--patience", "0", says=r"argument --patience: must be an integer in \[1, 1000000\] "
                                                      r"\(got 0\); to train without early stopping, make it at "
                                                      r"least epochs")
    with pytest.raises(ValueError, match="patience must be an integer"):
        load(None, {"patience": 0})
    assert load(None, {"patience": 1}).patience == 1


# --- neighbours of those -----------------------------------------------------------------------------------

def test_bad_config_not_json(cli, world) -> None:
    cfg = _config(world, None, raw=b'{"lr": 0.1,}')
    _train_refuses(cli, world, "--config", cfg, says=r"cannot read config file .*cfg\.json: it is not valid JSON")


def test_bad_config_not_an_object(cli, world) -> None:
    cfg = _config(world, [1, 2])
    _train_refuses(cli, world, "--config", cfg, says=r"config file .*cfg\.json must hold a JSON object of settings "
                                                     r".*not a JSON list")


def test_bad_config_is_a_folder(cli, world) -> None:
    _train_refuses(cli, world, "--config", world["model"],
                   says=r"cannot read config file .*model: it does not exist or is not a regular file")


def test_bad_config_nan(cli, world) -> None:
    cfg = _config(world, None, raw=b'{"weight_decay": NaN}')  # Python's json reads NaN; the rule refuses it
    _train_refuses(cli, world, "--config", cfg, says=r"weight_decay must be a number in \[0, 1\] \(got nan\)")


def test_bad_config_nested_values_all_listed(cli, world) -> None:
    cfg = _config(world, {"model": {"width": "wide"}, "augment": {"scale": [1.2, 0.8]}, "anomaly": {"erode": -1}})
    err = _train_refuses(cli, world, "--config", cfg, says=r"model\.width must be an integer in \[1, 1024\] "
                                                           r"\(got 'wide'\)")
    assert cli.says(err, r"augment\.scale must be a list of 2 numbers in \(0, 10\], low <= high \(got \(1\.2, 0\.8\)\)")
    assert cli.says(err, r"anomaly\.erode must be an integer in \[0, 4096\] \(got -1\)")


def test_bad_config_unknown_option(cli, world) -> None:
    cfg = _config(world, {"model": {"norm": "layer"}})
    _train_refuses(cli, world, "--config", cfg,
                   says=r"unknown norm 'layer' \(model\.norm\); valid: batch, instance, group, none")


def test_bad_empty_out_path(cli, world) -> None:
    _train_refuses(cli, world, "--out", "", says=r"argument --out: must be a non-empty path \(got ''\)")


def test_bad_empty_init(cli, world) -> None:
    """An empty --init was dropped silently (no initial weights); now it is an error."""
    _train_refuses(cli, world, "--init", "", says=r"argument --init: must be a non-empty path or name")


def test_bad_patch_element(cli, world) -> None:
    _train_refuses(cli, world, "--dim", "3", "--patch", "16", "0", "16",
                   says=r"argument --patch: must be an integer in \[1, 4096\] \(got 0\)")


def test_bad_seed_negative(cli, world) -> None:
    _train_refuses(cli, world, "--seed", "-1", says=r"argument --seed: must be an integer in \[0, 4294967295\]")


def test_bad_device_index(cli, world) -> None:
    _train_refuses(cli, world, "--device", "cuda:x", says=r"argument --device: must be auto, cpu, cuda, cuda:N or mps")


def test_bad_synthesize_n_zero(cli, world) -> None:
    cli.refuses("synthesize", world["data"], "--out", world["out"], "--n", "0",
                says=r"argument --n: must be an integer in \[1, 1000000\] \(got 0\)",
                untouched=(world["data"], world["outs"]))


def test_bad_synthesize_gan_size(cli, world) -> None:
    cli.refuses("synthesize", world["data"], "--out", world["out"], "--n", "2", "--size", "8",
                says=r"argument --size: must be an integer in \[16, 4096\] \(got 8\)",
                untouched=(world["data"], world["outs"]))


def test_bad_export_opset(cli, world) -> None:
    cli.refuses("export", world["model"], "--out", world["out"], "--opset", "99",
                says=r"argument --opset: must be an integer in \[13, 20\] \(got 99\)",
                untouched=(world["model"], world["outs"]))


def test_bad_serve_upload_limit(cli, world) -> None:
    cli.refuses("serve", world["model"], "--max-upload-mb", "0",
                says=r"argument --max-upload-mb: must be a number in \(0, 10000000\] \(got 0\.0\)",
                untouched=(world["model"],))


def test_bad_serve_host(cli, world) -> None:
    cli.refuses("serve", world["model"], "--host", "local host",
                says=r"argument --host: must be a host name or IP address \(got 'local host'\)",
                untouched=(world["model"],))


def test_bad_plan_max_minutes(cli, world) -> None:
    cli.refuses("plan", world["data"], "--out", world["out"], "--max-minutes", "inf",
                says=r"argument --max-minutes: must be a number in \[0, 1000000\] \(got inf\)",
                untouched=(world["data"], world["outs"]))


def test_bad_demo_max_minutes(cli, world) -> None:
    cli.refuses("demo", "--out", world["out"], "--max-minutes", "soon",
                says=r"argument --max-minutes: must be a number in \[0, 1000000\] \(got 'soon'\)",
                untouched=(world["outs"],))


def test_bad_predict_device(cli, world) -> None:
    img = next(world["data"].glob("case0/case0_0.png"))
    cli.refuses("predict", world["model"], img, "--out", world["out"], "--device", "gpu",
                says=r"argument --device: must be auto, cpu, cuda, cuda:N or mps \(got 'gpu'\)",
                untouched=(world["data"], world["model"], world["outs"]))
