"""Nothing lost: checkpoints inside epochs, SIGKILL/SIGTERM, full disks, the run lock, guards.

Processes started here are killed by PID in ``finally`` blocks, with timeouts.
"""

import contextlib
import errno
import glob
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, TINY

import checkpoints
import durable
import errors
import layouts
import model
import phantoms
import training
from trainer import SRGANTrainer
from training_loop import CheckpointPolicy, StopSignals

STEPS_PER_EPOCH = 8  # 2 training volumes x 8 patches / batch 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("durable_data")
    phantoms.make_demo_data(str(root), subjects=3, shape=(32, 32, 24), seed=6)
    return root


def _argv(data, ckpt, *extra):
    return (["-data_path", str(data), "-checkpoint_dir", str(ckpt), "-epochs", "2",
             "-train_fraction", "0.67", "-checkpoint_steps", "2"] + TINY + list(extra))


def _state(ckpt):
    """Every variable of the latest checkpoint, by name.

    The project's rule for "latest" (``checkpoints.latest``): a kill between a
    checkpoint's index write and the state file's update leaves it complete
    but unlisted, and a resume uses it.
    """
    path = checkpoints.latest(str(ckpt))
    reader = tf.train.load_checkpoint(path)
    # save_counter counts saves, which a resumed run makes more of: not training state.
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


def _step(ckpt):
    return int(_state(ckpt)["step/.ATTRIBUTES/VARIABLE_VALUE"])


def _hold_lock(ckpt):
    """A process that holds the run lock of ``ckpt`` until killed (it has printed "locked")."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import durable; "
         "lock = durable.RunLock(sys.argv[2], 'training'); lock.acquire(); print('locked', flush=True); "
         "time.sleep(120)", ROOT, str(ckpt)], stdout=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted two-epoch run, the weights every interrupted run must end with.

    Its folder is first locked by another process: the refused attempt and the
    run after the holder died are recorded under ``"locked"``, which
    test_a_locked_folder_waits_for_its_holder_and_sigterm_then_sigkill_resume_identically
    asserts, so that one training run serves both.
    """
    ckpt = tmp_path_factory.mktemp("reference") / "ckpt"
    locked = {}
    holder = _hold_lock(ckpt)
    try:
        locked["holder_said"] = holder.stdout.readline().strip()
        locked["holder_pid"] = holder.pid
        with contextlib.redirect_stderr(io.StringIO()) as err:
            locked["refused_rc"] = model.main(_argv(data, ckpt))
        locked["refused_err"] = err.getvalue()
        locked["written_while_locked"] = tf.train.latest_checkpoint(str(ckpt))
    finally:
        _stop(holder)
    # The kernel released the dead holder's lock: the folder is free again.
    locked["rc"] = model.main(_argv(data, ckpt))
    return {"state": _state(ckpt), "locked": locked}


def _start(data, ckpt, cwd, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "model.py")] + _argv(data, ckpt, *extra)
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, ckpt, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
        if os.path.exists(os.path.join(ckpt, f"ckpt-{step}.index")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no ckpt-{step} after {timeout} s")


def _stop(proc):
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _assert_same_weights(state, reference):
    assert set(state) == set(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


def test_a_locked_folder_waits_for_its_holder_and_sigterm_then_sigkill_resume_identically(data, reference,
                                                                                         tmp_path, monkeypatch,
                                                                                         capsys):
    """Three tests in one, so that the reference run is trained once (a module fixture used by
    two tests is built by each xdist worker that runs one of them).

    A second run into a locked folder is refused until its holder dies (the
    reference run, recorded by its fixture). SIGTERM checkpoints at once (at
    that batch) and exits 143; a resumed run killed by SIGKILL keeps its last
    checkpoint inside the epoch; resuming again ends bit-identical to the
    uninterrupted run: one chain instead of two separate runs from scratch, as
    a resume that was not exact at either interruption would leave weights
    unequal to the reference.
    """
    # 0. The reference run's folder was locked by another process first.
    locked = reference["locked"]
    assert locked["holder_said"] == "locked"
    assert locked["refused_rc"] == 2
    assert f"in use by process {locked['holder_pid']}" in locked["refused_err"]
    assert "Traceback" not in locked["refused_err"]
    assert locked["written_while_locked"] is None  # nothing was written
    # The kernel released the dead holder's lock: the folder is free again.
    assert locked["rc"] == 0
    ckpt = tmp_path / "ckpt"
    # 1. SIGTERM mid-way through epoch 2, at step 11 (between the checkpoints of -checkpoint_steps 2):
    #    a checkpoint of the very step it stopped at, exit 143. In this process: the signal reaches
    #    the handler of model.main as it reaches a job's process (the SIGKILL below needs one).
    original = SRGANTrainer.train_step
    calls = []

    def terminated(self, lr, hr):
        out = original(self, lr, hr)
        calls.append(1)
        if len(calls) == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(SRGANTrainer, "train_step", terminated)
    assert model.main(_argv(data, ckpt)) == 128 + signal.SIGTERM
    monkeypatch.setattr(SRGANTrainer, "train_step", original)
    err = capsys.readouterr().err
    assert "received SIGTERM at step 11" in err and "resume with -restore" in err.lower()
    assert "Traceback" not in err
    stopped_at = 11
    assert _step(ckpt) == stopped_at == len(calls)  # the checkpoint is the step it stopped at
    state = _state(ckpt)
    assert int(state["epoch_batches/.ATTRIBUTES/VARIABLE_VALUE"]) == stopped_at % STEPS_PER_EPOCH
    # 2. The resumed run (a process of its own), SIGKILLed after its first checkpoint past that step.
    target = max(12, stopped_at + 2 - stopped_at % 2)  # the next step that -checkpoint_steps 2 saves
    proc = _start(data, ckpt, tmp_path, "-restore", str(ckpt))
    try:
        _wait_for_checkpoint(proc, ckpt, target)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == -signal.SIGKILL
    kept = _step(ckpt)
    assert target <= kept < 2 * STEPS_PER_EPOCH  # the last checkpoint survived the kill, inside the epoch
    # 3. Resumed from step `kept`, finished, and bit-identical to the uninterrupted run.
    assert model.main(["-restore", str(ckpt)]) == 0
    _assert_same_weights(_state(ckpt), reference["state"])


def test_a_full_disk_during_a_save_or_a_resume_exits_2_and_leaves_the_runs_files_intact(data, tmp_path, monkeypatch,
                                                                                        capsys):
    ckpt = tmp_path / "ckpt"
    # 1. The disk fills up while the checkpoint of step 6 is written: one plain paragraph, what
    #    was kept, and no partial checkpoint left behind.
    original = tf.train.CheckpointManager.save

    def save(self, checkpoint_number=None, **kwargs):
        if checkpoint_number == 6:
            temp = ckpt / "ckpt-6_temp"
            temp.mkdir()
            (temp / "part-00000-of-00001.data-00000-of-00001.tempstate123").write_bytes(b"x" * 10)
            raise tf.errors.ResourceExhaustedError(None, None, (
                "{{function_node __wrapped__SaveV2_dtypes_194_device_/job:localhost/replica:0/task:0/"
                f"device:CPU:0}}}} {temp}/part-00000-of-00001.data-00000-of-00001.tempstate123; "
                "No space left on device [Op:SaveV2] name: "))
        return original(self, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    # Saving is the subject, not the GAN: the generator pre-trains (a quarter of the graph to trace).
    assert model.main(_argv(data, ckpt, "-pretrain_steps", "100")) == errors.EXIT_ERROR == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "cannot write the checkpoint of step 6" in line and "No space left on device" in line
    assert "function_node" not in line and "[Op:" not in line
    assert f"The last complete checkpoint is {ckpt / 'ckpt-4'}" in line and "-restore" in err
    assert "Traceback" not in err and _step(ckpt) == 4
    assert not (ckpt / "ckpt-6_temp").exists()
    monkeypatch.setattr(tf.train.CheckpointManager, "save", original)
    # 2. A resume while the disk is still full: exit 2 at the first write, config.json,
    #    split.json and the checkpoints as they were, no temporaries.
    before = {name: (ckpt / name).read_bytes() for name in ("config.json", "split.json")}
    latest = tf.train.latest_checkpoint(str(ckpt))
    real_fsync = os.fsync

    def full(fd):
        # A disk that filled up after the run took its lock (a lock file keeps its block).
        if os.readlink(f"/proc/self/fd/{fd}").endswith(durable.LOCK_NAME):
            return real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert model.main(["-restore", str(ckpt), "-epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "config.json" in err and "Traceback" not in err
    for name, content in before.items():
        assert (ckpt / name).read_bytes() == content
    assert not glob.glob(str(ckpt / ".tmp-*"))
    assert tf.train.latest_checkpoint(str(ckpt)) == latest


@pytest.mark.parametrize("argv, fragment", [
    (["-learning_rate", "nan"], "-learning_rate"), (["-learning_rate", "inf"], "-learning_rate"),
    (["-learning_rate", "-1e-4"], "-learning_rate"), (["-sigma", "nan"], "-sigma"),
    (["-train_fraction", "inf"], "-train_fraction"), (["-checkpoint_minutes", "nan"], "-checkpoint_minutes"),
    (["-seed", "4294967296"], "-seed"), (["-seed", "-1"], "-seed"), (["-keep_checkpoints", "0"], "-keep_checkpoints"),
])
def test_numbers_must_be_finite_and_in_range(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        model.build_parser().parse_args(argv)
    assert exc.value.code == 2 and fragment in capsys.readouterr().err


def test_the_largest_seed_is_accepted():
    assert model.build_parser().parse_args(["-seed", "4294967295"]).seed == 2 ** 32 - 1


def test_non_finite_losses_stop_the_run_without_saving_them(data, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ckpt"
    original = training.TrainingStream.batches

    def poisoned(self, epoch, skip):
        for i, (lr, hr, nf) in enumerate(original(self, epoch, skip)):
            if i == 6:  # the 7th step trains on NaN
                lr = lr * np.nan
            yield lr, hr, nf

    monkeypatch.setattr(training.TrainingStream, "batches", poisoned)
    # The loss guard is the subject (the GAN's divergence: test_checkpoints.py): the generator
    # pre-trains, its content loss turns NaN.
    assert model.main(_argv(data, ckpt, "-pretrain_steps", "100")) == errors.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "diverged" in err and "non-finite at step 7" in err and "ckpt-6" in err
    assert "Traceback" not in err
    # Every checkpoint kept is finite, and none is past the divergence.
    for index in glob.glob(str(ckpt / "ckpt-*.index")):
        reader = tf.train.load_checkpoint(index[:-len(".index")])
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.all(np.isfinite(value)), name
    assert _step(ckpt) == 6


def test_a_data_folder_removed_mid_run_stops_it(data, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    original = SRGANTrainer.end_epoch

    def end_epoch(self):
        original(self)
        shutil.rmtree(copy)  # gone before epoch 2 reads it

    monkeypatch.setattr(SRGANTrainer, "end_epoch", end_epoch)
    # The data stream is the subject, not the GAN: the generator pre-trains.
    assert model.main(_argv(copy, tmp_path / "ckpt", "-pretrain_steps", "100")) == 2
    err = capsys.readouterr().err
    assert "has disappeared" in err and "Traceback" not in err
    assert _step(tmp_path / "ckpt") == STEPS_PER_EPOCH  # epoch 1 stays saved


def test_an_epoch_that_reads_no_subject_is_an_error(data, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    for folder in sorted(os.listdir(copy))[:2]:  # both training subjects: truncated gzip streams
        path = copy / folder / layouts.IMAGE_NAME
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 3])
    assert model.main(_argv(copy, tmp_path / "ckpt", "-epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "epoch 1 trained nothing" in err and "Traceback" not in err
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")) is None


def test_output_folders_inside_the_data_are_refused(data, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    assert model.main(_argv(copy, copy / "runs" / "ckpt", "-epochs", "1")) == 2
    assert "inside the data" in capsys.readouterr().err
    assert not (copy / "runs").exists()


def test_leftover_temporaries_are_removed_at_start(run, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run["ckpt"], ckpt)  # a finished one-epoch run
    (ckpt / ".tmp-config.json-abc123.json").write_text("{")
    (ckpt / "ckpt-99_temp").mkdir()
    (ckpt / "ckpt-99_temp" / "part-00000-of-00001.data-00000-of-00001.tempstate1").write_bytes(b"x" * 10)
    keep = ckpt / "notes.txt"
    keep.write_text("mine")
    capsys.readouterr()
    # Removed as the run takes its folder, before anything else (here: nothing left to train).
    assert model.main(["-restore", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "removed 2 temporary file(s)" in out and "nothing to train" in out
    assert not (ckpt / "ckpt-99_temp").exists() and not glob.glob(str(ckpt / ".tmp-*"))
    assert keep.read_text() == "mine"


def test_checkpoint_policy_by_steps_and_by_time():
    now = [0.0]
    policy = CheckpointPolicy(minutes=1.0, steps=5, clock=lambda: now[0])
    assert [s for s in range(1, 12) if policy.due(s)] == [5, 10]
    now[0] = 61.0
    assert policy.due(7)  # a minute of training since the last checkpoint
    policy.saved()
    assert not policy.due(8)
    off = CheckpointPolicy(minutes=0, steps=0, clock=lambda: now[0])
    now[0] = 1e9
    assert not any(off.due(s) for s in range(1, 100))


def test_stop_signals_are_recorded_not_fatal_and_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert signals.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is before
