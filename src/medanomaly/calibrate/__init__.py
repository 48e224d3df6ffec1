"""Choosing on the validation split what training cannot: anomaly map settings, thresholds and post-processing."""
