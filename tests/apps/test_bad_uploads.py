"""Bad requests to ``medanomaly serve``, through FastAPI's TestClient: writes sent by a page of another
origin (403), uploads whose header declares an image too large for the server's memory budget (413,
from the header alone, before a pixel is decoded), and uploads that come while running analyses
hold the budget (503 "busy ... retry in a moment", eight 10000x10000 PNGs at once included). Each
is checked as the bad-input corpus checks commands: the status, a message saying what is wrong and
what to do, and nothing left in the server's upload folder (nor a session made).
"""

from __future__ import annotations

import io
import re
import struct
import threading
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

import medanomaly.apps.viewer as viewer_module  # noqa: E402
from medanomaly.apps.serve import create_app  # noqa: E402

BASE = "http://127.0.0.1"  # the TestClient's Host: 127.0.0.1 (port 80)
BUDGET_MB = 3000  # one 10000x10000 grey PNG (2289 MB to analyse) fits; two do not


@pytest.fixture(scope="module")
def model(tmp_path_factory, make_model_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("bad-uploads") / "model")


@pytest.fixture
def client(model, tmp_path):
    app = create_app(model, max_upload_mb=4, work_dir=tmp_path / "work", max_memory_mb=BUDGET_MB)
    with TestClient(app, base_url=BASE) as c:
        yield c


def png_bytes(h: int = 30, w: int = 40) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (h, w), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """138 kB-style PNG: the header declares width x height grey pixels; one row of data follows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))


def refused(client, response, status: int, says: str) -> str:
    """The bad-input check of a request: status, message, no upload or mask file left, no session."""
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert re.search(says, message), message
    viewer = client.app.state.viewer
    assert list(viewer.upload_dir.iterdir()) == [] and list(viewer.keep_dir.iterdir()) == []
    return message


def upload(client, name: str, data: bytes, headers: dict | None = None, **form):
    return client.post("/api/predict", files={"file": (name, data, "application/octet-stream")}, data=form,
                       headers=headers or {})


# --- cross-origin writes -------------------------------------------------------------------------

def test_bad_origin_upload(client):
    r = upload(client, "scan.png", png_bytes(), {"Origin": "http://evil.example"}, keep="true")
    refused(client, r, 403, r"cross-origin request refused: this POST came from 'http://evil.example', not from "
                            r"this server's own page \(http://127\.0\.0\.1/\)")
    assert not client.app.state.viewer.sessions


def test_bad_referer_upload_without_origin(client):
    r = upload(client, "scan.png", png_bytes(), {"Referer": "http://evil.example:8000/page.html"})
    refused(client, r, 403, r"cross-origin request refused: this POST came from 'http://evil.example:8000/page")


def test_bad_null_origin_upload(client):
    """Sandboxed frames and data: pages send 'Origin: null'."""
    refused(client, upload(client, "scan.png", png_bytes(), {"Origin": "null"}), 403, r"came from 'null'")


def test_bad_other_port_same_host(client):
    """Another program on this machine (another port) is another origin."""
    r = upload(client, "scan.png", png_bytes(), {"Origin": "http://127.0.0.1:8081"})
    refused(client, r, 403, r"came from 'http://127\.0\.0\.1:8081'")


def test_bad_origin_delete(client):
    sid = upload(client, "scan.png", png_bytes()).json()["session"]
    r = client.delete(f"/api/session/{sid}", headers={"Origin": "http://evil.example"})
    refused(client, r, 403, r"this DELETE came from 'http://evil\.example'")
    assert sid in client.app.state.viewer.sessions  # still there


# --- declared sizes over the budget --------------------------------------------------------------

def test_bad_png_declaring_more_than_the_budget(client):
    r = upload(client, "huge.png", png_declaring(20_000, 20_000))
    refused(client, r, 413, r"huge.png declares 1x20000x20000 = 400,000,000 values, about 9,155 MB to analyse, "
                            r"more than this server's memory budget of 3,000 MB; crop or downsample .*--max-memory-mb")


def test_bad_jpeg_declaring_more_than_the_budget(client):
    sof = struct.pack(">BHHB", 8, 40_000, 40_000, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    data = b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"
    refused(client, upload(client, "huge.jpg", data), 413, r"huge.jpg declares 3x40000x40000 = ")


def test_bad_nifti_declaring_more_than_the_budget(client):
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.float32)
    data = header.binaryblock + bytes(4) + bytes(1000)  # the header, the extension flag and a little data
    refused(client, upload(client, "huge.nii", data), 413, r"huge.nii declares 2000x2000x2000 = 8,000,000,000 values")


def test_bad_dicom_declaring_more_than_the_budget(client, shared_data):
    ds = pydicom.dcmread(shared_data("dicom/MR_small.dcm"))
    ds.Rows = ds.Columns = 60_000  # pixel data left as it was: only the header is read
    buf = io.BytesIO()
    ds.save_as(buf)
    refused(client, upload(client, "huge.dcm", buf.getvalue()), 413, r"huge.dcm declares 1x60000x60000x1 = ")


def test_bad_zipped_series_declaring_more_than_the_budget(client, shared_data, make_zip):
    ds = pydicom.dcmread(shared_data("dicom/MR_small.dcm"))
    ds.Rows = ds.Columns = 30_000
    buf = io.BytesIO()
    ds.save_as(buf)
    data = make_zip({f"series/{k}.dcm": buf.getvalue() for k in range(3)})
    refused(client, upload(client, "series.zip", data), 413, r"series.zip declares 3x30000x30000x1 = 2,700,000,000")


# --- a busy server -------------------------------------------------------------------------------

@pytest.fixture
def held_reader(monkeypatch, tmp_path):
    """The viewer's reader made to wait for ``release`` (a real small PNG is read then), so that
    analyses stay under way while other uploads arrive; ``entered`` is set when one is reading."""
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes())
    entered, release = threading.Event(), threading.Event()
    real = viewer_module.read_image

    def read_held(path):
        entered.set()
        assert release.wait(60), "never released"
        return real(small)

    monkeypatch.setattr(viewer_module, "read_image", read_held)
    return entered, release


def test_bad_upload_while_the_budget_is_held(client, held_reader):
    entered, release = held_reader
    first = threading.Thread(target=lambda: upload(client, "first.png", png_declaring(10_000, 10_000)))
    first.start()
    try:
        assert entered.wait(60)
        r = upload(client, "second.png", png_declaring(10_000, 10_000))
        assert r.headers["retry-after"] == "5"
        viewer = client.app.state.viewer
        assert len(list(viewer.upload_dir.iterdir())) == 1  # the first one's, being analysed
        assert r.status_code == 503 and re.search(r"^busy: 1 analyses hold 2,289 MB; retry in a moment \(second.png "
                                                  r"needs about 2,289 MB of this server's 3,000 MB memory budget",
                                                  r.json()["error"]), r.text
    finally:
        release.set()
        first.join(60)
    assert list(client.app.state.viewer.upload_dir.iterdir()) == []


def test_bad_eight_huge_uploads_at_once(client, held_reader):
    """The issue's case: eight PNGs declaring 10000x10000 at once. One is analysed; seven are
    answered 503 while it runs, so the analyses never hold more than the budget (not 8 GB)."""
    entered, release = held_reader
    answers: list = []
    threads = [threading.Thread(target=lambda k=k: answers.append(upload(client, f"{k}.png",
                                                                         png_declaring(10_000, 10_000))))
               for k in range(8)]
    for t in threads:
        t.start()
    try:
        assert entered.wait(60)
        for _ in range(600):  # the seven refusals come while the first analysis is held
            if len(answers) >= 7:
                break
            threading.Event().wait(0.1)
        assert len(answers) == 7 and {a.status_code for a in answers} == {503}, [a.text for a in answers]
        assert all(a.json()["error"].startswith("busy: 1 analyses hold 2,289 MB; retry in a moment")
                   for a in answers)
        assert sum(client.app.state.viewer._running.values()) <= BUDGET_MB * 2**20
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert sorted(a.status_code for a in answers) == [200] + [503] * 7
    assert list(client.app.state.viewer.upload_dir.iterdir()) == [] and not client.app.state.viewer._running
