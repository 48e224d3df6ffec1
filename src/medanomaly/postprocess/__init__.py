"""Score map to mask: threshold, small components, holes, smoothing, foreground; the region table."""
