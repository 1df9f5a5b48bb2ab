"""NIfTI volumes in a folder: one image per axial slice through nibabel, the canonical affine
recorded, 4-D and damaged volumes refused in a sentence, and re-runs that skip them."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from medsim import cli
from medsim.images import nifti
from medsim.sources import archive
from medsim.sources.folder import FolderSource
from tests.helpers import image_by_path

KEY = "a test key that is long enough"


def volume(shape=(20, 16, 6), seed=0, dtype=np.int16, affine=None) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    data = (rng.integers(-1000, 1000, size=shape)).astype(dtype)
    for k in range(shape[2] if len(shape) > 2 else 0):
        data[:, :, k] += 100 * k  # each slice its own brightness: their order must survive
    return nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine)


@pytest.fixture
def vols(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    root = tmp_path / "mri"
    (root / "tumour").mkdir(parents=True)
    (root / "healthy").mkdir()
    nib.save(volume(seed=1), root / "tumour" / "a.nii.gz")
    # stored left-right flipped (a negative x axis): canonical orientation makes it match a
    flipped = nib.Nifti1Image(np.asarray(volume(seed=1).dataobj)[::-1], np.diag([-0.8, 0.8, 2.5, 1.0]))
    nib.save(flipped, root / "tumour" / "b_flipped.nii")
    nib.save(volume((20, 16, 6, 3), seed=2), root / "healthy" / "fmri.nii.gz")
    (root / "healthy" / "broken.nii.gz").write_bytes(gzip.compress(b"not a volume at all" * 10))
    return root


def test_one_image_per_slice_with_its_place_in_the_patient(conn, vols):
    r = archive.ingest_archive(conn, FolderSource(vols), "mri", progress=False)
    skipped = {p: why for p, kind, why in r.problems if kind == "skipped"}
    assert skipped["healthy/fmri.nii.gz"] == ("a 4-D volume (20 x 16 x 6 x 3): one image per slice is for 3-D "
                                             "volumes; refused")
    assert skipped["healthy/broken.nii.gz"].startswith("not a readable NIfTI file (")
    # 6 slices of a; the flipped copy is the same volume once oriented: all 6 are duplicates
    assert r.added == 6 and r.duplicates == 6
    meta, h, w, depth = image_by_path(conn, "tumour/a.nii.gz#slice2", "metadata, height, width, bit_depth")
    assert (h, w, depth) == (16, 20, 16)  # axial: rows along y, columns along x
    assert meta["slice"] == 2 and meta["format"] == "NIfTI" and meta["voxel_mm"] == [0.8, 0.8, 2.5]
    assert np.allclose(meta["affine"], np.diag([0.8, 0.8, 2.5, 1.0]))
    # the volume's range spread over 16 bits: brighter slices stay brighter
    means = [float(np.mean(x)) for x in nifti.read_slices(vols / "tumour" / "a.nii.gz", list(range(6)), 10**7)]
    assert means == sorted(means)
    again = archive.ingest_archive(conn, FolderSource(vols), "mri", progress=False)
    # both volumes settled, not read again; the refusals came from the header alone, which
    # is all a re-run reads of them
    assert (again.added, again.unchanged_files, again.skipped) == (0, 2, 2)


def test_a_volume_over_the_limit_is_refused_before_its_voxels_are_read(conn, vols, monkeypatch, capsys):
    monkeypatch.setenv("MEDSIM_MAX_IMAGE_PIXELS", "300")
    assert cli.main(["ingest-folder", str(vols), "--name", "mri", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "a slice of 20 x 16 pixels is over the limit of 300 (MEDSIM_MAX_IMAGE_PIXELS)" in out
    monkeypatch.setenv("MEDSIM_MAX_IMAGE_PIXELS", "400")
    with pytest.raises(Exception, match="a volume of 1,920 voxels is over the limit of 1,600"):
        nifti.header(vols / "tumour" / "a.nii.gz", 400)
