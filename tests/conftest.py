"""Shared test settings: one thread per test process, the real-data root and its skip marker, and
the builders that several test modules need (fixtures, since importlib mode lets no test module
import another)."""

from __future__ import annotations

import builtins
import functools
import hashlib
import io
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image as PILImage
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medanomaly.apps.cli import main
from medanomaly.apps.demo import make_phantoms
from medanomaly.config.model_file import TrainingSummary, build_model_file, write_model_file
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import AnomalyConfig, PostprocessParams, UNetConfig
from medanomaly.models.unet import UNet

# The real images live beside the project (../shared/data), never inside it; MEDANOMALY_SHARED_DATA
# points elsewhere. The resolved root is written back to the environment, because under importlib
# mode a test module cannot import conftest: modules read it with
# ``Path(os.environ["MEDANOMALY_SHARED_DATA"])`` for their module-level paths.
_BESIDE = (Path(__file__).resolve().parents[1].parent / "shared" / "data").resolve()
SHARED_DATA = Path(os.environ.get("MEDANOMALY_SHARED_DATA") or _BESIDE).resolve()
os.environ["MEDANOMALY_SHARED_DATA"] = str(SHARED_DATA)
_SHOWN = "../shared/data" if SHARED_DATA == _BESIDE else str(SHARED_DATA)


def _missing(sub: str) -> str:
    """The skip reason for a sub-path of the shared data root that is absent."""
    return f"{_SHOWN}/{sub}".rstrip("/") + " not found: the real images live beside the project, see its README"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shared_data(*subpaths): skip unless every ../shared/data/<subpath> exists")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``@pytest.mark.shared_data("lgg-flair", ...)`` (on the test, its class or
    the module's ``pytestmark``) whose data is absent; they are skipped before any fixture is set up."""
    for item in items:
        for mark in item.iter_markers("shared_data"):
            absent = [sub for sub in mark.args or ("",) if not (SHARED_DATA / sub).exists()]
            if absent:
                item.add_marker(pytest.mark.skip(reason=_missing(absent[0])))
                break


@pytest.fixture(scope="session")
def shared_data():
    """``shared_data("lgg-flair") -> Path`` under the real-data root; skips the test when it is absent."""
    def get(sub: str = "") -> Path:
        path = SHARED_DATA / sub
        if not path.exists():
            pytest.skip(_missing(sub))
        return path
    return get


# --- real LGG slices and the in-process CLI, for the bad-input tests of io/ and data/ ----------------

LGG_PATIENTS = ("TCGA_CS_4941_19960909", "TCGA_CS_4943_20000902", "TCGA_CS_4944_20010208")
TINY_TRAIN = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "2", "--device", "cpu"]


@functools.lru_cache(maxsize=None)
def _lgg_slices(patient: str, lesion: bool) -> tuple[tuple[Path, Path], ...]:
    """(flair, mask) pairs of a real LGG patient, with or without tumour, in file-name order."""
    out = []
    for m in sorted((SHARED_DATA / "lgg-flair" / patient).glob("*_mask.png")):
        if bool(np.asarray(PILImage.open(m)).any()) == lesion:
            out.append((m.with_name(m.name.replace("_mask.png", "_flair.png")), m))
    return tuple(out)


class Lgg:
    """Three real LGG patients of ../shared/data/lgg-flair and copies of their slices."""

    patients = LGG_PATIENTS

    @staticmethod
    def slices(patient: str, lesion: bool) -> tuple[tuple[Path, Path], ...]:
        return _lgg_slices(patient, lesion)

    @property
    def flair(self) -> Path:
        """The first FLAIR slice with tumour of the first patient (a 256x256 8-bit PNG)."""
        return _lgg_slices(LGG_PATIENTS[0], True)[0][0]

    @staticmethod
    def train_set(d: Path, per: int = 1, lesion: bool = True) -> dict[str, list[tuple[Path, Path]]]:
        """Real LGG pairs copied to d/<patient>/ (``per`` middle slices each); splits.json: 2 patients
        train, 1 val. Returns patient -> the copied (image, mask) pairs."""
        copies = {}
        for p in LGG_PATIENTS:
            (d / p).mkdir(parents=True)
            pairs = _lgg_slices(p, lesion)
            picked = pairs[len(pairs) // 2: len(pairs) // 2 + per]
            copies[p] = [(Path(shutil.copy(img, d / p / img.name)), Path(shutil.copy(m, d / p / m.name)))
                         for img, m in picked]
        (d / "splits.json").write_text(json.dumps({"train": list(LGG_PATIENTS[:2]), "val": list(LGG_PATIENTS[2:]),
                                                   "test": []}))
        return copies


@pytest.fixture(scope="session")
def real_lgg() -> Lgg:
    """Real LGG slices: ``real_lgg.slices(patient, lesion)``, ``.flair``, ``.train_set(folder)``."""
    return Lgg()


@pytest.fixture(scope="session")
def tiny_train_flags() -> list[str]:
    """``medanomaly train`` flags for a seconds-long CPU run of a 32x32, width-4, depth-2 U-Net."""
    return list(TINY_TRAIN)


@pytest.fixture(scope="session")
def tiny_lgg_model(tmp_path_factory) -> Path:
    """A tiny U-Net trained for one epoch on 6 real LGG slices of 3 patients (seconds on a CPU)."""
    data = tmp_path_factory.mktemp("tiny data")
    for p in LGG_PATIENTS:
        (data / p).mkdir()
        pairs = _lgg_slices(p, True)
        for img, m in pairs[len(pairs) // 2: len(pairs) // 2 + 2]:
            shutil.copy(img, data / p / img.name)
            shutil.copy(m, data / p / m.name)
    (data / "splits.json").write_text(json.dumps({"train": list(LGG_PATIENTS[:1]), "val": list(LGG_PATIENTS[1:2]),
                                                  "test": list(LGG_PATIENTS[2:])}))
    model = tmp_path_factory.mktemp("tiny model") / "model"
    assert main(["-q", "train", str(data), "--out", str(model), *TINY_TRAIN]) == 0
    return model


@pytest.fixture
def deny_read(monkeypatch: pytest.MonkeyPatch):
    """``deny_read(path)``: open() of that path raises PermissionError inside medanomaly.io, as for a
    chmod 000 file read by a normal user (root reads those, so a real chmod would test nothing here)."""
    def deny(target: Path) -> None:
        def fake_open(file, *args, **kwargs):
            if Path(file) == target:
                raise PermissionError(13, "Permission denied", str(file))
            return builtins.open(file, *args, **kwargs)

        for name, module in list(sys.modules.items()):  # medanomaly.io and its modules: open() is called in several
            if name == "medanomaly.io" or name.startswith("medanomaly.io."):
                monkeypatch.setattr(module, "open", fake_open, raising=False)
    return deny


class Cli:
    """``medanomaly -q ARGV`` run in-process, what its stderr says and what it left in a folder."""

    def __init__(self, capsys: pytest.CaptureFixture) -> None:
        self._capsys = capsys

    def __call__(self, *argv) -> tuple[int, str]:
        """(exit code, stderr) of ``medanomaly -q ARGV``."""
        rc = main(["-q", *map(str, argv)])
        return rc, self._capsys.readouterr().err

    @staticmethod
    def flat(text: str) -> tuple[str, str]:
        """stderr with the CLI's line wrapping undone, both ways (broken at a space or a hyphen)."""
        return text.replace("\n  ", " "), text.replace("\n  ", "")

    @classmethod
    def names(cls, err: str, path: Path) -> bool:
        return any(str(path) in t for t in cls.flat(err))

    @classmethod
    def says(cls, err: str, pattern: str) -> bool:
        return any(re.search(pattern, t, re.S) for t in cls.flat(err))

    @staticmethod
    def tmp_files(folder: Path) -> list[Path]:
        """The atomic writers' leftovers (``.tmp-*``) under a folder."""
        return [p for p in folder.rglob("*") if p.name.startswith(".tmp-")] if folder.exists() else []

    @staticmethod
    def outputs_of(out: Path, stem: str) -> list[Path]:
        return [p for p in out.rglob(f"{stem}_*")] if out.exists() else []

    @staticmethod
    def digest(*roots: Path) -> dict[str, str]:
        """Every file and folder below ``roots`` (or the file itself), with a SHA-256 of each file's
        bytes: equal before and after a command means it changed, created and deleted nothing there."""
        out: dict[str, str] = {}
        for root in map(Path, roots):
            for p in ([root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        return out

    def refuses(self, *argv, says: str, untouched: tuple[Path, ...] = ()) -> str:
        """Run ``medanomaly -q ARGV`` and check a clean refusal: exit 2, no traceback, stderr matching
        ``says`` (a regex), and no file changed, created or deleted below any path of ``untouched``
        (the inputs, the --out folder, its parent...). Returns stderr."""
        before = self.digest(*untouched)
        rc, err = self(*argv)
        assert rc == 2, f"exit {rc}, expected 2: {err}"
        assert "Traceback" not in err, err
        assert self.says(err, says), f"{says!r} not in: {err}"
        assert self.digest(*untouched) == before, f"files changed below {untouched}"
        return err


@pytest.fixture
def cli(capsys) -> Cli:
    """``rc, err = cli("train", folder, ...)``; ``cli.names(err, path)``, ``cli.says(err, regex)``."""
    return Cli(capsys)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a busy 2-core machine: one intra-op thread avoids costly oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """medanomaly's demo phantoms, 5 cases x 4 slices of 48x48: 12 training slices (3 steps of 4),
    4 val, 4 test."""
    return make_phantoms(tmp_path_factory.mktemp("phantoms"), n_cases=5, slices=4, size=48)


def _labelled_phantoms(root: Path, n_cases: int = 4, rgb: bool = False) -> Path:
    """Tiny 32x32 image/mask pairs (a bright 8x8 lesion) in case folders, with a 2/1/1 splits.json."""
    rng = np.random.default_rng(0)
    for c in range(n_cases):
        d = root / f"case{c}"
        d.mkdir(parents=True)
        for k in range(3):
            img = (rng.random((32, 32) + ((3,) if rgb else ())) * 100).astype(np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            mask[8:16, 8:16] = 255
            img[8:16, 8:16] = 220
            PILImage.fromarray(img).save(d / f"case{c}_{k}.png")
            PILImage.fromarray(mask).save(d / f"case{c}_{k}_mask.png")
    (root / "splits.json").write_text(json.dumps({"train": ["case0", "case1"], "val": ["case2"], "test": ["case3"]}))
    return root


@pytest.fixture
def labelled_phantoms():
    """The builder of tiny labelled phantoms: ``labelled_phantoms(root, n_cases=4, rgb=False) -> root``."""
    return _labelled_phantoms


def _multilabel_phantoms(root: Path, n_cases: int = 4, dataset_json: bool = True) -> Path:
    """Tiny 32x32 image/mask pairs with two lesion labels in case folders (3 slices each, 2/1/1
    splits.json): label 1 a bright 8x8 square (220) top left, label 2 a dimmer one (120) bottom right;
    masks hold the values 1 and 2 (PNG). ``dataset_json``: root/dataset.json names them (nnU-Net v2
    ``labels``: background 0, edema 1, enhancing 2)."""
    rng = np.random.default_rng(0)
    for c in range(n_cases):
        d = root / f"case{c}"
        d.mkdir(parents=True)
        for k in range(3):
            img = (rng.random((32, 32)) * 60).astype(np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            y, x = 4 + (c + k) % 3, 4 + k
            img[y:y + 8, x:x + 8], mask[y:y + 8, x:x + 8] = 220, 1
            img[18:26, 18 - k:26 - k], mask[18:26, 18 - k:26 - k] = 120, 2
            PILImage.fromarray(img).save(d / f"case{c}_{k}.png")
            PILImage.fromarray(mask).save(d / f"case{c}_{k}_mask.png")
    (root / "splits.json").write_text(json.dumps({"train": ["case0", "case1"], "val": ["case2"], "test": ["case3"]}))
    if dataset_json:
        (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "edema": 1, "enhancing": 2}}))
    return root


@pytest.fixture
def multilabel_phantoms():
    """The builder of tiny two-label phantoms: ``multilabel_phantoms(root, n_cases=4, dataset_json=True) -> root``."""
    return _multilabel_phantoms


def _make_model_dir(path: Path, task: str = "supervised", method: str = "denoise", size: int = 32,
                   in_channels: int = 1, depth: int = 2, seed: int = 0, norm: str = "batch") -> Path:
    """A model directory as train writes it, with random weights (BatchNorm statistics included,
    so eval-mode export is tested) and precision fp32 (the torch reference runs in fp32)."""
    cfg = TrainConfig(size=size, model=UNetConfig(width=4, depth=depth, norm=norm), task=task, precision="fp32",
                      anomaly=AnomalyConfig(method=method))
    model_file = build_model_file(cfg, in_channels, PostprocessParams(), TrainingSummary(), {})
    path.mkdir(parents=True, exist_ok=True)
    write_model_file(model_file, path)
    if method != "intensity":
        torch.manual_seed(seed)
        net = UNet(model_file.model)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        torch.save(net.state_dict(), path / "model.pt")
    return path


@pytest.fixture(scope="session")
def make_model_dir():
    """The builder of model directories with random weights: ``make_model_dir(path, task=..., ...) -> path``."""
    return _make_model_dir


def _make_model_dir_3d(path: Path, task: str = "supervised", method: str = "denoise",
                       patch: tuple[int, int, int] = (8, 16, 16),
                       spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)) -> Path:
    """A 3D model directory as train writes it (width 4, depth 2, instance norm; ``patch`` in voxels,
    ``spacing`` in mm), random weights (seed 0), fp32."""
    cfg = TrainConfig(size=32, model=UNetConfig(dim=3, width=4, depth=2, norm="instance"), task=task,
                      precision="fp32", patch=patch, spacing=spacing, anomaly=AnomalyConfig(method=method))
    mf = build_model_file(cfg, 1, PostprocessParams(), TrainingSummary(), {})
    write_model_file(mf, path)
    torch.manual_seed(0)
    torch.save(UNet(mf.model).state_dict(), path / "model.pt")
    return path


@pytest.fixture(scope="session")
def make_model_dir_3d():
    """The builder of 3D model directories with random weights: ``make_model_dir_3d(path, task=..., patch=...,
    spacing=...) -> path``."""
    return _make_model_dir_3d


def _make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="session")
def make_zip():
    """The bytes of a zip archive of ``{member name: bytes}`` (uploads of a zipped DICOM series)."""
    return _make_zip


def _disk_image(rng: np.random.Generator, shape: tuple[int, int] = (64, 64),
                radius: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(image, disk): a bright disk of ``radius`` px (0.9) in the middle of a dark image, plus
    uniform noise in [0, 0.2); ``disk`` is its bool mask (the body a foreground should find)."""
    yy, xx = np.indices(shape)
    disk = (yy - shape[0] // 2) ** 2 + (xx - shape[1] // 2) ** 2 <= radius**2
    img = np.where(disk, 0.9, 0.0) + rng.uniform(0, 0.2, shape)
    return img, disk


@pytest.fixture(scope="session")
def disk_image():
    """The builder of a noisy bright disk: ``disk_image(rng, shape=(64, 64), radius=20) -> (image, disk)``."""
    return _disk_image


# --- small DICOM files and series written with pydicom: tests/io/test_dicom*.py --------------------

def _dicom_slice(path: Path, pixels: np.ndarray, z: float, series: str, slope: float = 1.0, intercept: float = 0.0,
                 **attributes) -> Path:
    """An axial MR slice (uint16 ``pixels``, 0.5 x 0.5 mm, at x = -10, y = 5 mm) at height ``z`` mm of the
    series ``series`` (a UID), in a file with preamble; ``attributes`` are set last (e.g.
    PhotometricInterpretation="MONOCHROME1")."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID, series
    ds.Modality, ds.Rows, ds.Columns = "MR", pixels.shape[0], pixels.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing, ds.ImageOrientationPatient = [0.5, 0.5], [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, 5.0, z]
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _dicom_series(folder: Path, zs: tuple[float, ...] = (4.0, 0.0, 2.0)) -> list[np.ndarray]:
    """Slices of 3 x 4 pixels at heights ``zs`` (mm) in files 000.dcm, 001.dcm... named in that
    (shuffled) order; returns their pixels (10 z + column index)."""
    folder.mkdir(parents=True, exist_ok=True)
    uid, pixels = generate_uid(), []
    for k, z in enumerate(zs):
        pixels.append(np.full((3, 4), 10 * z, np.uint16) + np.arange(4, dtype=np.uint16))
        _dicom_slice(folder / f"{k:03d}.dcm", pixels[-1], z, uid)
    return pixels


@pytest.fixture(scope="session")
def dicom_slice():
    """``dicom_slice(path, pixels, z, series_uid, slope=1, intercept=0, **attributes) -> path``."""
    return _dicom_slice


@pytest.fixture(scope="session")
def dicom_series():
    """``dicom_series(folder, zs=(4.0, 0.0, 2.0)) -> the pixels of each slice``, in file order."""
    return _dicom_series
