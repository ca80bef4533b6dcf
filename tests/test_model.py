"""Command line, trainer, losses, evaluation and super-resolution tests on tiny demo data."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

import config
import durable
import errors
import inference
import layouts
import metrics
import model
import networks
import phantoms
import quiet
import train_dataset as td
import training
import utils
from config import PERSISTED, PRECISION_POLICIES, adopt_saved_settings
from losses import discriminator_loss, draw_targets, generator_losses
from trainer import SRGANTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_TRAIN = ("-path_prediction YOURPATH -checkpoint_dir YOURCHECKPOINTPATH -residual_blocks 8 "
              "-upsampling_factor 2 -subpixel_NN True -feature_size 64").split()
SEED_TEST = ("-path_volumes YOURPATH -checkpoint_dir_restore YOURCHECKPOINTPATH -residual_blocks 8 "
             "-upsampling_factor 2 -subpixel_NN True -feature_size 64 -evaluate True").split()
# 32x32x24 volumes, 20x20x16 patches, margin 2: 2 positions per axis, 8 patches as the original.
TINY = ["-volume_shape", "32,32,24", "-patch_shape", "20,20,16", "-patch_margin", "2",
        "-feature_size", "4", "-residual_blocks", "1", "-upsampling_factor", "2"]


def _args(argv):
    return model.build_parser().parse_args(argv)


# ----------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------

def test_seed_readme_train_command_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("data")  # the default -data_path
    command = model.parse_command(SEED_TRAIN, log=lambda *_: None)
    cfg = command.settings
    assert cfg.path_prediction == "YOURPATH" and cfg.checkpoint_dir == "YOURCHECKPOINTPATH"
    assert cfg.residual_blocks == 8 and cfg.upsampling_factor == 2 and cfg.feature_size == 64
    assert cfg.upsampling_mode == "subpixel_NN" and command.action == "train"
    assert cfg.restore is None and cfg.epochs == 10


def test_seed_readme_test_command_parses_and_needs_a_checkpoint(tmp_path):
    args = _args(SEED_TEST)
    assert args.evaluate is True and args.checkpoint_dir_restore == "YOURCHECKPOINTPATH"
    assert args.path_volumes == "YOURPATH" and args.subpixel_NN is True
    with pytest.raises(errors.UserError, match="YOURCHECKPOINTPATH.*does not exist"):
        model.resolve_command(args, log=lambda *_: None)


def test_defaults_match_the_original(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("data")
    command = model.parse_command([], log=lambda *_: None)
    cfg = command.settings
    assert (cfg.residual_blocks, cfg.upsampling_factor, cfg.feature_size) == (6, 4, 32)
    assert cfg.upsampling_mode == "subpixel" and cfg.epochs == 10 and cfg.batch_size == 2
    assert cfg.volume_shape == (224, 224, 152) and cfg.patch_shape == (128, 128, 92)
    assert cfg.patch_margin == 16 and cfg.train_fraction == 0.8 and cfg.learning_rate == 1e-4
    assert command.action == "train"


@pytest.mark.parametrize("text, value", [("True", True), ("false", False), ("1", True), ("0", False),
                                         ("YES", True), ("no", False)])
def test_boolean_flags(text, value):
    args = _args(["-subpixel_NN", text, "--nn", text])
    assert args.subpixel_NN is value and args.nn is value


def test_bare_boolean_flag_means_true():
    assert _args(["-evaluate"]).evaluate is True


@pytest.mark.parametrize("argv, fragment", [
    (["-subpixel_NN", "maybe"], "-subpixel_NN"),
    (["-upsampling_factor", "two"], "-upsampling_factor"),
    (["-patch_shape", "16,16"], "-patch_shape"),
    (["-feature_size", "0"], "-feature_size"),
])
def test_bad_flag_values_name_the_flag(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        _args(argv)
    assert exc.value.code != 0
    assert fragment in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        _args(["-h"])
    text = capsys.readouterr().out
    for name in [*config.defaults(), *model.MODE_FLAGS]:
        if name != "upsampling_mode":  # chosen by the two mode flags
            assert f"-{name}" in text
    assert "(default: 224,224,152)" in text and "(default: 6)" in text


@pytest.mark.parametrize("argv, message", [
    (["-upsampling_factor", "3"], "power of two"),
    (["-patch_shape", "16,16,11", "-volume_shape", "32,32,24", "-upsampling_factor", "2"],
     "patch_shape 16,16,11 must be divisible by -upsampling_factor 2"),
    (["-patch_shape", "64,64,64", "-volume_shape", "32,32,24", "-upsampling_factor", "2"], "larger than"),
    (["-patch_margin", "8", "-patch_shape", "16,16,12", "-volume_shape", "32,32,24",
      "-upsampling_factor", "2"], "leaves no step"),
    (["-evaluate", "True"], "needs -checkpoint_dir_restore"),
    (["-super_resolve", "scan.nii.gz"], "needs -checkpoint_dir_restore"),
    (["-train_fraction", "1.5"], "-train_fraction 1.5"),
    (["-data_path", "/nonexistent/adni"], "-data_path '/nonexistent/adni' does not exist"),
])
def test_contradictory_or_missing_flags_fail_before_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if "-data_path" not in argv:
        os.mkdir("data")
    assert model.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ----------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------

def test_losses_match_numpy():
    rng = np.random.default_rng(0)
    hr = rng.uniform(-1, 1, (2, 6, 5, 4, 1)).astype(np.float32)
    sr = rng.uniform(-1, 1, (2, 6, 5, 4, 1)).astype(np.float32)
    d_fake = rng.normal(size=(2, 1)).astype(np.float32)
    t = rng.uniform(0.7, 1.2, (2, 1)).astype(np.float32)
    out = {k: float(v) for k, v in generator_losses(hr, sr, d_fake, t).items()}
    gdl = sum(np.sum((np.abs(np.diff(hr, axis=a)) - np.abs(np.diff(sr, axis=a))) ** 2) for a in (1, 2, 3))
    assert out["mse"] == pytest.approx(np.sum((sr - hr) ** 2), rel=1e-5)
    assert out["gdl"] == pytest.approx(gdl, rel=1e-5)
    assert out["adv"] == pytest.approx(0.1 * np.mean((d_fake - t) ** 2), rel=1e-5)
    assert out["g_loss"] == pytest.approx(out["mse"] + out["gdl"] + out["adv"], rel=1e-6)
    d_real = rng.normal(size=(2, 1)).astype(np.float32)
    tr, tf_ = np.full((2, 1), 0.9, np.float32), np.full((2, 1), 0.1, np.float32)
    assert float(discriminator_loss(d_real, d_fake, tr, tf_)) == pytest.approx(
        np.mean((d_real - tr) ** 2) + np.mean((d_fake - tf_) ** 2), rel=1e-5)


def test_targets_are_smoothed_and_flipped_one_time_in_ten():
    flips, n = 0, 2000
    for step in range(n):
        t_real, t_fake, flipped, t_gen = draw_targets(7, step, 2)
        real, fake = t_real.numpy(), t_fake.numpy()
        assert real.shape == fake.shape == t_gen.shape == (2, 1)
        if bool(flipped):
            flips += 1
            real, fake = fake, real
        assert np.all((real >= 0.7) & (real < 1.2)) and np.all((fake >= 0) & (fake < 0.3))
        assert np.all((t_gen.numpy() >= 0.7) & (t_gen.numpy() < 1.2))
    assert 0.07 < flips / n < 0.13


def test_targets_are_a_function_of_seed_and_step_only():
    same = [np.concatenate([t.numpy().ravel() for t in draw_targets(3, 41, 4)]) for _ in range(2)]
    np.testing.assert_array_equal(same[0], same[1])
    other = np.concatenate([t.numpy().ravel() for t in draw_targets(3, 42, 4)])
    assert not np.array_equal(same[0], other)


# ----------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------

def _tiny_trainer(run_eagerly=False):
    g = networks.build_generator(2, residual_blocks=1, feature_size=4)
    d = networks.build_discriminator((8, 8, 6, 1))
    return SRGANTrainer(g, d, learning_rate=1e-4, seed=1, run_eagerly=run_eagerly)


def test_train_step_returns_scalars_and_decays_learning_rate():
    trainer = _tiny_trainer()
    hr = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 6, 1)).astype(np.float32)
    lr = np.asarray(td.degrade(hr, 2))
    before = [w.numpy().copy() for w in trainer.generator.trainable_weights]
    out = trainer.train_step(lr, hr)
    assert set(out) >= {"d_loss", "g_loss", "mse", "gdl", "adv", "learning_rate", "flipped"}
    assert all(isinstance(v, tf.Tensor) and v.shape == () for v in out.values())  # no host sync
    out = {k: float(v) for k, v in out.items()}
    assert all(np.isfinite(v) for v in out.values())
    assert out["learning_rate"] == pytest.approx(1e-4)
    assert int(trainer.step) == 1 and int(trainer.g_optimizer.iterations) == 1
    assert int(trainer.d_optimizer.iterations) == 1
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, trainer.generator.trainable_weights))
    trainer.g_optimizer.iterations.assign(4920)
    assert trainer.learning_rate == pytest.approx(1e-4 / 1.5)


def test_eager_and_compiled_steps_agree():
    results = []
    for eager in (True, False):
        tf.keras.utils.set_random_seed(5)
        trainer = _tiny_trainer(run_eagerly=eager)
        hr = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 6, 1)).astype(np.float32)
        results.append({k: float(v) for k, v in trainer.train_step(np.asarray(td.degrade(hr, 2)), hr).items()})
    for key in ("d_loss", "g_loss", "mse"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-3)  # graph vs eager round-off


# ----------------------------------------------------------------------------
# End to end on tiny phantoms: train, restore, evaluate, super-resolve
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Trains one epoch on 5 tiny phantoms (4 train, 1 test); shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    phantoms.make_demo_data(str(data), subjects=5, shape=(34, 30, 26), seed=0)
    ckpt = root / "ckpt"
    argv = ["-data_path", str(data), "-checkpoint_dir", str(ckpt), "-epochs", "1",
            "-path_prediction", str(root / "pred")] + TINY
    assert model.main(argv) == 0
    return {"root": root, "data": data, "ckpt": ckpt, "argv": argv}


def test_training_writes_checkpoint_configuration_split_and_previews(run):
    ckpt = run["ckpt"]
    assert tf.train.latest_checkpoint(str(ckpt)) is not None
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["feature_size"] == 4 and saved["upsampling_mode"] == "subpixel"
    assert saved["patch_shape"] == [20, 20, 16]
    split = json.loads((ckpt / "split.json").read_text())
    assert len(split["train"]) == 4 and len(split["test"]) == 1
    assert sorted(split["train"] + split["test"]) == split["train"] + split["test"]
    previews = sorted(os.listdir(run["root"] / "pred"))
    assert any(p.endswith("_hr.nii.gz") for p in previews) and any(p.endswith("_sr.nii.gz") for p in previews)
    lr_preview = nib.load(str(run["root"] / "pred" / [p for p in previews if p.endswith("_lr.nii.gz")][0]))
    assert lr_preview.shape == (10, 10, 8) and lr_preview.header.get_zooms()[:3] == (2.0, 2.0, 2.0)
    assert any(n.startswith("events") for n in os.listdir(ckpt / "logs"))


def _checkpoint_state(folder):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(folder)))
    get = lambda key: reader.get_tensor(key)  # noqa: E731
    return {"epoch": int(get("epoch/.ATTRIBUTES/VARIABLE_VALUE")),
            "step": int(get("step/.ATTRIBUTES/VARIABLE_VALUE")),
            "g_iter": int(get("g_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")),
            "d_iter": int(get("d_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))}


def test_training_again_into_the_same_folder_refuses_to_overwrite(run, capsys):
    assert model.main(run["argv"]) == 2
    assert "-restore" in capsys.readouterr().err


def test_restore_continues_epoch_step_and_optimiser(run, tmp_path):
    first = _checkpoint_state(run["ckpt"])
    assert first["epoch"] == 1 and first["step"] == 16  # 4 volumes x 8 patches / batch 2
    assert first["g_iter"] == first["d_iter"] == 16
    # Resume into a copy so the other tests keep the one-epoch run.
    resumed = tmp_path / "resumed"
    argv = ["-restore", str(run["ckpt"]), "-checkpoint_dir", str(resumed), "-epochs", "2",
            "-data_path", str(run["data"]), "-path_prediction", str(tmp_path / "pred")]
    assert model.main(argv) == 0
    second = _checkpoint_state(resumed)
    assert second == {"epoch": 2, "step": 32, "g_iter": 32, "d_iter": 32}
    # The architecture came from the saved configuration (no flags passed).
    assert json.loads((resumed / "config.json").read_text())["feature_size"] == 4


def test_restore_with_contradicting_architecture_names_the_flags(run, capsys):
    argv = ["-restore", str(run["ckpt"]), "-feature_size", "8", "-nn", "True", "-epochs", "2"]
    assert model.main(argv) == 2
    err = capsys.readouterr().err
    assert "-feature_size 8, the checkpoint uses -feature_size 4" in err
    assert "'nn'" in err and "Traceback" not in err


def test_evaluate_writes_volumes_on_source_grid_metrics_and_pngs(run, tmp_path):
    out = tmp_path / "volumes"
    argv = ["-evaluate", "True", "-checkpoint_dir_restore", str(run["ckpt"]), "-path_volumes", str(out)]
    assert model.main(argv) == 0
    split = json.loads((run["ckpt"] / "split.json").read_text())
    (name,) = split["test"]
    source = nib.load(str(run["data"] / name / layouts.IMAGE_NAME))
    for kind in ("sr", "hr"):
        img = nib.load(str(out / f"{name}_{kind}.nii.gz"))
        assert img.shape == source.shape
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
    lr = nib.load(str(out / f"{name}_lr.nii.gz"))
    assert lr.shape == (16, 16, 12)
    np.testing.assert_allclose(lr.header.get_zooms()[:3], 2 * np.array(source.header.get_zooms()[:3]),
                               rtol=1e-5)
    # LR voxel i lies where source voxel offset + 2*i lies: the LR overlays the HR in a viewer.
    offset = td.canonical_grid(source.shape, (32, 32, 24)).offset()
    for i in [(0, 0, 0), (3, 5, 7), (15, 15, 11)]:
        np.testing.assert_allclose(lr.affine @ np.r_[i, 1],
                                   source.affine @ np.r_[offset + 2 * np.array(i), 1], atol=1e-4)
    _, rows = durable.read_csv_rows(out / "metrics.csv")  # after its "# setting: value" lines
    assert list(rows[0]) == list(metrics.METRIC_COLUMNS) and rows[0]["subject"] == name
    assert all(np.isfinite(float(rows[0][k])) for k in metrics.METRIC_COLUMNS[1:])
    assert (out / f"{name}_slices.png").stat().st_size > 100
    # The HR written equals the source inside the canonical region.
    hr = nib.load(str(out / f"{name}_hr.nii.gz")).get_fdata()
    src = source.get_fdata()
    inside = hr != 0
    np.testing.assert_allclose(hr[inside], src[inside], rtol=1e-5)


def test_evaluate_with_mismatched_architecture_is_a_clear_error(run, tmp_path, capsys):
    argv = ["-evaluate", "True", "-checkpoint_dir_restore", str(run["ckpt"]), "-residual_blocks", "3",
            "-path_volumes", str(tmp_path)]
    assert model.main(argv) == 2
    assert "-residual_blocks 3, the checkpoint uses -residual_blocks 1" in capsys.readouterr().err


def test_super_resolve_shape_and_affine(run, tmp_path):
    affine = np.array([[0.0, -2.0, 0.0, 40.0], [2.2, 0.0, 0.0, -30.0], [0.0, 0.0, 2.4, 10.0], [0, 0, 0, 1]])
    scan = np.random.default_rng(0).uniform(0, 300, (11, 9, 7)).astype(np.float32)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scan, affine), str(path))
    argv = ["-super_resolve", str(path), "-checkpoint_dir_restore", str(run["ckpt"]),
            "-path_volumes", str(tmp_path / "out")]
    assert model.main(argv) == 0
    sr = nib.load(str(tmp_path / "out" / "scan_sr.nii.gz"))
    assert sr.shape == (22, 18, 14)
    np.testing.assert_allclose(sr.affine, affine @ np.diag([0.5, 0.5, 0.5, 1.0]), atol=1e-5)
    assert np.all(np.isfinite(sr.get_fdata()))


def test_empty_checkpoint_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_unwritable_output_folder_is_a_clear_error(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = ["-evaluate", "True", "-checkpoint_dir_restore", str(run["ckpt"]),
            "-path_volumes", str(blocker / "sub")]
    assert model.main(argv) == 2
    assert "-path_volumes" in capsys.readouterr().err


def test_super_resolve_volume_stitches_patches_exactly():
    # An identity-like "generator" (nearest upsampling) makes stitching visible.
    def predict(x):
        x = np.asarray(x)
        return np.repeat(np.repeat(np.repeat(x, 2, 1), 2, 2), 2, 3)
    lr = np.random.default_rng(0).normal(size=(13, 11, 9)).astype(np.float32)
    sr = inference.super_resolve_volume(predict, lr, 2, (8, 8, 6), 2, batch_size=3)
    np.testing.assert_array_equal(sr, np.repeat(np.repeat(np.repeat(lr, 2, 0), 2, 1), 2, 2))


# ----------------------------------------------------------------------------
# The real command line, as a user runs it
# ----------------------------------------------------------------------------

def test_cli_user_mistake_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), "-data_path",
                           str(tmp_path / "missing")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_end_to_end_train_then_evaluate(tmp_path):
    data = tmp_path / "data"
    phantoms.make_demo_data(str(data), subjects=3, shape=(32, 32, 24), seed=1)
    cmd = [sys.executable, os.path.join(ROOT, "model.py"), "-data_path", str(data),
           "-checkpoint_dir", str(tmp_path / "ckpt"), "-epochs", "1", "-train_fraction", "0.67",
           "-nn", "True"] + TINY
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [sys.executable, os.path.join(ROOT, "model.py"), "-evaluate", "True",
           "-checkpoint_dir_restore", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PSNR: mean" in proc.stdout
    assert (tmp_path / "ckpt" / "volumes" / "metrics.csv").exists()


def test_ctrl_c_saves_and_resume_finishes_the_same_epoch(run, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    argv = ["-data_path", str(run["data"]), "-checkpoint_dir", str(ckpt), "-epochs", "1",
            "-path_prediction", str(tmp_path / "pred")] + TINY
    original = SRGANTrainer.train_step
    calls = {"n": 0}

    def interrupted(self, lr, hr):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, lr, hr)

    monkeypatch.setattr(SRGANTrainer, "train_step", interrupted)
    assert model.main(argv) == 130
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(ckpt)))
    assert int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")) == 0
    assert int(reader.get_tensor("epoch_batches/.ATTRIBUTES/VARIABLE_VALUE")) == 3
    monkeypatch.setattr(SRGANTrainer, "train_step", original)
    # No -epochs: the run's own total (1, from config.json) is the one to reach.
    assert model.main(["-restore", str(ckpt)]) == 0
    # The rest of the interrupted epoch, not a whole new one: 16 steps in all.
    assert _checkpoint_state(ckpt) == {"epoch": 1, "step": 16, "g_iter": 16, "d_iter": 16}


def test_slices_mosaic_layout():

    vols = [np.full((8, 6, 4), v, np.float32) for v in (0.0, 50.0, 100.0)]
    img = utils.slices_mosaic(vols, window=(0, 100), min_panel=1)
    # Rows: sagittal (z, y) 4x6, coronal 4x8, axial 6x8 panels; 2-pixel gaps.
    assert img.shape == (4 + 2 + 4 + 2 + 6, 3 * 8 + 2 * 2)
    assert img.dtype == np.uint8 and img[0, 0] == 0 and img[0, 6 + 2] == 128 and img[0, 12 + 4] == 255
    big = utils.slices_mosaic(vols, window=(0, 100), min_panel=32)
    assert big.shape == (img.shape[0] * 4, img.shape[1] * 4)


@pytest.mark.parametrize("precision", ["float16"])
def test_mixed_precision_train_step(precision, tmp_path):
    policy = PRECISION_POLICIES[precision]
    g = networks.build_generator(2, residual_blocks=1, feature_size=4, dtype_policy=policy)
    d = networks.build_discriminator((8, 8, 6, 1), dtype_policy=policy)
    trainer = SRGANTrainer(g, d, loss_scale=precision == "float16")
    hr = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 6, 1)).astype(np.float32)
    before = [w.numpy().copy() for w in g.trainable_weights]
    # Dynamic loss scaling may skip the first float16 update or two while it
    # finds its scale; three steps must update the generator.
    for _ in range(3):
        out = trainer.train_step(np.asarray(td.degrade(hr, 2)), hr)
        assert all(np.isfinite(v) for v in out.values())
    assert int(trainer.g_optimizer.iterations) >= 1
    assert all(w.dtype == "float32" for w in g.trainable_weights)
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, g.trainable_weights))
    names = {name for name, _ in tf.train.list_variables(trainer.checkpoint.save(str(tmp_path / "ckpt")))}
    assert any(n.startswith("g_loss_scale/") for n in names) == (precision == "float16")


def test_resume_keeps_the_run_precision(run, capsys):
    argv = ["-restore", str(run["ckpt"]), "-mixed_precision", "float16", "-epochs", "2"]
    assert model.main(argv) == 2
    assert "-mixed_precision float16, the checkpoint uses -mixed_precision none" in capsys.readouterr().err


def test_resume_keeps_the_runs_split_and_seed(run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(run["data"], data)
    phantoms.make_demo_data(str(tmp_path / "more"), subjects=2, shape=(34, 30, 26), seed=5)
    for name in os.listdir(tmp_path / "more"):
        shutil.copytree(tmp_path / "more" / name, data / f"aaa_{name}")  # sorts first
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run["ckpt"], ckpt)
    split_before = (ckpt / "split.json").read_text()
    argv = ["-restore", str(ckpt), "-epochs", "2", "-data_path", str(data), "-seed", "7"]
    assert model.main(argv) == 0
    assert (ckpt / "split.json").read_text() == split_before
    assert "2 subject(s)" in capsys.readouterr().out
    assert _checkpoint_state(ckpt)["step"] == 32  # still the same 4 training volumes
    assert json.loads((ckpt / "config.json").read_text())["seed"] == 0  # the seed actually used


def test_resume_into_another_runs_folder_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run["ckpt"], other)
    before = sorted(os.listdir(other))
    assert model.main(["-restore", str(run["ckpt"]), "-checkpoint_dir", str(other), "-epochs", "2"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert sorted(os.listdir(other)) == before


def test_demo_refuses_restore(capsys):
    assert model.main(["-demo", "True", "-restore", "somewhere"]) == 2
    assert "-restore" in capsys.readouterr().err


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="the refusal is for CPU-only machines")
def test_bfloat16_training_is_refused_without_a_gpu(tmp_path, monkeypatch, capsys):
    # oneDNN's CPU bfloat16 conv3d gradients intermittently give NaN (TF 2.21): refuse, do not corrupt.
    monkeypatch.chdir(tmp_path)
    os.mkdir("data")
    assert model.main(["-mixed_precision", "bfloat16"]) == 2
    assert "bfloat16 needs a GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# One table of persisted settings
# ----------------------------------------------------------------------------

SAVED = {"upsampling_factor": 2, "residual_blocks": 1, "feature_size": 4, "upsampling_mode": "nn",
         "volume_shape": [32, 32, 24], "patch_shape": [20, 20, 16], "patch_margin": 2, "sigma": 0.5,
         "mixed_precision": "none", "data_path": "/d", "seed": 3, "batch_size": 4, "epochs": 7}


@pytest.mark.parametrize("given, action, key, expected", [
    ({}, "train", "feature_size", 4),                      # architecture comes from the checkpoint
    ({}, "evaluate", "volume_shape", (32, 32, 24)),        # lists become tuples again
    ({}, "evaluate", "sigma", 0.5),                        # evaluation degrades as the training did
    ({}, "train", "seed", 3),                              # run settings are inherited ...
    ({"seed": 9}, "train", "seed", 9),                     # ... unless given
    ({"batch_size": 1}, "evaluate", "batch_size", 1),
    ({}, "train", "mixed_precision", "none"),              # a resumed run keeps its precision
    ({"mixed_precision": "float16"}, "evaluate", "mixed_precision", "float16"),  # evaluation may choose
    ({"upsampling_mode": "nn"}, "evaluate", "upsampling_mode", "nn"),  # agreeing flags are fine
])
def test_saved_settings_are_adopted_by_the_table(given, action, key, expected):
    values = config.defaults()
    values.update(given)
    adopt_saved_settings(values, SAVED, given, action, "ckpt")
    assert values[key] == expected


@pytest.mark.parametrize("given, action, fragment", [
    ({"feature_size": 8}, "evaluate", "-feature_size 8, the checkpoint uses -feature_size 4"),
    ({"sigma": 1.0}, "evaluate", "-sigma 1.0, the checkpoint uses -sigma 0.5"),
    ({"upsampling_mode": "subpixel"}, "train", "'subpixel' (-subpixel_NN False -nn False)"),
    ({"mixed_precision": "float16"}, "train", "-mixed_precision float16"),
])
def test_contradicting_the_checkpoint_is_an_error(given, action, fragment):
    values = dict(config.defaults(), **given)
    with pytest.raises(errors.UserError, match="do not match the checkpoint") as err:
        adopt_saved_settings(values, SAVED, given, action, "ckpt")
    assert fragment in str(err.value)


def test_config_json_holds_exactly_the_persisted_settings(run):
    saved = json.loads((run["ckpt"] / "config.json").read_text())
    assert set(saved) == set(PERSISTED) | {"tensorflow", "keras", "strategy", "replicas", "workers"}
    assert saved["replicas"] == 1 and saved["workers"] == 1
    assert saved["sigma"] == 1.0 and "subpixel_NN" not in saved and "nn" not in saved


@pytest.mark.parametrize("argv, mode", [([], "subpixel"), (["-nn"], "nn"), (["-subpixel_NN", "1"], "subpixel_NN"),
                                        (["-subpixel_NN", "yes", "-nn", "yes"], "subpixel_NN"),
                                        (["-subpixel_NN", "False", "-nn", "False"], "subpixel")])
def test_mode_flags_become_one_setting(argv, mode):
    given = model.given_settings(_args(argv))
    assert "subpixel_NN" not in given and "nn" not in given
    assert given.get("upsampling_mode", "subpixel") == mode


def test_evaluation_degrades_with_the_training_sigma(tmp_path, monkeypatch):
    data = tmp_path / "data"
    phantoms.make_demo_data(str(data), subjects=2, shape=(32, 32, 24), seed=2)
    ckpt = tmp_path / "ckpt"
    argv = ["-data_path", str(data), "-checkpoint_dir", str(ckpt), "-epochs", "1", "-sigma", "0.5"] + TINY
    seen = []
    degrade = td.degrade

    def spy(x, f, sigma=1.0):
        seen.append(float(sigma))
        return degrade(x, f, sigma)

    monkeypatch.setattr(td, "degrade", spy)
    assert model.main(argv) == 0
    assert json.loads((ckpt / "config.json").read_text())["sigma"] == 0.5
    seen.clear()
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(ckpt)]) == 0
    assert seen and set(seen) == {0.5}


# ----------------------------------------------------------------------------
# The training loop reads the device every few steps, and its summaries survive a resume
# ----------------------------------------------------------------------------

def test_step_history_holds_what_each_step_returned():
    trainer = _tiny_trainer()
    rng = np.random.default_rng(2)
    returned = []
    for _ in range(5):
        hr = rng.uniform(-1, 1, (2, 8, 8, 6, 1)).astype(np.float32)
        returned.append({k: float(v) for k, v in trainer.train_step(np.asarray(td.degrade(hr, 2)), hr).items()})
    history = trainer.recent_scalars(2, 5)
    assert [s for s, _ in history] == [2, 3, 4, 5]
    for (_, values), expected in zip(history, returned[1:]):
        assert values == pytest.approx(expected, rel=1e-6)
    losses = trainer.epoch_losses()
    assert losses["mse"] == pytest.approx(np.mean([r["mse"] for r in returned]), rel=1e-5)
    trainer.end_epoch()
    assert int(trainer.epoch) == 1 and trainer.epoch_losses()["mse"] == 0.0


def test_mid_epoch_resume_reports_the_whole_epochs_losses(run, tmp_path, monkeypatch):
    def cfg_for(folder, *extra):
        argv = ["-data_path", str(run["data"]), "-checkpoint_dir", str(folder), "-epochs", "1",
                "-path_prediction", str(tmp_path / "pred")] + TINY + list(extra)
        return model.parse_command(argv, log=lambda *_: None).settings

    quiet = lambda *_: None  # noqa: E731
    whole = training.train(cfg_for(tmp_path / "whole"), log=quiet)["losses"]
    original = SRGANTrainer.train_step
    calls = {"n": 0}

    def interrupted(self, lr, hr):
        if calls["n"] == 5:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, lr, hr)

    monkeypatch.setattr(SRGANTrainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg_for(tmp_path / "cut"), log=quiet)
    monkeypatch.setattr(SRGANTrainer, "train_step", original)
    resumed = training.train(cfg_for(tmp_path / "cut", "-restore", str(tmp_path / "cut")), log=quiet)["losses"]
    # All 16 batches, not the 11 since the resume: the same numbers as the uninterrupted epoch.
    assert resumed == pytest.approx(whole, rel=1e-5)


# ----------------------------------------------------------------------------
# A terminal shows our lines, not TensorFlow's
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, verbose", [([], False), (["-verbose"], True), (["-verbose", "True"], True),
                                           (["--verbose=1"], True), (["-verbose", "no"], False),
                                           (["-verbose", "-demo"], True), (["-demo", "True"], False)])
def test_verbose_is_read_before_tensorflow_loads(argv, verbose):
    assert quiet.verbose_requested(argv) is verbose


def test_tensorflow_start_up_lines_are_hidden_unless_verbose(tmp_path):
    script = ("import sys; sys.argv = ['model.py'] + sys.argv[1:]; sys.path.insert(0, %r); "
              "import model; import tensorflow as tf; print(tf.reduce_sum(tf.ones(3)).numpy())" % ROOT)
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
    loud = subprocess.run([sys.executable, "-c", script, "-verbose", "True"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert quiet.returncode == 0 and loud.returncode == 0 and "3.0" in quiet.stdout
    assert quiet.stderr.strip() == ""
    assert loud.stderr.strip() != ""  # what was hidden: TensorFlow's own start-up lines


def test_pretrain_steps_train_the_generator_alone_then_the_gan():
    g = networks.build_generator(2, residual_blocks=1, feature_size=4)
    d = networks.build_discriminator((8, 8, 6, 1))
    trainer = SRGANTrainer(g, d, seed=1, pretrain_steps=2)
    hr = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 6, 1)).astype(np.float32)
    lr = np.asarray(td.degrade(hr, 2))
    d_before = [w.numpy().copy() for w in d.trainable_weights]
    for _ in range(2):
        out = {k: float(v) for k, v in trainer.train_step(lr, hr).items()}
        assert out["d_loss"] == 0.0 and out["adv"] == 0.0
        assert out["g_loss"] == pytest.approx(out["mse"] + out["gdl"], rel=1e-6)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(d_before, d.trainable_weights))
    assert int(trainer.g_optimizer.iterations) == 2 and int(trainer.d_optimizer.iterations) == 0
    out = {k: float(v) for k, v in trainer.train_step(lr, hr).items()}
    assert out["d_loss"] > 0 and out["adv"] > 0  # the GAN from step 3 on
    assert int(trainer.d_optimizer.iterations) == 1 and int(trainer.step) == 3


def test_fair_metrics_use_the_references_range_for_every_method():
    rng = np.random.default_rng(0)
    hr = rng.uniform(0, 100, (12, 12, 10)).astype(np.float32)
    mask = np.ones(hr.shape, bool)
    close = hr + rng.normal(0, 2, hr.shape).astype(np.float32)
    overshoot = close.copy()
    overshoot[0, 0, 0] = 1000.0  # one wild voxel enlarges its own max - min
    row = metrics.subject_metrics(hr, {"sr": close, "tricubic": overshoot}, mask)
    assert set(row) == set(metrics.METRIC_COLUMNS[1:]) - {
        f"{m}_{s}{t}" for m in ("psnr", "ssim") for s in ("nearest", "trilinear") for t in ("", "_fair")}
    mse = np.mean((overshoot.astype(np.float64) - hr) ** 2)
    expected_fair = 10 * np.log10(float(hr.max() - hr.min()) ** 2 / mse)
    assert row["psnr_tricubic_fair"] == pytest.approx(expected_fair, rel=1e-6)
    # The original's rule rewards the overshoot with a larger range; the fair one does not.
    assert row["psnr_tricubic"] > row["psnr_tricubic_fair"] + 10
    # The two rules differ by exactly the ratio of the ranges they use.
    both = max(hr.max(), close.max()) - min(hr.min(), close.min())
    assert row["psnr"] - row["psnr_fair"] == pytest.approx(20 * np.log10(both / (hr.max() - hr.min())), rel=1e-6)
