"""Tests for medanomaly.data.augment: seeding, pass-through, binary masks, shared geometry, flips."""

from __future__ import annotations

import pytest
import torch

from medanomaly.data.augment import SPATIAL_3D, AugmentConfig, augment_batch

NO_INTENSITY = dict(p_gamma=0.0, p_contrast=0.0, p_noise=0.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 4, size: int = 32, channels: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, channels, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = torch.zeros(n, 1, size, size)
    for i in range(n):  # an off-centre disc per sample, so flips and rotations show
        cy, cx, r = 8 + 3 * i, 10 + 2 * i, 5 + i
        mask[i, 0] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()
    return image, mask


def test_same_seed_same_output():
    image, mask = _batch()
    cfg = AugmentConfig(p_affine=1.0, p_elastic=1.0, p_gamma=1.0, p_contrast=1.0, p_noise=1.0)
    a_img, a_mask = augment_batch(image, mask, cfg, _gen(7))
    b_img, b_mask = augment_batch(image, mask, cfg, _gen(7))
    assert torch.equal(a_img, b_img)
    assert torch.equal(a_mask, b_mask)


def test_different_seeds_differ():
    image, mask = _batch()
    cfg = AugmentConfig(p_affine=1.0, p_elastic=1.0, p_noise=1.0)
    a_img, a_mask = augment_batch(image, mask, cfg, _gen(0))
    b_img, b_mask = augment_batch(image, mask, cfg, _gen(1))
    assert not torch.equal(a_img, b_img)
    assert not torch.equal(a_mask, b_mask)


def test_disabled_returns_inputs_unchanged():
    image, mask = _batch()
    ref_img, ref_mask = image.clone(), mask.clone()
    out_img, out_mask = augment_batch(image, mask, AugmentConfig(enabled=False), _gen(0))
    assert torch.equal(out_img, ref_img)
    assert torch.equal(out_mask, ref_mask)


def test_disabled_draws_nothing_from_generator():
    image, mask = _batch()
    gen = _gen(3)
    augment_batch(image, mask, AugmentConfig(enabled=False), gen)
    assert torch.equal(torch.rand(5, generator=gen), torch.rand(5, generator=_gen(3)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_stays_binary(seed):
    image, mask = _batch()
    cfg = AugmentConfig(p_affine=1.0, p_elastic=1.0)
    _, out = augment_batch(image, mask, cfg, _gen(seed))
    assert out.shape == mask.shape
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_geometry_identical_on_image_and_mask(seed):
    _, mask = _batch(n=4)
    image = mask.float().clone()
    cfg = AugmentConfig(p_affine=1.0, p_elastic=1.0, p_flip=0.5, **NO_INTENSITY)
    out_img, out_mask = augment_batch(image, mask, cfg, _gen(seed))
    agree = ((out_img > 0.5).float() == out_mask).float().mean().item()
    assert agree >= 0.99
    assert not torch.equal(out_mask, mask)  # the geometry did change something


def test_flip_only_is_exact_flip():
    image, mask = _batch(channels=3)
    cfg = AugmentConfig(p_affine=0.0, p_elastic=0.0, p_flip=1.0, **NO_INTENSITY)
    out_img, out_mask = augment_batch(image, mask, cfg, _gen(0))
    torch.testing.assert_close(out_img, torch.flip(image, [-1]), atol=1e-6, rtol=0)
    assert torch.equal(out_mask, torch.flip(mask, [-1]))


def test_identity_when_every_probability_is_zero():
    image, mask = _batch()
    cfg = AugmentConfig(p_affine=0.0, p_elastic=0.0, p_flip=0.0, **NO_INTENSITY)
    out_img, out_mask = augment_batch(image, mask, cfg, _gen(0))
    torch.testing.assert_close(out_img, image, atol=1e-6, rtol=0)
    assert torch.equal(out_mask, mask)


@pytest.mark.parametrize("ndim", [4, 5])
def test_inputs_not_modified_in_place(ndim):
    image, mask = _batch()
    if ndim == 5:
        image, mask = image[:, :, None].repeat(1, 1, 4, 1, 1), mask[:, :, None].repeat(1, 1, 4, 1, 1)
    ref_img, ref_mask = image.clone(), mask.clone()
    cfg = AugmentConfig(p_affine=1.0, p_elastic=1.0, p_flip=1.0, p_gamma=1.0, p_contrast=1.0, p_noise=1.0)
    out_img, out_mask = augment_batch(image, mask, cfg, _gen(0))
    assert torch.equal(image, ref_img)
    assert torch.equal(mask, ref_mask)
    assert out_img.data_ptr() != image.data_ptr()


def test_mask_none_is_supported():
    image, _ = _batch()
    out_img, out_mask = augment_batch(image, None, AugmentConfig(), _gen(0))
    assert out_mask is None
    assert out_img.shape == image.shape


@pytest.fixture
def no_spatial_3d(monkeypatch: pytest.MonkeyPatch) -> None:
    """3D spatial augmentation (rotation, scaling, elastic) off: only flips and intensity remain."""
    for key in ("p_rotate", "p_scale", "p_elastic"):
        monkeypatch.setitem(SPATIAL_3D, key, 0.0)


def test_3d_batch_keeps_shape(no_spatial_3d):
    g = _gen(0)
    image = torch.rand(2, 1, 6, 16, 16, generator=g)
    mask = (torch.rand(2, 1, 6, 16, 16, generator=g) > 0.7).float()
    out_img, out_mask = augment_batch(image, mask, AugmentConfig(p_flip=1.0), _gen(1))
    assert out_img.shape == image.shape
    assert out_mask.shape == mask.shape
    assert torch.equal(out_mask, torch.flip(mask, [-1]))  # p_flip=1: every sample flipped
    assert set(torch.unique(out_mask).tolist()) <= {0.0, 1.0}


def test_3d_flip_only_is_exact(no_spatial_3d):
    g = _gen(0)
    image = torch.rand(2, 1, 4, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 4, 8, 8, generator=g) > 0.5).float()
    cfg = AugmentConfig(p_flip=1.0, **NO_INTENSITY)
    out_img, out_mask = augment_batch(image, mask, cfg, _gen(0))
    torch.testing.assert_close(out_img, torch.flip(image, [-1]), atol=1e-6, rtol=0)
    assert torch.equal(out_mask, torch.flip(mask, [-1]))


def test_intensity_changes_image_only():
    image, mask = _batch()
    cfg = AugmentConfig(p_affine=0.0, p_elastic=0.0, p_flip=0.0, p_gamma=1.0, p_contrast=1.0, p_noise=1.0)
    out_img, out_mask = augment_batch(image, mask, cfg, _gen(0))
    assert torch.equal(out_mask, mask)
    assert not torch.allclose(out_img, image)
    assert out_img.dtype == torch.float32


def test_half_precision_input_accepted():
    image, mask = _batch()
    out_img, out_mask = augment_batch(image.half(), mask.to(torch.uint8), AugmentConfig(), _gen(0))
    assert out_img.shape == image.shape and out_img.is_floating_point()
    assert set(torch.unique(out_mask).tolist()) <= {0.0, 1.0}


def test_3d_spatial_moves_image_and_mask_together():
    """nnU-Net's 3D spatial augmentation: a mask equal to the image's bright cube follows it (the
    image bilinear, the mask nearest: they agree but at the cube's border), the mask stays binary,
    and a sample that drew no spatial transform keeps its voxels exactly."""
    cube = torch.zeros(8, 1, 12, 16, 16)
    cube[:, :, 3:9, 4:12, 4:12] = 1.0
    cfg = AugmentConfig(p_flip=0.0, **NO_INTENSITY)
    out_img, out_mask = augment_batch(cube.clone(), cube.clone(), cfg, _gen(3))
    assert set(torch.unique(out_mask).tolist()) <= {0.0, 1.0}
    moved = [k for k in range(8) if not torch.equal(out_mask[k], cube[k])]
    assert 0 < len(moved) < 8  # probability 0.2 per transform: some samples moved, some not
    for k in range(8):
        if k not in moved:
            assert torch.equal(out_img[k], cube[k])
    assert ((out_img > 0.5).float() != out_mask).float().mean() < 0.05
