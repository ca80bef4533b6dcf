"""Checkpoint folders: finding the latest checkpoint, what identifies it, restoring the generator alone."""

import gc
import hashlib
import os
import re

import keras
import tensorflow as tf

import quiet
from errors import UserError


def latest(folder):
    """str, the prefix of the newest checkpoint in ``folder`` (``.../ckpt-N``), or None."""
    return tf.train.latest_checkpoint(folder)


def require(folder):
    """The newest checkpoint of a folder that must hold one.

    Args:
        folder: a folder written by a training run.

    Returns:
        str, the checkpoint prefix (``.../ckpt-N``).

    Raises:
        UserError: the folder does not exist, is a file or holds no checkpoint.
    """
    if not os.path.exists(folder):
        raise UserError(f"checkpoint folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise UserError(f"checkpoint folder {folder!r} is a file, not a folder")
    path = latest(folder)
    if path is None:
        raise UserError(f"checkpoint folder {folder!r} holds no checkpoint "
                        "(expected the files written by a training run: checkpoint, ckpt-N.index)")
    return path


def read_int(variable):
    """The value of an integer variable, also a mirrored one (which int() refuses)."""
    return int(variable.numpy())


def checkpoint_identity(checkpoint_dir):
    """What identifies the checkpoint an inference run uses.

    Args:
        checkpoint_dir: a folder holding a training run's checkpoints.

    Returns:
        dict: ``path`` (real path of the latest ``ckpt-N`` prefix), ``step``
        (int, the training step; None when unknown) and ``sha256`` (16 hex
        digits of its ``.index`` file, which holds a checksum of every tensor:
        it tells apart two checkpoints saved under the same name).

    Raises:
        UserError: if the folder holds no checkpoint.
    """
    path = require(checkpoint_dir)
    try:
        with open(path + ".index", "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    except OSError as err:
        raise UserError(f"cannot read the checkpoint {path}: {err.strerror or err}")
    step = None
    try:
        step = int(tf.train.load_checkpoint(path).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    except (ValueError, KeyError, tf.errors.OpError):
        match = re.search(r"-(\d+)$", path)
        step = int(match.group(1)) if match else None
    return {"path": os.path.realpath(path), "step": step, "sha256": digest}


def restore_generator(generator, checkpoint_dir):
    """Loads only the generator's weights from the latest checkpoint in a folder.

    Returns:
        str, the checkpoint prefix restored.

    Raises:
        UserError: if the folder holds no checkpoint or its generator does not fit.
    """
    path = require(checkpoint_dir)
    problem = generator_restore_problem(keras.models.clone_model(generator), path)
    if problem is not None:
        raise UserError(f"the generator in {path} does not fit the architecture flags: {problem}")
    status = tf.train.Checkpoint(generator=generator).restore(path)
    status.expect_partial()
    return path


def generator_restore_problem(probe, path):
    """Tries a generator restore on a throwaway copy; returns the first error line or None.

    A restore that fails half-way leaves TensorFlow's bookkeeping attached to
    the model, which logs one warning per checkpoint value (~170 lines) when
    the model is finally deleted, after the error message. The copy is deleted
    here, with TensorFlow's loggers quiet, so a mismatch prints one line.
    """
    checkpoint = tf.train.Checkpoint(generator=probe)
    problem = None
    with quiet.quiet_tensorflow_logs():
        try:
            status = checkpoint.restore(path)
            status.expect_partial()
            status.assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as err:
            problem = str(err).splitlines()[0]
        del probe, checkpoint
        gc.collect()
    return problem
