"""Prediction: the :class:`~medanomaly.infer.predictor.Predictor` rebuilt from a model directory's model file
(2D slice-wise and 3D sliding-window scoring, the network behind a PyTorch or an ONNX Runtime backend), the inputs
and outputs of ``predict`` (finding images, writing masks, score maps, overlays and DICOM SEG), its loop over
files and volumes, overlays, and the ONNX export (which only writes ``model.onnx`` and its sidecar)."""
