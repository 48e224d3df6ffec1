"""Every option list of medanomaly, in one place: the configs validate against these tuples and the
CLI builds its ``choices`` from them, so the two cannot disagree."""

from __future__ import annotations

TASKS = ("supervised", "anomaly")
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("auto", "bf16", "fp32")
LOSSES = ("bce", "dice", "bce+dice")  # segmentation losses on logits (medanomaly.models.losses)
NORMS = ("batch", "instance", "group", "none")
ENCODERS = ("plain", "resnet18", "resnet34")
NORMALIZATIONS = ("auto", "percentile", "ct", "none")
ANOMALY_METHODS = ("denoise", "identity", "intensity", "synthetic")
RESIDUALS = ("abs", "positive", "negative")
UNLABELLED_METHODS = ("auto", "mean-teacher", "pretrain", "pretrain+mean-teacher")
# what `train --unlabelled` does unless told otherwise: the remedy that measured best with few labels
# (bench/label_efficiency.py, README "Learning from few labels")
DEFAULT_UNLABELLED_METHOD = "pretrain"
# predict --naming: medanomaly (STEM_pred.EXT, STEM_score.EXT, STEM_overlay.png) or nnunet (CASE.EXT label maps only)
NAMINGS = ("medanomaly", "nnunet")
RUNTIMES = ("torch", "onnx")  # what runs the network in `predict` (ONNX Runtime: MODEL/model.onnx, CPU, fp32)
EXPORT_FORMATS = ("onnx",)
DIMS = (2, 3)  # 2: U-Net on slices; 3: U-Net on patches of volumes
SECTIONS = ("model", "augment", "anomaly")  # the nested sections of a TrainConfig
# --device: what medanomaly.core.runtime.resolve_device takes (auto: a CUDA GPU if there is one, else the CPU)
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d{1,3})?"
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
