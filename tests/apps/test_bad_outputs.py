"""The output policy of every command that writes (medanomaly.core.outputs), end to end: each
example of issue 15's "Outputs overwrite silently" reproduced, and each output path that cannot
be one refused with one clear line, exit 2, no traceback, and no file changed, created or deleted
in the inputs or the output folder (``cli.refuses``). Tiny inputs: a random-weight 32x32 model
and 32x32 labelled phantoms; every refusal comes before any model is loaded or trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.core import outputs
from medanomaly.train.plan import PLAN_VERSION


@pytest.fixture
def model(tmp_path, make_model_dir) -> Path:
    return make_model_dir(tmp_path / "model")


@pytest.fixture
def data(tmp_path, labelled_phantoms) -> Path:
    return labelled_phantoms(tmp_path / "data")


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray((np.random.default_rng(seed).random((32, 32)) * 255).astype(np.uint8)).save(path)
    return path


def _file(path: Path, text: str = "a user's file") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- predict --------------------------------------------------------------------------------------

def test_inputs_with_one_name_keep_their_outputs_apart(cli, model, tmp_path):
    """``predict M dirA/T1 dirB/T1 --out OUT`` wrote both to OUT/T1_* (one survived, regions.json
    listed T1 twice): now each input has its own outputs, named by its path below the inputs' root."""
    a, b = _png(tmp_path / "dirA" / "T1.png", 1), _png(tmp_path / "dirB" / "T1.png", 2)
    out = tmp_path / "out"
    assert cli("predict", model, a, b, "--out", out)[0] == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "dirA/T1_overlay.png", "dirA/T1_pred.png", "dirA/T1_score.tif",
        "dirB/T1_overlay.png", "dirB/T1_pred.png", "dirB/T1_score.tif", "regions.json"]
    regions = json.loads((out / "regions.json").read_text())
    assert [r["case"] for r in regions["images"]] == ["dirA/T1", "dirB/T1"]


def test_two_formats_of_one_name_and_an_input_given_twice(cli, model, tmp_path):
    """``x.png`` and ``x.tif`` of one folder share the stem ``x``: their outputs keep the suffix;
    an input given twice (alone and with its folder) is predicted once."""
    src = tmp_path / "in"
    _png(src / "x.png", 1)
    _png(src / "x.tif", 2)
    _png(src / "y.png", 3)
    out = tmp_path / "out"
    assert cli("predict", model, src, src / "y.png", "--out", out)[0] == 0
    cases = [r["case"] for r in json.loads((out / "regions.json").read_text())["images"]]
    assert cases == ["x.png", "x.tif", "y"]
    assert (out / "x.png_pred.png").is_file() and (out / "x.tif_score.tif").is_file()


def test_bad_predict_user_file_named_like_an_output(cli, model, tmp_path):
    """A user's file in --out with an output's name was replaced (only regions.json was checked)."""
    src, out = tmp_path / "in", tmp_path / "out"
    _png(src / "scan.png")
    _file(out / "scan_pred.png", "mine")
    cli.refuses("predict", model, src, "--out", out, says=r"already holds 1 file.*scan_pred\.png.*--overwrite",
                untouched=(src, out))
    assert cli("predict", model, src, "--out", out, "--overwrite")[0] == 0


def test_bad_predict_out_holds_the_input(cli, model, tmp_path):
    """``predict M in --out PARENT_OF_in`` wrote into the input tree and replaced an input image
    whose name was an output's."""
    parent = tmp_path / "parent"
    src = parent / "in"
    _png(src / "scan.png")
    _png(parent / "scan_pred.png", 5)  # an input image of the user's, named like an output
    cli.refuses("predict", model, src, "--out", parent, says=r"the input .*in is inside --out", untouched=(parent,))


def test_bad_predict_output_subfolder_is_a_file(cli, model, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _png(src / "case0" / "scan.png")
    _file(out / "case0")
    cli.refuses("predict", model, src, "--out", out, says=r"case0 is a file, not a folder", untouched=(src, out))


def test_bad_predict_out_is_a_file(cli, model, tmp_path):
    src, out = tmp_path / "in", _file(tmp_path / "out")
    _png(src / "scan.png")
    cli.refuses("predict", model, src, "--out", out, says=r"--out .*out is a file, not a folder",
                untouched=(src, out))


def test_bad_predict_out_below_a_file(cli, model, tmp_path):
    src, blocker = tmp_path / "in", _file(tmp_path / "notes.txt")
    _png(src / "scan.png")
    cli.refuses("predict", model, src, "--out", blocker / "out", says=r"lies below .*notes\.txt, which is a file",
                untouched=(src, blocker))


def test_bad_predict_out_in_dev_null(cli, model, tmp_path):
    src = tmp_path / "in"
    _png(src / "scan.png")
    cli.refuses("predict", model, src, "--out", "/dev/null/x", says="special files", untouched=(src,))


def test_bad_predict_out_in_proc(cli, model, tmp_path):
    src = tmp_path / "in"
    _png(src / "scan.png")
    cli.refuses("predict", model, src, "--out", "/proc/medanomaly-out", says="special files", untouched=(src,))


def test_bad_predict_out_unwritable(cli, model, tmp_path, monkeypatch):
    src = tmp_path / "in"
    _png(src / "scan.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(outputs, "_writable", lambda folder: folder != locked)  # as chmod 555 for a normal user
    cli.refuses("predict", model, src, "--out", locked / "out", says=r"locked is not writable",
                untouched=(src, locked))


def test_bad_predict_out_link_loop(cli, model, tmp_path):
    src = tmp_path / "in"
    _png(src / "scan.png")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    cli.refuses("predict", model, src, "--out", tmp_path / "a" / "out", says="cannot be followed to a real path",
                untouched=(src,))


# --- evaluate -------------------------------------------------------------------------------------

def test_bad_evaluate_earlier_results(cli, model, data, tmp_path):
    out = tmp_path / "eval"
    _file(out / "summary.json", "{}")
    cli.refuses("evaluate", "--model", model, "--data", data, "--out", out, says=r"summary\.json.*--overwrite",
                untouched=(data, out, model))
    assert cli("evaluate", "--model", model, "--data", data, "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "summary.json").read_text())["n_cases"] == 1


def test_bad_evaluate_out_holds_the_data(cli, model, data, tmp_path):
    cli.refuses("evaluate", "--model", model, "--data", data, "--out", tmp_path, says=r"the input .*data is inside",
                untouched=(tmp_path,))


def test_bad_evaluate_out_inside_the_model(cli, model, data):
    cli.refuses("evaluate", "--model", model, "--data", data, "--out", model / "eval",
                says=r"inside the input .*model", untouched=(data, model))


def test_bad_evaluate_out_inside_the_predictions(cli, data, tmp_path):
    pred = tmp_path / "pred"
    _png(pred / "case3" / "case3_0_pred.png")
    cli.refuses("evaluate", "--pred", pred, "--data", data, "--out", pred / "eval", says=r"inside the input .*pred",
                untouched=(data, pred))


def test_bad_evaluate_out_is_a_file(cli, model, data, tmp_path):
    out = _file(tmp_path / "eval")
    cli.refuses("evaluate", "--model", model, "--data", data, "--out", out, says="is a file, not a folder",
                untouched=(data, out, model))


def test_bad_evaluate_out_in_dev_null(cli, model, data):
    cli.refuses("evaluate", "--model", model, "--data", data, "--out", "/dev/null/eval", says="special files",
                untouched=(data, model))


# --- train, pretrain ------------------------------------------------------------------------------

def test_bad_train_out_is_the_data(cli, data, tiny_train_flags):
    """``train --out DATA_DIR`` wrote the model into the data and rewrote its splits.json."""
    cli.refuses("train", data, "--out", data, "--no-plan", *tiny_train_flags, says=r"--out .*data is inside the input",
                untouched=(data,))


def test_bad_train_out_inside_the_data(cli, data, tiny_train_flags):
    cli.refuses("train", data, "--out", data / "model", "--no-plan", *tiny_train_flags, says="inside the input",
                untouched=(data,))


def test_bad_train_out_is_a_file(cli, data, tmp_path, tiny_train_flags):
    out = _file(tmp_path / "model")
    cli.refuses("train", data, "--out", out, "--no-plan", *tiny_train_flags, says="is a file, not a folder",
                untouched=(data, out))


def test_bad_train_out_in_dev_null(cli, data, tiny_train_flags):
    cli.refuses("train", data, "--out", "/dev/null/model", "--no-plan", *tiny_train_flags, says="special files",
                untouched=(data,))


def test_bad_train_user_files_in_out(cli, data, tmp_path, tiny_train_flags):
    """A hand-written config.json in --out (not an earlier run's) would be replaced by the run's."""
    out = tmp_path / "runs"
    config = _file(out / "config.json", json.dumps({"lr": 0.001}))
    cli.refuses("train", data, "--out", out, "--config", config, "--no-plan", *tiny_train_flags,
                says=r"holds config\.json, which training writes", untouched=(data, out))


def test_bad_pretrain_out_is_the_data(cli, data):
    cli.refuses("pretrain", data, "--out", data, "--size", "32", "--epochs", "1", "--device", "cpu",
                says="inside the input", untouched=(data,))


# --- export, plan ---------------------------------------------------------------------------------

def test_bad_export_existing_file(cli, model, tmp_path):
    """``export --out FILE`` replaced an existing file."""
    target = _file(tmp_path / "net.onnx")
    cli.refuses("export", model, "--out", target, says=r"net\.onnx exists already; pass --overwrite",
                untouched=(target, model))
    pytest.importorskip("onnxruntime")
    assert cli("export", model, "--out", target, "--overwrite")[0] == 0
    assert target.read_bytes() != b"a user's file" and (tmp_path / "net.onnx.json").is_file()


def test_bad_export_out_is_a_folder(cli, model, tmp_path):
    cli.refuses("export", model, "--out", tmp_path, says="is a folder, not a regular file", untouched=(tmp_path,))


def test_bad_export_out_below_a_file(cli, model, tmp_path):
    blocker = _file(tmp_path / "notes.txt")
    cli.refuses("export", model, "--out", blocker / "net.onnx", says="which is a file", untouched=(tmp_path,))


def test_bad_plan_existing_file(cli, data, tmp_path):
    """``plan --out FILE`` replaced an existing file."""
    target = _file(tmp_path / "plan.json", "my notes")
    cli.refuses("plan", data, "--out", target, says=r"plan\.json exists already; pass --overwrite",
                untouched=(target, data))
    assert cli("plan", data, "--out", target, "--overwrite", "--device", "cpu")[0] == 0
    assert json.loads(target.read_text())["version"] == PLAN_VERSION


def test_bad_plan_out_below_a_file(cli, data, tmp_path):
    blocker = _file(tmp_path / "notes.txt")
    cli.refuses("plan", data, "--out", blocker / "plan.json", says="which is a file", untouched=(tmp_path,))


# --- synthesize, demo -----------------------------------------------------------------------------

def test_bad_synthesize_out_holds_the_data(cli, data, tmp_path):
    cli.refuses("synthesize", data, "--out", tmp_path, "--n", "1", says=r"the input .*data is inside --out",
                untouched=(tmp_path,))


def test_bad_synthesize_out_below_a_file(cli, data, tmp_path):
    blocker = _file(tmp_path / "notes.txt")
    cli.refuses("synthesize", data, "--out", blocker / "syn", "--n", "1", says="which is a file",
                untouched=(tmp_path,))


def test_bad_demo_out_holds_the_data(cli, data, tmp_path):
    cli.refuses("demo", "--data", data, "--out", tmp_path, "--max-minutes", "0.01", "--device", "cpu",
                says=r"the input .*data is inside --out", untouched=(tmp_path,))


def test_bad_demo_earlier_results(cli, tmp_path):
    out = tmp_path / "demo"
    _file(out / "eval" / "summary.json", "{}")
    cli.refuses("demo", "--out", out, "--max-minutes", "0.01", "--device", "cpu",
                says=r"holds an earlier demo's results.*--overwrite", untouched=(out,))


def test_bad_demo_foreign_phantom_folder(cli, tmp_path):
    out = tmp_path / "demo"
    _file(out / "synthetic-data" / "patient.png", "not a phantom")
    cli.refuses("demo", "--out", out, "--max-minutes", "0.01", "--device", "cpu",
                says="not the phantoms of an earlier demo", untouched=(out,))
