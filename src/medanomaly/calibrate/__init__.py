"""Calibration: what training cannot choose, chosen on the validation split and written into the model file: the
anomaly-map settings (``maps``), the threshold and post-processing (``thresholds``), on the val predictions of the
model read back from its directory (``val``); ``search`` runs them for a model directory."""
