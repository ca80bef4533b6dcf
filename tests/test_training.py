"""A training run (training.py, training_loop.py): files written, refusals, restore, Ctrl-C, resume."""

import json
import os
import shutil

import nibabel as nib
import pytest
import tensorflow as tf
from helpers import TINY, checkpoint_state

import model
import phantoms
import run_records
from trainer import SRGANTrainer


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
    # The epoch's mean losses, for report.html: one row per epoch.
    (row,) = run_records.read_numbers(ckpt / run_records.LOSSES_NAME, "epoch")
    assert (row["epoch"], row["step"]) == (1, 16) and row["seconds"] > 0
    assert {k: row[k] for k in run["losses"]} == pytest.approx(run["losses"], abs=1e-5)


def test_training_again_into_the_same_folder_refuses_to_overwrite(run, capsys):
    assert model.main(run["argv"]) == 2
    assert "-restore" in capsys.readouterr().err


def test_restore_with_contradicting_architecture_names_the_flags(run, capsys):
    argv = ["-restore", str(run["ckpt"]), "-feature_size", "8", "-nn", "True", "-epochs", "2"]
    assert model.main(argv) == 2
    err = capsys.readouterr().err
    assert "-feature_size 8, the checkpoint uses -feature_size 4" in err
    assert "'nn'" in err and "Traceback" not in err


def test_resume_keeps_the_run_precision(run, capsys):
    argv = ["-restore", str(run["ckpt"]), "-mixed_precision", "float16", "-epochs", "2"]
    assert model.main(argv) == 2
    assert "-mixed_precision float16, the checkpoint uses -mixed_precision none" in capsys.readouterr().err


def test_resume_into_another_runs_folder_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run["ckpt"], other)
    before = sorted(os.listdir(other))
    assert model.main(["-restore", str(run["ckpt"]), "-checkpoint_dir", str(other), "-epochs", "2"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert sorted(os.listdir(other)) == before


def test_restore_continues_epoch_step_optimiser_split_and_seed(run, tmp_path, capsys):
    first = checkpoint_state(run["ckpt"])
    assert first == {"epoch": 1, "step": 16, "g_iter": 16, "d_iter": 16}  # 4 volumes x 8 patches / batch 2
    # New subjects that sort first, and another -seed: the run keeps its split and seed.
    data = tmp_path / "data"
    shutil.copytree(run["data"], data)
    phantoms.make_demo_data(str(tmp_path / "more"), subjects=2, shape=(34, 30, 26), seed=5)
    for name in os.listdir(tmp_path / "more"):
        shutil.copytree(tmp_path / "more" / name, data / f"aaa_{name}")
    # Resumed into another folder so the other tests keep the one-epoch run.
    resumed = tmp_path / "resumed"
    argv = ["-restore", str(run["ckpt"]), "-checkpoint_dir", str(resumed), "-epochs", "2",
            "-data_path", str(data), "-path_prediction", str(tmp_path / "pred"), "-seed", "7"]
    assert model.main(argv) == 0
    assert checkpoint_state(resumed) == {"epoch": 2, "step": 32, "g_iter": 32, "d_iter": 32}
    assert "2 subject(s)" in capsys.readouterr().out  # the new ones, not used
    before = json.loads((run["ckpt"] / "split.json").read_text())
    after = json.loads((resumed / "split.json").read_text())
    assert (after["train"], after["test"]) == (before["train"], before["test"])
    saved = json.loads((resumed / "config.json").read_text())
    assert saved["feature_size"] == 4  # the architecture came from the saved configuration
    assert saved["seed"] == 0  # the seed actually used


def test_ctrl_c_saves_and_a_resume_finishes_the_epoch_with_its_whole_losses(run, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    argv = ["-data_path", str(run["data"]), "-checkpoint_dir", str(ckpt), "-epochs", "1",
            "-path_prediction", str(tmp_path / "pred")] + TINY
    original = SRGANTrainer.train_step
    calls = {"n": 0}

    def interrupted(self, lr, hr):
        if calls["n"] == 5:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, lr, hr)

    monkeypatch.setattr(SRGANTrainer, "train_step", interrupted)
    assert model.main(argv) == 130
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(ckpt)))
    assert int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")) == 0
    assert int(reader.get_tensor("epoch_batches/.ATTRIBUTES/VARIABLE_VALUE")) == 5
    monkeypatch.setattr(SRGANTrainer, "train_step", original)
    # No -epochs: the run's own total (1, from config.json) is the one to reach.
    result = model.run(model.parse_command(["-restore", str(ckpt)], log=lambda *_: None), log=lambda *_: None)
    # The rest of the interrupted epoch, not a whole new one: 16 steps in all ...
    assert checkpoint_state(ckpt) == {"epoch": 1, "step": 16, "g_iter": 16, "d_iter": 16}
    # ... and the epoch's losses over all 16 batches, not the 11 since the resume:
    # the same numbers as the uninterrupted epoch of the shared run.
    assert result["losses"] == pytest.approx(run["losses"], rel=1e-5)
    # losses.csv: the interrupted epoch once, with its whole losses.
    (row,) = run_records.read_numbers(ckpt / run_records.LOSSES_NAME, "epoch")
    assert row["step"] == 16 and {k: row[k] for k in run["losses"]} == pytest.approx(run["losses"], abs=1e-4)


def test_a_resume_whose_data_moved_says_the_exact_command(run, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run["ckpt"], ckpt)
    saved = json.loads((ckpt / "config.json").read_text())
    saved["data_path"] = str(tmp_path / "moved_away")
    (ckpt / "config.json").write_text(json.dumps(saved))
    assert model.main(["-restore", str(ckpt), "-epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert f"-restore {ckpt} -data_path NEW_PLACE" in err and "-demo" not in err


def _run_with_best(run, tmp_path):
    """A copy of the shared run whose best/ holds its ckpt-16, as validation keeps it."""
    import validation

    folder = tmp_path / "run"
    shutil.copytree(run["ckpt"], folder, ignore=shutil.ignore_patterns("logs", "predictions"))
    record = {"step": 16, "epoch": 1.0, "psnr_fair": 20.0, "ssim_fair": 0.5, "psnr_tricubic_fair": 19.0,
              "subjects": 1, "checkpoint": str(folder / "ckpt-16")}
    validation.BestCheckpoint(str(folder)).replace(str(folder / "ckpt-16"), record)
    (folder / validation.VALIDATION_NAME).write_text("step,epoch,psnr_fair\n16,1.0,20.0\n")
    return folder


def test_training_into_a_best_folder_is_refused_naming_the_run(run, tmp_path, capsys):
    import training

    folder = _run_with_best(run, tmp_path)
    best = folder / "best"
    before = sorted(os.listdir(best))
    for argv, given in ((["-restore", str(best)], f"-restore {best} trains into"),
                        (["-restore", str(folder), "-checkpoint_dir", str(best)], f"-checkpoint_dir {best}")):
        assert model.main(argv + ["-epochs", "2"]) == 2
        err = capsys.readouterr().err
        assert f"error: {given} {str(best)!r}" in err
        assert f"the best checkpoint of the run in {str(folder)!r}" in err
        assert f"Resume the run with -restore {folder}," in err and "Traceback" not in err
    assert sorted(os.listdir(best)) == before and not (best / "best").exists()
    # What the message offers instead: the best checkpoint continued in a new folder.
    command = model.parse_command(["-restore", str(best), "-checkpoint_dir", str(tmp_path / "new")], log=print)
    assert training.prepare_run_folder(command.settings) is False


def test_a_folder_whose_checkpoints_are_gone_but_whose_results_remain_is_refused(run, tmp_path, capsys):
    folder = _run_with_best(run, tmp_path)
    for path in list(folder.glob("ckpt-*")) + [folder / "checkpoint"]:
        path.unlink()
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    argv = [a if a != str(run["ckpt"]) else str(folder) for a in run["argv"]]
    assert model.main(argv) == 2
    err = capsys.readouterr().err
    assert f"-checkpoint_dir {str(folder)!r} already holds a training run (best/ (step 16), validation.csv)" in err
    assert f"-restore {folder / 'best'} -checkpoint_dir NEW_FOLDER" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
