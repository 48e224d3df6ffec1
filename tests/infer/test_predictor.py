"""Tests for medanomaly.infer.predictor: one Predictor for 2D and 3D models, rebuilt from the model
file, with the network behind a PyTorch or an ONNX Runtime backend; model directories of the
previous release (tests/fixtures/model-v1, made by commit b9f2d7b) predict identically."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medanomaly.anomaly.methods import residual_map
from medanomaly.config.labels import Label
from medanomaly.config.model_file import TrainingSummary, build_model_file, read_model_file, write_model_file
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import AnomalyConfig, PostprocessParams, UNetConfig
from medanomaly.core.atomic import file_sha256
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.slices import normalize, resize
from medanomaly.data.volumes import resample
from medanomaly.infer.backend import TorchBackend
from medanomaly.infer.export import export_onnx
from medanomaly.infer.predictor import Predictor, label_map, probability, score_batch
from medanomaly.infer.sliding import sliding_window
from medanomaly.io import Geometry, Image, read_image
from medanomaly.models.unet import UNet

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "model-v1"
PATCH, SPACING = (8, 16, 16), (2.0, 2.0, 2.0)


def raster(array: np.ndarray) -> Image:
    """An 8-bit raster image (normalised by /255, so slices normalise independently)."""
    geo = Geometry("raster", (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False, meta={"dtype": "uint8"})
    return Image(np.ascontiguousarray(array, dtype=np.float32), geo, Path("x.png"))


def volume(shape: tuple[int, int, int] = (10, 20, 24), seed: int = 0) -> Image:
    """A (1, Z, Y, X) volume at 2 x 1 x 1 mm (resampled to 10 x 10 x 12 voxels at the model's spacing)."""
    a = np.random.default_rng(seed).random((1, *shape)).astype(np.float32) * 900
    geo = Geometry("nifti", (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), True)
    return Image(a, geo, Path("v.nii.gz"))


@pytest.mark.parametrize("name", ["supervised", "anomaly"])
def test_model_directory_of_the_previous_release_predicts_identically(name):
    model_dir = FIXTURES / name
    before = (model_dir / "model.json").read_text()
    assert "schema_version" not in json.loads(before)  # version 1
    p = Predictor(model_dir)
    assert p.model_file.schema_version == 2 and p.model_file == read_model_file(model_dir)  # upgraded in memory
    expected = np.load(FIXTURES / f"{name}_score.npy")  # the old release's Predictor(model_dir).scores
    got = p.scores(read_image(FIXTURES / "input.png"))
    assert got.dtype == np.float32 and got.shape == expected.shape == (24, 24)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert (model_dir / "model.json").read_text() == before


def test_predictor_is_rebuilt_from_the_model_file(tmp_path, make_model_dir):
    model_dir = make_model_dir(tmp_path / "m", size=40, depth=3)
    data = json.loads((model_dir / "model.json").read_text())
    data["postprocess"]["threshold"] = 0.35
    (model_dir / "model.json").write_text(json.dumps(data))
    p = Predictor(model_dir)
    mf = read_model_file(model_dir)
    assert p.model_file == mf and (p.size, p.channels, p.dim, p.tta) == (40, 1, 2, False)
    assert p.post == mf.postprocess and p.post.threshold == 0.35 and p.task == "supervised" and p.anomaly is None
    assert isinstance(p.backend, TorchBackend) and p.precision == "fp32"
    with pytest.raises(MedanomalyError, match="unknown runtime 'tensorrt'"):
        Predictor(model_dir, runtime="tensorrt")


def test_2d_path_is_the_network_on_resized_slices(tmp_path, make_model_dir):
    """The score of an image is sigmoid(network) at the model size, resized back; a non-square image
    is zero-padded to a square first (40 x 50: 5 rows above and below) and cropped back, never
    squashed; a volume is scored slice by slice (batches of batch_size slices) exactly as each slice alone."""
    p = Predictor(make_model_dir(tmp_path / "m"), batch_size=2)
    rng = np.random.default_rng(1)
    image = raster(rng.integers(0, 256, (1, 40, 50)))
    padded = F.pad(torch.from_numpy(image.array / np.float32(255))[None], (0, 0, 5, 5))
    x = resize(padded, (32, 32))
    with torch.no_grad():
        expected = F.interpolate(torch.sigmoid(p.model(x)), size=(50, 50), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(p.scores(image), expected[0, 0, 5:45].numpy(), atol=1e-6, rtol=0)
    vol = raster(rng.integers(0, 256, (1, 5, 40, 50)))
    got = p.scores(vol)
    assert got.shape == (5, 40, 50) and got.dtype == np.float32
    for k in range(5):
        np.testing.assert_allclose(got[k], p.scores(raster(vol.array[:, k])), atol=1e-6, rtol=0)


def test_3d_path_is_sliding_windows_at_the_training_spacing(tmp_path, make_model_dir_3d):
    p = Predictor(make_model_dir_3d(tmp_path, patch=PATCH, spacing=SPACING))
    assert (p.dim, tuple(p.patch), tuple(p.spacing)) == (3, PATCH, SPACING)
    image = volume()
    a = normalize(image.array, "auto", "nifti", None)
    x = resample(a, (10, 10, 12))
    with torch.no_grad():
        prob = torch.sigmoid(sliding_window(x, PATCH, p.model, 0.5, 2))
    expected = resample(prob, (10, 20, 24))[0].numpy()
    got = p.scores(image)
    assert got.shape == (10, 20, 24) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    flat = p.scores(raster(np.random.default_rng(2).integers(0, 256, (1, 20, 24))))  # a 2D image: one slice
    assert flat.shape == (20, 24) and np.isfinite(flat).all()


def test_3d_anomaly_map_is_the_residual_of_the_sliding_window_reconstruction(tmp_path, make_model_dir_3d):
    p = Predictor(make_model_dir_3d(tmp_path, task="anomaly", patch=PATCH, spacing=SPACING))
    image = volume(seed=3)
    x = resample(normalize(image.array, "auto", "nifti", None), (10, 10, 12))
    with torch.no_grad():
        recon = sliding_window(x, PATCH, p.model, 0.5, 2)
    expected = resample(torch.from_numpy(residual_map(x.numpy(), recon.numpy(), p.anomaly))[None], (10, 20, 24))
    np.testing.assert_allclose(p.scores(image), expected[0].numpy(), atol=1e-6, rtol=0)


def test_tta_and_anomaly_maps_are_shared_by_both_paths():
    """score_batch: the probability averaged with the flipped prediction, or one residual map per item."""
    x = torch.rand(2, 1, 4, 6, generator=torch.Generator().manual_seed(0))

    def net(b: torch.Tensor) -> torch.Tensor:  # not flip-equivariant: tta changes the result
        return b.cumsum(-1)

    plain = torch.sigmoid(net(x))
    tta = 0.5 * (plain + torch.sigmoid(net(x.flip(-1))).flip(-1))
    torch.testing.assert_close(probability(net, x, tta=False), plain)
    torch.testing.assert_close(score_batch(x, net, None, tta=True), tta)
    intensity = AnomalyConfig(method="intensity", erode=0, median_size=1)
    maps = score_batch(x, None, intensity, tta=False)
    assert maps.shape == (2, 1, 4, 6)
    for k in range(2):
        np.testing.assert_array_equal(maps[k, 0].numpy(), residual_map(x[k].numpy(), None, intensity))


def test_intensity_method_has_no_network_on_either_runtime(tmp_path, make_model_dir):
    model_dir = make_model_dir(tmp_path / "i", task="anomaly", method="intensity")
    image = raster(np.random.default_rng(4).integers(0, 256, (1, 30, 30)))
    torch_p, onnx_p = Predictor(model_dir), Predictor(model_dir, runtime="onnx")  # no model.onnx needed
    assert torch_p.model is None and torch_p.backend is None and onnx_p.backend is None
    np.testing.assert_array_equal(torch_p.scores(image), onnx_p.scores(image))


def test_torch_and_onnx_backends_agree_in_2d_and_3d(tmp_path, make_model_dir, make_model_dir_3d):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    rng = np.random.default_rng(5)
    cases = [(make_model_dir(tmp_path / "2d"), raster(rng.integers(0, 256, (1, 45, 37)))),
             (make_model_dir_3d(tmp_path / "3d", patch=PATCH, spacing=SPACING), volume(seed=6))]
    for model_dir, image in cases:
        export_onnx(model_dir)
        torch_p, onnx_p = Predictor(model_dir), Predictor(model_dir, runtime="onnx")
        assert onnx_p.precision == "fp32" and onnx_p.dim == torch_p.dim
        np.testing.assert_allclose(onnx_p.scores(image), torch_p.scores(image), atol=1e-4, rtol=0)
        np.testing.assert_array_equal(onnx_p.predict(image).mask, torch_p.predict(image).mask)


def _recorded(model_dir: Path) -> Path:
    """``model_dir`` with the SHA-256 of its model.pt in its model.json, as calibration writes it."""
    write_model_file(replace(read_model_file(model_dir), weights_sha256=file_sha256(model_dir / "model.pt")),
                     model_dir)
    return model_dir


def test_a_model_file_in_memory_runs_as_the_one_on_disk(tmp_path, make_model_dir):
    """Calibration runs the model before its model.json exists: the predictor takes the model file."""
    model_dir = _recorded(make_model_dir(tmp_path / "m"))
    mf = read_model_file(model_dir)
    (model_dir / "model.json").unlink()
    image = raster(np.random.default_rng(3).integers(0, 256, (1, 40, 40)))
    in_memory = Predictor(model_dir, model_file=mf)
    assert in_memory.model_file is mf and not (model_dir / "model.json").exists()
    (model_dir / "model.json").write_text(json.dumps(mf.to_dict()))
    np.testing.assert_array_equal(in_memory.scores(image), Predictor(model_dir).scores(image))


def test_weights_other_than_the_recorded_ones_are_refused(tmp_path, make_model_dir):
    model_dir = _recorded(make_model_dir(tmp_path / "m"))
    Predictor(model_dir)  # the recorded weights load
    state = torch.load(model_dir / "model.pt", weights_only=True)
    state["head.bias"] += 0.01  # still a sound weights file of this network, but not the calibrated one
    torch.save(state, model_dir / "model.pt")
    with pytest.raises(MedanomalyError, match="is not the weights file this model was calibrated with: its SHA-256"):
        Predictor(model_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_or_without_a_recorded_hash(tmp_path, make_model_dir, value):
    model_dir = make_model_dir(tmp_path / "m")  # no hash recorded
    state = torch.load(model_dir / "model.pt", weights_only=True)
    state["head.weight"].view(-1)[0] = value
    torch.save(state, model_dir / "model.pt")
    with pytest.raises(MedanomalyError, match="holds non-finite weights .*1 of its .* tensors, e.g. 'head.weight'"):
        Predictor(model_dir)
    with pytest.raises(MedanomalyError, match="non-finite"):
        Predictor(_recorded(model_dir))  # recorded as they are: still refused


def _with_geometry(model_dir: Path, **record) -> Path:
    """The model directory with a training-geometry record in its model file."""
    data = json.loads((model_dir / "model.json").read_text())
    data["geometry"] = {"orientation": ["L", "P", "S"], "median_spacing": None, "slice_plane": None, **record}
    (model_dir / "model.json").write_text(json.dumps(data))
    return model_dir


def _phantom(tmp_path: Path, name: str, sagittal: bool) -> Path:
    """One phantom (a bright ball in noise, 3 mm axial slices) written as axial slices, or with the
    same voxels in the same places stored as sagittal slices (array axes permuted, affine to match)."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(np.arange(20), np.arange(24), np.arange(6), indexing="ij")
    data = (rng.random((20, 24, 6)) * 50 + 400 * ((x - 9) ** 2 + (y - 12) ** 2 + (3 * z - 8) ** 2 < 40)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    if sagittal:  # stored index (i', j', k') = (y, z, x)
        data, move = data.transpose(1, 2, 0), np.eye(4)[[2, 0, 1, 3]]
        affine = affine @ move
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_sagittal_and_axial_phantom_give_the_same_scores(tmp_path, make_model_dir, caplog):
    """The same phantom stored as axial or as sagittal slices: reoriented, scored on axial slices,
    mapped back to each file's own grid; the maps agree voxel by voxel in the world. Only the
    sagittal one is warned about."""
    p = Predictor(_with_geometry(make_model_dir(tmp_path / "m"), slice_plane="axial"))
    axial, sagittal = read_image(_phantom(tmp_path, "ax", False)), read_image(_phantom(tmp_path, "sag", True))
    with caplog.at_level("WARNING", logger="medanomaly.infer.predictor"):
        s_ax = p.scores(axial)
        assert not caplog.records
        s_sag = p.scores(sagittal)
    assert s_ax.shape == axial.spatial_shape == (6, 24, 20) and s_sag.shape == sagittal.spatial_shape == (20, 6, 24)
    np.testing.assert_allclose(s_sag, s_ax.transpose(2, 0, 1), atol=1e-6, rtol=0)
    assert len(caplog.records) == 1 and "sag.nii.gz: it was acquired in sagittal slices" in caplog.text
    assert "coarse axis" not in caplog.text  # its 3 mm axis is still across the axial slices


def test_spacing_far_from_training_is_warned_once(tmp_path, make_model_dir, caplog):
    p = Predictor(_with_geometry(make_model_dir(tmp_path / "m"), median_spacing=[3.0, 0.4, 0.4]))
    with caplog.at_level("WARNING", logger="medanomaly.infer.predictor"):
        p.scores(read_image(_phantom(tmp_path, "ax", False)))
    assert len(caplog.records) == 1 and "more than 2 times off the training median" in caplog.text


def test_models_without_a_geometry_record_use_volumes_as_stored(tmp_path, make_model_dir):
    """Older model files (trained on volumes as stored) keep their behaviour: no reorientation."""
    p = Predictor(make_model_dir(tmp_path / "m"))
    sagittal = read_image(_phantom(tmp_path, "sag", True))
    got = p.scores(sagittal)
    with torch.inference_mode():  # the stored axis 0 (sagittal) sliced, as before
        flat = p._slice_scores(normalize(sagittal.array, "auto", "nifti"), (3.0, 1.0))  # (Z, Y) mm pixels
    np.testing.assert_allclose(got, flat, atol=1e-6, rtol=0)


def _labels_model_dir(path: Path, posts=None) -> Path:
    """A 2D model of two labels (1=edema, 2=enhancing; size 32, width 4, depth 2) with random weights."""
    cfg = TrainConfig(size=32, model=UNetConfig(width=4, depth=2), precision="fp32", labels="1=edema,2=enhancing")
    mf = build_model_file(cfg, 1, PostprocessParams(), TrainingSummary(), {},
                          label_posts=posts or (PostprocessParams(threshold=0.3), PostprocessParams(threshold=0.3)))
    path.mkdir(parents=True)
    write_model_file(mf, path)
    torch.manual_seed(0)
    torch.save(UNet(mf.model).state_dict(), path / "model.pt")
    return path


def test_label_map_takes_each_labels_mask_and_gives_overlaps_to_the_most_probable():
    scores = np.array([[[0.6, 0.6, 0.1, 0.2]], [[0.1, 0.7, 0.1, 0.45]]], np.float32)  # (K=2, 1, 4)
    posts = (PostprocessParams(threshold=0.5), PostprocessParams(threshold=0.4))
    out = label_map(scores, posts, (Label(1, "a"), Label(4, "b")))
    np.testing.assert_array_equal(out, [[1, 4, 0, 4]])  # pixel 1: both above, label 4 more probable
    assert out.dtype == np.uint8


def test_a_model_of_several_labels_gives_one_probability_map_per_label_and_a_label_map(tmp_path):
    predictor = Predictor(_labels_model_dir(tmp_path / "m"))
    assert predictor.classes == 3 and [lb.value for lb in predictor.labels] == [1, 2]
    image = raster(np.random.default_rng(0).integers(0, 255, (1, 24, 40)))  # not square: padded, then cropped back
    scores = predictor.scores(image)
    assert scores.shape == (2, 24, 40) and scores.dtype == np.float32
    assert scores.min() >= 0 and float(scores.sum(0).max()) <= 1 + 1e-5  # softmax: labels + background = 1
    pred = predictor.predict(image)
    assert pred.labels == predictor.labels and pred.mask.dtype == np.uint8 and pred.mask.shape == (24, 40)
    np.testing.assert_array_equal(pred.mask, label_map(scores, predictor.label_posts, predictor.labels,
                                                       image.array.mean(0)))
    vol = predictor.scores(volume((3, 20, 24)))  # a volume, slice by slice: (K, Z, Y, X)
    assert vol.shape == (2, 3, 20, 24)
