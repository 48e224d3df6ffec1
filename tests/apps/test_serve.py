"""The web viewer (``medanomaly serve``): its API through FastAPI's TestClient, then the page end to
end in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium).

The model is a tiny random U-Net (its scores still vary over the image, which is all the viewer
needs); the images are a real LGG FLAIR slice and a real DICOM series from ``shared/data``. The
functions behind the endpoints have their own tests: tests/apps/test_uploads.py (type checks, zip
extraction) and tests/apps/test_viewer.py (sessions, masks, outputs).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
import nibabel as nib  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from medanomaly.anomaly.methods import AnomalyConfig  # noqa: E402
from medanomaly.apps.cli import build_parser, main  # noqa: E402
from medanomaly.apps.serve import bind, create_app, is_loopback, make_server  # noqa: E402
from medanomaly.config.model_file import TrainingSummary, build_model_file, write_model_file  # noqa: E402
from medanomaly.config.schema import TrainConfig  # noqa: E402
from medanomaly.models.unet import UNet, UNetConfig  # noqa: E402
from medanomaly.postprocess.ops import PostprocessParams  # noqa: E402

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
LGG_SLICE_NAME = "lgg-flair/TCGA_CS_4944_20010208/TCGA_CS_4944_20010208_10_flair.png"
LGG_SLICE = DATA / LGG_SLICE_NAME
DICOM_SERIES = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MAX_MB = 4
BASE = "http://127.0.0.1"


def make_model_dir(path: Path, size: int = 32, seed: int = 0) -> Path:
    """A model directory as train writes it (as tests/test_export.py makes one), random weights."""
    cfg = TrainConfig(size=size, model=UNetConfig(width=4, depth=2), task="supervised", precision="fp32",
                      anomaly=AnomalyConfig())
    model_file = build_model_file(cfg, 1, PostprocessParams(threshold=0.5), TrainingSummary(), {})
    path.mkdir(parents=True, exist_ok=True)
    write_model_file(model_file, path)
    torch.manual_seed(seed)
    torch.save(UNet(model_file.model).state_dict(), path / "model.pt")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    app = create_app(model_dir, max_upload_mb=MAX_MB, work_dir=tmp_path_factory.mktemp("serve-work"))
    with TestClient(app, base_url=BASE) as c:
        yield c


def upload(client, name: str, data: bytes, **form) -> dict:
    return client.post("/api/predict", files={"file": (name, data, "application/octet-stream")}, data=form)


def uploads_left(client) -> list[str]:
    return os.listdir(client.app.state.viewer.upload_dir)


def png_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png(content: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(content)))


# ------------------------------------------------------------------------------------------- API


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element in ("file", "upload", "overlay", "threshold", "slice", "regions", "download", "error"):
        assert f'id="{element}"' in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in r.text and "{{" not in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN: works offline
    info = client.get("/api/info").json()
    assert info["task"] == "supervised" and info["threshold"] == 0.5 and info["max_upload_bytes"] == MAX_MB * 2**20


@pytest.mark.shared_data(LGG_SLICE_NAME)
def test_lgg_slice_overlay_regions_and_mask(client):
    r = upload(client, "slice.png", LGG_SLICE.read_bytes())
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["shape"] == [256, 256] and info["n_slices"] == 1 and not info["is_volume"]
    assert info["threshold"] == 0.5 and info["score_min"] < info["score_max"] and info["mask_name"] == "slice_mask.png"
    assert uploads_left(client) == []  # nothing uploaded is kept after the response
    sid = info["session"]

    overlay = client.get(f"/api/slice/{sid}/0")
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    assert png(overlay.content).shape == (256, 256, 3)

    lo_t = info["score_min"] + 0.3 * (info["score_max"] - info["score_min"])
    hi_t = info["score_min"] + 0.7 * (info["score_max"] - info["score_min"])
    low, high = (client.get(f"/api/regions/{sid}", params={"threshold": t}).json() for t in (lo_t, hi_t))
    assert low["mask_px"] > high["mask_px"] > 0
    assert low["total_area_px"] == low["mask_px"] and low["n_regions"] == len(low["regions"]) >= 1
    assert {"area_px", "centroid", "bbox", "max_score", "mean_score"} <= set(low["regions"][0])
    assert client.get(f"/api/slice/{sid}/0", params={"threshold": lo_t}).content != \
        client.get(f"/api/slice/{sid}/0", params={"threshold": hi_t}).content

    mask = client.get(f"/api/mask/{sid}", params={"threshold": lo_t})
    assert mask.status_code == 200 and 'filename="slice_mask.png"' in mask.headers["content-disposition"]
    m = png(mask.content)
    assert m.shape == (256, 256) and set(np.unique(m)) <= {0, 255}
    assert int((m == 255).sum()) == low["mask_px"]
    assert uploads_left(client) == []  # the mask file is deleted once sent


def test_upload_too_large_is_413(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(MAX_MB * 2**20 + 100_000)
    r = upload(client, "big.png", big)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    # without Content-Length (chunked): the body is counted as it arrives
    boundary = "medanomalytestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(MAX_MB + 2):
            yield bytes(2**20)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/api/predict", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert uploads_left(client) == []


def test_unsupported_type_is_415(client):
    r = upload(client, "notes.txt", b"hello")
    assert r.status_code == 415 and "unsupported file type '.txt'" in r.json()["error"]
    r = upload(client, "archive.gz", b"\x1f\x8b\x08\x00" + bytes(20))
    assert r.status_code == 415


def test_wrong_or_broken_content_is_422(client, tmp_path):
    r = upload(client, "scan.png", b"this is a text file, not an image\n" * 20)
    assert r.status_code == 422 and "is not a PNG file" in r.json()["error"]
    r = upload(client, "scan.png", png_bytes()[:300])  # a truncated PNG: read_image's error
    err = r.json()["error"]
    assert r.status_code == 422 and "cannot read scan.png" in err and "upload-" not in err  # no server paths
    r = upload(client, "empty.png", b"")
    assert r.status_code == 422 and "empty" in r.json()["error"]
    r = client.post("/api/predict", data={"keep": "true"})
    assert r.status_code == 400 and "field 'file'" in r.json()["error"]
    assert uploads_left(client) == []


def test_zip_with_unsafe_members_is_rejected(client, tmp_path, make_zip):
    for bad in ("../evil", "series/../../evil", "/etc/evil", "C:/evil"):
        r = upload(client, "series.zip", make_zip({"series/a.dcm": b"x", bad: b"owned"}))
        assert r.status_code == 422 and "unsafe entry" in r.json()["error"], bad
    root = client.app.state.viewer.root
    assert not list(root.parent.glob("evil")) and not list(root.glob("**/evil"))
    r = upload(client, "bomb.zip", make_zip({"series/a.dcm": bytes(4 * MAX_MB * 2**20 + 1)}))  # declared size over the cap
    assert r.status_code == 422 and "uncompressed" in r.json()["error"]
    r = upload(client, "notes.zip", make_zip({"readme.txt": b"no images"}))
    assert r.status_code == 422 and "no DICOM series" in r.json()["error"]
    assert uploads_left(client) == []


@pytest.mark.shared_data("dicom-series/mr-gre-fieldmap-axial")
def test_zipped_dicom_series_is_a_volume(client, tmp_path, make_zip):
    data = make_zip({f"fieldmap/{p.name}": p.read_bytes() for p in sorted(DICOM_SERIES.iterdir())})
    r = upload(client, "fieldmap.zip", data)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["is_volume"] and info["n_slices"] == 36 and info["shape"] == [36, 64, 64] and info["kind"] == "dicom"
    sid, k = info["session"], info["n_slices"] - 1
    assert png(client.get(f"/api/slice/{sid}/{k}").content).shape == (64, 64, 3)
    assert client.get(f"/api/slice/{sid}/36").status_code == 404
    regions = client.get(f"/api/regions/{sid}", params={"threshold": info["score_min"]}).json()
    assert regions["unit"] == "mm³" and regions["regions"][0]["area_mm"] > 0
    mask = client.get(f"/api/mask/{sid}")
    assert mask.status_code == 200 and 'filename="fieldmap_mask.nii.gz"' in mask.headers["content-disposition"]
    out = tmp_path / "m.nii.gz"
    out.write_bytes(mask.content)
    assert nib.load(out).shape == (64, 64, 36)
    assert uploads_left(client) == []


def test_nifti_volume_and_keep(model_dir, tmp_path):
    vol = np.random.default_rng(0).uniform(0, 100, (24, 20, 3)).astype(np.float32)  # x, y, z
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.9, 0.9, 3.0, 1.0])), path)
    app = create_app(model_dir, max_upload_mb=1, max_sessions=1, work_dir=tmp_path / "work")
    viewer = app.state.viewer
    with TestClient(app, base_url=BASE) as c:
        first = upload(c, "vol.nii.gz", path.read_bytes(), keep="true").json()
        assert first["n_slices"] == 3 and first["shape"] == [3, 20, 24] and first["kept"]
        assert (viewer.keep_dir / first["session"] / "upload.nii.gz").is_file()  # kept on request
        assert c.get(f"/api/mask/{first['session']}").headers["content-disposition"].endswith('vol_mask.nii.gz"')
        second = upload(c, "vol.nii", nib.Nifti1Image(vol, np.eye(4)).to_bytes()).json()
        assert not second["kept"] and len(os.listdir(viewer.keep_dir)) == 1
        assert c.get(f"/api/regions/{first['session']}").status_code == 404  # LRU cap of 1: evicted
        assert c.get(f"/api/regions/{second['session']}").status_code == 200
        assert c.delete(f"/api/session/{second['session']}").json() == {"deleted": True}
    assert not viewer.root.exists()  # kept uploads are deleted at shutdown


def test_only_loopback_host_names_are_answered(client):
    assert client.get("/", headers={"host": "attacker.example"}).status_code == 400
    assert client.get("/", headers={"host": "localhost:8000"}).status_code == 200


def test_writes_from_the_server_s_own_page_pass(client):
    """The page's own requests (Origin, or only a Referer, naming this server) and clients that send
    neither (curl, scripts, this TestClient elsewhere) work; reads are not checked. Requests from other
    origins are refused 403: tests/apps/test_bad_uploads.py."""
    for headers in ({"Origin": BASE}, {"Origin": BASE + ":80"}, {"Referer": BASE + "/"}, {}):
        r = client.post("/api/predict", files={"file": ("s.png", png_bytes(), "image/png")}, headers=headers)
        assert r.status_code == 200, (headers, r.text)
        assert client.delete(f"/api/session/{r.json()['session']}", headers=headers).json() == {"deleted": True}
    assert client.get("/api/info", headers={"Origin": "http://evil.example"}).status_code == 200
    r = client.post("/api/predict", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.headers["x-content-type-options"] == "nosniff"  # the security headers too


def test_is_loopback():  # the upload type checks are in tests/apps/test_uploads.py
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_cli_serve_arguments(model_dir, capsys):
    args = build_parser().parse_args(["serve", str(model_dir), "--port", "0", "--max-upload-mb", "5"])
    assert (args.command, args.host, args.port, args.max_upload_mb) == ("serve", "127.0.0.1", 0, 5.0)
    sock = bind("127.0.0.1", 0)  # a port in use: one clear error, exit code 2
    try:
        assert main(["-q", "serve", str(model_dir), "--port", str(sock.getsockname()[1]), "--device", "cpu"]) == 2
    finally:
        sock.close()
    assert "choose another --port" in capsys.readouterr().err


def test_cli_serve_memory_budget(model_dir, capsys):
    parse = build_parser().parse_args
    assert parse(["serve", str(model_dir)]).max_memory_mb is None  # default: half the available memory
    assert parse(["serve", str(model_dir), "--max-memory-mb", "512"]).max_memory_mb == 512.0
    assert main(["-q", "serve", str(model_dir), "--port", "0", "--max-memory-mb", "0", "--device", "cpu"]) == 2
    assert "--max-memory-mb" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- browser

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1280,900")

OVERLAY_STATS = """
const img = document.getElementById('overlay');
const c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
const g = c.getContext('2d');
g.drawImage(img, 0, 0);
const d = g.getImageData(0, 0, c.width, c.height).data;
let red = 0, sum = 0;
for (let i = 0; i < d.length; i += 4) {
  if (d[i] === 255 && d[i + 1] === 60 && d[i + 2] === 60) red++;
  sum = (sum * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) % 1000000007;
}
return {width: c.width, height: c.height, red: red, hash: sum};
"""


@contextlib.contextmanager
def serving(app):
    """``app`` served by uvicorn on a free port of 127.0.0.1: yields its URL."""
    sock = bind("127.0.0.1", 0)
    server = make_server(app, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def live_server(model_dir, tmp_path):
    app = create_app(model_dir, max_upload_mb=MAX_MB, work_dir=tmp_path / "work")
    with serving(app) as url:
        yield url, app


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines on stderr
        pass


@pytest.fixture
def page_elsewhere(tmp_path):
    """A web page of another origin (another port of this machine), as a hostile site would be."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "index.html").write_text("<!doctype html><title>elsewhere</title><p>hello</p>")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(tmp_path / "elsewhere")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium chromium-driver (scripts/setup.sh does it in CI)")
    if not CHROMEDRIVER.exists():
        pytest.skip(f"{CHROMEDRIVER} is absent: apt-get install chromium-driver (scripts/setup.sh does it in CI)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, condition: str, what: str, timeout: float = 30.0):
    """Wait until the JavaScript expression ``condition`` is truthy; fail with the page's error text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return ({condition});")
        if value:
            return value
        time.sleep(0.05)
    error = driver.execute_script("return document.getElementById('error').textContent;")
    pytest.fail(f"timed out waiting for {what}; page error: {error!r}")


OVERLAY_READY = ("(() => { const i = document.getElementById('overlay'); return i.complete && i.naturalWidth > 0 "
                 "&& i.dataset.loaded === i.getAttribute('src'); })()")


@pytest.mark.shared_data(LGG_SLICE_NAME)
def test_browser_upload_overlay_and_threshold_slider(live_server, browser, tmp_path):
    url, app = live_server
    path = LGG_SLICE
    browser.get(url)
    _wait(browser, "document.getElementById('model').textContent.includes('supervised')", "the model information")
    browser.find_element("id", "file").send_keys(str(path))
    browser.find_element("id", "upload").click()
    _wait(browser, OVERLAY_READY, "the overlay")
    _wait(browser, "document.getElementById('regions').dataset.threshold", "the region list")
    assert browser.find_element("id", "slice-row").is_displayed() is False  # a 2D image has no slice slider
    assert browser.find_element("id", "error").is_displayed() is False

    def at(fraction: float) -> tuple[dict, str, int, str]:
        """Move the threshold slider as a user would; the overlay, regions and link at that threshold."""
        before = browser.find_element("id", "overlay").get_attribute("src")
        lo, hi = (float(browser.find_element("id", "threshold").get_attribute(a))
                  for a in ("data-score-min", "data-score-max"))
        browser.execute_script("const s = document.getElementById('threshold'); s.value = arguments[0];"
                               "s.dispatchEvent(new Event('input', {bubbles: true}));", lo + fraction * (hi - lo))
        t = float(browser.execute_script("return document.getElementById('threshold').value"))
        src = _wait(browser, f"(() => {{ const s = document.getElementById('overlay').src; "
                             f"return s !== {json.dumps(before)} ? s : ''; }})()", "the overlay to follow the slider")
        _wait(browser, OVERLAY_READY, "the new overlay to load")
        _wait(browser, f"Math.abs(Number(document.getElementById('regions').dataset.threshold) - {t}) < 1e-5",
              "the region list at the new threshold")
        stats = browser.execute_script(OVERLAY_STATS)
        total = int(browser.find_element("id", "regions").get_attribute("data-total"))
        return stats, src, total, browser.find_element("id", "download").get_attribute("href")

    low, high = at(0.3), at(0.7)
    assert low[0]["width"] == low[0]["height"] == 256
    assert low[1] != high[1] and low[3] != high[3]  # image and download link follow the slider
    assert low[0]["hash"] != high[0]["hash"], (low, high)  # the displayed overlay changed
    assert low[0]["red"] > 0 and high[0]["red"] > 0  # the mask contour is drawn
    assert low[2] > high[2] > 0  # a lower threshold gives a larger mask
    rows = browser.execute_script("return document.querySelectorAll('#regions tbody tr').length")
    assert rows >= 1
    browser.save_screenshot(str(tmp_path / "viewer.png"))
    if os.environ.get("MEDANOMALY_SCREENSHOT"):  # for a person to look at
        shutil.copy(tmp_path / "viewer.png", os.environ["MEDANOMALY_SCREENSHOT"])
    assert os.listdir(app.state.viewer.upload_dir) == []


POST_FROM_PAGE = """
const done = arguments[arguments.length - 1];
const form = new FormData();
form.append("file", new Blob([new Uint8Array(arguments[0])], {type: "image/png"}), "scan.png");
form.append("keep", "true");
fetch(arguments[1] + "api/predict", {method: "POST", mode: "no-cors", body: form})
  .then(() => done("sent"), (e) => done("not sent: " + e));
"""


def test_browser_page_elsewhere_cannot_upload_but_the_viewer_can(model_dir, tmp_path, browser, page_elsewhere):
    """A page of another origin posts an upload (a no-cors 'simple' request: no preflight, the
    browser sends it): the server refuses it, 403, by its Origin. The viewer's own page, whose
    fetch sends its own Origin, still uploads."""
    app = create_app(model_dir, max_upload_mb=MAX_MB, work_dir=tmp_path / "work")
    seen: list[tuple[str, str | None, int]] = []

    async def record(request, call_next):  # added last: outermost, sees the refused requests too
        response = await call_next(request)
        seen.append((request.method, request.headers.get("origin"), response.status_code))
        return response

    app.middleware("http")(record)
    with serving(app) as url:
        browser.get(page_elsewhere)
        assert browser.execute_async_script(POST_FROM_PAGE, list(png_bytes()), url) == "sent"  # (opaque answer)
        assert ("POST", page_elsewhere.rstrip("/"), 403) in seen, seen
        assert not app.state.viewer.sessions and os.listdir(app.state.viewer.keep_dir) == []
        (tmp_path / "scan.png").write_bytes(png_bytes())
        browser.get(url)
        _wait(browser, "document.getElementById('model').textContent.includes('supervised')", "the model information")
        browser.find_element("id", "file").send_keys(str(tmp_path / "scan.png"))
        browser.find_element("id", "upload").click()
        _wait(browser, OVERLAY_READY, "the overlay")
        assert ("POST", url.rstrip("/"), 200) in seen, seen  # the page's own fetch names its origin
        assert len(app.state.viewer.sessions) == 1
