"""Strict JSON: NaN and infinities are written as null and read back as NaN where a float is needed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medanomaly.core import jsonio


def test_non_finite_numbers_become_null_everywhere():
    obj = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": np.float32("nan"), "e": np.int64(3)},
           "f": np.array([0.5, np.nan]), "g": "NaN", "h": True, "i": None}
    text = jsonio.dumps(obj)
    assert jsonio.loads_strict(text) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": None, "e": 3},
                                        "f": [0.5, None], "g": "NaN", "h": True, "i": None}


def test_the_strict_reader_refuses_what_python_writes_by_default():
    with pytest.raises(ValueError, match="strict JSON has no NaN"):
        jsonio.loads_strict(json.dumps({"dice": math.nan}))
    with pytest.raises(ValueError):
        jsonio.loads_strict("[Infinity]")


def test_number_reads_null_back_as_nan():
    assert math.isnan(jsonio.number(None)) and jsonio.number(None, 0.0) == 0.0 and jsonio.number(2) == 2.0


def test_write_json_is_strict_and_atomic(tmp_path):
    jsonio.write_json(tmp_path / "x.json", {"score": float("nan")})
    assert jsonio.loads_strict((tmp_path / "x.json").read_text()) == {"score": None}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
