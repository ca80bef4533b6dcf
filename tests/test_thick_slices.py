"""Per-axis upsampling factors (thick-slice scans) end to end: train, resume, evaluate, export, super-resolve."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from helpers import TINY, checkpoint_state

import degradation
import inference
import model
import phantoms
import super_resolve
import train_dataset as td
import utils


def _flags(factor, margin, volume="32,32,24", patch="20,20,16", profile="gaussian"):
    flags = list(TINY)
    for flag, value in (("-upsampling_factor", factor), ("-patch_margin", margin), ("-volume_shape", volume),
                        ("-patch_shape", patch)):
        flags[flags.index(flag) + 1] = value
    return flags + ["-slice_profile", profile]


def _thick_scan(path, factors, profile="gaussian", seed=2):
    """A phantom degraded by ``factors`` with voxel sizes to match (e.g. 1x1x3 mm), as a scanner writes it."""
    phantoms.make_demo_data(str(path.parent / "src"), subjects=1, shape=(30, 30, 24), seed=seed)
    (folder,) = (path.parent / "src").iterdir()
    source = nib.load(str(folder / "T1_brain_extractedBrainExtractionBrain.nii.gz"))
    hr = source.get_fdata().astype(np.float32)
    lr = degradation.degrade(hr, factors, 1.0, profile).numpy()
    affine = np.diag([*factors, 1.0]) @ np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-10, 5, 3)
    nib.save(nib.Nifti1Image(lr, affine), str(path))
    return lr.shape, affine


@pytest.mark.parametrize("factor, profile, margin, volume, patch, factors", [
    ("1,1,3", "box", "3", "32,32,24", "20,20,18", (1, 1, 3)),
    ("3", "gaussian", "3", "30,30,24", "18,18,18", (3, 3, 3)),
    ("2,2,1", "gaussian", "2", "32,32,24", "20,20,16", (2, 2, 1))])
def test_any_factor_trains_resumes_evaluates_exports_and_super_resolves(factor, profile, margin, volume, patch,
                                                                        factors, tmp_path, capsys):
    data = tmp_path / "data"
    phantoms.make_demo_data(str(data), subjects=2, shape=(32, 32, 24), seed=1)
    ckpt = tmp_path / "ckpt"
    argv = ["-data_path", str(data), "-checkpoint_dir", str(ckpt), "-epochs", "1", "-train_fraction", "0.5",
            "-path_prediction", str(tmp_path / "pred")] + _flags(factor, margin, volume, patch, profile)
    assert model.main(argv) == 0
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["upsampling_factor"] == (list(factors) if len(set(factors)) > 1 else factors[0])
    assert saved["slice_profile"] == profile
    # A resume takes the factor and the profile from config.json and restores the networks (the
    # trained epoch is all there is: it stops there; resumed training is test_training's).
    assert model.main(["-restore", str(ckpt)]) == 0
    assert "nothing to train" in capsys.readouterr().out and checkpoint_state(ckpt)["epoch"] == 1
    # Evaluation: LR volumes with voxel sizes multiplied per axis, placed where the profile puts
    # their voxels; SR on the HR grid.
    volumes = tmp_path / "volumes"
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(ckpt), "-path_volumes", str(volumes),
                       "-tta", "flip", "-blend", "gaussian"]) == 0
    (name,) = json.loads((ckpt / "split.json").read_text())["test"]
    hr = nib.load(str(volumes / f"{name}_hr.nii.gz"))
    lr = nib.load(str(volumes / f"{name}_lr.nii.gz"))
    sr = nib.load(str(volumes / f"{name}_sr.nii.gz"))
    canonical = tuple(int(n) for n in volume.split(","))
    assert lr.shape == tuple(n // f for n, f in zip(canonical, factors)) and sr.shape == hr.shape
    np.testing.assert_allclose(lr.header.get_zooms()[:3], np.array(hr.header.get_zooms()[:3]) * factors)
    np.testing.assert_allclose(lr.affine[:3, :3], hr.affine[:3, :3] @ np.diag(factors), atol=1e-5)
    # LR voxel 0 lies on HR voxel (f - 1)/2 of the canonical grid for box (its slab's centre), 0 for gaussian.
    _, grid = td.to_canonical(np.zeros((32, 32, 24)), canonical)
    origin = [(f - 1) / 2 if profile == "box" else 0.0 for f in factors]
    np.testing.assert_allclose((np.linalg.inv(hr.affine) @ lr.affine)[:3, 3], grid.offset() + origin, atol=1e-4)
    assert np.isfinite(sr.get_fdata()).all()
    assert json.loads((volumes / f"{name}_sr.json").read_text())["SliceProfile"] == profile
    # Exported, the model super-resolves a thick-slice scan onto the fine grid.
    exported = tmp_path / "thick.keras"
    assert model.main(["-export", str(exported), "-checkpoint_dir_restore", str(ckpt)]) == 0
    assert f"x{'x'.join(map(str, factors)) if len(set(factors)) > 1 else factors[0]}" in capsys.readouterr().out
    scan = tmp_path / "scan.nii.gz"
    shape, affine = _thick_scan(scan, factors, profile)
    out = tmp_path / "sr"
    assert model.main(["-super_resolve", str(scan), "-model", str(exported), "-path_volumes", str(out)]) == 0
    result = nib.load(str(out / "scan_sr.nii.gz"))
    assert result.shape == tuple(n * f for n, f in zip(shape, factors))
    np.testing.assert_allclose(result.header.get_zooms()[:3], (1.0, 1.0, 1.0), atol=1e-6)
    np.testing.assert_allclose(result.affine, super_resolve.output_affine(affine, factors, profile), atol=1e-6)


def test_a_scan_whose_slice_axis_the_model_does_not_upsample_is_refused(tmp_path, capsys):
    import super_resolve

    messages = []
    super_resolve.check_scan_fits_factors("a.nii.gz", (1.0, 1.0, 4.0), (1, 1, 4), messages.append)
    assert messages == []  # 1x1x4 mm with a 1,1,4 model: isotropic output
    super_resolve.check_scan_fits_factors("b.nii.gz", (1.0, 1.0, 2.0), (1, 1, 4), messages.append)
    assert "b.nii.gz" in messages[0] and "1x1x2 mm" in messages[0] and "1x1x4" in messages[0]
    with pytest.raises(super_resolve.nifti_io.DataError, match="axis 0"):
        super_resolve.check_scan_fits_factors("c.nii.gz", (4.0, 1.0, 1.0), (1, 1, 4), messages.append)
    super_resolve.check_scan_fits_factors("d.nii.gz", (4.0, 1.0, 1.0), 2, messages.append)  # isotropic: as before
    assert len(messages) == 1


@pytest.mark.parametrize("argv, fragment", [
    (["-upsampling_factor", "1,1,3"], "-patch_shape 20,20,16: z = 16 is not divisible by the factor 3; use 15 or 18"),
    (["-upsampling_factor", "1,1,1"], "1,1,1 upsamples no axis"),
    (["-upsampling_factor", "0"], "0 must be an integer >= 2"),
    (["-upsampling_factor", "1,1,4,2"], "three integers >= 1, one per axis"),
    (["-upsampling_factor", "1,1,4", "-patch_margin", "2"], "-patch_margin 2 is not divisible by 4"),
    (["-upsampling_factor", "1,1,4", "-patch_shape", "20,20,18"], "z = 18 is not divisible by the factor 4; use 16 or 20"),
    (["-upsampling_factor", "2,2,3", "-volume_shape", "36,36,24", "-patch_shape", "24,24,18"],
     "-patch_margin 4 is not divisible by 6"),
    (["-upsampling_factor", "3", "-volume_shape", "30,32,24"], "y = 32 is not divisible by the factor 3; use 30 or 33"),
    (["-slice_profile", "slab"], "invalid choice: 'slab'"),
])
def test_per_axis_factor_mistakes_name_the_axis_or_value(argv, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    base = ["-volume_shape", "32,32,24", "-patch_shape", "20,20,16", "-patch_margin", "4"]
    try:
        code = model.main(base + argv)
    except SystemExit as stop:  # argparse's own refusal of a malformed value
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


# ----------------------------------------------------------------------------
# The box slice profile and where thick slices lie
# ----------------------------------------------------------------------------

def _slab_means(x, factors):
    """The box degradation written out with NumPy: each LR voxel the mean of its f-voxel slab per axis."""
    fx, fy, fz = factors
    nx, ny, nz = x.shape
    return x.reshape(nx // fx, fx, ny // fy, fy, nz // fz, fz).mean(axis=(1, 3, 5))


@pytest.mark.parametrize("factors", [(1, 1, 3), (1, 1, 5), (3, 3, 3), (2, 2, 6), (1, 2, 3)])
def test_box_profile_is_the_slab_mean_and_a_patch_cuts_the_volume(factors):
    x = np.random.default_rng(0).random((12, 12, 30), dtype=np.float32)
    lr = degradation.degrade(x, factors, sigma=7.0, slice_profile="box").numpy()  # sigma is not used
    np.testing.assert_allclose(lr, _slab_means(x.astype(np.float64), factors), atol=1e-6)
    # A patch whose start is a multiple of the factor degrades to the cut of the degraded volume, exactly.
    (fx, fy, fz) = factors
    patch = x[fx:3 * fx, fy:3 * fy, fz:3 * fz]  # starts at LR voxel 1, two LR voxels long
    cut = lr[1:3, 1:3, 1:3]
    np.testing.assert_allclose(degradation.degrade(patch, factors, slice_profile="box").numpy(), cut, atol=1e-6)


def test_gaussian_profile_is_unchanged_and_unknown_profiles_are_refused():
    x = np.random.default_rng(1).random((8, 8, 12), dtype=np.float32)
    np.testing.assert_array_equal(degradation.degrade(x, (1, 1, 4), 1.0).numpy(),
                                  degradation.degrade(x, (1, 1, 4), 1.0, "gaussian").numpy())
    with pytest.raises(ValueError, match="slice_profile 'slab' must be one of gaussian, box"):
        degradation.degrade(x, 2, slice_profile="slab")


@pytest.mark.parametrize("f", [2, 3, 5])
def test_a_ramp_degraded_by_box_comes_back_exactly_where_its_slabs_lie(f):
    """Trilinear interpolation read at the slab centres returns a linear ramp exactly; at j / f it would not."""
    z = np.arange(10 * f, dtype=np.float32)
    hr = np.broadcast_to(z, (4, 4, 10 * f)).copy()
    lr = degradation.degrade(hr, (1, 1, f), slice_profile="box").numpy()
    np.testing.assert_allclose(lr[0, 0], f * np.arange(10) + (f - 1) / 2, atol=1e-5)  # slab centres
    back = utils.upsample_baseline(lr, (1, 1, f), 1, hr.shape, "box")
    inner = slice(f, -f)  # the clamped borders are not a ramp
    np.testing.assert_allclose(back[..., inner], hr[..., inner], atol=1e-4)
    misplaced = utils.upsample_baseline(lr, (1, 1, f), 1, hr.shape, "gaussian")
    np.testing.assert_allclose(misplaced[..., inner] - hr[..., inner], (f - 1) / 2, atol=1e-4)


@pytest.mark.parametrize("factors, profile, origin", [((1, 1, 3), "box", (0, 0, 1)), ((1, 1, 4), "box", (0, 0, 1.5)),
                                                      ((2, 2, 2), "gaussian", (0, 0, 0)), (5, "box", (2, 2, 2))])
def test_lr_voxels_lie_at_their_slab_centres(factors, profile, origin):
    affine = utils.lr_grid_affine(factors, profile)
    axes = np.broadcast_to(factors, 3)
    np.testing.assert_allclose(affine, np.array([[axes[0], 0, 0, origin[0]], [0, axes[1], 0, origin[1]],
                                                 [0, 0, axes[2], origin[2]], [0, 0, 0, 1]]))


def test_super_resolved_thin_slices_fill_the_thick_slices_of_a_1x1x3_mm_scan():
    scan = np.diag([1.0, 1.0, 3.0, 1.0])
    scan[:3, 3] = (-90, 20, -40)
    out = super_resolve.output_affine(scan, (1, 1, 3), "box")
    centre = lambda a, k: (a @ [0, 0, k, 1])[2]  # noqa: E731
    # The three thin slices of thick slice 0 are centred on it and span exactly its 3 mm.
    assert np.mean([centre(out, j) for j in range(3)]) == pytest.approx(centre(scan, 0))
    assert centre(out, 0) == pytest.approx(centre(scan, 0) - 1.0) and np.allclose(out[:3, :3], np.eye(3))
    # The gaussian profile keeps the point-sample convention: thin slice 0 on thick slice 0.
    assert centre(super_resolve.output_affine(scan, (1, 1, 3), "gaussian"), 0) == pytest.approx(centre(scan, 0))


def test_the_mirrored_pass_of_a_box_model_needs_no_shift():
    plain = np.zeros((3, 3, 6), np.float32)
    mirrored = np.arange(54, dtype=np.float32).reshape(3, 3, 6)
    assert inference.align_mirrored_pass(mirrored, plain, 2, (1, 1, 3), "box") is mirrored
    shifted = inference.align_mirrored_pass(mirrored, plain, 2, (1, 1, 3), "gaussian")
    np.testing.assert_array_equal(shifted[..., :4], mirrored[..., 2:])


def test_sigma_with_the_box_profile_is_said_to_be_unused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    notes = []
    model.parse_command(_flags("1,1,3", "3", patch="20,20,18", profile="box") + ["-sigma", "2"], log=notes.append)
    assert any("-sigma 2.0 is not used with -slice_profile box" in n for n in notes)


# ----------------------------------------------------------------------------
# Files of earlier versions give the same volumes
# ----------------------------------------------------------------------------

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "models")


def test_a_model_file_and_a_checkpoint_of_earlier_versions_give_the_same_volumes(tmp_path):
    """References made by tests/data/models/make_references.py with the code of 46624b2."""
    import gzip
    import shutil

    import keras

    import checkpoints
    import networks

    lr = np.load(os.path.join(MODELS, "lr.npy"))
    # A 1,2,4 model file (per-axis ×2 stages) exported by 46624b2.
    g = keras.saving.load_model(os.path.join(MODELS, "x124_46624b2.keras"))
    np.testing.assert_allclose(g(lr, training=False).numpy(), np.load(os.path.join(MODELS, "x124_46624b2_sr.npy")),
                               rtol=1e-5, atol=1e-6)
    # The x2 checkpoint of 9a6130d (tests/data/checkpoints), restored into today's generator.
    folder = tmp_path / "9a6130d"
    shutil.copytree(os.path.join(os.path.dirname(MODELS), "checkpoints", "9a6130d"), folder)
    for packed in folder.glob("*.gz"):
        with gzip.open(packed, "rb") as src, open(str(packed)[:-len(".gz")], "wb") as dst:
            shutil.copyfileobj(src, dst)
    saved = json.loads((folder / "config.json").read_text())
    g2 = networks.build_generator(saved["upsampling_factor"], saved["residual_blocks"], saved["feature_size"],
                                  saved["upsampling_mode"])
    checkpoints.restore_generator(g2, str(folder))
    np.testing.assert_allclose(g2(lr, training=False).numpy(), np.load(os.path.join(MODELS, "9a6130d_sr.npy")),
                               rtol=1e-5, atol=1e-6)
