"""The predictor rebuilt from a model directory (2D and 3D, PyTorch or ONNX Runtime), sliding windows, writing outputs and overlays, ONNX export."""
