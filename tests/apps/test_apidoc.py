"""docs/api.md is what medanomaly.apps.apidoc generates from the API's docstrings (regenerate with
``python -m medanomaly.apps.apidoc docs/api.md``); the conversions it makes. The example it shows
runs in tests/apps/test_api.py."""

from __future__ import annotations

from pathlib import Path

from medanomaly.apps import api, apidoc

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_the_reference_page_is_current():
    assert DOCS.read_text(encoding="utf-8") == apidoc.render(), \
        "docs/api.md is stale: run 'python -m medanomaly.apps.apidoc docs/api.md'"


def test_every_public_name_and_option_is_documented():
    page = apidoc.render()
    for name in ("train", "plan", "predict", "evaluate", "Model", "Model.predict", "Model.load", "calibrate"):
        assert f"`{name}`" in page
    assert all(f"| `{key}` |" in page for key in api.option_keys())
    assert apidoc.EXAMPLE in page and len(apidoc.EXAMPLE.splitlines()) == 5


def test_markdown_and_signatures():
    assert apidoc.markdown("``x`` and :func:`~medanomaly.apps.api.train` and :mod:`medanomaly.io`") == \
        "`x` and `train` and `medanomaly.io`"

    def f(a: int, b=2, *, c: str = "x", **options) -> None: ...

    assert apidoc.signature("f", f) == "f(a: int, b = 2, *, c: str = 'x', **options) -> None"


def test_main_writes_the_page(tmp_path, capsys):
    assert apidoc.main([str(tmp_path / "api.md")]) == 0
    assert (tmp_path / "api.md").read_text(encoding="utf-8") == apidoc.render()
    assert apidoc.main([]) == 0 and capsys.readouterr().out == apidoc.render()


def test_the_readme_shows_the_tested_example():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert apidoc.EXAMPLE in readme  # the example test_api runs is the one users read
