"""The state behind ``medanomaly serve`` (medanomaly.apps.viewer), without HTTP: an upload checked,
stored privately, scored and described; the least-recently-used session cache; the per-session
cache of masks by threshold; slices, region lists and mask files; the private folders' lifetime.
The model is a tiny random U-Net (tests/conftest.py ``make_model_dir``): its scores vary over the
image, and the checks compare with ``score > threshold`` computed here. Also: the memory budget
(sessions dropped to make room, MemoryError as 503) and the removal, at start-up, of the private
folders that killed runs left behind."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from medanomaly.apps.uploads import ROOT_PREFIX, ApiError
from medanomaly.apps.viewer import (
    BYTES_PER_VALUE,
    MAX_MASKS_PER_SESSION,
    Viewer,
    _display_name,
    _file_stem,
    _threshold_key,
    available_memory,
    memory_budget,
)
from medanomaly.core.errors import MedanomalyError


def _png(h: int = 30, w: int = 40, seed: int = 0) -> io.BytesIO:
    """An 8-bit grey PNG of h x w random pixels, as an uploaded file object."""
    buf = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)).save(buf, "PNG")
    buf.seek(0)
    return buf


@pytest.fixture(scope="module")
def model(tmp_path_factory, make_model_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("viewer") / "model")


@pytest.fixture
def viewer(model, tmp_path):
    v = Viewer(model, max_upload_mb=1, max_sessions=2, work_dir=tmp_path / "work")
    yield v
    v.close()


@pytest.fixture(scope="module")
def session(model, tmp_path_factory):
    """One analysed 30x40 upload in a module-wide viewer (for the read-only checks)."""
    v = Viewer(model, max_upload_mb=1, work_dir=tmp_path_factory.mktemp("work"))
    sid = v.analyse(_png(), "scan.png")["session"]
    yield v, v.get(sid)
    v.close()


def test_analyse_describes_the_upload_and_keeps_nothing(viewer) -> None:
    info = viewer.analyse(_png(), "C:\\Users\\me/scans/scan one.png")
    assert info["name"] == "scan one.png" and info["mask_name"] == "scan_one_mask.png"  # base name; a safe file stem
    assert info["shape"] == [30, 40] and info["n_slices"] == 1 and not info["is_volume"] and info["channels"] == 1
    assert info["task"] == "supervised" and info["threshold"] == 0.5 and info["default_slice"] == 0
    assert 0.0 <= info["score_min"] <= info["score_max"] <= 1.0  # probabilities
    assert not info["kept"] and list(viewer.upload_dir.iterdir()) == []
    s = viewer.get(info["session"])
    assert s.heat_range == (0.0, 1.0) and s.score.shape == (30, 40) and s.kept is None


def test_sessions_are_a_least_recently_used_cache(viewer) -> None:
    a, b = (viewer.analyse(_png(seed=k), f"{k}.png")["session"] for k in range(2))
    viewer.get(a)  # a is now the most recently used
    c = viewer.analyse(_png(seed=2), "2.png")["session"]
    assert list(viewer.sessions) == [a, c]  # max_sessions=2: b, the least recently used, is dropped
    with pytest.raises(ApiError, match="keeps the last 2 uploads") as exc:
        viewer.get(b)
    assert exc.value.status == 404
    assert viewer.drop(a) and not viewer.drop(a) and list(viewer.sessions) == [c]


def test_masks_are_cached_per_threshold(session) -> None:
    v, s = session
    s.masks.clear()
    m = v.mask_at(s, 0.5)
    np.testing.assert_array_equal(m, s.score > 0.5)  # default post-processing: the threshold alone
    assert v.mask_at(s, 0.5 + 1e-9) is m and v.mask_at(s, None) is m  # same key at 6 significant digits
    for t in (0.1, 0.2, 0.3, 0.4, 0.6, 0.7):
        v.mask_at(s, t)
    assert MAX_MASKS_PER_SESSION == 6 and list(s.masks) == [0.1, 0.2, 0.3, 0.4, 0.6, 0.7]  # 0.5, least recent, went
    with pytest.raises(ApiError, match="finite number") as exc:
        v.mask_at(s, float("nan"))
    assert exc.value.status == 422


@settings(max_examples=20, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1))
def test_a_higher_threshold_never_grows_the_mask(session, t1: float, t2: float) -> None:
    v, s = session
    lo, hi = v.mask_at(s, min(t1, t2)), v.mask_at(s, max(t1, t2))
    assert not (hi & ~lo).any()


def test_slice_regions_and_mask_file(session) -> None:
    v, s = session
    t = float(np.median(s.score))
    rgb = np.asarray(PILImage.open(io.BytesIO(v.slice_png(s.sid, 0, t))))
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    with pytest.raises(ApiError, match=r"slice 1 does not exist; the image has 1 slice\(s\), 0..0") as exc:
        v.slice_png(s.sid, 1, t)
    assert exc.value.status == 404
    regions = v.regions(s.sid, t)
    mask = s.score > _threshold_key(t)
    assert regions["mask_px"] == regions["total_area_px"] == int(mask.sum()) > 0
    assert regions["n_regions"] == len(regions["regions"]) >= 1 and regions["unit"] is None  # a PNG has no spacing
    path, name, work = v.mask_file(s.sid, t)
    assert name == "scan_mask.png" and path.parent == work and work.parent == v.upload_dir
    np.testing.assert_array_equal(np.asarray(PILImage.open(path)) > 0, mask)


def test_bad_uploads_are_api_errors_without_private_paths(viewer) -> None:
    with pytest.raises(ApiError, match=r"empty.png is empty \(0 bytes\)"):
        viewer.analyse(io.BytesIO(b""), "empty.png")
    with pytest.raises(ApiError, match="unsupported file type '.txt'"):
        viewer.analyse(io.BytesIO(b"hello"), "notes.txt")
    with pytest.raises(ApiError) as exc:
        viewer.analyse(io.BytesIO(_png().getvalue()[:300]), "cut.png")  # the reader's error, about a private file
    assert exc.value.status == 422 and "cannot read cut.png" in exc.value.message
    assert str(viewer.root) not in exc.value.message and "upload-" not in exc.value.message
    assert list(viewer.upload_dir.iterdir()) == [] and not viewer.sessions


def test_kept_upload_lives_until_close(viewer) -> None:
    info = viewer.analyse(_png(), "scan.png", keep=True)
    kept = viewer.keep_dir / info["session"]
    assert info["kept"] and (kept / "upload.png").is_file() and list(viewer.upload_dir.iterdir()) == []
    viewer.close()
    assert not viewer.root.exists() and not viewer.sessions


def test_upload_limit_must_be_positive(model) -> None:
    with pytest.raises(MedanomalyError, match="--max-upload-mb must be positive, got 0"):
        Viewer(model, max_upload_mb=0)


def test_names_and_threshold_keys() -> None:
    assert _display_name("a/b\\c.png") == "c.png" and _display_name(None) == "upload"
    assert _display_name("\x00\x07 ") == "upload" and _display_name("tab\there.png") == "tabhere.png"
    long = "x" * 200 + ".png"
    assert _display_name(long) == "x" * 60 + "..." + "x" * 53 + ".png" and len(_display_name(long)) == 120
    assert _file_stem("my scan (1).nii.gz") == "my_scan_1" and _file_stem("...") == "upload"
    assert _threshold_key(0.123456789) == 0.123457 and _threshold_key(2) == 2.0


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=300)))
def test_display_names_are_short_printable_base_names(filename: str | None) -> None:
    name = _display_name(filename)
    assert 0 < len(name) <= 120 and name.isprintable() and "/" not in name and "\\" not in name



# --- memory ---------------------------------------------------------------------------------------

def test_memory_budget_default_and_flag(model) -> None:
    assert abs(memory_budget(None) - available_memory() // 2) < 512 * 2**20  # (memory moves a little meanwhile)
    assert memory_budget(1.5) == int(1.5 * 2**20)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(MedanomalyError, match="--max-memory-mb must be a positive number of MB"):
            memory_budget(bad)
    with pytest.raises(MedanomalyError, match="--max-memory-mb"):
        Viewer(model, max_memory_mb=0)


def test_old_sessions_make_room_for_a_new_analysis(model, tmp_path) -> None:
    """A 30x40 grey upload needs 1200 x BYTES_PER_VALUE bytes to analyse; a stored session holds its
    image, score and mask cache. With room for one analysis beside one session, the third upload
    drops the least recently used session (max_sessions alone would keep all three)."""
    per_session = 1200 * 4 + 1200 * 4 + MAX_MASKS_PER_SESSION * 1200
    budget = 1200 * BYTES_PER_VALUE + per_session + 100
    v = Viewer(model, max_upload_mb=1, max_sessions=8, work_dir=tmp_path / "work", max_memory_mb=budget / 2**20)
    try:
        a, b = (v.analyse(_png(seed=k), f"{k}.png")["session"] for k in range(2))
        assert list(v.sessions) == [a, b]  # the second analysis fits beside the first session
        c = v.analyse(_png(seed=2), "2.png")["session"]
        assert list(v.sessions) == [b, c] and not v._running
    finally:
        v.close()


def test_memory_error_is_503_and_frees_its_reservation(viewer, monkeypatch) -> None:
    def no_memory(image):
        raise MemoryError("Unable to allocate 8.00 GiB for an array")

    monkeypatch.setattr(viewer.predictor, "scores", no_memory)
    with pytest.raises(ApiError, match="not enough memory to analyse scan.png now; retry in a moment") as exc:
        viewer.analyse(_png(), "scan.png")
    assert exc.value.status == 503 and exc.value.headers["Retry-After"]
    assert "GiB" not in exc.value.message and not viewer._running and list(viewer.upload_dir.iterdir()) == []


# --- folders of earlier runs ------------------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="stale folders are found with flock and pids (POSIX)")
def test_start_up_removes_what_killed_runs_left_with_a_log_line(model, tmp_path, caplog) -> None:
    work = tmp_path / "work"
    live = Viewer(model, max_upload_mb=1, work_dir=work)  # a run still going: left alone
    stale = work / f"{ROOT_PREFIX}99999999-x1y2"  # a pid that cannot exist: its run is gone
    (stale / "kept" / "sid").mkdir(parents=True)
    (stale / "kept" / "sid" / "upload.nii.gz").write_bytes(b"a kept patient volume")
    with caplog.at_level(logging.INFO, logger="medanomaly.apps.serve"):
        v = Viewer(model, max_upload_mb=1, work_dir=work)
    try:
        assert not stale.exists() and live.root.exists() and v.root.exists()
        assert "removed 1 folder(s) that earlier serve runs left behind" in caplog.text and str(stale) in caplog.text
    finally:
        v.close()
        live.close()
    assert sorted(work.iterdir()) == []
