"""Where ``medanomaly synthesize`` paints its lesions: lesion-free target slices of the training split
at the levels where real lesions occur, real training masks flipped, rotated and shifted into a
target's foreground, and random blobs where none fits. No network here: the GAN that fills the
lesion in is :mod:`medanomaly.train.gan`.

Shapes: masks and foregrounds (H, W) bool; a SliceSet's images (N, C, S, S), masks (N, 1, S, S).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from medanomaly.core.errors import MedanomalyError
from medanomaly.data.foreground import foreground_mask
from medanomaly.data.synthetic import random_shape


def place_mask(mask: torch.Tensor, fg: torch.Tensor, gen: torch.Generator,
               tries: int = 40) -> tuple[torch.Tensor, dict] | None:
    """Flip, rotate and shift ``mask`` (H, W) bool so that it lies inside ``fg`` (H, W) bool.

    The lesion stays near where it was (left-right flips mirror it to the other side): its centre
    moves by up to 5% of the side in the first half of the tries, up to 15% in the second. Returns
    (placed mask (H, W) bool, the transform) or None.
    """
    h, w = mask.shape
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) == 0 or not fg.any():
        return None
    # centre in normalised coordinates (x, y) in [-1, 1] (align_corners=False: a flip maps x to -x)
    centre = torch.stack([(2 * xs.float().mean() + 1) / w - 1, (2 * ys.float().mean() + 1) / h - 1])
    for t in range(tries):
        u = torch.rand(5, generator=gen)
        flip, angle = bool(u[0] < 0.5), float((u[1] * 2 - 1) * 20)
        c = centre * torch.tensor([-1.0, 1.0]) if flip else centre
        target = c + (u[2:4] * 2 - 1) * (0.1 if t < tries // 2 else 0.3)
        rot = torch.tensor([[math.cos(a := math.radians(angle)), -math.sin(a)], [math.sin(a), math.cos(a)]])
        theta = torch.cat([rot, (c - rot @ target)[:, None]], 1)[None]  # output point -> input point
        grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
        src = mask.float()[None, None].flip(-1) if flip else mask.float()[None, None]
        placed = F.grid_sample(src, grid, mode="bilinear", align_corners=False)[0, 0] > 0.5
        if placed.any() and not (placed & ~fg).any() and placed.sum() >= 0.5 * len(ys):
            shift = [float(target[1] - c[1]) * h / 2, float(target[0] - c[0]) * w / 2]
            return placed, {"flip_lr": flip, "rotate_deg": round(angle, 2), "shift_yx": [round(v, 1) for v in shift]}
    return None


def random_blob(fg: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(H, W) bool: a :func:`~medanomaly.data.synthetic.random_shape` centred on a random pixel of ``fg``, cut to it."""
    (h, w), where = fg.shape, torch.nonzero(fg)
    cy, cx = where[torch.randint(len(where), (1,), generator=gen)][0].tolist()
    blob = torch.roll(random_shape((h, w), gen), shifts=(cy - h // 2, cx - w // 2), dims=(0, 1)) & fg
    blob[cy, cx] = True  # never empty
    return blob


def check_targets(slices) -> torch.Tensor:
    """The indices of the lesion-free slices (empty mask) that lesions can be painted into; refused
    when there is none (synthesize checks this before training its generator)."""
    has = slices.masks.flatten(1).amax(1) > 0
    free = torch.nonzero(~slices.lesion & ~has).flatten()
    if len(free) == 0:
        raise MedanomalyError("the train split has no lesion-free slice to paint lesions into; synthesize needs "
                              "slices whose mask is empty")
    return free


def pick_targets(slices, n: int, gen: torch.Generator, erode: int) -> list[tuple[int, list[int], torch.Tensor]]:
    """n (lesion-free target slice, 3 slices with lesion whose masks may go there, best first,
    the target's foreground (Otsu, eroded by ``erode`` px, (H, W) bool)).

    Levels follow the slice's position in its case (0..1; 0.5 for single 2D images): targets are
    drawn among lesion-free slices at the levels where real lesions occur (5th..95th percentile),
    with a foreground of at least 5% of the image where possible. Mask slices are, of the 32 slices
    with lesion nearest in level, those whose foreground overlaps the target's best (Dice): the same
    anatomy and head position, so a lesion kept near its place lands in the same tissue.
    """
    cache: dict[int, torch.Tensor] = {}

    def fg_of(i: int) -> torch.Tensor:
        if i not in cache:
            cache[i] = torch.from_numpy(foreground_mask(slices.images[i].float().mean(0).numpy(), erode=erode))
        return cache[i]

    has = slices.masks.flatten(1).amax(1) > 0
    free, lesioned = check_targets(slices), torch.nonzero(has).flatten()
    cases, total = slices.cases, Counter(slices.cases)
    pos = torch.tensor([r / (total[c] - 1) if total[c] > 1 else 0.5 for r, c in zip(ranks(cases), cases)])
    lo, hi = torch.quantile(pos[lesioned], torch.tensor([0.05, 0.95])).tolist()
    level = free[(pos[free] >= lo - 1e-6) & (pos[free] <= hi + 1e-6)]
    free = level if len(level) else free
    out = []
    for _ in range(n):
        picks = free[torch.randint(len(free), (30,), generator=gen)].tolist()
        i = next((i for i in picks if fg_of(i).float().mean() >= 0.05), max(picks, key=lambda i: int(fg_of(i).sum())))
        if not fg_of(i).any():
            raise MedanomalyError("the lesion-free training slices drawn have no foreground (blank images); "
                                  "synthesize needs normal anatomy to paint lesions into")
        near = (pos[lesioned] - pos[i]).abs() + 0.05 * torch.rand(len(lesioned), generator=gen)
        cands = lesioned[near.argsort()[:32]].tolist()
        dice = [2 * int((fg_of(i) & fg_of(j)).sum()) / max(1, int(fg_of(i).sum() + fg_of(j).sum()))
                for j in cands]
        out.append((i, [cands[k] for k in np.argsort(dice)[::-1][:3]], fg_of(i)))
    return out


def choose_mask(slices, sources: list[int], fg: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, int | None, dict | None]:
    """(lesion mask (H, W) bool, the slice whose mask it is or None, its transform or None): the
    first mask of ``sources`` (best first) that fits into ``fg``, else a random blob."""
    for j in sources:
        if (placed := place_mask(slices.masks[j, 0] > 0, fg, gen)) is not None:
            return placed[0], j, placed[1]
    return random_blob(fg, gen), None, None  # no room for those lesions here: a smooth blob at a foreground pixel


def ranks(keys: list) -> list[int]:
    """Each item's count of equal items before it: a slice's index within its file or its case."""
    seen: Counter = Counter()
    return [seen.update([k]) or seen[k] - 1 for k in keys]
