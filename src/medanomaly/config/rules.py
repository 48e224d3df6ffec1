"""One schema for every configuration value: each field of the configuration dataclasses declares
its :class:`Rule` (type, range, choices, whether null is allowed) next to itself with
:func:`setting`, and :func:`check` enforces the rules on construction, so a configuration from a
``--config`` JSON file, from command-line flags or from Python goes through the same test. The CLI
converts and checks its flags with the same rules (:func:`parse`), before any work starts.

Nothing is coerced: ``true`` is not an integer, ``2.5`` is not an integer, ``"2"`` is not a number;
an integer is a number; NaN and infinity are refused where a finite number is meant. Messages name
the key, the value and what is allowed: ``lr must be a number in (0, 10] (got 'fast')``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cache
from itertools import pairwise
from typing import Any

import numpy as np

from medanomaly.core.errors import MedanomalyError

KINDS = ("int", "float", "bool", "str", "section")
_SINGULAR_TO_PLURAL = {"an integer": "integers", "a number": "numbers", "a finite number": "finite numbers"}


class ConfigError(MedanomalyError, ValueError):
    """A configuration value that breaks its rule, or an architecture that cannot be built: a
    ValueError for library callers, one clear message (exit 2) for users."""


@dataclass(frozen=True)
class Rule:
    """What a value may be. Bounds are inclusive (``ge``, ``le``) or exclusive (``gt``, ``lt``)."""

    kind: str  # one of KINDS; "section": an instance of ``section``
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple = ()  # the value is one of these (an option list of medanomaly.config.options)
    pattern: str = ""  # str: the whole value matches this regular expression (strings are never empty)
    nullable: bool = False  # None (JSON null) allowed
    length: int = 0  # > 0: a list (tuple) of exactly this many values, each following the rule
    ordered: bool = False  # a list in non-decreasing order, as (low, high) ranges are
    finite: bool = True  # float: NaN and +-inf refused; False: NaN only (a threshold may be infinite)
    section: type | None = None  # kind "section": the dataclass
    what: str = ""  # the description in messages, where the generated one would not say it well
    hint: str = ""  # appended to the message: what to do instead

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rule kind {self.kind!r} is not one of {KINDS}")


def setting(default: Any, **rule: Any) -> Any:
    """A dataclass field with its rule in ``metadata["rule"]``: ``lr: float = setting(2e-3, gt=0, le=10)``.
    ``kind`` defaults to the type of ``default`` (bool, int, float or str; give it for None or a tuple)."""
    if "kind" not in rule:
        rule["kind"] = {bool: "bool", int: "int", float: "float", str: "str"}[type(default)]
    return field(default=default, metadata={"rule": Rule(**rule)})


@cache
def rules_of(cls: type) -> dict[str, Rule]:
    """Field name -> Rule of a configuration dataclass (fields without a rule left out)."""
    return {f.name: f.metadata["rule"] for f in fields(cls) if "rule" in f.metadata}


def item_rule(rule: Rule) -> Rule:
    """The rule of one element of a list rule (the rule itself for a scalar): what one value of a
    ``nargs`` flag such as ``--patch Z Y X`` must be."""
    return replace(rule, length=0, ordered=False, nullable=False) if rule.length else rule


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


def _in_range(rule: Rule, v: Any) -> bool:
    return ((rule.ge is None or v >= rule.ge) and (rule.gt is None or v > rule.gt)
            and (rule.le is None or v <= rule.le) and (rule.lt is None or v < rule.lt))


def _scalar_ok(rule: Rule, v: Any) -> bool:
    if rule.kind == "bool":
        return isinstance(v, (bool, np.bool_))
    if rule.kind == "section":
        return rule.section is not None and isinstance(v, rule.section)
    if rule.kind == "str":
        return (isinstance(v, str) and v != "" and (not rule.choices or v in rule.choices)
                and (not rule.pattern or re.fullmatch(rule.pattern, v) is not None))
    if not (_is_int(v) if rule.kind == "int" else _is_number(v)):
        return False
    if not _is_int(v) and (math.isnan(v) or (rule.finite and math.isinf(v))):  # ints are finite (and may be huge)
        return False
    return (not rule.choices or v in rule.choices) and _in_range(rule, v)


def valid(rule: Rule, v: Any) -> bool:
    """True when ``v`` follows ``rule``."""
    if v is None:
        return rule.nullable
    if not rule.length:
        return _scalar_ok(rule, v)
    if not isinstance(v, (tuple, list)) or len(v) != rule.length or not all(_scalar_ok(rule, x) for x in v):
        return False
    return not rule.ordered or all(a <= b for a, b in pairwise(v))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _range_text(rule: Rule) -> str:
    lo = f"[{_num(rule.ge)}" if rule.ge is not None else f"({_num(rule.gt)}" if rule.gt is not None else ""
    hi = f"{_num(rule.le)}]" if rule.le is not None else f"{_num(rule.lt)})" if rule.lt is not None else ""
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" {'>=' if rule.ge is not None else '>'} {lo[1:]}"
    return f" {'<=' if rule.le is not None else '<'} {hi[:-1]}" if hi else ""


def _choices_text(choices: tuple) -> str:
    names = [str(c) for c in choices]
    return " or ".join(names) if len(names) <= 2 else "one of " + ", ".join(names)


def _noun(rule: Rule) -> str:
    """'an integer', 'a number' or 'a finite number' (a number without an upper bound: inf is refused)."""
    if rule.kind == "int":
        return "an integer"
    return "a finite number" if rule.finite and rule.le is None and rule.lt is None else "a number"


def _scalar_text(rule: Rule) -> str:
    if rule.choices:
        return _choices_text(rule.choices)
    if rule.kind == "bool":
        return "true or false"
    if rule.kind == "str":
        return "a non-empty string"
    if rule.kind == "section":
        return f"an object of {getattr(rule.section, '__name__', 'settings')} settings"
    return _noun(rule) + _range_text(rule)


def describe(rule: Rule) -> str:
    """What ``rule`` allows, in words: 'an integer in [1, 1024]', 'a number > 0, or null'..."""
    if rule.what:
        text = rule.what
    elif rule.length:
        text = (f"a list of {rule.length} {_SINGULAR_TO_PLURAL[_noun(rule)]}{_range_text(rule)}"
                + (", low <= high" if rule.ordered else ""))
    else:
        text = _scalar_text(rule)
    return text + (", or null" if rule.nullable else "")


def shown(v: Any) -> str:
    """A value as messages quote it: its repr (numpy scalars as Python's), at most 40 characters."""
    if isinstance(v, np.generic):
        v = v.item()
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def problem(name: str, rule: Rule, v: Any) -> str | None:
    """The message for a value that breaks its rule (None when it follows it)."""
    if valid(rule, v):
        return None
    if rule.kind == "str" and rule.choices and isinstance(v, str) and not rule.length:
        leaf = name.rpartition(".")[2]  # 'unknown encoder ...', the wording of every option error
        where = f" ({name})" if leaf != name else ""
        text = f"unknown {leaf} {v!r}{where}; valid: {', '.join(map(str, rule.choices))}"
    else:
        text = f"{name} must be {describe(rule)} (got {shown(v)})"
    return text + (f"; {rule.hint}" if rule.hint else "")


def problems(cls: type, values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The messages for the ``values`` (a possibly partial field -> value mapping) of ``cls`` that
    break their rules; keys are quoted as ``prefix + name`` (``model.width``)."""
    rules = rules_of(cls)
    found = (problem(prefix + k, rules[k], v) for k, v in values.items() if k in rules)
    return [p for p in found if p is not None]


def check(obj: Any, where: str = "") -> None:
    """Raise one ConfigError listing every field of the dataclass ``obj`` that breaks its rule
    (``where``: a prefix such as 'GAN settings'). Called by each configuration's ``__post_init__``."""
    bad = problems(type(obj), {f.name: getattr(obj, f.name) for f in fields(obj)})
    if bad:
        raise ConfigError((f"{where}: " if where else "") + "; ".join(bad))


def parse(rule: Rule, text: str) -> Any:
    """The value of the command-line ``text`` under a scalar ``rule``: converted to int or float
    (Python's own syntax, so '2.5' is no integer and 'nan' is a float), then checked; ConfigError
    'must be ... (got ...)' otherwise (the caller names the flag)."""
    value: Any = text
    try:
        if rule.kind == "int":
            value = int(text)
        elif rule.kind == "float":
            value = float(text)
    except ValueError:  # not a number at all: quoted as the text it is
        pass
    if not valid(rule, value):
        raise ConfigError(f"must be {describe(rule)} (got {shown(value)})" + (f"; {rule.hint}" if rule.hint else ""))
    return value
