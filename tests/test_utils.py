"""Tests of the shared helpers: atomic NIfTI writes, metrics, interpolation baselines."""

import os

import nibabel as nib
import numpy as np
import pytest

import utils


def test_save_nifti_keeps_source_orientation_codes_and_writes_atomically(tmp_path):
    affine = np.diag([1.0, 1.2, 1.4, 1.0])
    affine[:3, 3] = [-90, -126, -72]
    src = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine)
    src.set_qform(affine, code=4)  # MNI space
    src.set_sform(affine, code=4)
    out = tmp_path / "out.nii.gz"
    utils.save_nifti(out, np.ones((4, 5, 6)), affine, header=src.header)
    img = nib.load(str(out))
    assert int(img.header["sform_code"]) == 4 and int(img.header["qform_code"]) == 4
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, affine)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []
    # Without a header: scanner space (code 1), and the requested dtype.
    utils.save_nifti(tmp_path / "mask.nii", np.ones((2, 2, 2)), np.eye(4), dtype=np.uint8)
    mask = nib.load(str(tmp_path / "mask.nii"))
    assert int(mask.header["sform_code"]) == 1 and mask.get_data_dtype() == np.uint8


def test_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "result.txt"
    path.write_text("previous")

    def broken(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        utils.atomic_write(path, broken, suffix=".txt")
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["result.txt"]


def test_metrics_follow_the_original_rule():
    rng = np.random.default_rng(0)
    hr = rng.uniform(0, 100, (12, 12, 12))
    sr = hr + rng.normal(0, 5, hr.shape)
    mask = np.zeros(hr.shape, bool)
    mask[2:10, 2:10, 2:10] = True
    psnr, ssim = utils.compute_metrics(hr, sr, mask)
    data_range = max(hr.max(), sr.max()) - min(hr.min(), sr.min())
    mse = np.mean((hr * mask - sr * mask) ** 2)
    assert psnr == pytest.approx(10 * np.log10(data_range ** 2 / mse), rel=1e-6)
    assert 0 < ssim < 1
    assert utils.compute_metrics(hr, hr, mask) == (float("inf"), 1.0)
    with pytest.raises(ValueError, match="equal shapes"):
        utils.compute_metrics(hr, hr[:-1])


@pytest.mark.parametrize("order", [0, 1, 3])
def test_upsample_baseline_is_aligned_with_decimation(order):
    # Voxel i of x[::2] must be read back at HR voxel 2i: a linear ramp then comes back
    # exactly for linear and cubic interpolation, and nearest keeps every sampled voxel.
    # A half-voxel misalignment (e.g. scipy.ndimage.zoom's corner alignment) fails this.
    ramp = np.add.outer(np.add.outer(np.arange(24.0), 2 * np.arange(20.0)), 3 * np.arange(20.0))
    lr = ramp[::2, ::2, ::2]
    up = utils.upsample_baseline(lr, 2, order, ramp.shape)
    assert up.shape == ramp.shape
    # Borders follow each method's edge handling; the interior must be exact.
    inner = (slice(8, -8),) * 3
    np.testing.assert_allclose(up[::2, ::2, ::2][4:-4, 4:-4, 4:-4], lr[4:-4, 4:-4, 4:-4], atol=0.05)
    if order:
        np.testing.assert_allclose(up[inner], ramp[inner], atol=0.05)
    else:
        np.testing.assert_array_equal(np.abs(up - ramp).max() > 0, True)  # nearest is blocky


@pytest.mark.parametrize("data_range", [None, 50.0, 400, np.float32(123.5)])
def test_metrics_data_range_argument(data_range):
    rng = np.random.default_rng(1)
    hr = rng.uniform(0, 100, (12, 12, 12))
    sr = hr + rng.normal(0, 5, hr.shape)
    mask = np.zeros(hr.shape, bool)
    mask[1:11, 2:10, 3:9] = True
    psnr, ssim = utils.compute_metrics(hr, sr, mask, data_range=data_range)
    used = max(hr.max(), sr.max()) - min(hr.min(), sr.min()) if data_range is None else float(data_range)
    mse = np.mean((hr * mask - sr * mask) ** 2)
    assert psnr == pytest.approx(10 * np.log10(used ** 2 / mse), rel=1e-6)
    assert np.isfinite(ssim)


def test_metrics_of_an_empty_mask_are_nan_never_inf():
    hr = np.arange(6 * 6 * 6, dtype=np.float64).reshape(6, 6, 6)
    for sr in (hr, hr + 1.0):
        psnr, ssim = utils.compute_metrics(hr, sr, np.zeros(hr.shape, bool))
        assert np.isnan(psnr) and np.isnan(ssim)
    one = np.zeros(hr.shape, bool)
    one[2, 3, 4] = True
    assert utils.compute_metrics(hr, hr + 5 * ~one, one) == (float("inf"), 1.0)  # equal inside the mask
    # NaN rows stay out of a nan-aware mean instead of making it inf.
    assert np.nanmean([30.0, utils.compute_metrics(hr, hr, np.zeros(hr.shape))[0]]) == 30.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_metrics_refuse_a_bad_data_range_or_mask_shape(bad):
    hr = np.ones((4, 4, 4))
    with pytest.raises(ValueError, match="data_range"):
        utils.compute_metrics(hr, hr, data_range=bad)
    with pytest.raises(ValueError, match="mask"):
        utils.compute_metrics(hr, hr, np.ones((4, 4, 3)))


@pytest.mark.parametrize("volume, expected_nf", [
    (np.array([[[0.0, 2.0], [4.0, 8.0]]]), 4.0),
    (np.zeros((2, 2, 2)), 0.0),
    (np.array([[[-3.0, -1.0], [-8.0, -0.5]]]), 0.0),  # only negative intensities
    (np.array([[[-3.0, 0.0], [-8.0, 0.0]]]), 0.0),
])
def test_normalize_never_flips_the_sign(volume, expected_nf):
    out, nf = utils.normalize(volume)
    assert nf == expected_nf and out.dtype == np.float32
    if nf:
        assert out.min() >= -1 and out.max() == 1
    else:
        np.testing.assert_array_equal(out, volume)  # unchanged, not mirrored
    np.testing.assert_allclose(utils.denormalize(out, nf), volume, rtol=1e-6)
