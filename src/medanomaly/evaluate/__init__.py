"""Scoring predictions against masks (per case, overall, lesion-wise) and the HTML report."""
