"""Where synthesize paints its lesions: real masks moved into a target's foreground, random blobs."""

from __future__ import annotations

import torch

from medanomaly.train.gan_masks import place_mask


def test_place_mask_stays_inside_foreground():
    fg = torch.zeros(32, 32, dtype=torch.bool)
    fg[6:26, 6:26] = True
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:10, 5:11] = True  # partly outside the foreground: must be moved in
    for seed in range(5):
        placed, transform = place_mask(mask, fg, torch.Generator().manual_seed(seed))
        assert placed.any() and not (placed & ~fg).any() and set(transform) == {"flip_lr", "rotate_deg", "shift_yx"}
