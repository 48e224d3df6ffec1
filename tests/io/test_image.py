"""Tests for medanomaly.io.image: suffix helpers, Geometry and Image, and the 4x4 RAS affine of every
kind of geometry (checked against SimpleITK's own index-to-physical mapping)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from medanomaly.io.image import (
    IMAGE_SUFFIXES,
    Geometry,
    Image,
    _reversed_geometry,
    affine_from_geometry,
    full_suffix,
    stem_of,
)

IDENTITY_2D = (1.0, 0.0, 0.0, 1.0)


def test_suffix_and_stem() -> None:
    assert full_suffix("a/B.NII.GZ") == ".nii.gz"
    assert full_suffix("x.Png") == ".png"
    assert full_suffix("00001") == ""
    assert stem_of("dir/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert stem_of("case_1.5.png") == "case_1.5"
    assert stem_of("noext") == "noext"
    assert {".nii.gz", ".dcm", ".mha", ".png"} <= set(IMAGE_SUFFIXES)


def test_voxel_volume() -> None:
    known = Geometry("nrrd", (2.0, 0.5, 0.5), (0.0,) * 3, tuple(np.eye(3).ravel()), True)
    assert known.voxel_volume_mm() == pytest.approx(0.5)
    assert Geometry("raster", (1.0, 1.0), (0.0, 0.0), (1, 0, 0, 1), False).voxel_volume_mm() is None


def test_image_shape_properties() -> None:
    geo = Geometry("raster", (1.0, 1.0), (0.0, 0.0), IDENTITY_2D, False)
    flat = Image(np.zeros((3, 4, 5), np.float32), geo, Path("rgb.png"))
    assert (flat.channels, flat.ndim_spatial, flat.spatial_shape) == (3, 2, (4, 5))
    vol = Image(np.zeros((1, 2, 3, 4), np.float32), geo, Path("v.nii.gz"))
    assert (vol.channels, vol.ndim_spatial, vol.spatial_shape) == (1, 3, (2, 3, 4))
    assert all(type(s) is int for s in vol.spatial_shape)


def test_reversed_geometry_turns_itk_order_into_array_order() -> None:
    direction_xyz = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rows x, y, z
    geo = _reversed_geometry((0.5, 0.7, 2.0), (1.0, -2.0, 3.0), direction_xyz)
    assert geo["spacing"] == (2.0, 0.7, 0.5) and geo["origin"] == (3.0, -2.0, 1.0)
    # element (i, j) of the reversed matrix is element (2 - i, 2 - j) of the ITK one
    np.testing.assert_array_equal(np.reshape(geo["direction"], (3, 3)), direction_xyz[::-1, ::-1])


def test_raster_affine_is_the_pixel_grid_without_a_flip() -> None:
    geo = Geometry("raster", (1.0, 1.0), (0.0, 0.0), IDENTITY_2D, False)
    np.testing.assert_array_equal(affine_from_geometry(geo), np.eye(4))
    scaled = Geometry("raster", (0.5, 0.25), (0.0, 0.0), IDENTITY_2D, True)  # (row, column) spacing
    np.testing.assert_array_equal(affine_from_geometry(scaled), np.diag([0.25, 0.5, 1.0, 1.0]))


def test_nifti_affine_is_its_own_and_a_copy() -> None:
    affine = np.array([[-1.0, 0, 0, 90], [0, 1.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
    geo = Geometry("nifti", (2.0, 1.0, 1.0), (-72.0, -126.0, 90.0), tuple(np.eye(3).ravel()), True, affine=affine)
    got = affine_from_geometry(geo)
    np.testing.assert_array_equal(got, affine)
    got[0, 0] = 5.0
    assert geo.affine[0, 0] == -1.0  # the geometry is not changed through the result


def test_single_dicom_slice_uses_its_lps_placement() -> None:
    lps = np.eye(4)
    lps[:3, :3] = np.diag([0.7, 0.7, 5.0])
    lps[:3, 3] = (10.0, 20.0, 30.0)
    geo = Geometry("dicom", (0.7, 0.7), (0.0, 0.0), IDENTITY_2D, True, meta={"lps_affine": lps})
    ras = affine_from_geometry(geo)
    np.testing.assert_allclose(ras[:3, 3], [-10.0, -20.0, 30.0])  # LPS -> RAS: x and y negated
    np.testing.assert_allclose(ras[:3, :3], np.diag([-0.7, -0.7, 5.0]))


def _rotation(a: float, b: float) -> np.ndarray:
    """An orthonormal 3x3 matrix: a rotation by ``a`` about z, then by ``b`` about x."""
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


positive = st.floats(0.1, 5.0)
coordinate = st.floats(-200.0, 200.0)


@settings(max_examples=20, deadline=None)
@given(spacing=st.tuples(positive, positive, positive), origin=st.tuples(coordinate, coordinate, coordinate),
       angles=st.tuples(st.floats(-3.1, 3.1), st.floats(-3.1, 3.1)),
       index=st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50)))
def test_property_itk_geometry_affine_maps_indices_as_simpleitk(spacing, origin, angles, index) -> None:
    """An ITK (LPS) geometry read into array order and turned into the RAS affine maps the voxel
    (x, y, z) where SimpleITK puts it, with x and y negated (LPS -> RAS)."""
    direction = _rotation(*angles)
    img = sitk.Image(2, 2, 2, sitk.sitkUInt8)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(direction.ravel()))
    geo = Geometry("itk", spacing_known=True, **_reversed_geometry(img.GetSpacing(), img.GetOrigin(), direction))
    lps = np.array(img.TransformContinuousIndexToPhysicalPoint([float(i) for i in index]))
    ras = affine_from_geometry(geo) @ np.array([*index, 1.0])
    np.testing.assert_allclose(ras[:3], lps * np.array([-1.0, -1.0, 1.0]), atol=1e-6)
