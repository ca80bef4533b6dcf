"""Tests of the patch pipeline (train_dataset.py): canonical grid, patches, degradation, tf.data; CPU, tiny shapes."""

import numpy as np
import pytest
from helpers import Log, huge_claim, write_nifti

import degradation
import layouts
import nifti_io
import train_dataset as td
import utils

# Tiny training geometry used throughout: 40x40x24 canonical, 16x16x8 patches.
VOL = (40, 40, 24)
PATCH = (16, 16, 8)
MARGIN = 2


def _batches(ds):
    return [(lr.numpy(), hr.numpy()) for lr, hr in ds]


# --------------------------------------------------------------------------- #
# Patch geometry
# --------------------------------------------------------------------------- #


def test_default_geometry_matches_original():
    starts = td.patch_starts(td.VOLUME_SHAPE, td.PATCH_SHAPE, td.MARGIN)
    expected = [(x, y, z) for x in (0, 96) for y in (0, 96) for z in (0, 60)]
    assert starts == expected  # x outermost, z innermost
    assert td.patches_per_volume() == 8
    rng = np.random.default_rng(0)
    v = rng.random(td.VOLUME_SHAPE, dtype=np.float32)
    patches = td.extract_patches(v)
    assert patches.shape == (8, 128, 128, 92, 1) and patches.dtype == np.float32
    for p, (x, y, z) in zip(patches, expected):
        np.testing.assert_array_equal(p[..., 0], v[x:x + 128, y:y + 128, z:z + 92])
    np.testing.assert_array_equal(td.stitch_patches(patches, td.VOLUME_SHAPE), v)


@pytest.mark.parametrize("volume_shape, patch_shape, margin", [
    ((100, 90, 70), (64, 48, 32), 8),
    ((17, 16, 9), (16, 5, 3), 1),  # single position, step 1 and repositioned last patch
    ((40, 40, 24), (16, 16, 8), 0),
])
def test_stitch_inverts_extract_for_odd_geometries(volume_shape, patch_shape, margin):
    v = np.random.default_rng(1).normal(size=volume_shape).astype(np.float32)
    patches = td.extract_patches(v[..., None], patch_shape, margin)
    starts = td.patch_starts(volume_shape, patch_shape, margin)
    assert len(patches) == len(starts) == td.patches_per_volume(volume_shape, patch_shape, margin)
    for axis in range(3):  # the last patch ends at the border
        assert max(s[axis] for s in starts) + patch_shape[axis] == volume_shape[axis]
    np.testing.assert_array_equal(td.stitch_patches(patches, volume_shape, margin), v)


def test_stitch_keeps_the_half_of_each_overlap_nearest_the_centre():
    volume_shape, patch_shape, margin = (100, 90, 70), (64, 48, 32), 8
    n = td.patches_per_volume(volume_shape, patch_shape, margin)
    ids = np.arange(n, dtype=np.float32)[:, None, None, None, None] * np.ones((1, *patch_shape, 1), np.float32)
    owner = td.stitch_patches(ids, volume_shape, margin)
    starts = td.patch_starts(volume_shape, patch_shape, margin)
    # Step 48 gives x = 0 only; the last position is moved back to 100 - 64 = 36.
    xs = sorted({s[0] for s in starts})
    assert xs == [0, 36]
    # Overlap of x patches is [36, 64): patch 0 keeps up to 50, patch at 36 from 50.
    first = [i for i, s in enumerate(starts) if s == (0, 0, 0)][0]
    second = [i for i, s in enumerate(starts) if s == (36, 0, 0)][0]
    assert owner[49, 0, 0] == first and owner[50, 0, 0] == second


def test_volume_smaller_than_patch_or_no_step_is_value_error():
    with pytest.raises(ValueError, match=r"\(100, 90, 70\).*\(128, 128, 92\)"):
        td.patch_starts((100, 90, 70), (128, 128, 92), 16)
    with pytest.raises(ValueError, match="smaller than patch_shape"):
        td.extract_patches(np.zeros((10, 10, 10)), (16, 8, 8), 2)
    with pytest.raises(ValueError, match=r"margin 4 .*\(16, 8, 8\)"):
        td.patch_starts((32, 32, 32), (16, 8, 8), 4)
    with pytest.raises(ValueError, match="margin"):
        td.patch_starts((32, 32, 32), (16, 8, 8), -1)
    with pytest.raises(ValueError, match="smaller than patch_shape"):
        td.make_train_dataset([], 2, volume_shape=(8, 8, 8), patch_shape=(16, 16, 16), margin=2)
    with pytest.raises(ValueError, match="8 patches given"):
        td.stitch_patches(np.zeros((8, 16, 16, 8, 1)), (16, 16, 8), 2)


# --------------------------------------------------------------------------- #
# Canonical volume
# --------------------------------------------------------------------------- #


def _original_rule(v):
    """The original's pad/crop, written independently: central crop of axes
    above 256x256x184 (odd extra dropped at the start), zero pad to 256x256x184
    with the extra voxel at the start, crop [16:240, 16:240, 16:168]."""
    target = (256, 256, 184)
    for axis, t in enumerate(target):
        s = v.shape[axis]
        if s > t:
            start = (s - t) // 2
            v = np.take(v, np.arange(start, start + t), axis=axis)
    pad = [(t - s) for s, t in zip(v.shape, target)]
    v = np.pad(v, [((p + 1) // 2, p // 2) for p in pad])
    return v[16:240, 16:240, 16:168]


@pytest.mark.parametrize("shape", [(197, 233, 189), (256, 256, 170), (224, 224, 152),
                                   (255, 201, 184), (160, 191, 133), (300, 261, 190)])
def test_canonical_equals_original_rule_and_goes_back(shape):
    rng = np.random.default_rng(2)
    v = rng.integers(1, 1000, size=shape).astype(np.float32)
    canonical, grid = td.to_canonical(v)
    assert canonical.shape == td.VOLUME_SHAPE and canonical.dtype == v.dtype
    np.testing.assert_array_equal(canonical, _original_rule(v))

    # Back on the source grid: every voxel the canonical volume covers is where it came from.
    back = td.from_canonical(canonical, grid, fill=-1.0)
    assert back.shape == shape
    covered = back != -1
    np.testing.assert_array_equal(back[covered], v[covered])
    expected_cover = np.minimum(shape, td.VOLUME_SHAPE)
    assert covered.sum() == np.prod(expected_cover)

    # Canonical voxel i and source voxel i + offset are the same world point.
    affine = np.array([[0.9, 0.1, 0, -90], [-0.05, 1.1, 0.02, -120], [0, 0.03, 1.2, -60], [0, 0, 0, 1]])
    can_affine = td.canonical_affine(affine, grid)
    offset = grid.offset()
    for i in ([0, 0, 0], [5, 17, 33], [223, 223, 151]):
        i = np.array(i)
        np.testing.assert_allclose(can_affine @ np.r_[i, 1], affine @ np.r_[i + offset, 1])
        if np.all((i + offset >= 0) & (i + offset < shape)):
            assert canonical[tuple(i)] == v[tuple(i + offset)]


def test_mask_goes_through_canonical_like_the_image():
    v = np.zeros((30, 20, 10), np.float32)
    v[3:25, 2:18, 1:9] = 5
    m = v > 0
    (cv, gv), (cm, gm) = td.to_canonical(v, (24, 24, 12)), td.to_canonical(m, (24, 24, 12))
    assert gv == gm and cm.dtype == bool
    np.testing.assert_array_equal(cm, cv > 0)


# --------------------------------------------------------------------------- #
# Degradation
# --------------------------------------------------------------------------- #


def test_degrade_shapes_and_matches_scipy():
    ndi = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(3).random((2, 128, 128, 92, 1), dtype=np.float32)
    lr = degradation.degrade(x, 4).numpy()
    assert lr.shape == (2, 32, 32, 23, 1) and lr.dtype == np.float32
    for b in range(2):
        ref = ndi.gaussian_filter(x[b, ..., 0].astype(np.float64), 1.0)[::4, ::4, ::4]
        np.testing.assert_allclose(lr[b, ..., 0], ref, atol=1e-5)
    odd = np.random.default_rng(4).random((13, 7, 3), dtype=np.float32)  # axes shorter than the kernel
    for f in (2, 3):
        out = degradation.degrade(odd, f, sigma=1.5).numpy()
        ref = ndi.gaussian_filter(odd.astype(np.float64), 1.5)[::f, ::f, ::f]
        assert out.shape == tuple(-(-s // f) for s in odd.shape)
        np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_array_equal(degradation.degrade(odd, 2, sigma=0).numpy(), odd[::2, ::2, ::2])


@pytest.mark.parametrize("profile", ["gaussian", "box"])
@pytest.mark.parametrize("factor", [(2, 1, 1), (1, 3, 1), (1, 1, 2), (1, 1, 3), (1, 1, 5)])
def test_an_axis_that_degrades_to_one_voxel_is_right(factor, profile):
    # oneDNN's strided 1-D convolution along z gave garbage (errors of 0.5 to
    # 1e31) when its output was one voxel long; four volumes, so that a lucky
    # buffer cannot pass for a right answer.
    ndi = pytest.importorskip("scipy.ndimage")
    shape = tuple(f if f > 1 else 9 for f in factor)  # the upsampled axis is one LR voxel long
    x = np.random.default_rng(7).random((4,) + shape + (1,), dtype=np.float32)
    lr = degradation.degrade(x, factor, sigma=1.0, slice_profile=profile).numpy()
    for b in range(4):
        if profile == "box":
            ref = x[b, ..., 0].mean(axis=factor.index(max(factor)), keepdims=True)
        else:
            sigma = tuple(1.0 if f > 1 else 0.0 for f in factor)
            ref = ndi.gaussian_filter(x[b, ..., 0].astype(np.float64), sigma)[::factor[0], ::factor[1], ::factor[2]]
        np.testing.assert_allclose(lr[b, ..., 0], ref, atol=1e-5, err_msg=f"volume {b}")


def test_degrade_never_mixes_batch_items_or_channels():
    rng = np.random.default_rng(5)
    x = rng.random((2, 16, 16, 12, 1), dtype=np.float32)
    x[0] = 0
    both = degradation.degrade(x, 2).numpy()
    alone = degradation.degrade(x[1:], 2).numpy()
    np.testing.assert_array_equal(both[0], 0)
    np.testing.assert_allclose(both[1], alone[0], atol=1e-7)
    two = rng.random((1, 16, 16, 12, 2), dtype=np.float32)
    out = degradation.degrade(two, 2).numpy()
    for c in range(2):
        np.testing.assert_allclose(out[0, ..., c], degradation.degrade(two[0, ..., c], 2).numpy(), atol=1e-7)


def test_degrade_patch_equals_cut_of_degraded_volume_away_from_borders():
    f, radius = 4, 4
    v = np.random.default_rng(6).random((48, 40, 36), dtype=np.float32)
    lr_volume = degradation.degrade(v, f).numpy()
    start, p = (8, 12, 4), (24, 20, 28)  # starts are multiples of f
    patch = v[start[0]:start[0] + p[0], start[1]:start[1] + p[1], start[2]:start[2] + p[2]]
    lr_patch = degradation.degrade(patch, f).numpy()
    # LR voxel j of the patch sits at HR position f*j; away from borders its whole kernel is inside.
    j = [slice(-(-radius // f), (pi - radius - 1) // f + 1) for pi in p]
    cut = lr_volume[tuple(slice(s // f + sl.start, s // f + sl.stop) for s, sl in zip(start, j))]
    assert cut.size > 0
    np.testing.assert_allclose(lr_patch[tuple(j)], cut, atol=1e-6)


def test_degrade_rejects_bad_arguments():
    with pytest.raises(ValueError, match="upsampling_factor 0"):
        degradation.degrade(np.zeros((4, 4, 4)), 0)
    with pytest.raises(ValueError, match="sigma -1"):
        degradation.degrade(np.zeros((4, 4, 4)), 2, sigma=-1)
    with pytest.raises(ValueError, match="shape"):
        degradation.degrade(np.zeros((1, 4, 4, 4)), 2)


# --------------------------------------------------------------------------- #
# Training stream
# --------------------------------------------------------------------------- #


def test_dataset_shapes_ranges_and_count(demo):
    subjects, _ = layouts.find_subjects(demo, log=Log())
    ds = td.make_train_dataset(subjects, 2, batch_size=3, volume_shape=VOL, patch_shape=PATCH,
                               margin=MARGIN, log=Log())
    batches = _batches(ds)
    n = len(subjects) * td.patches_per_volume(VOL, PATCH, MARGIN)  # 5 * 45
    assert len(batches) == td.batches_per_epoch(len(subjects), 3, VOL, PATCH, MARGIN) == -(-n // 3)
    assert sum(len(hr) for _, hr in batches) == n
    for lr, hr in batches:
        assert hr.dtype == lr.dtype == np.float32
        assert hr.shape[1:] == (*PATCH, 1) and lr.shape[1:] == (8, 8, 4, 1)
        assert hr.min() >= -1 and hr.max() <= 1
        np.testing.assert_allclose(lr, degradation.degrade(hr, 2).numpy(), atol=1e-6)
    # Patches are the x-major patches of the first subject of the epoch, each normalised.
    first = td.epoch_order(len(subjects), 0, 0)[0]
    vol, _, _ = nifti_io.load_volume(subjects[first].image_path)
    expected = td.extract_patches(td.to_canonical(vol, VOL)[0], PATCH, MARGIN)
    got = np.concatenate([hr for _, hr in batches])[: len(expected)]
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, utils.normalize(e)[0], atol=1e-6)
    assert ds.element_spec[1].shape.as_list() == [None, *PATCH, 1]


def test_dataset_can_yield_normalisation_factors(demo):
    subjects, _ = layouts.find_subjects(demo, log=Log())
    kwargs = dict(batch_size=4, volume_shape=VOL, patch_shape=PATCH, margin=MARGIN, log=Log())
    plain = _batches(td.make_train_dataset(subjects[:2], 2, **kwargs))
    with_nf = [tuple(t.numpy() for t in b) for b in td.make_train_dataset(subjects[:2], 2, with_norm_factor=True,
                                                                          **kwargs)]
    assert len(plain) == len(with_nf)
    first = td.epoch_order(2, 0, 0)[0]
    vol, _, _ = nifti_io.load_volume(subjects[first].image_path)
    raw = td.extract_patches(td.to_canonical(vol, VOL)[0], PATCH, MARGIN)
    for (lr, hr), (lr2, hr2, nf) in zip(plain, with_nf):
        np.testing.assert_array_equal(hr, hr2)
        np.testing.assert_array_equal(lr, lr2)
        assert nf.shape == (len(hr),) and nf.dtype == np.float32
    nf = np.concatenate([b[2] for b in with_nf])[: len(raw)]
    hr = np.concatenate([b[1] for b in with_nf])[: len(raw)]
    np.testing.assert_allclose(nf, raw.max(axis=(1, 2, 3, 4)) / 2, rtol=1e-6)
    for h, f, r in zip(hr, nf, raw):
        np.testing.assert_allclose(utils.denormalize(h, f), r, rtol=1e-5, atol=1e-3)


def test_default_batching_keeps_a_volume_in_four_batches(demo):
    subjects, _ = layouts.find_subjects(demo, log=Log())
    geometry = dict(volume_shape=(40, 40, 24), patch_shape=(24, 24, 16), margin=2)
    assert td.patches_per_volume(**geometry) == 8
    batches = _batches(td.make_train_dataset(subjects[:2], 4, log=Log(), **geometry))
    assert len(batches) == 8 and all(hr.shape == (2, 24, 24, 16, 1) for _, hr in batches)
    assert all(lr.shape == (2, 6, 6, 4, 1) for lr, _ in batches)


def test_dataset_order_depends_on_seed_and_epoch_only(demo):
    subjects, _ = layouts.find_subjects(demo, log=Log())
    kwargs = dict(batch_size=td.patches_per_volume(VOL, PATCH, MARGIN), volume_shape=VOL, patch_shape=PATCH, margin=MARGIN, log=Log())

    def firsts(**kw):  # one batch per volume: its first patch identifies the subject
        return [hr[0] for _, hr in _batches(td.make_train_dataset(subjects, 2, **kwargs, **kw))]

    def order(patches):
        refs = firsts(seed=0, epoch=0)
        return [int(np.argmin([np.abs(p - r).max() for r in refs])) for p in patches]

    a, b = firsts(seed=0, epoch=1), firsts(seed=0, epoch=1)
    assert order(a) == order(b)
    orders = {tuple(order(firsts(seed=0, epoch=e))) for e in range(4)}
    assert len(orders) > 1
    for o in orders:
        assert sorted(o) == list(range(len(subjects)))
    assert not np.array_equal(td.epoch_order(50, 1, 0), td.epoch_order(50, 0, 0))
    np.testing.assert_array_equal(td.epoch_order(50, 7, 3), td.epoch_order(50, 7, 3))


def test_dataset_skips_a_truncated_gzip_without_stopping(demo, tmp_path):
    subjects, _ = layouts.find_subjects(demo, log=Log())
    broken = tmp_path / "broken" / layouts.IMAGE_NAME
    broken.parent.mkdir()
    raw = open(subjects[0].image_path, "rb").read()
    broken.write_bytes(raw[: len(raw) // 2])
    nan_path = str(tmp_path / "nan" / layouts.IMAGE_NAME)
    vol = nifti_io.load_volume(subjects[1].image_path)[0]
    vol[5:9, 5:9, 5:9] = np.nan
    write_nifti(nan_path, vol)
    # The header check passes (only the data are cut), so the subject reaches training.
    found, problems = layouts.find_subjects(str(tmp_path), log=Log())
    assert {s.name for s in found} == {"broken", "nan"} and problems == []
    mixed = subjects[1:3] + [layouts.Subject("broken", str(broken), None), layouts.Subject("nan", nan_path, None)]
    log = Log()
    batches = _batches(td.make_train_dataset(mixed, 2, batch_size=4, volume_shape=VOL, patch_shape=PATCH,
                                             margin=MARGIN, log=log))
    per_volume = td.patches_per_volume(VOL, PATCH, MARGIN)
    assert sum(len(hr) for _, hr in batches) == 3 * per_volume
    assert all(np.isfinite(hr).all() and np.isfinite(lr).all() for lr, hr in batches)
    skipped = [m for m in log.lines if "Skipping" in m]
    assert len(skipped) == 1 and str(broken) in skipped[0] and "cannot read" in skipped[0]
    assert any(nan_path in m and "64 NaN/inf" in m for m in log.lines)


def test_dataset_argument_checks(demo):
    with pytest.raises(ValueError, match="patch_shape 16,16,8: x = 16 is not divisible by the factor 3"):
        td.make_train_dataset([], 3, volume_shape=VOL, patch_shape=PATCH, margin=MARGIN)
    with pytest.raises(ValueError, match="batch_size 0"):
        td.make_train_dataset([], 2, batch_size=0, volume_shape=VOL, patch_shape=PATCH, margin=MARGIN)
    assert _batches(td.make_train_dataset([], 2, volume_shape=VOL, patch_shape=PATCH, margin=MARGIN)) == []


# --------------------------------------------------------------------------- #
# Stopping on failures that are not bad data (bad files are skipped)
# --------------------------------------------------------------------------- #


def test_dataset_skips_bad_files_and_reports_each_via_on_skip(demo, tmp_path):
    subjects, _ = layouts.find_subjects(demo, log=Log())
    raw = open(subjects[0].image_path, "rb").read()
    truncated = tmp_path / "trunc" / layouts.IMAGE_NAME
    truncated.parent.mkdir()
    truncated.write_bytes(raw[: len(raw) // 2])
    negative = write_nifti(str(tmp_path / "neg" / layouts.IMAGE_NAME), -np.ones((40, 40, 24)))
    huge = str(tmp_path / "huge.nii.gz")
    huge_claim(huge)
    mixed = subjects[1:3] + [layouts.Subject("trunc", str(truncated)), layouts.Subject("neg", negative),
                             layouts.Subject("huge", huge)]
    skipped, failures, log = [], [], Log()
    ds = td.make_train_dataset(mixed, 2, batch_size=4, volume_shape=VOL, patch_shape=PATCH, margin=MARGIN,
                               log=log, on_skip=lambda p, r: skipped.append((p, r)), failures=failures)
    batches = _batches(ds)
    assert sum(len(hr) for _, hr in batches) == 2 * td.patches_per_volume(VOL, PATCH, MARGIN)
    assert failures == []
    reasons = dict(skipped)
    assert sorted(reasons) == sorted([str(truncated), negative, huge])
    assert reasons[str(truncated)].startswith("cannot read the NIfTI data (EOFError")
    assert reasons[negative].startswith("maximum intensity -1 <= 0")
    assert reasons[huge].startswith("header claims 1000000000 voxels")
    assert sum("Skipping" in m for m in log.lines) == 3


def test_dataset_stops_on_memory_error_and_keeps_the_original(demo, monkeypatch):
    import tensorflow as tf

    subjects, _ = layouts.find_subjects(demo, log=Log())
    real = nifti_io.load_volume
    oom = MemoryError("Unable to allocate 2.60 GiB for an array with shape (1000, 1000, 700)")
    victim = subjects[td.epoch_order(len(subjects), 0, 0)[1]].image_path

    def load_volume(path, *args, **kwargs):
        if path == victim:
            raise oom
        return real(path, *args, **kwargs)

    monkeypatch.setattr(nifti_io, "load_volume", load_volume)
    skipped, failures = [], []
    ds = td.make_train_dataset(subjects, 2, batch_size=4, volume_shape=VOL, patch_shape=PATCH, margin=MARGIN,
                               log=Log(), on_skip=lambda p, r: skipped.append(p), failures=failures)
    with pytest.raises(tf.errors.OpError) as info:
        _batches(ds)
    assert skipped == [] and failures and failures[0] is oom
    assert td.unwrap_pipeline_error(info.value, failures) is oom
    # Without the list, the TF error still becomes a readable PipelineError.
    fallback = td.unwrap_pipeline_error(info.value)
    assert isinstance(fallback, nifti_io.PipelineError)
    assert "MemoryError: Unable to allocate 2.60 GiB" in str(fallback) and "Traceback" not in str(fallback)
    plain = ValueError("not a tf error")
    assert td.unwrap_pipeline_error(plain) is plain


def test_dataset_stops_when_the_data_folder_disappears(demo, tmp_path):
    import shutil

    import tensorflow as tf

    root = tmp_path / "data"
    shutil.copytree(demo, root)
    subjects, _ = layouts.find_subjects(str(root), log=Log())
    shutil.rmtree(root)
    skipped, failures = [], []
    ds = td.make_train_dataset(subjects, 2, volume_shape=VOL, patch_shape=PATCH, margin=MARGIN, log=Log(),
                               on_skip=lambda p, r: skipped.append(p), failures=failures)
    with pytest.raises(tf.errors.OpError) as info:
        _batches(ds)
    err = td.unwrap_pipeline_error(info.value, failures)
    assert isinstance(err, nifti_io.PipelineError) and skipped == []
    assert str(err).startswith(f"data folder {root} has disappeared")


# Gaussian blending of patches (MONAI's sliding-window mode="gaussian")
# --------------------------------------------------------------------------- #


def _coverage(volume_shape, patch_shape, margin):
    count = np.zeros(volume_shape, np.int64)
    for x, y, z in td.patch_starts(volume_shape, patch_shape, margin):
        count[x:x + patch_shape[0], y:y + patch_shape[1], z:z + patch_shape[2]] += 1
    return count


@pytest.mark.parametrize("volume_shape, patch_shape, margin", [
    (VOL, PATCH, MARGIN),
    ((17, 16, 9), (16, 5, 3), 1),  # repositioned last patch, odd sizes
])
def test_gaussian_blend_keeps_constants_and_inverts_extract(volume_shape, patch_shape, margin):
    n = td.patches_per_volume(volume_shape, patch_shape, margin)
    constant = np.full((n, *patch_shape, 1), 3.7, np.float32)
    np.testing.assert_array_equal(td.stitch_patches(constant, volume_shape, margin, blend="gaussian"),
                                  np.full(volume_shape, 3.7, np.float32))
    v = np.random.default_rng(2).normal(size=volume_shape).astype(np.float32)
    patches = td.extract_patches(v, patch_shape, margin)
    for sigma_scale in (0.125, 0.01):  # 0.01: border weights underflow to the clamp
        out = td.stitch_patches(patches, volume_shape, margin, blend="gaussian", sigma_scale=sigma_scale)
        assert out.dtype == np.float32 and np.all(np.isfinite(out))
        np.testing.assert_array_equal(out, v)


def test_gaussian_and_crop_agree_where_one_patch_covers_a_voxel():
    n = td.patches_per_volume(VOL, PATCH, MARGIN)
    # Independent patches (as network outputs are): overlaps disagree.
    patches = np.random.default_rng(3).uniform(0, 100, (n, *PATCH, 1)).astype(np.float32)
    crop = td.stitch_patches(patches, VOL, MARGIN, blend="crop")
    gauss = td.stitch_patches(patches, VOL, MARGIN, blend="gaussian")
    single = _coverage(VOL, PATCH, MARGIN) == 1
    assert 0 < single.sum() < single.size
    np.testing.assert_array_equal(gauss[single], crop[single])
    assert np.mean(gauss[~single] != crop[~single]) > 0.99


def test_gaussian_blend_matches_the_weighted_mean_written_out():
    volume_shape, patch_shape, margin = (24, 8, 8), (16, 8, 8), 2
    starts = td.patch_starts(volume_shape, patch_shape, margin)
    assert [s[0] for s in starts] == [0, 8]  # two patches along x only, overlap [8, 16)
    patches = np.stack([np.full((*patch_shape, 1), 10.0), np.full((*patch_shape, 1), 20.0)]).astype(np.float32)
    out = td.stitch_patches(patches, volume_shape, margin, blend="gaussian")
    sigma, centre = 0.125 * 16, 7.5  # sigma = 0.125 x patch size, centred on the patch
    for x in range(8, 16):
        w0 = np.exp(-0.5 * ((x - centre) / sigma) ** 2)
        w1 = np.exp(-0.5 * ((x - 8 - centre) / sigma) ** 2)
        # y and z weights are the same for both patches and cancel.
        np.testing.assert_allclose(out[x, 3, 5], (10 * w0 + 20 * w1) / (w0 + w1), rtol=1e-6)
    assert out[11, 0, 0] < 15 < out[12, 0, 0]  # the midpoint of the overlap, by symmetry


def test_stitch_rejects_unknown_blend_and_bad_sigma_scale():
    patches = np.zeros((td.patches_per_volume(VOL, PATCH, MARGIN), *PATCH, 1), np.float32)
    assert td.BLEND_MODES == ("crop", "gaussian")
    with pytest.raises(ValueError, match="blend 'mean' must be one of crop, gaussian"):
        td.stitch_patches(patches, VOL, MARGIN, blend="mean")
    for bad in (0, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="sigma_scale"):
            td.stitch_patches(patches, VOL, MARGIN, blend="gaussian", sigma_scale=bad)


def test_shards_split_the_epoch_order_by_whole_subjects(demo):
    subjects, _ = layouts.find_subjects(demo, log=Log())
    kwargs = dict(batch_size=1, volume_shape=VOL, patch_shape=PATCH, margin=MARGIN, seed=3, epoch=1)
    whole = [hr for _, hr in _batches(td.make_train_dataset(subjects, 2, **kwargs))]
    shards = [[hr for _, hr in _batches(td.make_train_dataset(subjects, 2, shard=(i, 2), **kwargs))]
              for i in range(2)]
    ppv = td.patches_per_volume(VOL, PATCH, MARGIN)
    # Shard i holds the volumes at positions i, i+2, ... of the same epoch order, whole.
    for i, shard in enumerate(shards):
        expected = [whole[v * ppv + k] for v in range(i, len(subjects), 2) for k in range(ppv)]
        assert len(shard) == len(expected)
        for a, b in zip(shard, expected):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="shard"):
        td.make_train_dataset(subjects, 2, shard=(2, 2), **kwargs)


# ----------------------------------------------------------------------------
# Per-axis factors (thick-slice scans)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("factors", [(1, 1, 4), (2, 2, 1), (1, 2, 4)])
def test_per_axis_degradation_blurs_and_decimates_only_the_upsampled_axes(factors):
    from scipy import ndimage

    x = np.random.default_rng(4).normal(size=(16, 12, 16)).astype(np.float32)
    sigma = 1.0
    expected = ndimage.gaussian_filter(x.astype(np.float64), [sigma * (f > 1) for f in factors], mode="reflect",
                                       truncate=4.0)[::factors[0], ::factors[1], ::factors[2]]
    got = degradation.degrade(x, factors, sigma).numpy()
    assert got.shape == tuple(-(-n // f) for n, f in zip(x.shape, factors))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_isotropic_factor_given_per_axis_degrades_as_the_int():
    x = np.random.default_rng(5).normal(size=(2, 12, 10, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(degradation.degrade(x, (2, 2, 2), 0.7).numpy(), degradation.degrade(x, 2, 0.7).numpy())


def test_per_axis_margins_cut_and_stitch_exactly():
    volume = np.random.default_rng(6).normal(size=(20, 20, 6)).astype(np.float32)
    # The LR patches of a 1,1,4 factor: margin 4 in-plane, 1 along the thick axis.
    patches = td.extract_patches(volume, (12, 12, 4), (4, 4, 1))
    assert len(patches) == len(td.patch_starts(volume.shape, (12, 12, 4), (4, 4, 1)))
    for blend in td.BLEND_MODES:
        np.testing.assert_allclose(td.stitch_patches(patches, volume.shape, (4, 4, 1), blend=blend), volume,
                                   rtol=1e-6)
    with pytest.raises(ValueError, match="margin"):
        td.patch_starts(volume.shape, (12, 12, 4), (4, 4, 2))  # no step left along z
