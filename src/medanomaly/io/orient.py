"""One orientation for every volume: the axis permutation and flips that bring a volume's array to
the closest canonical orientation, and back.

The canonical orientation is DICOM's patient frame as a display shows an axial slice: array axes
(Z, Y, X) increase towards Superior, Posterior and Left (nibabel axis codes ``("L", "P", "S")`` for
the (x, y, z) = (column, row, slice) indices). Axis 0 is then always the axial axis, so 2D slices are
always axial, shown as radiologists (and PNG exports such as LGG's) show them: anterior at the top,
the patient's right on the left. It is nibabel's ``as_closest_canonical`` (RAS) with x and y flipped,
chosen over RAS because it is the identity for the most common storage (axial DICOM, NRRD and ITK
images with identity direction) and matches the 2D exports models are trained on.

The transform is a pure permutation and flip (no interpolation): :meth:`Reorientation.invert` maps a
canonical array back to the stored grid exactly. Only 3D images with a known spacing and a real
placement are reoriented (NIfTI, NRRD, MetaImage, DICOM series); rasters, 2D images and stacked 2D
slices keep their grid (:func:`reorientation` gives the identity).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import nibabel as nib
import numpy as np

from medanomaly.io.image import Geometry, Image, affine_from_geometry

#: axis codes of the canonical (x, y, z) index axes (array axes X, Y, Z)
CANONICAL = ("L", "P", "S")
#: anatomical plane of a slice cut across each canonical array axis
PLANES = ("axial", "coronal", "sagittal")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Reorientation:
    """A signed permutation of the last three array axes: canonical axis ``c`` is stored axis
    ``perm[c]``, reversed where ``flip[c]``. ``stored_shape`` (Z, Y, X) of the stored grid."""

    perm: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)
    stored_shape: tuple[int, ...] = ()

    @property
    def identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """(..., Z, Y, X) stored -> (..., Z', Y', X') canonical (a view where possible)."""
        if self.identity:
            return array
        lead = array.ndim - 3
        out = np.transpose(array, tuple(range(lead)) + tuple(lead + p for p in self.perm))
        axes = tuple(lead + c for c in range(3) if self.flip[c])
        return np.flip(out, axes) if axes else out

    def invert(self, array: np.ndarray) -> np.ndarray:
        """(..., Z', Y', X') canonical -> (..., Z, Y, X) stored: the exact inverse of :meth:`apply`."""
        if self.identity:
            return array
        lead = array.ndim - 3
        axes = tuple(lead + c for c in range(3) if self.flip[c])
        out = np.flip(array, axes) if axes else array
        inverse = tuple(int(i) for i in np.argsort(self.perm))
        return np.transpose(out, tuple(range(lead)) + tuple(lead + p for p in inverse))

    def spacing(self, spacing: tuple[float, ...]) -> tuple[float, ...]:
        """Stored (Z, Y, X) spacing -> canonical spacing."""
        return tuple(float(spacing[p]) for p in self.perm) if len(spacing) == 3 else tuple(spacing)

    @property
    def slice_axis(self) -> int:
        """The canonical axis the stored axis 0 (the acquisition's slice axis) became: 0 axial,
        1 coronal, 2 sagittal (see :data:`PLANES`)."""
        return self.perm.index(0)


def reorients(g: Geometry, ndim_spatial: int) -> bool:
    """Whether an image of this geometry is brought to the canonical orientation: 3D, spacing
    known, a real placement (not a raster, not stacked 2D slices)."""
    return (ndim_spatial == 3 and g.spacing_known and g.kind in ("nifti", "nrrd", "itk", "dicom")
            and "stacked_slices" not in g.meta)


def reorientation(image: Image) -> Reorientation:
    """The transform of ``image``'s array to the canonical orientation (identity where
    :func:`reorients` is False)."""
    shape = image.spatial_shape
    if not reorients(image.geometry, image.ndim_spatial):
        return Reorientation(stored_shape=shape)
    ornt = nib.orientations.io_orientation(_RAS_TO_LPS @ affine_from_geometry(image.geometry))
    perm, flip = [0, 0, 0], [False, False, False]
    for i, (j, sign) in enumerate(ornt):  # index axis i (x, y, z) lies along LPS world axis j
        c, a = 2 - int(j), 2 - i  # array axes are reversed: (Z, Y, X)
        perm[c], flip[c] = a, bool(sign < 0)
    return Reorientation((perm[0], perm[1], perm[2]), (flip[0], flip[1], flip[2]), shape)


def _index_map(r: Reorientation) -> np.ndarray:
    """4x4 map of canonical (x, y, z) indices to stored (x, y, z) indices."""
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for c, a in enumerate(r.perm):
        i, k = 2 - a, 2 - c  # stored and canonical index axes (x, y, z order)
        n = r.stored_shape[a]
        m[i, k] = -1.0 if r.flip[c] else 1.0
        m[i, 3] = n - 1.0 if r.flip[c] else 0.0
    return m


def reoriented_geometry(g: Geometry, r: Reorientation) -> Geometry:
    """``g`` for the canonical array: every voxel keeps its place in the world (the affines,
    origin, direction and spacing follow the permutation and flips)."""
    if r.identity:
        return g
    m = _index_map(r)
    meta = dict(g.meta)
    if "lps_affine" in meta:
        meta["lps_affine"] = np.asarray(meta["lps_affine"], float) @ m
    affine = None if g.affine is None else np.asarray(g.affine, float) @ m
    d = np.reshape(g.direction, (3, 3))
    spacing = np.asarray(g.spacing, float)
    signed = np.zeros((3, 3))  # stored array index = signed @ canonical array index + shift
    shift = np.zeros(3)
    for c, a in enumerate(r.perm):
        signed[a, c] = -1.0 if r.flip[c] else 1.0
        shift[a] = r.stored_shape[a] - 1.0 if r.flip[c] else 0.0
    origin = np.asarray(g.origin, float) + d @ (spacing * shift)
    direction = d @ signed  # D' diag(spacing') = D diag(spacing) signed
    return replace(g, spacing=r.spacing(g.spacing), origin=tuple(float(o) for o in origin),
                   direction=tuple(float(v) for v in direction.ravel()), affine=affine, meta=meta)


def canonical(image: Image) -> tuple[Image, Reorientation]:
    """``image`` in the canonical orientation (its array a view), and the transform that got it there."""
    r = reorientation(image)
    if r.identity:
        return image, r
    return Image(r.apply(image.array), reoriented_geometry(image.geometry, r), image.path), r
