"""A training run: the data stream of each epoch and the wiring of folder, subjects, trainer and loop."""

import contextlib
import os

import keras
import numpy as np
import tensorflow as tf

import checkpoints
import config
import durable
import folders
import nifti_io
import placement as placement_lib
import splits
import train_dataset as td
import validation as validation_lib
from checkpoints import read_int
from errors import RunStopped, UserError
from reporting import TrainingReporter
from trainer import SRGANTrainer, build_networks
from training_loop import CheckpointPolicy, TrainingLoop


class TrainingStream:
    """The training batches of one epoch at a time, resumable at any batch.

    On one device, one stream of global batches. Under a strategy, each worker
    streams its own shard of the epoch's subjects (whole subjects) in batches
    of ``batch_size / replicas`` patches, one per local replica and step; with
    one worker the global batches are exactly those of one device. Several
    workers cycle their shards so that every worker runs the epoch's number of
    steps. A resumed epoch skips the batches already trained, whatever the
    replica count was.

    A subject whose file is bad is reported and skipped; anything else that
    stops the stream (memory, a vanished data folder, an I/O error) stops the
    run with a message, and so does an epoch that trained fewer batches than
    its usable subjects give.

    Args:
        subjects: the training :class:`layouts.Subject` list.
        cfg: the run's :class:`config.Settings` (geometry, factor, sigma, batch size, seed).
        placement: a :class:`Placement` (None: one device).
        log: callable for the dataset's reports.
    """

    def __init__(self, subjects, cfg, placement=None, log=print):
        self.subjects = list(subjects)
        self.cfg = cfg
        self.placement = placement or placement_lib.Placement()
        self.log = log
        self.batches_per_epoch = td.batches_per_epoch(
            len(self.subjects), cfg.batch_size, cfg.volume_shape, cfg.patch_shape,
            cfg.patch_margin)
        self.skipped = []  # (path, reason) of the subjects skipped this epoch
        self._failures = []

    def __call__(self, epoch, skip=0):
        """The batches of ``epoch`` after its first ``skip`` global batches.

        Returns:
            an iterator of ``(lr, hr, nf)`` batches (see
            :func:`train_dataset.make_train_dataset`; distributed values under
            a strategy).

        Raises (while iterated):
            RunStopped or nifti_io.DataError: the stream failed, or the
                epoch ended short.
        """
        self.skipped, self._failures = [], []
        return self._checked(self.batches(epoch, skip), epoch, skip)

    def batches(self, epoch, skip):
        strategy = self.placement.strategy
        if strategy is None:
            dataset = self._dataset(epoch, self.cfg.batch_size)
            return dataset.skip(skip) if skip else dataset
        return strategy.distribute_datasets_from_function(
            lambda context: self._worker_dataset(context, epoch, skip))

    def _dataset(self, epoch, batch_size, shard=(0, 1)):
        cfg = self.cfg
        return td.make_train_dataset(
            self.subjects, cfg.upsampling_factor, batch_size=batch_size,
            volume_shape=cfg.volume_shape, patch_shape=cfg.patch_shape,
            margin=cfg.patch_margin, seed=cfg.seed, epoch=epoch, sigma=cfg.sigma,
            slice_profile=cfg.slice_profile, with_norm_factor=True, log=self.log, shard=shard,
            on_skip=lambda path, reason: self.skipped.append((path, reason)),
            failures=self._failures)

    def _worker_dataset(self, context, epoch, skip):
        workers = context.num_input_pipelines
        local_replicas = context.num_replicas_in_sync // workers
        per_replica = context.get_per_replica_batch_size(self.cfg.batch_size)
        dataset = self._dataset(epoch, per_replica, (context.input_pipeline_id, workers))
        if workers > 1:
            # Collective steps need every worker to run the same number of them.
            dataset = dataset.repeat().take(self.batches_per_epoch * local_replicas)
        return dataset.skip(skip * local_replicas) if skip else dataset

    def _checked(self, dataset, epoch, skip):
        iterator = iter(dataset)
        done = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except tf.errors.OpError as err:
                raise self._failure(err, epoch) from None
            done += 1
            yield batch
        self._account(epoch, skip, done)

    def _failure(self, error, epoch):
        """The exception that explains a failed stream (the original one where known)."""
        original = td.unwrap_pipeline_error(error, self._failures)
        where = f"while reading the training data of epoch {epoch + 1}"
        if isinstance(original, nifti_io.DataError):
            return original
        if isinstance(original, MemoryError):
            return RunStopped(f"out of memory {where} ({original}). A -volume_shape of "
                              f"{'x'.join(map(str, self.cfg.volume_shape))} and the scans' own "
                              "size set the memory each volume needs; free memory or use smaller "
                              "volumes, then resume with -restore (the last checkpoint is kept)")
        return RunStopped(f"the training data failed {where}: {type(original).__name__}: {original}. "
                          "Fix the cause, then resume with -restore (the last checkpoint is kept)")

    def _account(self, epoch, skip, done):
        """Stops the run when an epoch trained less than its usable subjects give."""
        cfg = self.cfg
        if self.placement.workers > 1:
            expected = self.batches_per_epoch - skip  # shards cycle to the full count
        else:
            usable = len(self.subjects) - len(self.skipped)
            patches = usable * td.patches_per_volume(cfg.volume_shape, cfg.patch_shape,
                                                     cfg.patch_margin)
            expected = -(-patches // cfg.batch_size) - skip
        planned = self.batches_per_epoch - skip
        if planned > 0 and done == 0:
            raise RunStopped(f"epoch {epoch + 1} trained nothing: none of its "
                             f"{len(self.subjects)} training subjects could be read "
                             f"({len(self.skipped)} reported above). Nothing was saved for it; fix "
                             "the data, then resume with -restore")
        if done < expected:
            raise RunStopped(f"epoch {epoch + 1} ended after {done} of its {expected} batches: the "
                             "data stream stopped early without a reason. Nothing was saved for this "
                             "epoch; resume with -restore to run it again")


def prepare_run_folder(cfg, write=True):
    """Refuses to train into another run's folder or into a run's best/; checks the output folders.

    Args:
        cfg: the run's :class:`config.Settings`.
        write: bool, whether this process writes there (the chief); other
            workers only check.

    Returns:
        bool, whether the run resumes into the folder it was restored from.

    Raises:
        UserError: the folder holds another run or is a best/ folder, or a
            folder is not writable.
    """
    ckpt_dir = cfg.checkpoint_dir
    refuse_best_folder(cfg)
    same_folder = bool(cfg.restore) and os.path.realpath(ckpt_dir) == os.path.realpath(cfg.restore)
    held = [] if same_folder or not os.path.isdir(ckpt_dir) else held_by(ckpt_dir)
    if held:
        how = (f"resume it with -restore {ckpt_dir}" if checkpoints.holds_checkpoints(ckpt_dir) else
               "its checkpoints are gone (a new run would append to its results and compete with its best "
               f"checkpoint); to continue from its best, -restore {os.path.join(ckpt_dir, validation_lib.BEST_FOLDER)} "
               "-checkpoint_dir NEW_FOLDER")
        raise UserError(f"-checkpoint_dir {ckpt_dir!r} already holds a training run ({', '.join(held)}); {how}, "
                        "or choose an empty folder (nothing was overwritten)")
    if write:
        for flag, folder in run_folders(cfg).items():
            folders.check_writable(folder, flag)
    return same_folder


def held_by(folder):
    """What of a training run a folder holds (its checkpoints, best/, validation.csv); [] for none."""
    held = []
    latest = checkpoints.latest(folder)
    if latest or checkpoints.holds_checkpoints(folder):
        held.append(os.path.basename(latest) if latest else "ckpt-N.index files")
    return held + validation_lib.results_in(folder)


def refuse_best_folder(cfg):
    """Refuses to train into a run's best/ folder (-evaluate takes RUN/best, so -restore RUN/best is an easy slip).

    Training there would write checkpoints beside the best one, make a
    best/best/, and leave -evaluate RUN/best evaluating another checkpoint.

    Raises:
        UserError: naming the run's folder to resume instead.
    """
    ckpt_dir = cfg.checkpoint_dir
    if not (os.path.isdir(ckpt_dir) and validation_lib.is_best_folder(ckpt_dir)):
        return
    run_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    given = (f"-restore {cfg.restore} trains into" if cfg.restore and os.path.realpath(cfg.restore) ==
             os.path.realpath(ckpt_dir) else f"-checkpoint_dir {ckpt_dir}")
    raise UserError(f"{given} {ckpt_dir!r}, the best checkpoint of the run in {run_dir!r} (a copy kept for "
                    "-evaluate, -super_resolve and -export, not a run to train in). Resume the run with "
                    f"-restore {run_dir}, or continue from its best checkpoint in a new folder with "
                    f"-restore {ckpt_dir} -checkpoint_dir NEW_FOLDER (nothing was written)")


def run_folders(cfg):
    """dict flag -> folder of what a training run writes."""
    return {"-checkpoint_dir": cfg.checkpoint_dir, "-path_prediction": cfg.path_prediction,
            "-log_dir": cfg.log_dir}


def resume(trainer, cfg, log):
    """Restores a run's whole state; returns the settings with the seed the run really uses."""
    path = trainer.restore(cfg.restore)
    log(f"resumed {path}: epoch {read_int(trainer.epoch)} done, step {read_int(trainer.step)}, "
        f"learning rate {trainer.learning_rate:.3g}")
    if read_int(trainer.data_seed) != cfg.seed:
        log(f"note: the data order and label noise keep the checkpoint's seed {read_int(trainer.data_seed)}")
        cfg = cfg.replace(seed=read_int(trainer.data_seed))
    return cfg


def write_run_files(cfg, split, keep_split, placement):
    """Writes config.json, and split.json unless the run keeps the one it was trained with."""
    folder = cfg.checkpoint_dir
    durable.write_json(os.path.join(folder, config.CONFIG_NAME), config.config_record(
        cfg, placement.name, placement.replicas, placement.workers))
    if not keep_split:
        splits.write_split(folder, cfg.data_path, cfg.train_fraction, split)


def check_placement(cfg, placement):
    """Checks that the settings can run on a placement.

    Raises:
        UserError: naming the flag and the numbers.
    """
    if cfg.batch_size % placement.replicas:
        raise UserError(f"-batch_size {cfg.batch_size} must be divisible by the {placement.replicas} "
                        f"replicas ({placement.describe()}): -batch_size is the global number of "
                        "patches per step, and each replica takes an equal share")
    if cfg.xla and placement.replicas > 1:
        raise UserError(f"-xla True runs on one device only; this run has {placement.replicas} replicas "
                        "(XLA-compiled replica steps cannot reach the mirrored variables). "
                        "Drop -xla, or choose one device with -gpus 0")


def check_batch_size(cfg, train_subjects):
    """Refuses a batch larger than an epoch's patches (it would train one short step a epoch).

    Raises:
        UserError: naming -batch_size and the epoch's patch count.
    """
    per_volume = td.patches_per_volume(cfg.volume_shape, cfg.patch_shape, cfg.patch_margin)
    patches = len(train_subjects) * per_volume
    if cfg.batch_size > patches:
        raise UserError(f"-batch_size {cfg.batch_size} is more than the {patches} patches of one epoch "
                        f"({len(train_subjects)} training subjects x {per_volume} patches of "
                        f"-patch_shape {','.join(map(str, cfg.patch_shape))}); choose at most {patches}")


def usable_subjects(cfg, subjects, say, role="training"):
    """The subjects whose image is at least one patch's worth; the others are reported.

    Args:
        role: "training" or "validation", for the messages.

    Raises:
        UserError: none is left.
    """
    usable = []
    for subject in subjects:
        _, shape = nifti_io.header_problem(subject.image_path)
        problem = shape and nifti_io.size_problem(shape, cfg.patch_shape, cfg.upsampling_factor)
        if problem:
            say(f"skipping {role} subject {subject.name}: {subject.image_path}: {problem}")
        else:
            usable.append(subject)
    if not usable:
        raise UserError(f"none of the {len(subjects)} {role} subjects in {cfg.data_path!r} "
                        f"is large enough to {'train' if role == 'training' else 'validate'} on (see above)")
    return usable


def start_validation(cfg, split, trainer, placement, batches_per_epoch, say):
    """The loop's ``validation.Validation`` of a run with validation subjects (None without).

    A resumed run first validates its restored checkpoint when that was due
    and validation.csv has no row for it (a kill or a stop came in between).
    """
    if not split.validation:
        if cfg.validate_steps:
            say(f"note: -validate_steps {cfg.validate_steps} has no effect: this run has no validation "
                "subjects (-validation_fraction 0)")
        return None
    subjects = usable_subjects(cfg, split.validation, say, "validation") if placement.is_chief else []
    validator = validation_lib.Validator(subjects, cfg, say)
    validation = validation_lib.Validation(validator, cfg.checkpoint_dir, cfg.log_dir, cfg.validate_steps,
                                           cfg.epochs * batches_per_epoch, batches_per_epoch,
                                           placement.is_chief, say)
    if cfg.restore:
        validation.catch_up(trainer, checkpoints.latest(cfg.restore))
    return validation


def close_validation(validation, say):
    """Says the best checkpoint at the end of a run; a run whose validation was incomplete does not end as a success.

    Raises:
        RunStopped: exit code 4, after the summary, when some validation
            passes could not score every validation subject.
    """
    if not validation:
        return
    say(validation.summary())
    stop = validation.incomplete()
    if stop is not None:
        raise stop


def pretraining_note(cfg, trainer, steps_per_epoch, say):
    """Says, in one line, when -pretrain_steps covers the whole run: its adversarial loss stays 0."""
    first = read_int(trainer.step)
    last = cfg.epochs * steps_per_epoch
    if cfg.pretrain_steps > first and cfg.pretrain_steps >= last:
        say(f"note: -pretrain_steps {cfg.pretrain_steps} covers every step of this run (steps "
            f"{first + 1}..{last}: -epochs {cfg.epochs} x {steps_per_epoch} batches): the generator "
            "trains on the content loss alone and adv stays 0; the GAN starts at step "
            f"{cfg.pretrain_steps + 1}")


def train(cfg, log=print, placement=None):
    """Trains the GAN as the original, checkpointing every epoch.

    Wires the pieces together: the run folder, the subjects, the networks and
    their ``trainer.SRGANTrainer`` (which restores and saves), the
    :class:`TrainingStream`, the ``reporting.TrainingReporter`` and the
    ``training_loop.TrainingLoop``. Under a multi-worker strategy only the
    chief writes files and reports.

    Args:
        cfg: the run's :class:`config.Settings`.
        log: callable for messages.
        placement: a ``placement.Placement`` (None: one device).

    Returns:
        dict with the last epoch's mean losses and the checkpoint path.

    Raises:
        UserError: bad data path, non-writable output folders, a checkpoint
            folder that already holds a run without ``-restore``, a batch size
            the replicas cannot share.
    """
    placement = placement or placement_lib.Placement()
    check_placement(cfg, placement)
    folders.check_outside_data(cfg.data_path, cfg.image_name, run_folders(cfg))
    chief = placement.is_chief
    say = log if chief else (lambda *_: None)
    same_folder = prepare_run_folder(cfg, write=chief)
    # The chief alone writes the folder, and holds it while the run lives.
    lock = durable.RunLock(cfg.checkpoint_dir, "training") if chief else contextlib.nullcontext()
    with lock:
        if chief:
            folders.remove_leftovers((cfg.checkpoint_dir, cfg.path_prediction), say)
        return train_locked(cfg, placement, same_folder, say, log)


def make_trainer(cfg, placement, log=print):
    """The networks of ``cfg`` and their trainer, placed, seeded by ``cfg.seed``."""
    keras.utils.set_random_seed(cfg.seed)
    generator, discriminator = build_networks(cfg, placement)
    return SRGANTrainer(generator, discriminator, cfg.learning_rate, seed=cfg.seed,
                        run_eagerly=cfg.run_eagerly, loss_scale=cfg.mixed_precision == "float16",
                        checkpoint_dir=cfg.checkpoint_dir, max_to_keep=cfg.keep_checkpoints,
                        pretrain_steps=cfg.pretrain_steps, gan_lr_scale=cfg.gan_lr_scale,
                        strategy=placement.strategy,
                        is_chief=placement.is_chief, xla=cfg.xla, workers=placement.workers,
                        log=log, quiet_first_step=not cfg.verbose)


def train_locked(cfg, placement, same_folder, say, log):
    """:func:`train` once the run folder is locked."""
    chief = placement.is_chief
    split = splits.training_split(cfg, say)
    cfg = splits.kept_split_settings(cfg, split, say)
    check_batch_size(cfg, split.train)
    say(placement.describe())
    if same_folder and chief:
        # Before the trainer's CheckpointManager reads the state file.
        checkpoints.recover_state(cfg.restore, say)
    trainer = make_trainer(cfg, placement, say)
    if cfg.restore:
        cfg = resume(trainer, cfg, say)
    finished = read_int(trainer.epoch) >= cfg.epochs
    if finished:
        say(f"the checkpoint already has {read_int(trainer.epoch)} epochs (-epochs {cfg.epochs}); "
            "nothing to train")
    elif chief:
        write_run_files(cfg, split, keep_split=same_folder, placement=placement)
    stream = TrainingStream(usable_subjects(cfg, split.train, say), cfg, placement, say)
    if finished:
        # A kill may have come between the last checkpoint and its validation.
        validation = start_validation(cfg, split, trainer, placement, stream.batches_per_epoch,
                                      say) if same_folder else None
        close_validation(validation, say)
        return {"checkpoint": checkpoints.latest(cfg.restore), "losses": {}}
    pretraining_note(cfg, trainer, stream.batches_per_epoch, say)
    reporter = TrainingReporter(cfg, stream.batches_per_epoch, log) if chief else None
    validation = start_validation(cfg, split, trainer, placement, stream.batches_per_epoch,
                                  reporter.write if reporter else say)
    policy = CheckpointPolicy(cfg.checkpoint_minutes, cfg.checkpoint_steps)
    batch_voxels = cfg.batch_size * int(np.prod(cfg.patch_shape))
    losses = TrainingLoop(trainer, reporter, policy, say, validation, batch_voxels).fit(stream, cfg.epochs)
    close_validation(validation, say)
    return {"checkpoint": checkpoints.latest(cfg.checkpoint_dir), "losses": losses,
            "best": validation.best.record if validation and chief else None}
