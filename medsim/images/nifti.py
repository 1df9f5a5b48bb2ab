"""NIfTI volumes (.nii, .nii.gz) through nibabel: one image per axial slice.

A volume is first turned to the closest canonical orientation (RAS+: nibabel's
as_closest_canonical), so that slice k runs along the inferior-superior axis whatever the
scanner wrote; each slice is shown as radiology viewers show an axial slice (anterior up).
Values are spread over 16 bits by the range of the whole volume (8-bit volumes stay 8-bit),
so slices of one volume keep their relative brightness, as a DICOM series' windows do. The
canonical affine is recorded with each slice: where it lies in the patient.

Refused in a sentence: a 4-D (or more) volume (fMRI, diffusion: a slice is not one
picture), a slice over MEDSIM_MAX_IMAGE_PIXELS, a volume over VOLUME_FACTOR times that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsim.errors import Unreadable

SUFFIXES = (".nii", ".nii.gz")
VOLUME_FACTOR = 4  # the largest volume read whole, in MEDSIM_MAX_IMAGE_PIXELS


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def _load(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        return img, tuple(int(n) for n in img.shape)
    except Exception as err:  # nibabel raises many kinds for a damaged or foreign file
        raise Unreadable(f"not a readable NIfTI file ({type(err).__name__}: {str(err)[:200]})") from None


def header(path: Path, max_pixels: int) -> dict:
    """Slices and the canonical affine, from the header alone; Unreadable if refused."""
    canonical = _checked(path, max_pixels)
    slices = int(canonical.shape[2]) if len(canonical.shape) >= 3 else 1
    return {"slices": slices, "affine": np.round(np.asarray(canonical.affine, dtype=float), 6).tolist(),
            "voxel_mm": [round(float(v), 6) for v in canonical.header.get_zooms()[:3]]}


def _checked(path: Path, max_pixels: int):
    """The volume in its closest canonical orientation (nibabel's lazy image: no voxel read
    yet), after the refusals; Unreadable otherwise."""
    import nibabel as nib

    img, shape = _load(path)
    if len(shape) > 3 and any(n > 1 for n in shape[3:]):
        raise Unreadable(f"a {len(shape)}-D volume ({' x '.join(map(str, shape))}): one image per slice is for "
                         f"3-D volumes; refused")
    shape = shape[:3] + (1,) * (3 - len(shape[:3]))
    if shape[0] * shape[1] > max_pixels:
        raise Unreadable(f"a slice of {shape[0]} x {shape[1]} pixels is over the limit of {max_pixels:,} "
                         f"(MEDSIM_MAX_IMAGE_PIXELS)")
    if shape[0] * shape[1] * shape[2] > VOLUME_FACTOR * max_pixels:
        raise Unreadable(f"a volume of {shape[0] * shape[1] * shape[2]:,} voxels is over the limit of "
                         f"{VOLUME_FACTOR * max_pixels:,} ({VOLUME_FACTOR} x MEDSIM_MAX_IMAGE_PIXELS)")
    try:
        return nib.as_closest_canonical(img) if len(img.shape) >= 3 else img
    except Exception as err:
        raise Unreadable(f"a NIfTI header medsim cannot orient ({type(err).__name__}: {str(err)[:200]})") from None


def read_slices(path: Path, slices: list, max_pixels: int) -> list[np.ndarray]:
    """The given axial slices of a volume, each (H, W, 1) uint8 or uint16; the volume is
    read once, after the same refusals as its header."""
    vol = _checked(path, max_pixels)
    try:
        data = np.asarray(vol.dataobj, dtype=np.float32)
    except Exception as err:
        raise Unreadable(f"cannot read its voxels ({type(err).__name__}: {str(err)[:200]})") from None
    data = data.reshape(data.shape[:3] if data.ndim >= 3 else data.shape + (1,) * (3 - data.ndim))
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    eight = vol.get_data_dtype() == np.uint8
    top = 255 if eight else 65535
    out = []
    for k in slices:
        s = np.flipud(data[:, :, int(k or 0)].T)  # rows: anterior at the top, as viewers show axial slices
        y = (np.nan_to_num(s, nan=lo) - lo) / (hi - lo) * top if hi > lo else np.zeros_like(s)
        out.append(np.clip(np.rint(y), 0, top).astype(np.uint8 if eight else np.uint16)[..., None])
    return out
