"""Confusion counts and the metrics built on them (Dice, IoU, AUROC, AUPRC, lesion-wise)."""
