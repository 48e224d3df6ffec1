"""Evaluation: predictions against truth, per case and overall, written as cases.csv and
summary.json (and report.html).

Conventions (also in the README): a case is a patient/volume (the slices of a case are pooled);
Dice of a case with empty truth and empty prediction is 1, with empty truth and any predicted
pixel 0. Sensitivity of a case without lesion is undefined (NaN) and left out of means.
Pixel AUROC/AUPRC pool every pixel of every evaluated image. Lesions are connected components
of each image (each 2D slice, or each volume); a predicted component that overlaps a true one is
a hit. Thresholds and post-processing come from the model directory (chosen on validation). Several
labels (a multi-label model, --labels, dataset.json): also per label, :mod:`medanomaly.evaluate.labels`.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medanomaly.anomaly.methods import AnomalyConfig, image_score
from medanomaly.calibrate.search import fit_intensity_baseline
from medanomaly.core import jsonio
from medanomaly.core.atomic import atomic_write_text
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.progress import track
from medanomaly.data.discover import Sample, discover, load_splits, read_sample
from medanomaly.data.listing import data_root, is_listing, listing_splits
from medanomaly.evaluate.labels import (
    LABELS_NOTE,
    Labels,
    LabelTally,
    evaluation_labels,
    label_table,
    model_labels,
    read_label_map,
    split_scores,
)
from medanomaly.evaluate.match import check_missing, find_predictions
from medanomaly.evaluate.report import GalleryItem, select_gallery, write_report
from medanomaly.infer.overlay import best_slice
from medanomaly.infer.predictor import Predictor
from medanomaly.infer.volume import iter_volumes, slice_predictions
from medanomaly.infer.write import (
    check_output_dir,
    check_outputs,
    output_stems,
    score_file,
    write_prediction,
)
from medanomaly.io import read_image, read_mask
from medanomaly.metrics import functional as M

log = logging.getLogger(__name__)
#: what evaluate writes into --out (besides predictions/ with --model), and the intensity baseline's model files
EVALUATE_FILES = ("cases.csv", "summary.json", "report.html")
BASELINE_FILES = tuple(f"baseline-model/{name}" for name in ("model.json", "config.json", "splits.json"))
#: summary.json's "split" when evaluate --model scores data that holds none of the model's cases
EXTERNAL_SPLIT = "all (data not in the model's split)"
CASE_FIELDS = ["case", "n_images", "dice", "iou", "sensitivity", "specificity", "precision", "tp", "fp", "fn",
               "tn", "n_true_lesions", "n_pred_lesions"]


@dataclass
class Accumulator:
    """Running totals over the evaluated images; one image at a time (scores kept for AUROC)."""

    per_case: dict[str, M.Stats] = field(default_factory=dict)
    lesions_case: dict[str, dict] = field(default_factory=dict)
    n_images: dict[str, int] = field(default_factory=dict)
    scores: list[np.ndarray] = field(default_factory=list)
    truths: list[np.ndarray] = field(default_factory=list)
    gallery: dict[str, tuple] = field(default_factory=dict)
    image_scores: list[float] = field(default_factory=list)  # anomaly task: one score per 2D image
    image_labels: list[bool] = field(default_factory=list)
    labels: LabelTally | None = None  # several labels: pred and truth are label maps, also tallied per label

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All scores and truths as two flat arrays, concatenated once (summary and curves share them)."""
        if len(self.scores) > 1:
            self.scores, self.truths = [np.concatenate(self.scores)], [np.concatenate(self.truths)]
        return self.scores[0], self.truths[0]

    def add(self, case: str, pred: np.ndarray, truth: np.ndarray, score: np.ndarray | None, image: np.ndarray | None = None,
            per_label: dict[int, np.ndarray] | None = None) -> None:
        if self.labels is not None:  # label maps: per label, then as any label against background
            self.labels.add(case, pred, truth, per_label)
            pred, truth = pred != 0, truth != 0
        M.add_case(self.per_case, case, M.get_stats(pred, truth))
        ls = M.lesion_stats(pred, truth)
        self.lesions_case[case] = M.add_lesion_stats(self.lesions_case[case], ls) if case in self.lesions_case else ls
        self.n_images[case] = self.n_images.get(case, 0) + 1
        if score is not None:
            self.scores.append(score.astype(np.float32).ravel())
            self.truths.append(truth.astype(bool).ravel())
        if image is not None and score is not None:
            self._keep_for_gallery(case, image, score, pred, truth)

    def add_detection(self, score: np.ndarray, truth: np.ndarray, anomaly: AnomalyConfig) -> None:
        """Image-level detection of one prediction, per 2D image (each slice of a (D, H, W) score map
        and truth): its image score and whether its truth holds a lesion."""
        per_slice = [(score, truth)] if score.ndim == 2 else list(zip(score, truth))
        self.image_scores += [image_score(sc, anomaly) for sc, _ in per_slice]
        self.image_labels += [bool(tr.any()) for _, tr in per_slice]

    def _keep_for_gallery(self, case, image, score, pred, truth) -> None:
        """Keep, per case, the 2D slice showing the most lesion (truth, else prediction)."""
        if score.ndim == 3:
            k = best_slice(score, pred, truth)
            image, score, pred, truth = image[:, k], score[k], pred[k], truth[k]
        weight = int(truth.sum()) * 10 + int(pred.sum())
        if case not in self.gallery or weight > self.gallery[case][0]:
            self.gallery[case] = (weight, image, score, pred, truth)


def case_rows(acc: Accumulator) -> list[dict]:
    if acc.labels is not None:
        return acc.labels.rows(acc.n_images)
    rows = []
    for case, s in acc.per_case.items():
        ls = acc.lesions_case[case]
        rows.append({"case": case, "n_images": acc.n_images[case], "dice": M.dice(s), "iou": M.iou(s),
                     "sensitivity": M.sensitivity(s), "specificity": M.specificity(s), "precision": M.precision(s),
                     "tp": s.tp, "fp": s.fp, "fn": s.fn, "tn": s.tn,
                     "n_true_lesions": ls["n_true"], "n_pred_lesions": ls["n_pred"]})
    return rows


def summarize(acc: Accumulator) -> dict:
    """summary.json content: pooled pixel metrics, per-case means, lesion-wise detection."""
    if not acc.per_case:
        raise MedanomalyError("nothing to evaluate: no image had both a prediction and a mask")
    pooled = sum(acc.per_case.values(), M.Stats(0, 0, 0, 0))
    lesions = {"n_true": 0, "n_pred": 0, "tp_true": 0, "tp_pred": 0}
    for ls in acc.lesions_case.values():
        lesions = M.add_lesion_stats(lesions, ls)
    case_dice = [M.dice(s) for s in acc.per_case.values()]
    out = {"n_cases": len(acc.per_case), "n_images": sum(acc.n_images.values()),
           "dice": M.dice(pooled), "iou": M.iou(pooled), "sensitivity": M.sensitivity(pooled),
           "specificity": M.specificity(pooled), "precision": M.precision(pooled), "f1": M.f1(pooled),
           "auroc": float("nan"), "auprc": float("nan"),
           "dice_per_case_mean": M.mean_case_dice(acc.per_case), "dice_per_case_std": float(np.std(case_dice)),
           "dice_per_case_median": float(np.median(case_dice)),
           **M.lesion_metrics(lesions), "lesions": lesions, **(acc.labels.summary() if acc.labels else {})}
    if acc.scores:
        s, t = acc.pooled()
        out["auroc"], out["auprc"] = M.auroc(s, t), M.auprc(s, t)
    if acc.image_scores and acc.scores:
        out["image_auroc"] = M.auroc(np.asarray(acc.image_scores), np.asarray(acc.image_labels))
        t_best, d_best = M.best_dice_threshold(s, t, n_thresholds=200)
        out["oracle_dice"] = d_best
        out["oracle_threshold"] = t_best
        out["oracle_note"] = "optimistic: best pooled Dice over thresholds chosen on the evaluated cases themselves"
    return out


def curves(acc: Accumulator, max_points: int = 400) -> dict:
    """ROC and PR curves (subsampled for plotting) from the pooled scores."""
    if not acc.scores:
        return {}
    s, t = acc.pooled()
    if t.all() or not t.any():
        return {}
    fpr, tpr, _ = M.roc_curve(s, t)
    prec, rec, _ = M.pr_curve(s, t)
    pick = lambda a: a[np.linspace(0, len(a) - 1, min(len(a), max_points)).astype(int)].tolist()  # noqa: E731
    return {"roc": {"fpr": pick(fpr), "tpr": pick(tpr)}, "pr": {"precision": pick(prec), "recall": pick(rec)}}


def write_tables(out: Path, rows: list[dict], summary: dict) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else CASE_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(out / "cases.csv", buf.getvalue())
    jsonio.write_json(out / "summary.json", summary, indent=2)


def select(data: Path, split: str | None, splits_file: str | Path | None) -> list[Sample]:
    """Labelled samples of ``data`` in ``split`` (all of them when split is None)."""
    samples = [s for s in discover(data) if s.mask is not None]
    if not samples:
        raise MedanomalyError(f"no image/mask pairs in {data}: evaluation needs masks (see README, 'Data layouts')")
    if split is None:
        return samples
    if splits_file is None and (data / "splits.json").is_file():
        splits_file = data / "splits.json"
    listed = listing_splits(data, [(s.image, s.case) for s in samples]) if is_listing(data) else None
    if splits_file is None and listed is None:
        raise MedanomalyError(f"--split {split} needs a split file: pass --splits FILE (the model's splits.json), "
                              f"put splits.json in {data} or a split column in a CSV listing; or pass --split all")
    splits = load_splits(splits_file, sorted({s.case for s in samples})) if splits_file is not None else listed
    if split not in splits:  # checked here, once the split file is read, before anything is predicted
        raise MedanomalyError(f"--split {split!r} is not a split of {splits_file}; valid: all, {', '.join(splits)}")
    cases = set(splits[split])
    chosen = [s for s in samples if s.case in cases]
    if not chosen:
        raise MedanomalyError(f"split '{split}' of {splits_file} has no labelled images in {data}")
    return chosen


def _finish(acc: Accumulator, out: Path, extra: dict, history: list[dict] | None, title: str, synthetic: bool,
            notes: list[str]) -> dict:
    rows = case_rows(acc)
    summary = {**summarize(acc), **extra}
    write_tables(out, rows, summary)

    dice_of = {c: M.dice(s) for c, s in acc.per_case.items()}  # a case's own Dice (any label vs background)
    picks = select_gallery([(c, dice_of[c]) for c in acc.gallery])
    gallery = {name: [GalleryItem(c, *acc.gallery[c][1:], dice=dice_of[c]) for c in ids] for name, ids in picks.items()}
    curve = curves(acc)
    if curve:  # the operating point: the saved threshold and post-processing, pooled
        curve["operating_point"] = {"fpr": 1 - summary["specificity"], "tpr": summary["sensitivity"],
                                    "precision": summary["precision"], "recall": summary["sensitivity"]}
    write_report(out, summary, rows, history=history, gallery=gallery, curves=curve, title=title, synthetic=synthetic,
                 notes=[*notes, LABELS_NOTE] if acc.labels else notes, labels=label_table(summary))
    return summary


def _history(model_dir: Path) -> list[dict] | None:
    path = model_dir / "metrics.csv"
    if not path.is_file():
        return None
    with path.open() as fh:
        return list(csv.DictReader(fh))


def prediction_stems(pred_dir: Path, data: Path, samples: Sequence[Sample]) -> dict[Path, Path]:
    """Where the predictions of the samples go, as ``predict DATA --out pred_dir`` names them: below
    ``pred_dir`` as the images are below ``data``, one name per image (:func:`output_stems`)."""
    root = data_root(data)  # a CSV listing: the folder of its images
    return output_stems(pred_dir, [(root, s.image) for s in samples])


def _predict_and_score(predictor, samples: list[Sample], data: Path, pred_dir: Path | None,
                       progress: bool, labels: Labels | None = None) -> Accumulator:
    """Run ``predictor`` on each sample as ``predict`` does (writing under pred_dir if given) and
    accumulate the scores against the masks (label maps, scored per label, with ``labels``)."""
    if getattr(predictor, "dim", 2) == 3:  # whole volumes (stacked slices too), written slice by slice (binary only)
        return predict_and_score_3d(predictor, samples, data, pred_dir, progress)
    acc = Accumulator(labels=LabelTally(labels) if labels else None)
    stems = prediction_stems(pred_dir, data, samples) if pred_dir is not None else {}
    for s in track(samples, desc="evaluate", unit="img", enabled=progress):
        img = read_sample(s)
        # before writing anything for this sample
        truth = read_label_map(s.mask, img, labels) if labels else read_mask(s.mask, like=img)
        pred = predictor.predict(img)
        if pred_dir is not None:
            write_prediction(pred, stems[s.image])
        score, per_label = split_scores(pred.score, labels, truth.shape) if labels else (pred.score, None)
        acc.add(s.case, pred.mask, truth, score, img.array if pred_dir is not None else None, per_label)
        if predictor.anomaly is not None:  # image-level detection, per 2D image (slice)
            acc.add_detection(pred.score, truth, predictor.anomaly)
    return acc


def evaluate_model(model_dir: str | Path, data: str | Path, out: str | Path, split: str | None = "test",
                   splits_file: str | Path | None = None, device: str = "cpu", progress: bool = True,
                   synthetic: bool = False, overwrite: bool = False) -> dict:
    """Predict the ``split`` of ``data`` with the model (exactly as ``predict`` does, writing the
    same files under ``out/predictions``), then score. The model's own splits.json is the
    default split file, so test cases are the ones training never saw. An anomaly model is
    compared with the intensity baseline, calibrated on the same validation split. Earlier
    results in ``out`` are replaced only with ``overwrite`` (checked before predicting)."""
    model_dir, data, out = Path(model_dir), Path(data), Path(out)
    check_output_dir(out, [data, model_dir])
    splits_file, split, external = model_split(model_dir, data, split, splits_file)
    samples = select(data, split, splits_file)
    check_outputs(out, list(prediction_stems(out / "predictions", data, samples).values()), overwrite,
                  extra=EVALUATE_FILES + BASELINE_FILES)
    predictor = Predictor(model_dir, device)
    labels = model_labels(predictor.model_file.labels)  # a multi-label model's (2D only: Predictor)
    acc = _predict_and_score(predictor, samples, data, out / "predictions", progress, labels)
    post = predictor.post.to_dict()
    calibration = predictor.model_file.calibration
    label = EXTERNAL_SPLIT if external else split or "all"
    extra = {"split": label, "model": str(model_dir), "task": predictor.task, "postprocess": post,
             "threshold_source": f"validation split ({calibration.get('mode', 'Dice on val')}), saved in model.json",
             "calibration": calibration, "training": asdict(predictor.model_file.training)}
    if labels:  # each label's own threshold and post-processing, chosen on val
        extra["label_postprocess"] = {lb.name: p.to_dict() for lb, p in zip(labels, predictor.model_file.label_posts)}
    if predictor.anomaly is not None and predictor.anomaly.method != "intensity" and not external:
        extra["method"] = predictor.anomaly.method
        extra["baseline"] = _baseline_summary(model_dir, data, out / "baseline-model", samples, device, progress)
    notes = [f"Threshold {post['threshold']:.4g} and post-processing {post} were chosen on the validation split "
             "during training; nothing was tuned on these cases.",
             "Dice per case pools all slices of a case; empty truth and empty prediction score 1.",
             *training_note(extra["training"]),
             *([f"{data} holds none of the cases of the model's split file: all its cases were scored as an "
                "external test set (no intensity baseline: it is calibrated on the model's val cases)."]
               if external else [])]
    return _finish(acc, out, extra, _history(model_dir), f"medanomaly evaluation ({label} split)", synthetic, notes)


def model_split(model_dir: Path, data: Path, split: str | None, splits_file: str | Path | None
                ) -> tuple[str | Path | None, str | None, bool]:
    """(split file, split, external) for ``evaluate --model``: ``--splits FILE`` as given; else the
    model's splits.json, unless ``data`` holds none of its cases (an external test set): then every
    case of ``data`` (split None) and ``external`` True, for the default ``test`` split only (another
    split name has no meaning there: an error)."""
    own = model_dir / "splits.json"
    if splits_file is not None or split is None or not own.is_file():
        return splits_file, split, False
    try:
        listed = json.loads(own.read_text())
        known = {str(c) for ids in listed.values() for c in ids}
    except (OSError, ValueError, AttributeError, TypeError):
        return own, split, False  # select -> load_splits reports a bad split file
    cases = {s.case for s in discover(data) if s.mask is not None}
    if not cases or cases & known:
        return own, split, False
    if split != "test":
        raise MedanomalyError(f"--split {split}: {data} holds none of the {len(known)} cases of the model's split "
                              f"file {own}, so it has no '{split}' cases; evaluate all its cases (--split all or no "
                              "--split) or pass --splits FILE")
    log.warning("%s holds none of the cases of the model's split file %s: an external test set, all its %d cases are "
                "scored", data, own, len(cases))
    return None, None, True


def training_note(training: dict) -> list[str]:
    """One line on the training behind the model (epochs, images seen, the plan's minimum), or none
    for a model file that does not record them."""
    if training.get("images_seen") is None:
        return []
    plan = (f"; the plan measured {training['plan_images_per_s']:.1f} images/s and asks for at least "
            f"{training['min_images']:,}" if training.get("plan_images_per_s") and training.get("min_images") else "")
    return [f"Trained {training['epochs']} epochs in {training['train_minutes']:.1f} min: "
            f"{training['images_seen']:,} training images seen{plan}."]


def _baseline_summary(model_dir: Path, data: Path, base_dir: Path, samples: list[Sample], device: str,
                      progress: bool) -> dict:
    """The intensity baseline on the same cases, calibrated on the model's own val split."""
    fit_intensity_baseline(model_dir, data, base_dir, device=device, progress=progress)
    summary = summarize(_predict_and_score(Predictor(base_dir, device), samples, data, None, progress))
    return {"method": "intensity", **summary}


def evaluate_predictions(pred_dir: str | Path, data: str | Path, out: str | Path, split: str | None = None,
                         splits_file: str | Path | None = None, progress: bool = True, overwrite: bool = False,
                         labels: str | Sequence[tuple[int, str]] | None = None) -> dict:
    """Score existing ``*_pred.*`` files (from medanomaly or any tool named the same way);
    ``*_score.*`` files, where present, give AUROC/AUPRC. Earlier results in ``out`` are replaced
    only with ``overwrite``. ``labels`` (``"1=edema,2=enhancing"`` or (value, name) pairs; default:
    DATA/dataset.json's when it lists several): predictions and masks are label maps, scored per label."""
    pred_dir, data, out = Path(pred_dir), Path(data), Path(out)
    chosen = evaluation_labels(data, labels)
    check_output_dir(out, [data, pred_dir])
    samples = select(data, split, splits_file)
    check_outputs(out, [], overwrite, extra=EVALUATE_FILES)
    found, cache = find_predictions(pred_dir, data, samples), {}
    missing = [s for s in samples if s.image not in found]
    check_missing(pred_dir, samples, missing)
    acc = Accumulator(labels=LabelTally(chosen) if chosen else None)
    for s in track([s for s in samples if s.image in found], desc="evaluate", unit="img", enabled=progress):
        img = read_sample(s)
        pred, truth = (read_label_map(found[s.image], img, chosen, "prediction"), read_label_map(s.mask, img, chosen)
                       ) if chosen else (read_mask(found[s.image], like=img), read_mask(s.mask, like=img))
        sp = score_file(found[s.image], cache) if not chosen else None  # one map, not one per label: left out
        score = read_image(sp).array[0] if sp is not None else None
        acc.add(s.case, pred, truth, score, img.array)
    extra = {"split": split or "all", "predictions": str(pred_dir), "n_missing_predictions": len(missing)}
    return _finish(acc, out, extra, None, "medanomaly evaluation of predictions", False,
                   [f"{len(missing)} images without a prediction were left out."] if missing else [])


def predict_and_score_3d(predictor, samples: Sequence[Sample], data: Path, pred_dir: Path | None, progress: bool):
    """:func:`medanomaly.evaluate.score._predict_and_score` for a 3D model: each volume predicted whole
    (post-processed in 3D), written (slice by slice for stacked slices) and scored. Returns the Accumulator."""
    acc = Accumulator()
    stems = prediction_stems(pred_dir, data, samples) if pred_dir is not None else {}
    for vc, image, slices, truth in iter_volumes(samples, progress, "evaluate"):
        pred = predictor.predict(image)
        parts = [(pred, truth, vc.images[0])] if slices is None else [
            (p, truth[k], vc.images[k]) for k, p in enumerate(slice_predictions(pred, slices))]
        for p, t, path in parts:
            if pred_dir is not None:
                write_prediction(p, stems[path])
            acc.add(vc.case, p.mask, t, p.score, p.image.array if pred_dir is not None else None)
            if predictor.anomaly is not None:  # image-level detection, per 2D slice
                acc.add_detection(p.score, t, predictor.anomaly)
    return acc
