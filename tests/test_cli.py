"""The command line (model.py): flags, help, errors without tracebacks, TensorFlow's noise, end to end."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, TINY

import config
import degradation
import model
import phantoms
import quiet
import train_dataset as td
import utils


def _args(argv):
    return model.build_parser().parse_args(argv)


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
    (["-gan_lr_scale", "0"], "a positive number up to 1"),
    (["-gan_lr_scale", "1.5"], "-gan_lr_scale"),
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
    (["-upsampling_factor", "3"], "-volume_shape 224,224,152: x = 224 is not divisible by the factor 3 (use 222 or 225)"),
    (["-patch_shape", "16,16,11", "-volume_shape", "32,32,24", "-upsampling_factor", "2"],
     "-patch_shape 16,16,11: z = 11 is not divisible by the factor 2; use 10 or 12"),
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


@pytest.mark.parametrize("argv, mode", [([], "subpixel"), (["-nn"], "nn"), (["-subpixel_NN", "1"], "subpixel_NN"),
                                        (["-subpixel_NN", "yes", "-nn", "yes"], "subpixel_NN"),
                                        (["-subpixel_NN", "False", "-nn", "False"], "subpixel")])
def test_mode_flags_become_one_setting(argv, mode):
    given = model.given_settings(_args(argv))
    assert "subpixel_NN" not in given and "nn" not in given
    assert given.get("upsampling_mode", "subpixel") == mode


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


def test_help_version_and_mistyped_flags_answer_without_loading_tensorflow():
    # TensorFlow takes ~9 s to load on two cores: the flags are parsed and checked first.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import model\n"
            "for argv in (['-h'], ['-version'], ['-bogus'], ['-upsampling_factor', 'two']):\n"
            "    try:\n        print('exit', model.main(argv))\n"
            "    except SystemExit as stop:\n        print('exit', stop.code)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'}))")
    done = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith("exit ")] == ["exit 0", "exit 0", "exit 2", "exit 2"]
    assert lines[-1] == "[]", done.stdout[-500:] + done.stderr[-2000:]
    assert "unrecognized arguments: -bogus" in done.stderr and "-upsampling_factor" in done.stderr


def test_the_first_call_of_a_training_step_is_quiet_unless_verbose(capfd):
    # TensorFlow's graph optimiser logs at a compiled step's first call (quiet.FirstCallQuiet says what).
    def noisy():
        os.write(2, b"remapper failed\n")
        return 1
    for hidden, expected in ((True, "remapper failed\n"), (False, "remapper failed\n" * 2)):
        step = quiet.FirstCallQuiet(noisy, hidden)
        assert step() == 1 and step() == 1
        assert capfd.readouterr().err == expected


def _model_py(*argv, cwd, **kwargs):
    """Runs ``python model.py ARGV`` as a user does, TensorFlow's log level not preset."""
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600, **kwargs)


# TensorFlow's own start-up lines (absl, oneDNN, CUDA notices), hidden unless -verbose.
TF_NOISE = ("absl", "oneDNN", "cuda", "cpu_feature_guard")


def test_a_users_mistake_is_one_line(tmp_path):
    # TensorFlow loads and stays quiet (test_cli_end_to_end... shows what -verbose lets through).
    quiet_run = _model_py("-data_path", tmp_path / "missing", cwd=tmp_path)
    assert quiet_run.returncode == 2
    assert "does not exist" in quiet_run.stderr and "Traceback" not in quiet_run.stderr
    assert quiet_run.stderr.strip().count("\n") == 0, quiet_run.stderr  # one line: the message


def test_cli_end_to_end_train_then_evaluate_with_the_trainings_sigma(tmp_path):
    data = tmp_path / "data"
    phantoms.make_demo_data(str(data), subjects=3, shape=(32, 32, 24), seed=1)
    trained = _model_py("-data_path", data, "-checkpoint_dir", tmp_path / "ckpt", "-epochs", "1",
                        "-train_fraction", "0.67", "-nn", "True", "-sigma", "0.5", *TINY, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["sigma"] == 0.5
    assert not any(word in trained.stderr for word in TF_NOISE)  # TensorFlow's start-up lines hidden ...
    evaluated = _model_py("-evaluate", "True", "-checkpoint_dir_restore", tmp_path / "ckpt", "-verbose", "True",
                          cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "PSNR: mean" in evaluated.stdout
    assert any(word in evaluated.stderr for word in TF_NOISE), evaluated.stderr  # ... unless -verbose
    volumes = tmp_path / "ckpt" / "volumes"
    assert (volumes / "metrics.csv").exists()
    # Evaluation degrades with the training's sigma (0.5), not the default 1.0: the
    # LR volume written is the reference blurred with sigma 0.5 and decimated.
    (name,) = json.loads((tmp_path / "ckpt" / "split.json").read_text())["test"]
    hr = nib.load(str(volumes / f"{name}_hr.nii.gz")).get_fdata().astype(np.float32)
    lr = nib.load(str(volumes / f"{name}_lr.nii.gz")).get_fdata().astype(np.float32)
    hr_n, nf = utils.normalize(hr)
    for sigma, same in ((0.5, True), (1.0, False)):
        expected = utils.denormalize(np.asarray(degradation.degrade(hr_n, 2, sigma)), nf)
        assert np.allclose(lr, expected, atol=1e-3 * float(hr.max())) is same, sigma

