"""``predict``: a model directory applied to every image below some inputs, one file (or, for a 3D
model, one stacked folder of slices) at a time, so memory stays bounded; a bad file is reported
and skipped. Outputs are those of :func:`medanomaly.infer.write.write_prediction`, plus
``regions.json`` at the output root.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medanomaly.config.options import NAMINGS
from medanomaly.core import distributed, jsonio
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.progress import track
from medanomaly.core.version import __version__
from medanomaly.data.discover import Sample, discover, group_inputs, read_sample
from medanomaly.data.listing import is_listing
from medanomaly.data.volumes import SLICE_SUFFIXES, VolumeCase, read_volume
from medanomaly.infer.predictor import Predictor
from medanomaly.infer.volume import slice_predictions
from medanomaly.infer.write import (
    check_output_dir,
    check_outputs,
    iter_inputs,
    output_stems,
    write_prediction,
)
from medanomaly.io import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


def predict_paths(model_dir: str | Path, inputs: list[str | Path], out: str | Path, device: str = "cpu",
                  overwrite: bool = False, progress: bool = True, runtime: str = "torch",
                  dicom_seg: bool = True, naming: str = "medanomaly") -> dict:
    """Predict every image below ``inputs`` (files, folders, DICOM series folders, CSV listings)
    into ``out``; keep going past bad files. ``naming``: one of
    :data:`medanomaly.config.options.NAMINGS` (:func:`medanomaly.infer.write.write_prediction`).

    In a process group (``torchrun``), process r of W predicts inputs r, r + W, ... of the sorted
    list and rank 0 writes regions.json for all of them: the same files as one process writes.
    Returns {"n_ok": int, "failed": [{"input": str, "error": str}], "out": str}.
    """
    out = Path(out)
    _check_inputs(inputs, naming)
    check_output_dir(out, inputs)
    items = list(iter_inputs(inputs))
    if not items:
        raise MedanomalyError(f"no images found in {', '.join(map(str, inputs))} (masks and earlier outputs are "
                              f"skipped); supported files: {', '.join(IMAGE_SUFFIXES)} or DICOM series folders")
    stems = output_stems(out, items, naming)  # one name per input: two inputs never share an output
    check_outputs(out, list(stems.values()), overwrite, extra=("regions.json",), naming=naming)
    predictor = Predictor(model_dir, device, runtime=runtime)
    records, failed = [], []
    items, images = group_inputs(items, predictor.channels)  # nnU-Net case_0000, case_0001...: one image
    images |= {s.image: s for given in inputs if is_listing(given) for s in discover(given)}  # CSV channel columns
    for sample in images.values():  # wrong channel files or names: refused before any work (one per file)
        if sample.channel_names or len(sample.files) > 1:
            predictor.model_file.input.check_input(len(sample.files), sample.channel_names, str(sample.image))
    if predictor.dim == 3:  # 3D model: a folder of 2D slices is one stacked volume (rank 0 predicts all)
        recs, fails = predict_items_3d(predictor, items if distributed.is_main() else [], out, stems, dicom_seg,
                                       progress, naming, images)
        records, failed, items = list(enumerate(recs)), list(enumerate(fails)), []
    rank, world = distributed.rank(), distributed.world_size()  # under torchrun: every world-th file here
    for k, (_, path) in enumerate(track(items[rank::world], desc="predict", unit="img", enabled=progress)):
        stem, index = stems[path], k * world + rank
        try:
            rec = write_prediction(predictor.predict(read_sample(images[path])), stem, dicom_seg, naming)
        except MedanomalyError as exc:
            log.info("skipped %s (reported at the end)", path.name)
            failed.append((index, {"input": str(path), "error": str(exc)}))
            continue
        records.append((index, {"case": str(stem.relative_to(out)), **rec}))
    shards = distributed.gather_objects((records, failed))  # back in input order, as one process writes them
    records = [r for _, r in sorted((x for recs, _ in shards for x in recs), key=lambda t: t[0])]
    failed = [f for _, f in sorted((x for _, fails in shards for x in fails), key=lambda t: t[0])]
    meta = _meta(predictor, model_dir, runtime, naming)
    if distributed.is_main():
        jsonio.write_json(out / "regions.json", {**meta, "images": records, "failed": failed}, indent=1)
    return {"n_ok": len(records), "failed": failed, "out": str(out)}


def _meta(predictor: Predictor, model_dir: str | Path, runtime: str, naming: str) -> dict:
    """What regions.json says of the run; several labels: each label's threshold (chosen on val)."""
    meta = {"medanomaly_version": __version__, "model": str(model_dir), "runtime": runtime,
            "threshold": predictor.post.threshold, "naming": naming}
    if predictor.labels:
        meta["labels"] = [{"value": lb.value, "name": lb.name, "threshold": post.threshold}
                          for lb, post in zip(predictor.labels, predictor.label_posts)]
    return meta


def _check_inputs(inputs: list[str | Path], naming: str) -> None:
    """A missing input is reported as such, before anything else; ``naming`` is one of NAMINGS."""
    if naming not in NAMINGS:
        raise MedanomalyError(f"naming {naming!r} is none of {', '.join(NAMINGS)}")
    for given in map(Path, inputs):
        if not given.exists():
            raise MedanomalyError(f"input {given} does not exist")


def predict_items_3d(predictor: Predictor, items: list[tuple[Path, Path]], out: Path, stems: dict[Path, Path],
                     dicom_seg: bool, progress: bool, naming: str = "medanomaly",
                     images: dict[Path, Sample] | None = None) -> tuple[list[dict], list[dict]]:
    """predict's loop for a 3D model: the 2D slice files of one folder are stacked and predicted
    as one volume, then written slice by slice (to ``stems[path]``); other inputs one by one, a
    multi-channel one (``images[path]``: its channel files, :func:`group_inputs`) read as one image.
    (records, failed)."""
    groups: dict[tuple, list[tuple[Path, Path]]] = {}
    for root, path in items:
        stack = path.is_file() and path.suffix.lower() in SLICE_SUFFIXES
        groups.setdefault((root, path.parent) if stack else (root, path), []).append((root, path))
    records, failed = [], []
    for group in track(list(groups.values()), desc="predict", unit="vol", enabled=progress):
        try:
            vc = VolumeCase("", tuple(p for _, p in group), (None,) * len(group))
            sample = (images or {}).get(vc.images[0])
            image, slices = (read_sample(sample), None) if sample is not None and len(sample.files) > 1 \
                else read_volume(vc)
            pred = predictor.predict(image)
            parts = [pred] if slices is None else slice_predictions(pred, slices)
            written = []
            for p, path in zip(parts, vc.images):
                stem = stems[path]
                written.append({"case": str(stem.relative_to(out)), **write_prediction(p, stem, dicom_seg, naming)})
        except MedanomalyError as exc:
            log.info("skipped %s (reported at the end)", group[0][1].parent if len(group) > 1 else group[0][1].name)
            failed += [{"input": str(p), "error": str(exc)} for _, p in group]
            continue
        records += written
    return records, failed
