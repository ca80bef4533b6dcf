"""Validation during training: when, validation.csv and the best checkpoint (validation.py)."""

import json
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import TINY, Log

import checkpoints
import config
import durable
import errors
import layouts
import model
import phantoms
import splits
import validation
from errors import RunStopped, UserError
from placement import choose_placement
from trainer import build_networks


@pytest.mark.parametrize("argv, message", [
    (["-validation_fraction", "1"], "-validation_fraction 1.0 must be in [0, 1)"),
    (["-validation_fraction", "-0.1"], "expected a non-negative number up to 1"),
    (["-validate_steps", "-3"], "expected a non-negative integer"),
])
def test_bad_validation_flags_are_named(argv, message, capsys):
    with pytest.raises((UserError, SystemExit)) as err:
        model.parse_command(argv, log=Log())
    assert message in str(err.value) + capsys.readouterr().err


# --------------------------------------------------------------------------- #
# When, validation.csv and the best checkpoint (scripted scores, fake checkpoints)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("validate_steps, expected", [(0, [8, 16, 24, 30]), (5, [5, 10, 15, 20, 25, 30]),
                                                      (16, [16, 30])])
def test_validation_is_due_at_epoch_ends_or_every_n_steps_and_at_the_last_step(validate_steps, expected):
    v = validation.Validation(None, "/nowhere", "/nowhere", validate_steps, last_step=30,
                              batches_per_epoch=8, is_chief=False)
    assert [s for s in range(1, 31) if v.due(s, epoch_end=s % 8 == 0 or s == 30)] == expected


class ScriptedValidator:
    """Returns the next of a list of PSNRs, as if the generator had been scored."""

    def __init__(self, psnrs):
        self.psnrs = list(psnrs)

    def score(self, generator):
        psnr = self.psnrs.pop(0)
        return {"psnr_fair": psnr, "ssim_fair": psnr / 100, "psnr_tricubic_fair": 20.0, "subjects": 2}


def _fake_checkpoint(run_dir, step):
    prefix = os.path.join(run_dir, f"ckpt-{step}")
    for suffix in (".data-00000-of-00001", ".index"):
        with open(prefix + suffix, "w") as fh:
            fh.write(f"{step}{suffix}")
    return prefix


def _fake_trainer(step, batches_per_epoch=4):
    return types.SimpleNamespace(step=tf.Variable(step), epoch=tf.Variable(step // batches_per_epoch),
                                 epoch_batches=tf.Variable(step % batches_per_epoch), generator=None)


def _validation(run_dir, psnrs, log=None):
    return validation.Validation(ScriptedValidator(psnrs), str(run_dir), str(run_dir / "logs"), 0,
                                 last_step=100, batches_per_epoch=4, log=log or Log())


def _run_steps(v, run_dir, steps):
    for step in steps:
        v.run(_fake_trainer(step), _fake_checkpoint(str(run_dir), step))


def test_the_best_checkpoint_is_the_peak_and_a_resumed_run_keeps_it(tmp_path):
    (tmp_path / "config.json").write_text('{"upsampling_factor": 2}')
    (tmp_path / "split.json").write_text('{"test": []}')
    log = Log()
    v = _validation(tmp_path, [21.0, 24.0, 22.5], log)
    _run_steps(v, tmp_path, [4, 8, 12])
    best = tmp_path / "best"
    assert checkpoints.latest(str(best)) == str(best / "ckpt-8")
    assert sorted(os.listdir(best)) == ["checkpoint", "ckpt-8.data-00000-of-00001", "ckpt-8.index",
                                        "ckpt-8.validation.json", "config.json", "split.json"]
    assert (best / "ckpt-8.index").read_text() == "8.index"  # a copy of the run's checkpoint
    assert json.loads((best / "ckpt-8.validation.json").read_text())["psnr_fair"] == 24.0
    _, rows = durable.read_csv_rows(str(tmp_path / validation.VALIDATION_NAME))
    assert [(int(r["step"]), float(r["psnr_fair"]), r["best"]) for r in rows] == [
        (4, 21.0, "1"), (8, 24.0, "1"), (12, 22.5, "0")]
    assert "the best stays step 8 (24.00 dB)" in log.lines[-1]
    # A new process (a resume after SIGTERM or SIGKILL) reads the best from best/.
    resumed = _validation(tmp_path, [23.0, 25.0])
    assert resumed.best.psnr == 24.0
    _run_steps(resumed, tmp_path, [16])
    assert checkpoints.latest(str(best)) == str(best / "ckpt-8")
    _run_steps(resumed, tmp_path, [20])
    assert checkpoints.latest(str(best)) == str(best / "ckpt-20")
    assert not (best / "ckpt-8.index").exists() and not (best / "ckpt-8.validation.json").exists()
    assert "best checkpoint: step 20 (epoch 5.00), validation PSNR 25.00 dB" in resumed.summary()
    # NaN (an empty mask everywhere) is never the best.
    _run_steps(_validation(tmp_path, [float("nan")]), tmp_path, [24])
    assert validation.best_record(str(best))["step"] == 20


def test_a_replacement_that_fails_or_is_killed_leaves_a_complete_best(tmp_path, monkeypatch):
    v = _validation(tmp_path, [21.0, 24.0, 26.0])
    _run_steps(v, tmp_path, [4])
    real_copy = durable.copy_file

    def full_disk_at_the_index(source, path):
        if path.endswith(".index"):
            raise durable.OutputError(path, "No space left on device")
        real_copy(source, path)

    monkeypatch.setattr(durable, "copy_file", full_disk_at_the_index)
    with pytest.raises(RunStopped, match=r"cannot record the validation of step 8: .*No space left.*"
                                         r"previous best in .*best are intact"):
        _run_steps(v, tmp_path, [8])
    assert validation.best_record(str(tmp_path / "best"))["step"] == 4
    assert [r["step"] for r in durable.read_csv_rows(str(tmp_path / validation.VALIDATION_NAME))[1]] == ["4"]
    # A kill after the new index but before the state file: the new best is complete and read.
    monkeypatch.setattr(durable, "copy_file", real_copy)
    monkeypatch.setattr(checkpoints, "write_state", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run_steps(v, tmp_path, [12])
    assert validation.best_record(str(tmp_path / "best"))["step"] == 12
    assert checkpoints.latest(str(tmp_path / "best")).endswith("ckpt-12")


def test_a_kill_between_the_best_copy_and_its_row_keeps_it_marked_best(tmp_path, monkeypatch):
    v = _validation(tmp_path, [21.0])
    real_append = durable.append_csv_row
    monkeypatch.setattr(durable, "append_csv_row", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run_steps(v, tmp_path, [4])  # best/ holds step 4, validation.csv has no row yet
    monkeypatch.setattr(durable, "append_csv_row", real_append)
    assert validation.best_record(str(tmp_path / "best"))["step"] == 4
    log = Log()
    # The resumed run validates the checkpoint again (its row is missing); CPU kernels may score it a
    # little lower: it is still the best, and marked so.
    resumed = _validation(tmp_path, [20.99], log)
    resumed.catch_up(_fake_trainer(4), _fake_checkpoint(str(tmp_path), 4))
    _, rows = durable.read_csv_rows(str(tmp_path / validation.VALIDATION_NAME))
    assert [(r["step"], r["best"]) for r in rows] == [("4", "1")]
    assert "the best, already in" in log.lines[-1]
    assert validation.best_record(str(tmp_path / "best"))["psnr_fair"] == 21.0


@pytest.fixture()
def two_subjects(data, tmp_path):
    """Two validation subjects copied out of the module's data (so that they can be damaged)."""
    import shutil

    subjects, _ = layouts.find_subjects(data, log=Log())
    for s in subjects[:2]:
        shutil.copytree(os.path.dirname(s.image_path), tmp_path / "data" / s.name)
    return layouts.find_subjects(str(tmp_path / "data"), log=Log())[0]


def test_a_validation_subject_lost_mid_run_is_said_at_each_pass_and_not_compared(two_subjects, tmp_path):
    import training

    cfg = config.Settings(volume_shape=(32, 32, 24), patch_shape=(20, 20, 16), patch_margin=2, feature_size=4,
                          residual_blocks=1, upsampling_factor=2)
    keras.utils.set_random_seed(0)
    generator, _ = build_networks(cfg)
    log = Log()
    validator = validation.Validator(two_subjects, cfg, log)
    predict = validator.predictor(generator)
    psnrs = {s.name: validator.score_subject(s, predict)[0] for s in two_subjects}
    # The subject lost is the worse one: the mean of the other alone is higher than the full pass's.
    lost, kept = sorted(two_subjects, key=lambda s: psnrs[s.name])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    v = validation.Validation(validator, str(run_dir), str(run_dir / "logs"), 4, last_step=12,
                              batches_per_epoch=4, log=log)

    def validate(step):
        trainer = _fake_trainer(step)
        trainer.generator = generator
        v.run(trainer, _fake_checkpoint(str(run_dir), step))
        return log.lines[-1]

    validate(4)
    with open(lost.image_path, "r+b") as fh:  # truncated on disk mid-run
        fh.truncate(os.path.getsize(lost.image_path) // 2)
    line = validate(8)
    assert f"incomplete: 1 validation subject(s) could not be read ({lost.name}), so it is not compared" in line
    assert "the best stays step 4" in line
    os.remove(kept.image_path)
    line = validate(12)
    assert line.startswith("validation at step 12 (epoch 3.00) failed: 2 validation subject(s) could not be "
                           f"read ({lost.name}, {kept.name}); no subject was scored")
    _, rows = durable.read_csv_rows(str(run_dir / validation.VALIDATION_NAME))
    assert [(r["step"], r["subjects"], r["best"]) for r in rows] == [("4", "2", "1"), ("8", "1", "0"),
                                                                     ("12", "0", "0")]
    assert float(rows[1]["psnr_fair"]) > float(rows[0]["psnr_fair"])  # a higher mean, over less
    assert validation.best_record(str(run_dir / "best"))["step"] == 4
    # The run's end: the summary says since when, and the run does not end as a success (exit code 4).
    said = Log()
    with pytest.raises(RunStopped) as stop:
        training.close_validation(v, said)
    assert stop.value.exit_code == errors.EXIT_PARTIAL
    assert "best checkpoint: step 4" in said.text
    assert ("warning: validation was incomplete at 2 of 3 pass(es) of this run, since step 8 (the last at "
            "step 12") in said.text
    assert "validation was incomplete since step 8" in str(stop.value)


def test_validate_steps_without_validation_subjects_is_said():
    import placement
    import training

    log = Log()
    cfg = config.Settings(validate_steps=50)
    empty = splits.Split(train=["a"], validation=[], test=[])
    assert training.start_validation(cfg, empty, None, placement.Placement(), 8, log) is None
    assert log.lines == ["note: -validate_steps 50 has no effect: this run has no validation subjects "
                         "(-validation_fraction 0)"]
    assert training.start_validation(cfg.replace(validate_steps=0), empty, None, placement.Placement(), 8,
                                     Log()) is None


def test_other_workers_do_not_validate(tmp_path):
    v = validation.Validation(ScriptedValidator([]), str(tmp_path), str(tmp_path), 0, 10, 4, is_chief=False)
    v.run(_fake_trainer(4), _fake_checkpoint(str(tmp_path), 4))  # the empty script would fail if scored
    v.catch_up(_fake_trainer(4), str(tmp_path / "ckpt-4"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-4.data-00000-of-00001", "ckpt-4.index"]
    assert v.summary() == ""


# --------------------------------------------------------------------------- #
# The validator and whole runs
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation_data")
    phantoms.make_demo_data(str(root), subjects=6, shape=(34, 30, 26), seed=1)
    return str(root)


def test_a_mirrored_generator_scores_as_on_one_device(data):
    cfg = config.Settings(volume_shape=(32, 32, 24), patch_shape=(20, 20, 16), patch_margin=2, feature_size=4,
                          residual_blocks=1, upsampling_factor=2)
    subjects, _ = layouts.find_subjects(data, log=Log())
    keras.utils.set_random_seed(0)
    one, _ = build_networks(cfg)
    mirrored, _ = build_networks(cfg, choose_placement(("cpu", 2), environ={}))
    mirrored.set_weights(one.get_weights())
    validator = validation.Validator(subjects[:2], cfg, Log())
    on_one, on_two = validator.score(one), validator.score(mirrored)
    assert on_one["subjects"] == 2 and np.isfinite(on_one["psnr_fair"])
    assert on_two["psnr_fair"] == pytest.approx(on_one["psnr_fair"], abs=1e-3)
    assert on_two["psnr_tricubic_fair"] == on_one["psnr_tricubic_fair"]


def _train(argv):
    log = Log()
    return model.run(model.parse_command(argv, log=log), log=log), log


def test_a_run_validates_keeps_the_peak_in_best_and_evaluate_restores_it(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = ["-data_path", data, "-checkpoint_dir", str(ckpt), "-epochs", "1", "-learning_rate", "1e-3",
            "-validation_fraction", "0.25", "-validate_steps", "3", "-path_prediction", str(tmp_path / "p")] + TINY
    result, log = _train(argv)
    split = json.loads((ckpt / splits.SPLIT_NAME).read_text())
    assert len(split["validation"]) == 1 and len(split["train"]) == 4 and len(split["test"]) == 1
    assert not set(split["validation"]) & set(split["train"] + split["test"])
    _, rows = durable.read_csv_rows(str(ckpt / validation.VALIDATION_NAME))
    # 4 training subjects x 8 patches / batch 2 = 16 steps an epoch: every 3 steps and the last.
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12, 15, 16]
    psnrs = [float(r["psnr_fair"]) for r in rows]
    peak = int(rows[int(np.argmax(psnrs))]["step"])
    best = ckpt / validation.BEST_FOLDER
    assert result["best"]["step"] == peak and checkpoints.latest(str(best)).endswith(f"ckpt-{peak}")
    assert [r["best"] for r in rows] == [str(int(p > max(psnrs[:i], default=-1e9))) for i, p in enumerate(psnrs)]
    assert f"best checkpoint: step {peak}" in log.lines[-1]
    assert len([line for line in log.lines if line.startswith("validation at step")]) == 6
    # TensorBoard: the scores at each validated step, beside the training's logs.
    events = [e for path in (ckpt / "logs" / "validation").glob("events.out.tfevents*")
              for e in tf.compat.v1.train.summary_iterator(str(path))]
    tagged = {(e.step, v.tag) for e in events for v in e.summary.value}
    assert {(s, "validation/psnr_fair") for s in (3, 6, 9, 12, 15, 16)} <= tagged
    # The best folder's generator is the one validated at the peak.
    cfg = model.parse_command(["-evaluate", "True", "-checkpoint_dir_restore", str(best)], log=Log()).settings
    generator = build_networks(cfg)[0]
    checkpoints.restore_generator(generator, str(best))
    subject = [s for s in layouts.find_subjects(data, log=Log())[0] if s.name in split["validation"]]
    assert validation.Validator(subject, cfg, Log()).score(generator)["psnr_fair"] == pytest.approx(max(psnrs), abs=1e-4)
    # -evaluate from best/ evaluates that step on the test subjects of split.json.
    rows_eval, _ = _train(["-evaluate", "True", "-checkpoint_dir_restore", str(best),
                           "-path_volumes", str(tmp_path / "volumes")])
    assert sorted(r["subject"] for r in rows_eval) == sorted(split["test"])
    settings = json.loads((tmp_path / "volumes" / "metrics.json").read_text())
    assert settings["checkpoint"].endswith(f"ckpt-{peak} (step {peak})")
    # -export takes it too: the model file carries the best step's weights.
    assert model.main(["-export", str(tmp_path / "best.keras"), "-checkpoint_dir_restore", str(best)]) == 0
    exported = keras.saving.load_model(str(tmp_path / "best.keras"), compile=False)
    assert all(np.array_equal(a, b) for a, b in zip(exported.get_weights(), generator.get_weights()))

    # A kill between the last checkpoint and its validation: the same command validates it.
    csv_path = ckpt / validation.VALIDATION_NAME
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:-1]))
    _, log = _train(["-restore", str(ckpt)])
    assert "nothing to train" in log.text and "validation at step 16" in log.text
    _, rows = durable.read_csv_rows(str(csv_path))
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12, 15, 16]
    assert float(rows[-1]["psnr_fair"]) == pytest.approx(psnrs[-1], abs=1e-6)
    assert validation.best_record(str(best))["step"] == peak


def test_the_default_holds_nothing_out(run):
    split = json.loads((run["ckpt"] / splits.SPLIT_NAME).read_text())
    assert split["validation"] == [] and len(split["train"]) == 4 and len(split["test"]) == 1
    assert not (run["ckpt"] / validation.BEST_FOLDER).exists()
    assert not (run["ckpt"] / validation.VALIDATION_NAME).exists()
    # No checkpoint beyond the original's: the epoch's own.
    assert sorted(p.name for p in run["ckpt"].glob("ckpt-*.index")) == ["ckpt-16.index"]


def test_a_resume_keeps_its_split_in_config_json_and_an_unreadable_validation_subject_ends_it_with_4(
        run, tmp_path, capsys):
    import shutil

    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    shutil.copytree(run["ckpt"], ckpt, ignore=shutil.ignore_patterns("logs", "predictions"))
    shutil.copytree(run["data"], data)
    # A run that held 2 of its 4 training subjects out for validation (-validation_fraction 0.5).
    split = json.loads((ckpt / splits.SPLIT_NAME).read_text())
    split.update(data_path=str(data), train=split["train"][:2], validation=split["train"][2:])
    (ckpt / splits.SPLIT_NAME).write_text(json.dumps(split))
    saved = json.loads((ckpt / config.CONFIG_NAME).read_text())
    saved.update(data_path=str(data), validation_fraction=0.5)
    (ckpt / config.CONFIG_NAME).write_text(json.dumps(saved))
    image = data / split["validation"][0] / layouts.IMAGE_NAME
    with open(image, "r+b") as fh:
        fh.truncate(os.path.getsize(image) // 2)
    assert model.main(["-restore", str(ckpt), "-validation_fraction", "0", "-epochs", "2"]) == errors.EXIT_PARTIAL
    out, err = capsys.readouterr()
    assert ("note: the run keeps its split.json (2 train, 2 validation, 1 test subjects): -validation_fraction "
            "0.0 is not used; -validation_fraction 0.5 (the run's) stays in config.json") in out
    assert json.loads((ckpt / config.CONFIG_NAME).read_text())["validation_fraction"] == 0.5
    # It kept validating, as config.json says; no pass read both subjects, so none is the best.
    _, rows = durable.read_csv_rows(str(ckpt / validation.VALIDATION_NAME))
    assert [(r["step"], r["subjects"], r["best"]) for r in rows] == [("16", "1", "0"), ("24", "1", "0")]
    assert "warning: validation was incomplete at 2 of 2 pass(es) of this run, since step 16" in out
    assert "stopped: training ended, but validation was incomplete since step 16" in err
