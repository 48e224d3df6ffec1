"""Strict JSON: every JSON file medanomaly writes (summary.json, model.json, config.json, plan.json,
splits, regions.json, sidecars, serve's answers) goes through :func:`dumps`, which writes a number
that is not finite (NaN, +-Infinity: an undefined Dice, a diverged loss) as ``null``. Python's
``json`` would write the bare tokens ``NaN``/``Infinity``, which strict readers (JavaScript's
``JSON.parse``, jq, most JSON libraries) reject. Readers of our own files turn ``null`` back into
NaN where they need a float (:func:`number`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medanomaly.core.atomic import atomic_write_text


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every float that is not finite replaced by None, recursively through dicts,
    lists and tuples (tuples become lists, as JSON has them); numpy scalars and arrays become
    Python numbers and lists (``.item()``/``.tolist()``: duck-typed, so numpy is not imported)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if not isinstance(obj, (str, int, bool, type(None))):
        if hasattr(obj, "tolist") and getattr(obj, "ndim", 0) > 0:  # a numpy array
            return finite_or_none(obj.tolist())
        if hasattr(obj, "item"):  # a numpy or torch scalar
            return finite_or_none(obj.item())
    return obj


def dumps(obj: Any, indent: int | None = 1, **kwargs: Any) -> str:
    """Strict JSON text of ``obj``: non-finite floats as null (``allow_nan=False`` then proves that
    none is left). ``kwargs`` go to :func:`json.dumps` (e.g. ``sort_keys``)."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as strict JSON to ``path``, atomically (:mod:`medanomaly.core.atomic`)."""
    atomic_write_text(Path(path), dumps(obj, indent=indent))


def _refuse(token: str) -> float:
    raise ValueError(f"{token} is not JSON (strict JSON has no NaN or Infinity; write null)")


def loads_strict(text: str) -> Any:
    """Parse ``text`` as strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` are refused
    (ValueError), as a strict reader would refuse them."""
    return json.loads(text, parse_constant=_refuse)


def number(value: Any, default: float = math.nan) -> float:
    """A float read back from one of our JSON files: ``null`` (a NaN or infinity when written) is
    ``default`` (NaN unless told), any other value ``float(value)``."""
    return default if value is None else float(value)
