"""Always recoverable: what a checkpoint folder holds can be resumed, whatever stopped the run.

Divergence never writes non-finite state, a lost ``checkpoint`` state file is
recovered from the ``ckpt-N.index`` files, and the checkpoints of earlier
released layouts (tests/data/checkpoints/<commit>/) still resume and evaluate.
"""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import config
import degradation
import errors
import model
import networks
import phantoms
import train_dataset as td
from errors import RunStopped
from trainer import SRGANTrainer
from training_loop import TrainingLoop

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = ["-volume_shape", "16,16,12", "-patch_shape", "8,8,6", "-patch_margin", "2",
         "-upsampling_factor", "2", "-residual_blocks", "1", "-feature_size", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_data")
    phantoms.make_demo_data(str(root), subjects=3, shape=(16, 16, 12), seed=6)
    return root


def _argv(data, ckpt, *extra):
    return (["-data_path", str(data), "-checkpoint_dir", str(ckpt), "-train_fraction", "0.67"]
            + SMALL + list(extra))


def _non_finite_tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    bad = []
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
            bad.append(name)
    return bad


def _tiny_trainer(folder):
    g = networks.build_generator(2, residual_blocks=1, feature_size=4)
    d = networks.build_discriminator((8, 8, 6, 1))
    return SRGANTrainer(g, d, learning_rate=1e-4, seed=1, checkpoint_dir=str(folder))


def _batch(seed=2):
    hr = np.random.default_rng(seed).uniform(-1, 1, (2, 8, 8, 6, 1)).astype(np.float32)
    return np.asarray(degradation.degrade(hr, 2)), hr


# ----------------------------------------------------------------------------
# 1. Divergence never writes non-finite state
# ----------------------------------------------------------------------------

def test_divergence_writes_no_non_finite_checkpoint(data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    rc = model.main(_argv(data, ckpt, "-learning_rate", "1e3", "-checkpoint_steps", "1", "-epochs", "2"))
    assert rc == errors.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "diverged" in err
    for index in glob.glob(str(ckpt / "ckpt-*.index")):
        assert _non_finite_tensors(index[:-len(".index")]) == []
    latest = checkpoints.latest(str(ckpt))
    if latest:
        assert f"the last good checkpoint is {latest}" in err


def test_non_finite_optimiser_state_is_refused_and_the_named_checkpoint_resumes(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    loop = TrainingLoop(trainer, log=lambda *_: None)
    trainer.train_step(*_batch())
    good = loop.save(1)
    trainer.train_step(*_batch(3))
    # Losses finite, one Adam moment of the generator overflowed.
    moment = next(v for label, v in trainer.saved_float_variables()
                  if label == "generator optimiser state" and "velocity" in v.path)
    moment.assign(np.full(moment.shape, np.inf, np.float32))
    with pytest.raises(RunStopped) as stop:
        loop.save(2)
    assert stop.value.exit_code == errors.EXIT_DIVERGED
    assert "generator optimiser state" in str(stop.value) and moment.path in str(stop.value)
    assert f"the last good checkpoint is {good}" in str(stop.value)
    assert checkpoints.latest(str(tmp_path)) == good
    assert _non_finite_tensors(good) == []
    resumed = _tiny_trainer(tmp_path)
    assert resumed.restore(str(tmp_path)) == good
    out = resumed.train_step(*_batch(3))
    assert all(np.isfinite(float(v)) for v in out.values())
    assert resumed.non_finite_state() == []


def _scripted_losses(trainer, step, **values):
    row = [values.get(name, 1.0) for name in SRGANTrainer.SCALAR_NAMES]
    trainer.history[step % SRGANTrainer.HISTORY].assign(np.asarray(row, np.float32))


@pytest.mark.parametrize("exploded, set_aside", [({"mse": 1e12}, True), ({"d_loss": 1e7}, True),
                                                 ({"adv": 1e9}, False),  # the step's own D update
                                                 ({"mse": np.nan}, False)])  # a NaN may come from the input
def test_the_checkpoint_whose_state_gave_exploded_losses_is_set_aside(tmp_path, exploded, set_aside):
    trainer = _tiny_trainer(tmp_path)
    loop = TrainingLoop(trainer, log=lambda *_: None, batch_voxels=768)
    for step in (1, 2):
        trainer.step.assign(step)
        _scripted_losses(trainer, step)
        loop.save(step)
    # Step 3's d_loss, mse and gdl come from the state of step 2; its adv from step 3's own update.
    _scripted_losses(trainer, 3, **exploded)
    with pytest.raises(RunStopped) as stop:
        loop.guard_finite(3)
    assert stop.value.exit_code == errors.EXIT_DIVERGED and "at step 3" in str(stop.value)
    good = str(tmp_path / ("ckpt-1" if set_aside else "ckpt-2"))
    assert checkpoints.latest(str(tmp_path)) == good
    assert (tmp_path / "diverged" / "ckpt-2.index").exists() == set_aside
    assert str(stop.value).endswith(f"the last good checkpoint is {good}; resume from it with a lower "
                                    f"-learning_rate than this run's 0.0001: -restore {tmp_path} -learning_rate 1e-05")


def test_following_the_divergence_advice_literally_trains_on(run, tmp_path, capsys):
    import re
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(run["ckpt"], folder, ignore=shutil.ignore_patterns("logs", "predictions"))
    # From the run's healthy ckpt-16, a learning rate 1000 times its own: the GAN blows up within a few
    # steps, losses still finite, while checkpoints are written (every 4 steps: each is 55 MB, fsynced,
    # and the followed command keeps the run's -checkpoint_steps).
    argv = ["-restore", str(folder), "-learning_rate", "0.1", "-epochs", "2", "-checkpoint_steps", "4"]
    assert model.main(argv) == errors.EXIT_DIVERGED
    err = capsys.readouterr().err.strip()
    advice = re.search(r"the last good checkpoint is (\S+); .*: (-restore \S+ -learning_rate \S+)$", err)
    assert advice, err
    named, command = advice.groups()
    assert checkpoints.latest(str(folder)) == named  # the one -restore takes
    assert command == f"-restore {folder} -learning_rate 0.01"
    for index in glob.glob(str(folder / "ckpt-*.index")):
        assert _non_finite_tensors(index[:-len(".index")]) == []
    assert model.main(command.split()) == 0
    assert checkpoints.latest(str(folder)) == str(folder / "ckpt-32")  # epoch 2, config.json's -epochs


# ----------------------------------------------------------------------------
# 2. A lost or stale `checkpoint` state file loses nothing
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One epoch (36 steps) checkpointed every 12 steps: ckpt-12, ckpt-24, ckpt-36.

    The tests that use it are about checkpoint files, not the GAN: the run
    pre-trains the generator throughout (-pretrain_steps 1000, a quarter of
    the GAN step's graph to trace), and what it said is kept beside it (said.txt)
    for test_pretraining_that_covers_the_whole_run_is_said.
    """
    import contextlib
    import io

    ckpt = tmp_path_factory.mktemp("trained") / "ckpt"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert model.main(_argv(data, ckpt, "-epochs", "1", "-checkpoint_steps", "12", "-pretrain_steps", "1000")) == 0
    assert checkpoints.latest(str(ckpt)).endswith("ckpt-36")
    (ckpt.parent / "said.txt").write_text(out.getvalue())
    return ckpt


def _copy_run(trained, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("logs", "predictions"))
    return folder


def test_lost_state_file_is_rebuilt_and_a_plain_start_is_refused(data, trained, tmp_path, capsys):
    ckpt = _copy_run(trained, tmp_path)
    os.remove(ckpt / "checkpoint")
    assert checkpoints.latest(str(ckpt)) == str(ckpt / "ckpt-36")
    assert checkpoints.require(str(ckpt)) == str(ckpt / "ckpt-36")
    config_before = (ckpt / "config.json").read_bytes()
    index_before = (ckpt / "ckpt-36.index").read_bytes()
    # A plain start over it is refused, and writes nothing.
    assert model.main(_argv(data, ckpt, "-epochs", "2")) == errors.EXIT_ERROR
    assert "already holds a training run" in capsys.readouterr().err
    assert (ckpt / "config.json").read_bytes() == config_before
    assert (ckpt / "ckpt-36.index").read_bytes() == index_before
    assert not (ckpt / "checkpoint").exists()
    # -restore resumes from the newest complete checkpoint and rebuilds the state file
    # with every kept checkpoint (the manager deletes the oldest of them later). The
    # run has its one epoch: resumed, nothing left to train (a longer run trains on as
    # any resume does).
    assert model.main(_argv(data, ckpt, "-epochs", "1", "-restore", str(ckpt))) == 0
    out = capsys.readouterr().out
    assert "rebuilt it from the 3 complete" in out and "resumed " + str(ckpt / "ckpt-36") in out
    state = tf.train.get_checkpoint_state(str(ckpt))
    assert state.model_checkpoint_path.endswith("ckpt-36")
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-12", "ckpt-24", "ckpt-36"]


def test_kill_between_index_and_state_file_resumes_from_the_newest(data, trained, tmp_path, capsys):
    ckpt = _copy_run(trained, tmp_path)
    # The state of the folder after a kill right after ckpt-36.index was written.
    checkpoints.write_state(str(ckpt), str(ckpt / "ckpt-24"), [str(ckpt / "ckpt-12"), str(ckpt / "ckpt-24")])
    assert checkpoints.latest(str(ckpt)) == str(ckpt / "ckpt-36")
    # An index whose data shard is missing is not complete: never chosen.
    (ckpt / "ckpt-99.index").write_bytes((ckpt / "ckpt-36.index").read_bytes())
    assert checkpoints.latest(str(ckpt)) == str(ckpt / "ckpt-36")
    os.remove(ckpt / "ckpt-99.index")
    assert model.main(_argv(data, ckpt, "-epochs", "1", "-restore", str(ckpt))) == 0
    out = capsys.readouterr().out
    assert "resumed " + str(ckpt / "ckpt-36") in out
    assert "did not list" in out
    assert tf.train.latest_checkpoint(str(ckpt)).endswith("ckpt-36")


# ----------------------------------------------------------------------------
# 10. Checkpoints of earlier versions resume and evaluate
# ----------------------------------------------------------------------------

# Runs of `python model.py -epochs 1` + SMALL on 3 demo phantoms 16x16x12 of
# seed 5, by the commit each folder is named after; see tests/data/checkpoints/README.md.
OLD_RUNS = ("38d74e2", "9a6130d")


def _old_run(commit, tmp_path):
    import gzip
    import shutil

    folder = tmp_path / commit
    shutil.copytree(os.path.join(HERE, "data", "checkpoints", commit), folder)
    for packed in glob.glob(str(folder / "*.gz")):
        with gzip.open(packed, "rb") as src, open(packed[:-len(".gz")], "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(packed)
    data = tmp_path / "data"
    phantoms.make_demo_data(str(data), subjects=3, shape=(16, 16, 12), seed=5)
    return folder, data


def _tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


@pytest.mark.parametrize("commit", OLD_RUNS)
def test_checkpoint_of_an_earlier_version_restores_exactly(commit, tmp_path):
    import placement
    import training

    folder, data = _old_run(commit, tmp_path)
    log = []
    cfg = model.parse_command(["-data_path", str(data), "-restore", str(folder), "-checkpoint_dir",
                               str(folder), "-epochs", "2"], log=log.append).settings
    trainer = training.make_trainer(cfg.replace(checkpoint_dir=str(tmp_path / "again")),
                                    placement.Placement(), log=log.append)
    assert trainer.restore(str(folder)) == str(folder / "ckpt-36")
    # Its config.json predates -gan_lr_scale: it goes on at the rate it would have had.
    assert cfg.gan_lr_scale == config.LEGACY_VALUES["gan_lr_scale"] == trainer.g_schedule.scale
    old = _tensors(str(folder / "ckpt-36"))
    new = _tensors(trainer.save())
    shared = set(old) & set(new)
    assert {k.split("/")[0] for k in shared} >= {"generator", "discriminator", "g_optimizer",
                                                 "d_optimizer", "step", "epoch", "data_seed"}
    for name in shared:
        np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    fresh = "loss_sums" not in {k.split("/")[0] for k in old}
    assert any("start afresh" in line for line in log) == fresh


@pytest.mark.parametrize("commit", OLD_RUNS)
def test_run_of_an_earlier_version_resumes_and_evaluates(commit, tmp_path, capsys):
    folder, data = _old_run(commit, tmp_path)
    assert model.main(["-data_path", str(data), "-restore", str(folder), "-checkpoint_dir",
                       str(folder), "-epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"resumed {folder / 'ckpt-36'}: epoch 1 done, step 36" in out
    assert checkpoints.latest(str(folder)).endswith("ckpt-72")
    volumes = tmp_path / "volumes"
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(folder), "-data_path",
                       str(data), "-path_volumes", str(volumes)]) == 0
    assert (volumes / "metrics.csv").exists()


def test_checkpoint_that_does_not_fit_is_refused_with_what_differs(tmp_path, capsys):
    folder, data = _old_run("9a6130d", tmp_path)
    foreign = tmp_path / "foreign"
    tf.train.CheckpointManager(tf.train.Checkpoint(step=tf.Variable(3, dtype=tf.int64)),
                               str(foreign), max_to_keep=1, checkpoint_name="ckpt").save(3)
    for name in ("config.json", "split.json"):
        (foreign / name).write_bytes((folder / name).read_bytes())
    rc = model.main(["-data_path", str(data), "-restore", str(foreign), "-checkpoint_dir",
                     str(foreign), "-epochs", "2"])
    err = capsys.readouterr().err
    assert rc == errors.EXIT_ERROR
    assert "holds no generator, discriminator" in err and "it holds step" in err


def test_config_json_that_disagrees_with_its_checkpoint_says_so(tmp_path, capsys):
    import json

    folder, data = _old_run("9a6130d", tmp_path)
    saved = json.loads((folder / "config.json").read_text())
    saved["feature_size"] = 8
    (folder / "config.json").write_text(json.dumps(saved))
    rc = model.main(["-data_path", str(data), "-restore", str(folder), "-checkpoint_dir",
                     str(folder), "-epochs", "2"])
    err = capsys.readouterr().err
    assert rc == errors.EXIT_ERROR
    assert "config.json and the checkpoint disagree" in err and "Received incompatible" not in err


# ----------------------------------------------------------------------------
# 5. Settings are never changed silently
# ----------------------------------------------------------------------------

def test_batch_larger_than_an_epoch_is_refused(data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    rc = model.main(_argv(data, ckpt, "-epochs", "1", "-batch_size", "100000"))
    err = capsys.readouterr().err
    assert rc == errors.EXIT_ERROR
    assert "-batch_size 100000 is more than the 72 patches of one epoch" in err
    assert not (ckpt / "config.json").exists()


def test_pretraining_that_covers_the_whole_run_is_said(trained):
    said = (trained.parent / "said.txt").read_text()
    assert "note: -pretrain_steps 1000 covers every step of this run" in said
    reader = tf.train.load_checkpoint(checkpoints.latest(str(trained)))
    # No adversarial term reached the generator; the discriminator warmed up at every step.
    step = int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    assert step > 0
    assert int(reader.get_tensor("d_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == step


# ----------------------------------------------------------------------------
# 8. SIGTERM during an evaluation: the subject under way is finished, exit 143
# ----------------------------------------------------------------------------

def test_sigterm_during_evaluation_stops_after_the_subject_and_the_rerun_resumes(trained, tmp_path,
                                                                                 monkeypatch, capsys):
    import signal

    import evaluation

    other = tmp_path / "other"
    phantoms.make_demo_data(str(other), subjects=3, shape=(16, 16, 12), seed=7)
    volumes = tmp_path / "volumes"
    argv = ["-evaluate", "True", "-checkpoint_dir_restore", str(trained), "-data_path", str(other),
            "-path_volumes", str(volumes)]
    real = evaluation.evaluate_subject
    calls = []

    def terminated(*args, **kwargs):
        calls.append(args[0].subject.name)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first subject is under way
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_subject", terminated)
    assert model.main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "received SIGTERM after 1 of 3 subject(s)" in err
    assert len(calls) == 1
    monkeypatch.setattr(evaluation, "evaluate_subject", real)
    assert model.main(argv) == 0
    out = capsys.readouterr().out
    assert "resuming: 1 of 3 subject(s) already in" in out


# ----------------------------------------------------------------------------
# 3. A mask on another grid than its image's is not used as if it matched
# ----------------------------------------------------------------------------

def test_mask_with_a_shifted_affine_is_refused(tmp_path):
    from helpers import write_nifti

    import layouts
    import nifti_io

    img = np.zeros((6, 6, 6), np.float32)
    img[1:4, 1:4, 1:4] = 3
    mask = np.ones((6, 6, 6), np.uint8)
    shifted = np.eye(4)
    shifted[0, 3] = 20.0
    nearly = np.eye(4)
    nearly[:3, 3] = 1e-4
    image_path = write_nifti(str(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz"), img)
    subject = layouts.Subject("sub-01", image_path, write_nifti(
        str(tmp_path / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"), mask, shifted, np.uint8))
    with pytest.raises(nifti_io.DataError, match=r"not on the image's grid.*origin shifted by \(20, 0, 0\) mm"):
        nifti_io.load_mask(subject, img)
    within = layouts.Subject("sub-01", image_path, write_nifti(
        str(tmp_path / "m2.nii.gz"), mask, nearly, np.uint8))
    assert nifti_io.load_mask(within, img).all()


# ----------------------------------------------------------------------------
# 4. Images smaller than one patch's worth are refused with their shape
# ----------------------------------------------------------------------------

def test_degenerate_images_are_refused_for_training(data, tmp_path, capsys):
    import shutil

    from helpers import write_nifti

    import layouts
    import nifti_io
    import splits
    import training

    assert nifti_io.minimum_image_shape((8, 8, 6), 2) == (4, 4, 4)
    assert nifti_io.size_problem((1, 1, 1), (8, 8, 6), 2).startswith("image 1x1x1 is smaller")
    assert nifti_io.size_problem((16, 16, 12), (8, 8, 6), 2) is None
    tiny = tmp_path / "tiny"
    for name in ("a", "b", "c"):
        write_nifti(str(tiny / name / layouts.IMAGE_NAME), np.full((1, 1, 1), 5.0))
    rc = model.main(_argv(tiny, tmp_path / "ckpt", "-epochs", "1"))
    captured = capsys.readouterr()
    assert rc == errors.EXIT_ERROR
    assert "image 1x1x1 is smaller than one patch's worth" in captured.out
    assert "is large enough to train on" in captured.err
    # Among good subjects the tiny ones are reported and left out; the good ones train
    # (training.usable_subjects is what train() streams from).
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny, mixed)
    for name in ("demo_000", "demo_001"):
        shutil.copytree(data / name, mixed / name)
    said = []
    cfg = model.parse_command(_argv(mixed, tmp_path / "ckpt2", "-epochs", "1", "-train_fraction", "0.8"),
                              log=said.append).settings
    train = splits.training_split(cfg, said.append).train
    assert [s.name for s in train] == ["a", "b", "c", "demo_000"]
    assert [s.name for s in training.usable_subjects(cfg, train, said.append)] == ["demo_000"]
    skipped = [line for line in said if line.startswith("skipping training subject")]
    assert len(skipped) == 3 and all("image 1x1x1 is smaller than one patch's worth" in line for line in skipped)


# 9. Messages: a failed save says it plainly and leaves no partial checkpoint: see
# test_durability.py::test_a_full_disk_during_a_save_or_a_resume_exits_2_and_leaves_the_runs_files_intact


# ----------------------------------------------------------------------------
# 4. A damaged checkpoint is named as such; one pruned while it is read is not lost
# ----------------------------------------------------------------------------

def _copy_of(run, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(run["ckpt"], folder, ignore=shutil.ignore_patterns("logs", "predictions"))
    return folder


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def test_a_truncated_checkpoint_file_is_named_and_the_flags_are_not_blamed(run, tmp_path, capsys):
    import validation

    folder = _copy_of(run, tmp_path)
    validation.BestCheckpoint(str(folder)).replace(str(folder / "ckpt-16"), {"step": 16, "psnr_fair": 20.0})
    _truncate(folder / "best" / "ckpt-16.index")
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(folder / "best"),
                       "-path_volumes", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "ckpt-16.index is corrupt or truncated" in err and "the flags are not at fault" in err
    _truncate(folder / "ckpt-16.data-00000-of-00001")
    data = "its data file ckpt-16.data-00000-of-00001 is corrupt or truncated"
    for argv in (["-export", str(tmp_path / "m.keras"), "-checkpoint_dir_restore", str(folder)],
                 ["-restore", str(folder), "-epochs", "2"]):
        assert model.main(argv) == 2
        err = capsys.readouterr().err
        assert data in err and "architecture flags" not in err and "Traceback" not in err


def _pruning_restores(monkeypatch, folder, times):
    """Makes each of the first ``times`` restores find its checkpoint pruned: a training run in ``folder``
    saves the next ckpt-N and removes the one being read, as -keep_checkpoints 1 does."""
    real_restore = tf.train.Checkpoint.restore
    calls = {"n": 0}

    def pruned_first(self, path, *args, **kwargs):
        if calls["n"] < times and os.path.exists(path + ".index"):
            calls["n"] += 1
            step = checkpoints.number(path) + 1
            for name in glob.glob(glob.escape(path) + ".*"):
                os.replace(name, name.replace(os.path.basename(path), f"ckpt-{step}"))
            checkpoints.write_state(str(folder), str(folder / f"ckpt-{step}"), [str(folder / f"ckpt-{step}")])
        return real_restore(self, path, *args, **kwargs)

    monkeypatch.setattr(tf.train.Checkpoint, "restore", pruned_first)


def test_a_checkpoint_pruned_while_an_evaluation_reads_it_gives_way_to_the_newest(run, tmp_path, monkeypatch,
                                                                                  capsys):
    import json

    folder = _copy_of(run, tmp_path)
    _pruning_restores(monkeypatch, folder, times=1)
    out = tmp_path / "out"
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(folder), "-path_volumes", str(out)]) == 0
    assert f"note: {folder / 'ckpt-16'} was removed while it was read" in capsys.readouterr().out
    # Every output names the checkpoint whose weights were used.
    assert json.loads((out / "metrics.json").read_text())["checkpoint"].startswith(str(folder / "ckpt-17"))
    (sidecar,) = out.glob("*_sr.json")
    assert json.loads(sidecar.read_text())["Checkpoint"] == str(folder / "ckpt-17")


def test_a_folder_pruned_at_every_read_says_so(run, tmp_path, monkeypatch, capsys):
    folder = _copy_of(run, tmp_path)
    _pruning_restores(monkeypatch, folder, times=3)  # checkpoints.RESTORE_ATTEMPTS
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(folder),
                       "-path_volumes", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "were removed while they were read (ckpt-16, ckpt-17, ckpt-18)" in err
    assert "architecture flags" not in err
