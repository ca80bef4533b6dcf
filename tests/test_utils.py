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


# --------------------------------------------------------------------------- #
# Left-right axis of an affine (for the flip test-time augmentation)
# --------------------------------------------------------------------------- #


def _rot(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine(linear):
    a = np.eye(4)
    a[:3, :3] = linear
    a[:3, 3] = [-90.0, 20.0, 7.0]
    return a


_PERMUTED = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # voxel axis 1 is world x


@pytest.mark.parametrize("linear, axis", [
    (np.eye(3), 0),
    (_PERMUTED, 1),
    (np.diag([-1.0, 1.0, 1.0]), 0),  # flipped x (LPS-like)
    (np.diag([1.0, -1.2, 1.4]), 0),
    (_rot(2, 20) @ np.diag([1.0, 1.1, 1.2]), 0),  # oblique: 20 degrees about z, x still dominant
    (_rot(2, 70), 1),  # 70 degrees about z: voxel axis 1 is now closest to x
    (_rot(1, 20) @ _PERMUTED, 1),  # oblique and permuted
    (np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), 2),  # sagittal slices stacked along axis 2, flipped
])
def test_left_right_axis(linear, axis):
    affine = _affine(linear)
    assert utils.left_right_axis(affine) == axis
    # Flipping the data along that axis (the affine unchanged) mirrors world x most.
    assert np.argmax(np.abs(affine[0, :3]) / np.linalg.norm(affine[:3, :3], axis=0)) == axis


def test_left_right_axis_rejects_bad_affines():
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        utils.left_right_axis(np.eye(3))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        utils.left_right_axis(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="left-right"):  # voxel axis 0 has no extent in the world
        utils.left_right_axis(np.diag([0.0, 1.0, 1.0, 1.0]))


# --------------------------------------------------------------------------- #
# Slice mosaics with titles
# --------------------------------------------------------------------------- #


def _mosaic_volumes():
    rng = np.random.default_rng(4)
    return [rng.uniform(1, 100, (8, 6, 4)).astype(np.float32) for _ in range(3)]


def _find(small, big):
    """Returns every (top, left) where ``small`` sits inside ``big``."""
    h, w = small.shape
    return [(t, l) for t in range(big.shape[0] - h + 1) for l in range(big.shape[1] - w + 1)
            if np.array_equal(big[t:t + h, l:l + w], small)]


def test_mosaic_titles_add_text_above_and_left_and_leave_panels_unchanged():
    vols = _mosaic_volumes()
    plain = utils.slices_mosaic(vols, window=(0, 100), min_panel=32)
    assert plain.shape == ((4 + 2 + 4 + 2 + 6) * 4, (3 * 8 + 2 * 2) * 4)  # today's layout, unchanged
    titled = utils.slices_mosaic(vols, window=(0, 100), min_panel=32, titles=["LR", "SR", "HR"],
                                 header="sub-01  PSNR 31.20 dB  SSIM 0.9412")
    assert titled.dtype == np.uint8
    [(top, left)] = _find(plain, titled)
    assert top > 0 and left > 0
    assert titled[:top].max() == 255  # header and column titles, white on black
    assert titled[top:, :left].max() == 255  # default row labels
    assert titled[:top].min() == 0 and titled[top:, :left].min() == 0
    # Each column title is centred over its column: text in the title band above each panel.
    title_band = titled[top // 2:top, left:]
    for j in range(3):
        assert title_band[:, j * 40:(j + 1) * 40 - 8].max() > 0
    # Header alone: text above, nothing to the left.
    head = utils.slices_mosaic(vols, window=(0, 100), min_panel=32, header="sub-01")
    assert _find(plain, head) == [(head.shape[0] - plain.shape[0], 0)] and head.shape[1] == plain.shape[1]
    # A header wider than the panels widens the image.
    tiny = utils.slices_mosaic(vols, window=(0, 100), min_panel=1, header="sub-ADNI002S0295_ses-M00  PSNR 31.2")
    assert tiny.shape[1] > 3 * 8 + 2 * 2


def test_mosaic_row_labels_and_bad_titles():
    vols = _mosaic_volumes()
    plain = utils.slices_mosaic(vols, window=(0, 100), min_panel=32)
    labelled = utils.slices_mosaic(vols, window=(0, 100), min_panel=32, row_labels=["x", "y", "z"])
    [(top, left)] = _find(plain, labelled)
    assert top == 0 and left > 0 and labelled[:, :left].max() == 255
    with pytest.raises(ValueError, match="2 titles for 3 columns"):
        utils.slices_mosaic(vols, titles=["LR", "SR"])
    with pytest.raises(ValueError, match="row_labels needs 3"):
        utils.slices_mosaic(vols, titles=["LR", "SR", "HR"], row_labels=["a", "b"])


def test_slices_mosaic_layout():
    vols = [np.full((8, 6, 4), v, np.float32) for v in (0.0, 50.0, 100.0)]
    img = utils.slices_mosaic(vols, window=(0, 100), min_panel=1)
    # Rows: sagittal (z, y) 4x6, coronal 4x8, axial 6x8 panels; 2-pixel gaps.
    assert img.shape == (4 + 2 + 4 + 2 + 6, 3 * 8 + 2 * 2)
    assert img.dtype == np.uint8 and img[0, 0] == 0 and img[0, 6 + 2] == 128 and img[0, 12 + 4] == 255
    big = utils.slices_mosaic(vols, window=(0, 100), min_panel=32)
    assert big.shape == (img.shape[0] * 4, img.shape[1] * 4)
