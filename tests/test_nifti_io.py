"""Tests of NIfTI reading and header checks (nifti_io.py): CPU, tiny volumes, seconds."""

import os
import re

import nibabel as nib
import numpy as np
import pytest
from helpers import Log, huge_claim, write_nifti

import layouts
import nifti_io
import train_dataset as td

# A small canonical shape (the pipeline tests' 40x40x24).
VOL = (40, 40, 24)


# --------------------------------------------------------------------------- #
# Reading volumes and masks
# --------------------------------------------------------------------------- #


def test_load_volume_nan_4d_and_truncated_gzip(tmp_path):
    data = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    affine = np.diag([1.0, 1.1, 1.2, 1.0])
    path = write_nifti(str(tmp_path / "nan.nii.gz"), data, affine)
    log = Log()
    out, aff, hdr = nifti_io.load_volume(path, log=log)
    assert out.dtype == np.float32 and out.shape == (6, 5, 4)
    assert out[1, 2, 3] == 0 and out[0, 0, 0] == 0 and out[5, 4, 3] == data[5, 4, 3]
    np.testing.assert_allclose(aff, affine)
    assert len(log.lines) == 1 and path in log.text and "2 NaN/inf" in log.text

    one = write_nifti(str(tmp_path / "one.nii.gz"), data[..., None])
    assert nifti_io.load_volume(one, log=Log())[0].shape == (6, 5, 4)
    many = write_nifti(str(tmp_path / "many.nii.gz"), np.stack([data] * 2, -1))
    with pytest.raises(nifti_io.DataError, match="many.nii.gz.*6x5x4x2"):
        nifti_io.load_volume(many)

    big = np.random.default_rng(7).integers(0, 30000, (40, 40, 40)).astype(np.int16)
    path = write_nifti(str(tmp_path / "trunc.nii.gz"), big, dtype=np.int16)
    raw = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(raw[: len(raw) // 2])
    assert nib.load(path).shape == (40, 40, 40)  # the header still reads ...
    with pytest.raises(nifti_io.DataError, match="trunc.nii.gz.*cannot read the NIfTI data"):
        nifti_io.load_volume(path)  # ... the data do not
    with pytest.raises(nifti_io.DataError, match="missing.nii.gz"):
        nifti_io.load_volume(str(tmp_path / "missing.nii.gz"))


def test_load_mask_from_file_or_image(tmp_path):
    img = np.zeros((6, 6, 6), np.float32)
    img[1:4, 1:4, 1:4] = 3
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[0:5, 0:5, 0:5] = 1
    root = str(tmp_path)
    with_mask = layouts.Subject("a", write_nifti(f"{root}/a/i.nii.gz", img),
                                write_nifti(f"{root}/a/m.nii.gz", mask, dtype=np.uint8))
    no_mask = layouts.Subject("b", write_nifti(f"{root}/b/i.nii.gz", img), None)
    m = nifti_io.load_mask(with_mask, img)
    assert m.dtype == bool and m.sum() == 125
    np.testing.assert_array_equal(nifti_io.load_mask(no_mask), img > 0)
    with pytest.raises(nifti_io.DataError, match="m.nii.gz.*6x6x6.*7x6x6"):
        nifti_io.load_mask(with_mask, np.zeros((7, 6, 6)))


# --------------------------------------------------------------------------- #
# Refusing bad data early
# --------------------------------------------------------------------------- #


def test_max_voxels_for():
    canonical = 224 * 224 * 152
    assert nifti_io.MAX_VOXELS_FACTOR == 16
    assert nifti_io.max_voxels_for() == nifti_io.max_voxels_for(td.VOLUME_SHAPE) == 16 * canonical
    assert nifti_io.max_voxels_for(VOL) == 16 * canonical  # a small canonical shape still accepts real scans
    assert nifti_io.max_voxels_for((512, 512, 512)) == 16 * 512 ** 3
    with pytest.raises(ValueError, match="volume_shape"):
        nifti_io.max_voxels_for((0, 4, 4))


def test_header_check_refuses_rgb_complex_and_implausible_sizes(tmp_path):
    rgb = np.zeros((6, 6, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb_path = str(tmp_path / "rgb.nii.gz")
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), rgb_path)
    cplx = write_nifti(str(tmp_path / "complex.nii.gz"), np.zeros((6, 6, 6)), dtype=np.complex64)
    good = write_nifti(str(tmp_path / "good.nii.gz"), np.ones((6, 6, 6)))
    huge_gz = huge_claim(tmp_path / "huge.nii.gz")
    huge_nii = huge_claim(tmp_path / "huge.nii")
    assert os.path.getsize(huge_gz) < 2048
    limit = nifti_io.max_voxels_for(VOL)
    cases = [
        (rgb_path, r"data type \[\('R', 'u1'\), \('G', 'u1'\), \('B', 'u1'\)\] is not a real scalar type: "
                   r"colour \(RGB/RGBA\)"),
        (cplx, "data type complex64 is not a real scalar type: complex"),
        (huge_gz, f"header claims 1000000000 voxels \\(1000x1000x1000\\), more than the limit {limit} "
                  f"\\(16x the canonical volume"),
        (huge_nii, "header claims 1000000000 voxels"),  # refused before the (also failing) size check
    ]
    for path, expected in cases:
        problem, _ = nifti_io.header_problem(path, max_voxels=limit)
        assert problem is not None and re.search(expected, problem), (path, problem)
        with pytest.raises(nifti_io.DataError, match=expected) as info:
            nifti_io.load_volume(path, log=Log(), max_voxels=limit)
        assert str(info.value).startswith(path + ": ")
    assert nifti_io.header_problem(good, max_voxels=limit) == (None, (6, 6, 6))
    # Without a limit only the size check of an uncompressed file catches the claim.
    assert "truncated" in nifti_io.header_problem(huge_nii)[0]


def test_load_volume_checks_the_header_before_reading_the_data(tmp_path, monkeypatch):
    def no_read(*_args, **_kwargs):
        raise AssertionError("the data were read")

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", no_read)
    with pytest.raises(nifti_io.DataError, match="header claims 1000000000 voxels"):
        nifti_io.load_volume(huge_claim(tmp_path / "huge.nii.gz"), max_voxels=nifti_io.max_voxels_for(VOL))


@pytest.mark.parametrize("raised, propagates", [
    (MemoryError("Unable to allocate 2.6 GiB"), MemoryError),
    (OSError(5, "Input/output error"), OSError),
    (OSError(28, "No space left on device"), OSError),
    (OSError("Expected 256 bytes, got 48 bytes from x.nii - could the file be damaged?"), nifti_io.DataError),
    (EOFError("Compressed file ended before the end-of-stream marker was reached"), nifti_io.DataError),
    (PermissionError(13, "Permission denied"), nifti_io.DataError),
])
def test_load_volume_tells_bad_files_from_other_failures(tmp_path, monkeypatch, raised, propagates):
    path = write_nifti(str(tmp_path / "v.nii.gz"), np.ones((6, 6, 6)))

    def fail(*_args, **_kwargs):
        raise raised

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", fail)
    with pytest.raises(propagates) as info:
        nifti_io.load_volume(path)
    if propagates is nifti_io.DataError:
        assert str(info.value).startswith(f"{path}: cannot read the NIfTI data ({type(raised).__name__}")
    else:
        assert info.value is raised


def test_load_volume_missing_file_versus_vanished_folder(tmp_path):
    (tmp_path / "data" / "s1").mkdir(parents=True)
    with pytest.raises(nifti_io.DataError, match="s1/missing.nii.gz: cannot read the NIfTI header") as info:
        nifti_io.load_volume(str(tmp_path / "data" / "s1" / "missing.nii.gz"))
    assert not isinstance(info.value, nifti_io.PipelineError)
    with pytest.raises(nifti_io.PipelineError, match=f"data folder {tmp_path / 'gone'} has disappeared"):
        nifti_io.load_volume(str(tmp_path / "gone" / "s1" / "image.nii.gz"))
    with pytest.raises(nifti_io.PipelineError, match=f"data folder {tmp_path / 'gone'} has disappeared"):
        nifti_io.header_problem(str(tmp_path / "gone" / "s1" / "image.nii.gz"))


@pytest.mark.parametrize("volume, message", [
    (np.zeros((4, 4, 4)), "maximum intensity 0 <= 0"),
    (-np.arange(1.0, 65.0).reshape(4, 4, 4), "maximum intensity -1 <= 0"),
    (np.zeros((0, 4, 4)), "empty volume"),
])
def test_check_intensity_refuses_non_positive_maxima(volume, message):
    with pytest.raises(nifti_io.DataError, match=f"^scan.nii.gz: {message}"):
        nifti_io.check_intensity(volume, "scan.nii.gz")
    vol = np.zeros((4, 4, 4))
    vol[1, 2, 3] = 7.5
    assert nifti_io.check_intensity(vol - 1.0, "x") == 6.5  # some negative voxels are fine
