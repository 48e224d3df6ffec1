"""Unsupervised anomaly detection from normal images: objectives (denoising with coarse noise, synthetic anomalies) and residual maps."""
