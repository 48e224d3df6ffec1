"""Cases and their splits, slices and volumes in memory, normalisation, body foreground, augmentation and synthetic lesions."""
