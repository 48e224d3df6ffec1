"""medanomaly: find abnormal regions in medical images with U-Net networks.

The Python API (docs/api.md)::

    from medanomaly import train, predict, evaluate, plan, Model

is :mod:`medanomaly.apps.api`, imported on first use (PEP 562) so that ``import medanomaly`` and
``medanomaly --help`` stay fast (torch is not imported until then).

The code is laid out by pipeline stage, one sub-package each (README, "How the code is laid out"):
io -> data -> models -> anomaly / postprocess -> infer -> train -> calibrate -> evaluate -> apps,
with config and core beneath them all.
"""

from __future__ import annotations

import importlib
import sys
import types

from medanomaly.core.errors import MedanomalyError
from medanomaly.core.version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a cost of --help); checkers read it as True
if TYPE_CHECKING:  # for type checkers and editors; at run time the API comes from __getattr__
    from collections.abc import Callable
    from typing import Any

    from medanomaly.apps.api import Model, evaluate, plan, predict, train

__all__ = ["MedanomalyError", "Model", "__version__", "evaluate", "plan", "predict", "train"]

API_MODULE = "medanomaly.apps.api"
API = ("Model", "evaluate", "plan", "predict", "train")
#: API functions named like a pipeline stage: the function wins the package attribute (an _Entry)
STAGES = ("evaluate", "train")


class _Entry:
    """An API function named like a pipeline stage (``medanomaly.train``, ``medanomaly.evaluate``):
    calling it calls the function; any other attribute is the stage package's, so that
    ``import medanomaly.train.loop as m``, ``medanomaly.train.plan`` and ``monkeypatch.setattr(
    "medanomaly.train.loop.X", ...)`` keep reaching the modules."""

    def __init__(self, func: Callable[..., Any], package: str) -> None:
        # as functools.update_wrapper (not imported: 2 ms of `import medanomaly`); signatures follow __wrapped__
        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(self, name, getattr(func, name))
        self.__wrapped__, self._package = func, package

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # dunders and _package itself (before __init__ sets it) are not the stage's
            raise AttributeError(name)
        return getattr(importlib.import_module(self._package), name)

    def __repr__(self) -> str:
        return f"<function medanomaly.{self.__name__} (also the package {self._package})>"


class _Package(types.ModuleType):
    """The ``medanomaly`` module: importing the stage ``medanomaly.train`` would bind the attribute
    ``train`` to that package (the import system's setattr); the API function keeps the name
    instead, and the package stays in sys.modules and reachable through the function's attributes."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in STAGES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    """PEP 562: the API names, imported from :mod:`medanomaly.apps.api` when first asked for."""
    if name not in API:
        raise AttributeError(f"module 'medanomaly' has no attribute {name!r}")
    value = getattr(importlib.import_module(API_MODULE), name)
    if name in STAGES:
        value = _Entry(value, f"{__name__}.{name}")
    globals()[name] = value  # once: later look-ups find it in the module
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))


sys.modules[__name__].__class__ = _Package
