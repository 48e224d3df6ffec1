"""Several lesion labels (oedema, enhancing tumour, necrosis...): their values and names, as the
``labels`` setting of a training configuration holds them (``"1=edema,2=enhancing"``: value=name
pairs, values 1..255, background 0 implied), as ``dataset.json`` gives them (nnU-Net v2
``{"background": 0, "edema": 1}``, v1/MSD ``{"0": "background", "1": "edema"}``) and as the model
file records them (``labels``: a list of ``{"value", "name", "postprocess"}``).

One label (or none) is the binary task of every earlier release (any mask value > 0 is lesion); two or
more train a softmax network of ``len(labels) + 1`` output channels (channel 0: background, channel
``i + 1``: ``labels[i]``), and predictions are label maps holding the label values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from medanomaly.config.rules import ConfigError
from medanomaly.config.sections import PostprocessParams

#: what the ``labels`` setting (and ``--labels``) must look like: value=name pairs, comma-separated
LABELS_PATTERN = r"\s*[1-9]\d{0,2}\s*=[^=,\x00-\x1f]+(?:,\s*[1-9]\d{0,2}\s*=[^=,\x00-\x1f]+)*"
LABELS_WHAT = "value=name pairs of the labels, e.g. 1=edema,2=enhancing (values 1..255)"
MAX_LABEL = 255  # label maps are written as uint8 (PNG too)


@dataclass(frozen=True)
class Label:
    """One lesion label: its value in the masks and label maps (1..255) and its name."""

    value: int
    name: str


def parse_labels(text: str | None) -> tuple[Label, ...]:
    """The labels of a ``labels`` setting (``"1=edema,2=enhancing"``), in value order; () for None.
    ConfigError for a value out of 1..255, an empty name, or a value or name given twice."""
    if text is None:
        return ()
    found: list[Label] = []
    for part in text.split(","):
        value, sep, name = part.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise ConfigError(f"labels: {part.strip()!r} is no value=name pair; write e.g. 1=edema,2=enhancing")
        found.append(Label(int(value), name.strip()))
    return checked(found, "labels")


def checked(labels: list[Label], where: str) -> tuple[Label, ...]:
    """``labels`` sorted by value; ConfigError (naming ``where``) for a value out of 1..255 or a
    value or name (case-insensitively) given twice."""
    bad = [lb.value for lb in labels if not 1 <= lb.value <= MAX_LABEL]
    if bad:
        raise ConfigError(f"{where}: label value {bad[0]} is not in 1..{MAX_LABEL} (0 is the background)")
    for key, what in ((lambda lb: lb.value, "value"), (lambda lb: lb.name.casefold(), "name")):
        keys = [key(lb) for lb in labels]
        twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if twice:
            raise ConfigError(f"{where}: label {what} {twice[0]!r} is given twice; each label needs its own")
    return tuple(sorted(labels, key=lambda lb: lb.value))


def labels_text(labels: tuple[Label, ...]) -> str | None:
    """The ``labels`` setting of ``labels`` (None for none): ``"1=edema,2=enhancing"``."""
    return ",".join(f"{lb.value}={lb.name}" for lb in labels) or None


def several(text: str | None) -> bool:
    """The setting names two or more labels: the multi-label task (one or none: binary)."""
    return len(parse_labels(text)) >= 2


def network_classes(text: str | None) -> int:
    """Output channels of a supervised network: 1 logit (binary), else background + each label."""
    labels = parse_labels(text)
    return len(labels) + 1 if len(labels) >= 2 else 1


def from_dataset_json(labels: Any, path: str) -> tuple[Label, ...]:
    """The lesion labels of a ``dataset.json`` ``labels`` entry, background (0) left out: nnU-Net v2
    ``{"background": 0, "edema": 1}`` or v1/MSD ``{"0": "background", "1": "edema"}``. ConfigError
    for anything else (nnU-Net's region-based labels, ``"tumor": [1, 2]``, included)."""
    if not isinstance(labels, dict):
        raise ConfigError(f"{path}: 'labels' must map names to values, e.g. {{\"background\": 0, \"edema\": 1}}")
    found: list[Label] = []
    for key, item in labels.items():
        if isinstance(item, int) and not isinstance(item, bool):  # v2: name -> value
            value, name = item, str(key)
        elif isinstance(key, str) and key.strip().isdigit() and isinstance(item, str):  # v1: "value" -> name
            value, name = int(key), item
        else:
            raise ConfigError(f"{path}: label {key!r}: {item!r} is not a name and an integer value (region-based "
                              "labels such as \"tumor\": [1, 2] are not supported); give each label its own value, "
                              "or pass --labels 1=NAME,2=NAME")
        if value != 0:
            found.append(Label(value, name))
    return checked(found, path)


def file_part(label: Label) -> str:
    """The label's name as a part of a file name (``STEM_score_<part>``): letters, digits, ``.``,
    ``_`` and ``-`` kept, anything else ``-``; the value where nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label.name).strip("-.") or str(label.value)


def labels_record(labels: tuple[Label, ...], posts: list[PostprocessParams]) -> list[dict[str, Any]]:
    """The model file's ``labels`` list: value, name and the post-processing chosen on val per label."""
    return [{"value": lb.value, "name": lb.name, "postprocess": p.to_dict()} for lb, p in zip(labels, posts)]


def read_labels_record(record: Any) -> tuple[tuple[Label, ...], tuple[PostprocessParams, ...]]:
    """(labels, their post-processing) of a model file's ``labels`` list; ValueError when it is not
    one (two labels at least, each with value, name and postprocess)."""
    if not isinstance(record, list) or len(record) < 2 or not all(
            isinstance(r, dict) and set(r) == {"value", "name", "postprocess"} and isinstance(r["name"], str)
            and isinstance(r["value"], int) and not isinstance(r["value"], bool) for r in record):
        raise ValueError(f"labels is {str(record)[:80]}; expected a list of two or more "
                         "{'value', 'name', 'postprocess'} objects")
    labels = checked([Label(r["value"], r["name"]) for r in record], "labels")
    if [lb.value for lb in labels] != [r["value"] for r in record]:
        raise ValueError("labels are not in value order")
    return labels, tuple(PostprocessParams.from_dict(r["postprocess"]) for r in record)
