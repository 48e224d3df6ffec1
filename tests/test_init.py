"""The package's lazy API (PEP 562): ``import medanomaly`` does not import torch; ``from medanomaly
import train, predict, evaluate, plan, Model`` gives the API whatever was imported before, and the
stages named like API functions (medanomaly.train, medanomaly.evaluate) stay reachable as modules."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import medanomaly
from medanomaly.apps import api


def test_import_is_light_and_the_api_comes_on_first_use():
    code = ("import sys, medanomaly; assert 'torch' not in sys.modules, 'torch imported'; "
            "from medanomaly import train, predict, evaluate, plan, Model; "
            "import medanomaly.apps.api as api; "
            "assert train.__wrapped__ is api.train and evaluate.__wrapped__ is api.evaluate; "
            "assert (predict, plan, Model) == (api.predict, api.plan, api.Model); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_api_names_win_over_stage_packages_imported_before():
    import medanomaly.evaluate.score
    import medanomaly.train.run  # binds nothing over the API name
    from medanomaly import Model, evaluate, train

    assert train.__wrapped__ is api.train and evaluate.__wrapped__ is api.evaluate and Model is api.Model
    assert inspect.signature(train) == inspect.signature(api.train) and train.__doc__ == api.train.__doc__
    assert "train" in dir(medanomaly) and "Model" in medanomaly.__all__


def test_the_stages_stay_reachable_as_modules(monkeypatch):
    import medanomaly.train.loop as loop  # noqa: PLR0402  (this form reaches the module through the package)
    from medanomaly.train import plan

    assert loop.__name__ == "medanomaly.train.loop" and medanomaly.train.plan is plan
    assert medanomaly.evaluate.score.__name__ == "medanomaly.evaluate.score"
    monkeypatch.setattr("medanomaly.train.loop.fit", "patched")  # string targets resolve through the package
    assert loop.fit == "patched"


def test_other_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        medanomaly.nothing  # noqa: B018
    with pytest.raises(ImportError):
        from medanomaly import nothing  # noqa: F401
