"""Checkpoint folders: finding the latest checkpoint, what identifies it, restoring the generator alone."""

import gc
import glob
import hashlib
import os
import re
import shutil

import keras
import tensorflow as tf

import durable
import quiet
from errors import UserError

STATE_FILE = "checkpoint"
_NUMBERED = re.compile(r"ckpt-(\d+)$")
_SHARD = re.compile(r"\.data-(\d+)-of-(\d+)$")


def number(prefix):
    """int N of a ``.../ckpt-N`` prefix, or None."""
    match = _NUMBERED.search(os.path.basename(prefix or ""))
    return int(match.group(1)) if match else None


def is_complete(prefix):
    """bool, whether ``prefix.index`` and every data shard it names exist."""
    if not os.path.isfile(prefix + ".index"):
        return False
    shards = [_SHARD.search(p) for p in glob.glob(glob.escape(prefix) + ".data-*-of-*")]
    shards = [m for m in shards if m]
    if not shards:
        return False
    total = int(shards[0].group(2))
    return {int(m.group(1)) for m in shards if int(m.group(2)) == total} == set(range(total))


def complete_checkpoints(folder):
    """The complete ``ckpt-N`` checkpoints on disk, oldest first.

    Returns:
        list of prefixes (``folder/ckpt-N``), by N; a ``ckpt-N.index`` without
        all its data shards is left out.
    """
    found = []
    for index in glob.glob(os.path.join(glob.escape(folder), "ckpt-*.index")):
        prefix = index[:-len(".index")]
        if number(prefix) is not None and is_complete(prefix):
            found.append((number(prefix), prefix))
    return [prefix for _, prefix in sorted(found)]


def listed(folder):
    """The newest checkpoint the state file ``folder/checkpoint`` names (None when unreadable)."""
    try:
        return tf.train.latest_checkpoint(folder)
    except (tf.errors.OpError, ValueError):
        return None


def latest(folder):
    """The prefix of the newest complete checkpoint in ``folder`` (``.../ckpt-N``), or None.

    The ``checkpoint`` state file names it; a checkpoint it does not list
    (the file was lost, or a kill came between writing ``ckpt-N.index`` and
    updating it) is found from the ``ckpt-N.index`` files.
    """
    if not folder or not os.path.isdir(folder):
        return None
    named = listed(folder)
    on_disk = complete_checkpoints(folder)
    newest = on_disk[-1] if on_disk else None
    if named is None or (newest is not None and number(named) is not None
                         and number(newest) > number(named)):
        return newest
    return named


def write_state(folder, newest, kept):
    """Writes the ``checkpoint`` state file (atomically) as tf.train.CheckpointManager does.

    Args:
        folder: the checkpoint folder.
        newest: the prefix of the latest checkpoint.
        kept: the prefixes of every checkpoint to keep, oldest first.
    """
    def line(key, prefix):
        return f'{key}: "{os.path.basename(prefix)}"\n'
    text = line("model_checkpoint_path", newest) + "".join(
        line("all_model_checkpoint_paths", p) for p in kept)
    durable.write_text(os.path.join(folder, STATE_FILE), text)


def plain_reason(message):
    """The part of a TensorFlow error message a person reads: no ``{{function_node ...}}``, no ``[Op:...]``."""
    text = " ".join(str(message).split())
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
    return text.strip() or str(message).splitlines()[0]


def remove_partial(folder, step):
    """Removes what a failed save of ``ckpt-<step>`` left: its ``_temp`` folder, data shards without an index.

    Returns:
        list of the removed paths.
    """
    prefix = os.path.join(folder, f"ckpt-{int(step)}")
    removed = []
    if os.path.isdir(prefix + "_temp") and not os.path.islink(prefix + "_temp"):
        shutil.rmtree(prefix + "_temp", ignore_errors=True)
        removed.append(prefix + "_temp")
    if not os.path.exists(prefix + ".index"):
        for shard in glob.glob(glob.escape(prefix) + ".data-*"):
            try:
                os.remove(shard)
                removed.append(shard)
            except OSError:
                pass
    return removed


def holds_checkpoints(folder):
    """bool, whether ``folder`` holds a training run's checkpoint files (complete or not)."""
    return bool(latest(folder) or glob.glob(os.path.join(glob.escape(folder), "ckpt-*.index")))


# Where a checkpoint whose state made the run diverge is kept, out of -restore's way.
DIVERGED_FOLDER = "diverged"


def set_aside(folder, step):
    """Moves ``folder/ckpt-<step>`` into ``folder/diverged/`` (not deleted), so -restore takes the one before.

    The ``checkpoint`` state file is rewritten to the checkpoints left (and
    removed when none is left).

    Returns:
        str, the moved checkpoint's new prefix; None when there was no such checkpoint.

    Raises:
        OSError: a file could not be moved.
    """
    prefix = os.path.join(folder, f"ckpt-{int(step)}")
    if not os.path.exists(prefix + ".index"):
        return None
    target = os.path.join(folder, DIVERGED_FOLDER)
    os.makedirs(target, exist_ok=True)
    for path in glob.glob(glob.escape(prefix) + ".*"):
        os.replace(path, os.path.join(target, os.path.basename(path)))
    left = complete_checkpoints(folder)
    if left:
        write_state(folder, left[-1], left)
    elif os.path.exists(os.path.join(folder, STATE_FILE)):
        os.remove(os.path.join(folder, STATE_FILE))
    return os.path.join(target, os.path.basename(prefix))


def recover_state(folder, log=print):
    """Rewrites the ``checkpoint`` state file when it misses the newest complete checkpoint.

    A ``tf.train.CheckpointManager`` reads that file to find (and later
    delete) the earlier checkpoints; a resumed run must see them all.

    Args:
        folder: a checkpoint folder.
        log: callable for the one-line note.

    Returns:
        str, the newest complete checkpoint (None when there is none).
    """
    newest = latest(folder)
    if newest is None or listed(folder) == newest:
        return newest
    kept = [p for p in complete_checkpoints(folder) if number(p) <= number(newest)]
    try:
        write_state(folder, newest, kept)
    except OSError as err:
        log(f"note: {os.path.join(folder, STATE_FILE)} does not list {newest} and could not be "
            f"rewritten ({err}); using {newest} all the same")
        return newest
    log(f"note: {os.path.join(folder, STATE_FILE)} was missing or did not list {newest} (a run "
        f"killed while saving?); rebuilt it from the {len(kept)} complete ckpt-N.index file(s)")
    return newest


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
                        "(expected the files written by a training run: ckpt-N.index with its "
                        "ckpt-N.data-* files, and the checkpoint state file)")
    return path


def saved_objects(path):
    """set of the top-level names a checkpoint holds (``generator``, ``step``, ...).

    Raises:
        UserError: the checkpoint cannot be read.
    """
    try:
        names = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as err:
        raise UserError(f"cannot read the checkpoint {path}: {damage(path, err) or plain_reason(err)}")
    return {name.split("/")[0] for name in names} - {"_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"}


def restore_state(objects, path, fresh_if_missing, log):
    """Restores a whole training state; bookkeeping an earlier version did not save starts afresh.

    Args:
        objects: dict name -> trackable, what the checkpoint should hold.
        path: the checkpoint prefix.
        fresh_if_missing: names that may be missing (earlier versions): they
            keep their initial values, with a one-line note.
        log: callable for the note.

    Raises:
        UserError: something else is missing, or a value does not fit.
    """
    saved = saved_objects(path)
    missing = [name for name in objects if name not in saved]
    lacking = [name for name in missing if name not in fresh_if_missing]
    if lacking:
        raise UserError(
            f"cannot resume from {path}: it holds no {', '.join(lacking)} (it holds "
            f"{', '.join(sorted(saved))}); it was not written by a training run of this project, "
            "or by one with other settings (e.g. -mixed_precision float16 adds loss-scale state)")
    present = {k: v for k, v in objects.items() if k in saved}
    try:
        status = tf.train.Checkpoint(**present).restore(path)
        # Checkpoints of earlier versions also hold a label-noise generator
        # that the stateless draws no longer need.
        status.expect_partial()
        status.assert_existing_objects_matched()
    except (ValueError, AssertionError, IndexError, tf.errors.OpError) as err:
        damaged = damage(path, err)
        raise UserError(damaged_message(path, damaged) if damaged else mismatch_message(path, err)) from None
    if missing:
        log(f"note: {path} was written by an earlier version without {', '.join(missing)}: the "
            "current epoch's running loss sums start afresh (weights, optimisers, step and data "
            "order are restored)")


class FiniteCheck:
    """Whether each of a list of variables is all finite, on the device, one host read in all.

    Eager ops: for the default networks (332 variables) a check takes 0.1 s on
    a CPU; a ``tf.function`` takes 0.06 s but first traces for 0.7 s, which
    a run pays at its first checkpoint, more than an eager check every 30
    minutes costs in a week.

    Args:
        pairs: list of (label, variable) pairs.
    """

    def __init__(self, pairs):
        self.pairs = list(pairs)

    def __call__(self):
        """list of (label, variable name) of the variables holding a NaN or an infinity."""
        finite = tf.stack([tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))
                           for _, v in self.pairs]).numpy()
        return [(label, getattr(v, "path", None) or v.name)
                for (label, v), ok in zip(self.pairs, finite) if not ok]


def mismatch_message(path, err):
    """The message for a checkpoint that does not fit the networks built from the settings."""
    first = str(err).splitlines()[0]
    shapes = re.search(r"incompatible tensor with shape (\S+) .*variable with shape (\S+)", str(err),
                       re.DOTALL)
    if shapes:
        folder = os.path.dirname(path)
        return (f"cannot resume from {path}: {folder}/config.json and the checkpoint disagree: "
                f"the settings of config.json (and the flags given) build a variable of shape "
                f"{shapes.group(2)} where the checkpoint holds one of shape {shapes.group(1)}. "
                "Give the architecture flags the checkpoint was trained with (-feature_size, "
                "-residual_blocks, -upsampling_factor, -patch_shape, upsampling mode), or restore "
                "the config.json written with it")
    return f"cannot resume from {path}: {first}"


def read_int(variable):
    """The value of an integer variable, also a mirrored one (which int() refuses)."""
    return int(variable.numpy())


def identify(path):
    """What identifies the checkpoint at prefix ``path`` (``.../ckpt-N``).

    Returns:
        dict: ``path`` (its real path), ``step`` (int, the training step;
        None when unknown), ``sha256`` (the SHA-256 of its ``.index`` file,
        64 hex digits, as ``sha256sum ckpt-N.index`` prints it; the index holds
        a checksum of every tensor, so it tells apart two checkpoints saved
        under the same name), ``epoch`` and ``epoch_batches`` (the epochs done
        and the batches into the next one; None when unknown).

    Raises:
        OSError: its ``.index`` cannot be read (it may have been removed).
    """
    with open(path + ".index", "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    counters = {}
    try:
        reader = tf.train.load_checkpoint(path)
        for name in ("step", "epoch", "epoch_batches"):
            counters[name] = int(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))
    except (ValueError, KeyError, tf.errors.OpError):
        pass
    if "step" not in counters:
        counters["step"] = number(path)
    return {"path": os.path.realpath(path), "step": counters["step"], "sha256": digest,
            "epoch": counters.get("epoch"), "epoch_batches": counters.get("epoch_batches")}


def checkpoint_identity(checkpoint_dir):
    """What identifies the checkpoint an inference run uses: :func:`identify` of the newest in a folder.

    Raises:
        UserError: if the folder holds no checkpoint, or its ``.index`` cannot be read.
    """
    path = require(checkpoint_dir)
    try:
        return identify(path)
    except OSError as err:
        raise UserError(f"cannot read the checkpoint {path}: {err.strerror or err}")


def damage(path, err):
    """Which file of the checkpoint at ``path`` is corrupt or truncated, as a phrase; None when it reads.

    A damaged file is not a mismatch with the settings: no flag would make it read.

    Args:
        path: the checkpoint prefix.
        err: the exception its restore or reading raised.
    """
    try:
        tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as index_err:
        return f"{os.path.basename(path)}.index is corrupt or truncated ({plain_reason(index_err)})"
    reason = plain_reason(err)
    kind = getattr(err, "original_type", type(err))
    if issubclass(kind, (IndexError, tf.errors.DataLossError, tf.errors.OutOfRangeError)) or re.search(
            r"corrupt|truncat|checksum|sstable|data loss|read less bytes", reason, re.IGNORECASE):
        shards = sorted(os.path.basename(p) for p in glob.glob(glob.escape(path) + ".data-*"))
        return f"its data file {', '.join(shards) or '(none)'} is corrupt or truncated ({reason})"
    return None


# Earlier versions recorded the first 16 hex digits of the digest (metrics.json,
# sidecars, model files); they still identify the checkpoint.
SHORT_DIGEST = 16


def same_digest(recorded, current):
    """bool, whether two recorded ``sha256`` values name the same checkpoint.

    Equal, or one is the other's first 16 or more hex digits (what earlier
    versions recorded), so their metrics.csv and model files are still
    resumed and recognised.
    """
    if recorded == current:
        return True
    if not isinstance(recorded, str) or not isinstance(current, str):
        return False
    short, full = sorted((recorded.lower(), current.lower()), key=len)
    return len(short) >= SHORT_DIGEST and full.startswith(short)


def damaged_message(path, damaged):
    """The message for a checkpoint whose files are damaged (:func:`damage`)."""
    return (f"cannot read the checkpoint {path}: {damaged}. The file is damaged (a copy or a transfer "
            "that did not finish?), the flags are not at fault: copy it again, or use another checkpoint")


# Tries at restoring a folder's newest checkpoint while a training run there
# prunes the older ones (-keep_checkpoints) between the choice and the read.
RESTORE_ATTEMPTS = 3


def restore_generator(generator, checkpoint_dir, log=print):
    """Loads only the generator's weights from the newest checkpoint of a folder, and says which it was.

    The checkpoint is chosen once and read once, into a throwaway copy of the
    generator, and its identity is that checkpoint's. A training run in the
    folder may remove it in between (it keeps its newest -keep_checkpoints):
    then the newest is chosen again, with a note.

    Returns:
        dict, the :func:`identify` of the checkpoint restored.

    Raises:
        UserError: the folder holds no checkpoint; the checkpoint is damaged;
            its generator does not fit; or every checkpoint chosen was removed
            before it could be read.
    """
    removed = []
    while len(removed) < RESTORE_ATTEMPTS:
        path = require(checkpoint_dir)
        try:
            identity = identify(path)
            weights = read_generator_weights(keras.models.clone_model(generator), path)
        except (RestoreError, OSError) as err:
            if not is_complete(path):
                removed.append(path)
                log(f"note: {path} was removed while it was read (a training run in {checkpoint_dir} keeps "
                    "only its newest checkpoints); choosing the newest again")
                continue
            damaged = damage(path, err)
            if damaged:
                raise UserError(damaged_message(path, damaged)) from None
            raise UserError(f"the generator in {path} does not fit the architecture flags: "
                            f"{str(err).splitlines()[0]}") from None
        generator.set_weights(weights)
        return identity
    raise UserError(f"the checkpoints of {checkpoint_dir!r} were removed while they were read ("
                    + ", ".join(os.path.basename(p) for p in removed) + "): a training run there keeps only its "
                    "newest -keep_checkpoints and removes older ones as it saves. Evaluate its best/ folder or "
                    "a copy of the folder, or wait for the run to end")


def read_generator_weights(probe, path):
    """Restores a throwaway copy of a generator from a checkpoint; returns its weights.

    A restore that fails half-way leaves TensorFlow's bookkeeping attached to
    the model, which logs one warning per checkpoint value (~170 lines) when
    the model is finally deleted, after the error message. The copy is deleted
    here, with TensorFlow's loggers quiet, so a mismatch prints one line.

    Raises:
        RestoreError: the checkpoint does not fit, is damaged or is gone.
    """
    checkpoint = tf.train.Checkpoint(generator=probe)
    weights, error = None, None
    with quiet.quiet_tensorflow_logs():
        try:
            status = checkpoint.restore(path)
            status.expect_partial()
            status.assert_existing_objects_matched()
            weights = probe.get_weights()
        except (ValueError, AssertionError, IndexError, OSError, tf.errors.OpError) as err:
            # Not the error itself: its tracebacks would keep the restore alive past the clean-up.
            error = RestoreError(err)
        status = None
        del probe, checkpoint, status
        gc.collect()
    if error is not None:
        raise error
    return weights


class RestoreError(Exception):
    """A failed restore, as its type and message only (not the objects its tracebacks held).

    Attributes:
        original_type: the class of the exception the restore raised.
    """

    def __init__(self, original):
        super().__init__(str(original))
        self.original_type = type(original)
