"""Calibration: what training cannot choose, chosen on the validation split and written into the model file: the
anomaly-map settings (``maps``), the threshold and post-processing (``thresholds``), on the val predictions of the
trained network run as the model file about to be written describes it (``val``); ``search`` runs them for a model
directory and writes its ``model.json`` last, and completes the calibration of an interrupted run."""
