"""Tests for medanomaly.evaluate.report: the self-contained HTML report and gallery selection."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medanomaly.evaluate.report import SYNTHETIC_BANNER, GalleryItem, select_gallery, write_report


def _item(case: str, seed: int, with_truth: bool = True) -> GalleryItem:
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 1.0, (1, 48, 64))
    yy, xx = np.mgrid[:48, :64]
    truth = (yy - 24) ** 2 + (xx - 30) ** 2 < 100
    score = np.exp(-((yy - 25) ** 2 + (xx - 33) ** 2) / 150.0)
    pred = score > 0.5
    return GalleryItem(case, image, score, pred, truth if with_truth else None, 0.8 if with_truth else None)


def _full_inputs() -> dict:
    fpr = np.linspace(0, 1, 30)
    return dict(
        summary={"dice": 0.812345, "iou": 0.7, "auroc": float("nan"), "n_cases": 3, "specificity": None,
                 "baseline": {"dice": 0.5, "iou": 0.4, "auroc": 0.6}},
        cases=[{"case": "case_001", "dice": 0.9, "n_lesions": 2, "note": "ok"},
               {"case": "case_002", "dice": float("nan"), "n_lesions": 0, "note": "<b>empty</b>"},
               {"case": "case_003", "dice": 0.1, "n_lesions": 1, "note": ""}],
        history=[{"epoch": str(e), "train_loss": str(1 / (e + 1)), "val_loss": f"{1.2 / (e + 1)}",
                  "val_dice": str(e / 10), "lr": "0.001"} for e in range(6)],
        gallery={"best": [_item("case_001", 0)], "median": [_item("case_002", 1, with_truth=False)],
                 "worst": [_item("case_003", 2)]},
        curves={"roc": {"fpr": fpr.tolist(), "tpr": np.sqrt(fpr).tolist()},
                "pr": {"recall": fpr.tolist(), "precision": (1 - 0.5 * fpr).tolist()},
                "operating_point": {"fpr": 0.2, "tpr": 0.45, "precision": 0.8, "recall": 0.45}},
        notes=["threshold 0.45 chosen on validation split"],
    )


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("rep") / "nested"
    path = write_report(out, title="Demo run", synthetic=True, **_full_inputs())
    assert path == out / "report.html" and path.exists()
    assert [p.name for p in out.iterdir()] == ["report.html"]  # no temp file left
    return path.read_text(encoding="utf-8")


def test_report_has_all_sections(full_report: str) -> None:
    text = full_report
    assert text.count("data:image/png;base64,") >= 5  # curves, training, 3 gallery rows
    for case in ("case_001", "case_002", "case_003"):
        assert case in text
    assert SYNTHETIC_BANNER in text and "Demo run" in text
    assert "0.812" in text and "n/a" in text and "Model vs baseline" in text
    assert "threshold 0.45 chosen on validation split" in text
    assert "<b>empty</b>" not in text and "&lt;b&gt;empty&lt;/b&gt;" in text  # escaped
    assert 'class="bar"' in text and "table.sortable" in text and "<script>" in text


def test_report_is_offline(full_report: str) -> None:
    assert "http://" not in full_report and "https://" not in full_report
    assert not re.search(r"""(src|href)=["'](?!data:)""", full_report)
    assert "@import" not in full_report and "url(" not in full_report


def test_embedded_pngs_decode(full_report: str) -> None:
    from io import BytesIO

    from PIL import Image

    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', full_report)
    assert len(uris) >= 5
    for uri in uris:
        img = Image.open(BytesIO(base64.b64decode(uri)))
        assert img.format == "PNG" and max(img.size) <= 1000
        assert "Software" not in img.info


def test_report_without_synthetic_and_empty_inputs(tmp_path: Path) -> None:
    path = write_report(tmp_path, summary={}, cases=[])
    text = path.read_text(encoding="utf-8")
    assert "SYNTHETIC" not in text and "medanomaly report" in text
    assert "data:image/png;base64," not in text
    assert "http://" not in text and "https://" not in text
    path = write_report(tmp_path, summary={"dice": float("nan")}, cases=[], history=[], gallery={"best": []},
                        curves={"roc": {"fpr": [], "tpr": []}}, notes=[])
    assert "n/a" in path.read_text(encoding="utf-8")


def test_report_does_not_modify_inputs(tmp_path: Path) -> None:
    inputs = _full_inputs()
    item = inputs["gallery"]["best"][0]
    image, cases = item.image.copy(), [dict(c) for c in inputs["cases"]]
    write_report(tmp_path, **inputs)
    np.testing.assert_array_equal(item.image, image)
    assert inputs["cases"][0] == cases[0] and "baseline" in inputs["summary"]


def test_select_gallery() -> None:
    scores = [(f"c{i}", s) for i, s in enumerate([0.9, 0.1, float("nan"), 0.5, 0.7, 0.3, 0.6, 0.2, 0.8, 0.4])]
    sel = select_gallery(scores, k=3)
    assert sel["best"] == ["c0", "c8", "c4"]
    assert sel["worst"] == ["c1", "c7", "c5"]
    assert sel["median"] == ["c9", "c3", "c6"]
    small = select_gallery([("a", 0.2), ("b", 0.9), ("c", 0.5), ("d", 0.6)], k=3)
    assert small == {"best": ["b", "d"], "median": ["c"], "worst": ["a"]}
    flat = sum(small.values(), [])
    assert len(flat) == len(set(flat))
    assert select_gallery([], k=3) == {"best": [], "median": [], "worst": []}
    assert select_gallery([("x", float("nan")), ("y", 0.5)], k=2) == {"best": ["y"], "median": [], "worst": []}


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="headless chromium not installed")
def test_render_with_chromium(tmp_path: Path) -> None:
    path = write_report(tmp_path, synthetic=True, **_full_inputs())
    shot = tmp_path / "shot.png"
    cmd = [shutil.which("chromium") or "/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu",
           f"--screenshot={shot}", "--window-size=1200,2000", path.as_uri()]
    subprocess.run(cmd, check=True, timeout=60, capture_output=True)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_per_label_table(tmp_path: Path) -> None:
    labels = [{"label": "edema", "value": 1, "dice": 0.75, "auroc": float("nan")},
              {"label": "<i>enh</i>", "value": 2, "dice": 0.5, "auroc": 0.9},
              {"label": "mean over labels", "value": "", "dice": 0.625, "auroc": 0.9}]
    page = write_report(tmp_path, {"dice": 0.7}, [], labels=labels).read_text()
    table = page[page.index("<h2>Per label</h2>"):page.index("<h2>Per-case results</h2>")]
    assert "edema" in table and "&lt;i&gt;enh&lt;/i&gt;" in table and "<i>" not in table  # names escaped
    assert "0.625" in table and "n/a" in table and table.index("edema") < table.index("mean over labels")
    assert "Per label" not in write_report(tmp_path, {"dice": 0.7}, []).read_text()  # binary: no such table
