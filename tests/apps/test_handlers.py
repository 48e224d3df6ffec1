"""Tests for medanomaly.apps.handlers, through FastAPI's TestClient on the app that
medanomaly.apps.serve.create_app wires them into: the page and its nonce, the security headers, the
threshold parameter, each route on a hand-made PNG, and every error answered as JSON. (The uploads
of real images and the browser: tests/apps/test_serve.py.)"""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from medanomaly.apps import handlers as H  # noqa: E402
from medanomaly.apps.serve import create_app  # noqa: E402
from medanomaly.apps.uploads import SUPPORTED, ApiError  # noqa: E402
from medanomaly.core.version import __version__  # noqa: E402
from medanomaly.postprocess.ops import PostprocessParams  # noqa: E402

BASE = "http://127.0.0.1"
MAX_MB = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_model_dir):
    return make_model_dir(tmp_path_factory.mktemp("handlers") / "model")


@pytest.fixture
def client(model_dir, tmp_path):
    with TestClient(create_app(model_dir, max_upload_mb=MAX_MB, work_dir=tmp_path), base_url=BASE) as c:
        yield c


def _png(size: int = 40) -> bytes:
    yy, xx = np.mgrid[:size, :size]
    img = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2, 200, 30).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _upload(client, **form):
    return client.post("/api/predict", files={"file": ("scan.png", _png(), "image/png")}, data=form)


def test_threshold_param() -> None:
    assert H.threshold_param(None) is None and H.threshold_param("") is None
    assert H.threshold_param("0.25") == 0.25 and H.threshold_param("-1e-3") == -0.001
    for bad, says in (("abc", "threshold must be a number, got 'abc'"), ("nan", "must be a finite number"),
                      ("inf", "must be a finite number")):
        with pytest.raises(ApiError, match=re.escape(says)) as info:
            H.threshold_param(bad)
        assert info.value.status == 422


def test_page_has_a_fresh_nonce_and_the_upload_limit(client) -> None:
    nonces = []
    for _ in range(2):
        r = client.get("/")
        nonce = r.headers["content-security-policy"].split("'nonce-")[1].split("'")[0]
        assert f'<script nonce="{nonce}">' in r.text and "{{" not in r.text
        assert f'data-max-bytes="{MAX_MB * 2**20}"' in r.text
        nonces.append(nonce)
    assert nonces[0] != nonces[1]


def test_every_answer_carries_the_security_headers(client) -> None:
    for r in (client.get("/"), client.get("/api/info"), client.get("/no/such/route"), client.get("/favicon.ico")):
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert r.headers["referrer-policy"] == "no-referrer" and r.headers["cache-control"] == "no-store"


def test_favicon_is_empty(client) -> None:
    r = client.get("/favicon.ico")
    assert r.status_code == 204 and r.content == b""


def test_info_describes_the_model(client) -> None:
    assert client.get("/api/info").json() == {
        "medanomaly_version": __version__, "task": "supervised", "threshold": 0.5,
        "postprocess": PostprocessParams().to_dict(), "channels": 1, "max_upload_bytes": MAX_MB * 2**20,
        "supported": SUPPORTED}


def test_routes_on_an_upload(client) -> None:
    r = _upload(client, keep="yes")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["kept"] and info["shape"] == [40, 40] and info["mask_name"] == "scan_mask.png"
    sid, viewer = info["session"], client.app.state.viewer
    overlay = client.get(f"/api/slice/{sid}/0", params={"threshold": info["score_min"]})
    assert overlay.headers["content-type"] == "image/png"
    assert np.asarray(PILImage.open(io.BytesIO(overlay.content))).shape == (40, 40, 3)
    regions = client.get(f"/api/regions/{sid}", params={"threshold": ""}).json()  # empty: the model's threshold
    assert regions["threshold"] == 0.5 and regions["total_area_px"] == regions["mask_px"]
    everything = client.get(f"/api/regions/{sid}", params={"threshold": info["score_min"] - 1}).json()
    assert everything["mask_px"] == 40 * 40
    mask = client.get(f"/api/mask/{sid}", params={"threshold": info["score_min"] - 1})
    assert mask.status_code == 200 and mask.headers["content-type"] == "image/png"
    assert 'filename="scan_mask.png"' in mask.headers["content-disposition"]
    assert (np.asarray(PILImage.open(io.BytesIO(mask.content))) == 255).all()
    assert os.listdir(viewer.upload_dir) == []  # the mask's private folder is gone once it is sent
    assert client.delete(f"/api/session/{sid}").json() == {"deleted": True}
    assert client.delete(f"/api/session/{sid}").json() == {"deleted": False}
    assert not _upload(client, keep="no").json()["kept"]


def test_errors_are_json(client) -> None:
    r = client.get("/api/regions/nosuchsession")
    assert r.status_code == 404 and r.json()["error"].startswith("unknown or expired session")
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = client.get("/api/slice/abc/first")
    assert r.status_code == 422 and r.json()["error"].startswith("invalid request: path.k: ")
    sid = _upload(client).json()["session"]
    r = client.get(f"/api/slice/{sid}/0", params={"threshold": "high"})
    assert r.status_code == 422 and r.json() == {"error": "threshold must be a number, got 'high'"}
    assert client.get(f"/api/slice/{sid}/1").status_code == 404  # a 2D image has slice 0 only
    r = client.post("/api/predict", data={"keep": "true"})
    assert r.status_code == 400 and "field 'file'" in r.json()["error"]


def test_a_crash_is_a_500_naming_the_error(model_dir, tmp_path, monkeypatch) -> None:
    app = create_app(model_dir, work_dir=tmp_path)

    def boom(sid, threshold):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.state.viewer, "regions", boom)
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        r = c.get("/api/regions/x")
    assert r.status_code == 500 and r.json() == {"error": "internal error (RuntimeError: boom); see the server's log"}


def test_stopping_the_app_deletes_its_private_folders(model_dir, tmp_path) -> None:
    app = create_app(model_dir, work_dir=tmp_path)
    with TestClient(app, base_url=BASE) as c:
        assert _upload(c, keep="true").json()["kept"] and app.state.viewer.root.is_dir()
    assert not app.state.viewer.root.exists()
