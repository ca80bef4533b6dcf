"""Per-axis upsampling factors (thick-slice scans) end to end: train, resume, evaluate, export, super-resolve."""

import json

import nibabel as nib
import numpy as np
import pytest
from helpers import TINY, checkpoint_state

import model
import phantoms
import train_dataset as td


def _flags(factor, margin):
    flags = list(TINY)
    flags[flags.index("-upsampling_factor") + 1] = factor
    flags[flags.index("-patch_margin") + 1] = margin
    return flags


def _thick_scan(path, factors, seed=2):
    """A phantom decimated by ``factors`` with voxel sizes to match (e.g. 1x1x4 mm), as a scanner writes it."""
    phantoms.make_demo_data(str(path.parent / "src"), subjects=1, shape=(32, 32, 24), seed=seed)
    (folder,) = (path.parent / "src").iterdir()
    source = nib.load(str(folder / "T1_brain_extractedBrainExtractionBrain.nii.gz"))
    hr = source.get_fdata().astype(np.float32)
    lr = td.degrade(hr, factors, 1.0).numpy()
    affine = np.diag([*factors, 1.0]) @ np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-10, 5, 3)
    nib.save(nib.Nifti1Image(lr, affine), str(path))
    return lr.shape, affine


@pytest.mark.parametrize("factor, margin, factors", [("1,1,4", "4", (1, 1, 4)), ("2,2,1", "2", (2, 2, 1))])
def test_per_axis_factor_trains_resumes_evaluates_exports_and_super_resolves(factor, margin, factors, tmp_path,
                                                                            capsys):
    data = tmp_path / "data"
    phantoms.make_demo_data(str(data), subjects=2, shape=(32, 32, 24), seed=1)
    ckpt = tmp_path / "ckpt"
    argv = ["-data_path", str(data), "-checkpoint_dir", str(ckpt), "-epochs", "1", "-train_fraction", "0.5",
            "-path_prediction", str(tmp_path / "pred")] + _flags(factor, margin)
    assert model.main(argv) == 0
    assert json.loads((ckpt / "config.json").read_text())["upsampling_factor"] == list(factors)
    # A resume takes the factor from config.json and restores the per-axis networks (the
    # trained epoch is all there is: it stops there; resumed training is test_training's).
    assert model.main(["-restore", str(ckpt)]) == 0
    assert "nothing to train" in capsys.readouterr().out and checkpoint_state(ckpt)["epoch"] == 1
    # Evaluation: LR volumes with voxel sizes multiplied per axis, SR on the HR grid.
    volumes = tmp_path / "volumes"
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(ckpt), "-path_volumes", str(volumes),
                       "-tta", "flip", "-blend", "gaussian"]) == 0
    (name,) = json.loads((ckpt / "split.json").read_text())["test"]
    hr = nib.load(str(volumes / f"{name}_hr.nii.gz"))
    lr = nib.load(str(volumes / f"{name}_lr.nii.gz"))
    sr = nib.load(str(volumes / f"{name}_sr.nii.gz"))
    assert lr.shape == tuple(n // f for n, f in zip((32, 32, 24), factors)) and sr.shape == hr.shape
    np.testing.assert_allclose(lr.header.get_zooms()[:3], np.array(hr.header.get_zooms()[:3]) * factors)
    np.testing.assert_allclose(lr.affine[:3, :3], hr.affine[:3, :3] @ np.diag(factors), atol=1e-5)
    assert np.isfinite(sr.get_fdata()).all()
    # Exported, the model super-resolves a thick-slice scan onto the fine grid.
    exported = tmp_path / "thick.keras"
    assert model.main(["-export", str(exported), "-checkpoint_dir_restore", str(ckpt)]) == 0
    scan = tmp_path / "scan.nii.gz"
    shape, affine = _thick_scan(scan, factors)
    out = tmp_path / "sr"
    assert model.main(["-super_resolve", str(scan), "-model", str(exported), "-path_volumes", str(out)]) == 0
    result = nib.load(str(out / "scan_sr.nii.gz"))
    assert result.shape == tuple(n * f for n, f in zip(shape, factors))
    np.testing.assert_allclose(result.header.get_zooms()[:3], (1.0, 1.0, 1.0), atol=1e-6)
    np.testing.assert_allclose(result.affine, affine @ np.diag([*(1.0 / np.array(factors)), 1.0]), atol=1e-6)


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
    (["-upsampling_factor", "1,1,3"], "power"),
    (["-upsampling_factor", "1,1,1"], "power of two >= 2"),
    (["-upsampling_factor", "1,1,4,2"], "three such as 1,1,4"),
    (["-upsampling_factor", "1,1,4", "-patch_margin", "2"], "-patch_margin 2 must be divisible"),
    (["-upsampling_factor", "1,1,4", "-patch_shape", "20,20,18"], "axis 2: 18 is not divisible by 4"),
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
