"""The trainer: both networks, both optimisers, the training state and its checkpoint, and one step.

:class:`SRGANTrainer` owns what a checkpoint holds and the compiled step
(one discriminator update, then one generator update, whose per-replica
arithmetic is in ``replica_steps``). The loop around it
(epochs, checkpoint policy, stop signals, the divergence guard) lives in
``training_loop``.
"""

import contextlib
import os
import shutil
import tempfile

import keras
import tensorflow as tf

import checkpoints
import config
import networks
import quiet
import replica_steps
from checkpoints import read_int
from errors import RunStopped

# Inverse time decay of the original: lr = 1e-4 / (1 + 0.5 * step / 4920).
DECAY_STEPS = 4920
DECAY_RATE = 0.5
# The generator's learning rate in the GAN steps that follow -pretrain_steps,
# as a share of the schedule's (-gan_lr_scale; SRGAN and ESRGAN also train
# their GAN phase at a lower rate than the content-only model). With the
# batch-norm statistics frozen, a generator at the full 1e-3 diverged in one
# seed of three (x2 crop96 seed 1: MSE 5e3 -> 2e5 in 7 steps, test PSNR
# -50 dB). A tenth was safe but left 1,1,3 box slabs only level with tricubic
# (+0.08 dB over 3 seeds); 0.3 won there on every seed and pair (+0.61 dB): README,
# "Thick slices".
GAN_PHASE_LEARNING_RATE_SCALE = 0.3


class GanPhaseSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule scaled by ``scale`` from step ``pretrain_steps`` on (the generator's, after pre-training)."""

    def __init__(self, schedule, pretrain_steps, scale=GAN_PHASE_LEARNING_RATE_SCALE):
        self.schedule, self.pretrain_steps, self.scale = schedule, int(pretrain_steps), float(scale)

    def __call__(self, step):
        """Args: step: int or scalar tensor, the optimiser's iterations. Returns: float32 scalar."""
        lr = self.schedule(step)
        if self.pretrain_steps <= 0:
            return lr
        gan = tf.cast(step, tf.int64) >= self.pretrain_steps
        return tf.where(gan, lr * self.scale, lr)

    def get_config(self):
        return {"schedule": self.schedule.get_config(), "pretrain_steps": self.pretrain_steps,
                "scale": self.scale}


class SRGANTrainer:
    """Owns both networks, both Adam optimisers, the loss trackers and the checkpoint.

    The checkpoint holds everything a bit-identical resume needs: both networks,
    both optimisers (moments, iteration counts; loss-scale state under
    float16), the epoch, the batches done in the current epoch, the step, the
    data seed (data order and label noise are functions of it, the epoch and
    the step) and the current epoch's loss sums. It does not depend on the
    number of replicas: a run started on N replicas resumes on M.

    Under a ``tf.distribute`` strategy each step runs on every replica with its
    share of the global batch; sums need no scaling and means divide by the
    global batch, so the summed gradients are those of the whole batch on one
    device (batch norm must then be synchronised: ``synchronized_bn=True``).

    Args:
        generator: ``keras.Model`` from :func:`networks.build_generator`, built
            under ``strategy.scope()`` when a strategy is given.
        discriminator: ``keras.Model`` from :func:`networks.build_discriminator`.
        learning_rate: initial learning rate of both optimisers.
        seed: int, seeds the label noise and the data order.
        run_eagerly: bool, run :meth:`train_step` without ``tf.function``.
        loss_scale: bool, wrap both optimisers in dynamic loss scaling (needed
            when the networks compute in float16, ``mixed_precision="float16"``).
        checkpoint_dir: folder the checkpoints are written to (None: the
            trainer cannot :meth:`save`).
        max_to_keep: checkpoints kept in ``checkpoint_dir``.
        pretrain_steps: int, the first steps update the generator on the
            content loss alone (``mse + gdl``, the original's generator loss
            without its adversarial term) while the discriminator learns as in
            the GAN steps (so that the first adversarial term is not an
            untrained D's, as large as the content loss). The GAN
            steps after them train the generator with its batch-norm
            statistics frozen (``freeze_generator_statistics``). 0 (the
            original's recipe) trains the GAN from the first step, batch
            statistics throughout.
        strategy: None (one device) or a ``tf.distribute.Strategy``.
        is_chief: bool; a non-chief worker of a multi-worker run writes its
            checkpoints to a temporary folder that is removed at once.
        xla: bool, compile the step with XLA (``jit_compile``; one device only).
        workers: int, processes training together (the training loop makes
            them agree on checkpoints and stop requests).
        log: callable for notes (a resume from an earlier version's checkpoint).
        quiet_first_step: bool, hide each compiled step's first-call log lines (``quiet.FirstCallQuiet``).
        gan_lr_scale: float in (0, 1], the generator's learning rate in the
            GAN steps after ``pretrain_steps`` as a share of the schedule's
            (:class:`GanPhaseSchedule`); unused when ``pretrain_steps`` is 0.
    """

    LOSS_NAMES = ("d_loss", "g_loss", "mse", "gdl", "adv")
    # What train_step returns and the step history records, in this order.
    SCALAR_NAMES = LOSS_NAMES + ("flipped", "learning_rate")
    # Steps of scalars kept on the device between two reads by the host.
    HISTORY = 256
    # Bookkeeping that checkpoints of earlier versions lack: it starts afresh.
    FRESH_IF_MISSING = ("loss_sums", "loss_count")

    def __init__(self, generator, discriminator, learning_rate=1e-4, seed=0, run_eagerly=False,
                 loss_scale=False, checkpoint_dir=None, max_to_keep=3, pretrain_steps=0,
                 strategy=None, is_chief=True, xla=False, workers=1, log=print, quiet_first_step=False,
                 gan_lr_scale=GAN_PHASE_LEARNING_RATE_SCALE):
        self.log = log
        self.generator = generator
        self.discriminator = discriminator
        self.strategy = strategy
        self.replicas = strategy.num_replicas_in_sync if strategy is not None else 1
        self.is_chief = is_chief
        self.workers = int(workers)
        if xla and self.replicas > 1:
            raise ValueError("xla=True is supported on one device only")
        with self._scope():
            self._build_state(learning_rate, seed, loss_scale, pretrain_steps, gan_lr_scale)
        self.manager = None
        self.checkpoint_dir = checkpoint_dir
        if checkpoint_dir is not None and is_chief:
            self.manager = tf.train.CheckpointManager(self.checkpoint, checkpoint_dir,
                                                      max_to_keep=max_to_keep, checkpoint_name="ckpt")
        self.run_eagerly = run_eagerly
        self.pretrain_steps = int(pretrain_steps)
        # After content-only pre-training the GAN phase trains the generator as
        # evaluation runs it (moving statistics; at lr 1e-3 with batches of 2 the
        # batch statistics drifted from them: README, "A short run that wins on
        # every seed"), at a lower rate (GanPhaseSchedule). 0: the original's.
        self.freeze_generator_statistics = self.pretrain_steps > 0
        self._host_step = None
        if run_eagerly:
            compile_ = lambda fn: fn  # noqa: E731
        else:
            # The step has no Python control flow on tensors (its branches are
            # tf.cond in Keras and the losses), so AutoGraph would only rewrite
            # it: without it the graph is the same and traces ~10 % faster.
            compile_ = lambda fn: quiet.FirstCallQuiet(  # noqa: E731
                tf.function(fn, jit_compile=bool(xla), autograph=False), quiet_first_step)
        self._compiled = compile_(lambda lr, hr: self._step(replica_steps.gan_step, lr, hr))
        self._compiled_pretrain = compile_(lambda lr, hr: self._step(replica_steps.pretrain_step, lr, hr))
        self._end_epoch = tf.function(self._end_epoch_fn, autograph=False)
        self._finite_check = None

    def _scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def _build_state(self, learning_rate, seed, loss_scale, pretrain_steps, gan_lr_scale):
        generator, discriminator = self.generator, self.discriminator
        self.schedule = keras.optimizers.schedules.InverseTimeDecay(
            learning_rate, decay_steps=DECAY_STEPS, decay_rate=DECAY_RATE, staircase=False)
        # The discriminator's; the generator's is the same without -pretrain_steps.
        self.g_schedule = GanPhaseSchedule(self.schedule, pretrain_steps, gan_lr_scale)
        adam = dict(beta_1=0.9, beta_2=0.999, epsilon=1e-8)
        self.g_optimizer = keras.optimizers.Adam(self.g_schedule, **adam)
        self.d_optimizer = keras.optimizers.Adam(self.schedule, **adam)
        # The optimisers that apply the updates: the Adams themselves, or
        # dynamic loss scaling around them (float16 gradients underflow).
        self.g_apply, self.d_apply = self.g_optimizer, self.d_optimizer
        extra = {}
        if loss_scale:
            # The generator loss is a sum over every voxel (~1e3-1e5): its
            # gradients need no up-scaling, and the usual 2**15 would overflow
            # float16 for the first dozen steps. The discriminator's is a mean.
            self.g_apply = keras.optimizers.LossScaleOptimizer(self.g_optimizer, initial_scale=1.0)
            self.d_apply = keras.optimizers.LossScaleOptimizer(self.d_optimizer)
            extra = {"g_loss_scale": self.g_apply, "d_loss_scale": self.d_apply}
        # Built now so that a restore finds every slot variable to fill.
        self.g_apply.build(generator.trainable_variables)
        self.d_apply.build(discriminator.trainable_variables)
        counter = dict(dtype=tf.int64, trainable=False)
        self.epoch = tf.Variable(0, name="epoch", **counter)
        self.epoch_batches = tf.Variable(0, name="epoch_batches", **counter)
        self.step = tf.Variable(0, name="step", **counter)
        self.data_seed = tf.Variable(seed, name="data_seed", **counter)
        # The current epoch's loss sums and batch count: in the checkpoint, so
        # the epoch's summary after a mid-epoch resume covers the whole epoch.
        self.loss_sums = tf.Variable(tf.zeros(len(self.LOSS_NAMES)), trainable=False, name="loss_sums")
        self.loss_count = tf.Variable(0.0, trainable=False, name="loss_count")
        # The scalars of the last HISTORY steps, row ``step % HISTORY``: the
        # host reads them every few steps instead of waiting on every step.
        self.history = tf.Variable(tf.zeros((self.HISTORY, len(self.SCALAR_NAMES))),
                                   trainable=False, name="history")
        # What a checkpoint holds, by the name it is saved under.
        self.checkpointed = dict(
            generator=generator, discriminator=discriminator, g_optimizer=self.g_optimizer,
            d_optimizer=self.d_optimizer, epoch=self.epoch, epoch_batches=self.epoch_batches,
            step=self.step, data_seed=self.data_seed, loss_sums=self.loss_sums,
            loss_count=self.loss_count, **extra)
        self.checkpoint = tf.train.Checkpoint(**self.checkpointed)

    # ------------------------------------------------------------------ state

    @property
    def learning_rate(self):
        """float, the generator's learning rate at the next step."""
        return float(self.g_schedule(self.g_optimizer.iterations))

    def restore(self, checkpoint_dir):
        """Restores the whole training state from the latest checkpoint of a folder.

        Args:
            checkpoint_dir: a folder written by :meth:`save`.

        Returns:
            str, the checkpoint path restored.

        Raises:
            UserError: if the folder holds no checkpoint or it does not fit.
        """
        path = checkpoints.require(checkpoint_dir)
        checkpoints.restore_state(self.checkpointed, path, self.FRESH_IF_MISSING, self.log)
        self._host_step = None
        return path

    def save(self):
        """Writes a checkpoint numbered by the step (numbers are never reused).

        Every worker of a multi-worker run must call it (the variables are read
        collectively); only the chief's copy is kept.

        Returns:
            str, the checkpoint path (the chief's).
        """
        if self.checkpoint_dir is None:
            raise ValueError("this trainer was built without a checkpoint_dir")
        step = read_int(self.step)
        try:
            if self.is_chief:
                return self.manager.save(checkpoint_number=step)
            scratch = tempfile.mkdtemp(prefix="srgan-worker-")
            try:
                self.checkpoint.write(os.path.join(scratch, "ckpt"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return os.path.join(self.checkpoint_dir, f"ckpt-{step}")
        except (tf.errors.OpError, OSError) as err:
            reason = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err)
            checkpoints.remove_partial(self.checkpoint_dir, step)
            latest = checkpoints.latest(self.checkpoint_dir)
            kept = (f"The last complete checkpoint is {latest}" if latest else
                    "No checkpoint of this run was completed")
            raise RunStopped(
                f"cannot write the checkpoint of step {step} to {self.checkpoint_dir}: "
                f"{checkpoints.plain_reason(reason)}. {kept}; make room (or fix the folder) and "
                f"resume with -restore {self.checkpoint_dir}.") from None

    def saved_float_variables(self):
        """What a checkpoint holds that can turn non-finite, by the part it belongs to.

        Returns:
            list of (label, variable) pairs: the weights of both networks, both
            optimisers' state (moments; loss-scale state under float16) and
            the current epoch's loss sums.
        """
        groups = [("generator weights", self.generator.variables),
                  ("discriminator weights", self.discriminator.variables),
                  ("generator optimiser state", self.g_apply.variables),
                  ("discriminator optimiser state", self.d_apply.variables),
                  ("epoch loss sums", [self.loss_sums, self.loss_count])]
        pairs, seen = [], set()
        for label, variables in groups:
            for v in variables:
                if tf.as_dtype(v.dtype).is_floating and id(v) not in seen:
                    seen.add(id(v))
                    pairs.append((label, v))
        return pairs

    def non_finite_state(self):
        """The checkpointed variables holding a NaN or an infinity, checked on the device in one call.

        Returns:
            list of (label, variable name) pairs; empty when everything a
            checkpoint would hold is finite.
        """
        if self._finite_check is None:
            self._finite_check = checkpoints.FiniteCheck(self.saved_float_variables())
        return self._finite_check()

    def epoch_losses(self):
        """dict of the mean of each loss over the current epoch's batches so far."""
        count = float(self.loss_count.numpy())
        sums = self.loss_sums.numpy()
        return {name: float(sums[i]) / max(count, 1.0) for i, name in enumerate(self.LOSS_NAMES)}

    def recent_scalars(self, first_step, last_step):
        """The scalars of steps ``first_step..last_step`` (1-based, at most HISTORY back).

        Returns:
            list of (step, dict of the ``SCALAR_NAMES`` floats); one read of the device.
        """
        first_step = max(first_step, last_step - self.HISTORY + 1, 1)
        rows = self.history.numpy()
        return [(s, dict(zip(self.SCALAR_NAMES, map(float, rows[s % self.HISTORY]))))
                for s in range(first_step, last_step + 1)]

    def end_epoch(self):
        """Counts an epoch as done (epoch + 1, batches in epoch 0, loss sums 0) in one call.

        The counters change inside one graph call so that a Ctrl-C can never
        leave a checkpoint with one updated and not the other.
        """
        self._end_epoch()

    def _end_epoch_fn(self):
        self.epoch.assign_add(1)
        self.epoch_batches.assign(0)
        self.loss_sums.assign(tf.zeros_like(self.loss_sums))
        self.loss_count.assign(0.0)

    # ------------------------------------------------------------------ step

    def train_step(self, lr, hr):
        """One discriminator update, then one generator update.

        Args:
            lr: float32 (b, x/f, y/f, z/f, 1) in [-1, 1], the degraded patches
                (under a strategy: a distributed value, each replica's share).
            hr: float32 (b, x, y, z, 1) in [-1, 1], the reference patches.

        Returns:
            dict of float32 scalar tensors (no host synchronisation): d_loss,
            g_loss, mse, gdl, adv (this step's, over the global batch), flipped
            (1.0 when the labels were swapped) and learning_rate (the one this
            step used). During pre-training d_loss, adv and flipped are 0.
        """
        # A host-side mirror of the step counter: reading self.step would make
        # the host wait for the device at every step.
        if self._host_step is None:
            self._host_step = read_int(self.step)
        pretraining = self._host_step < self.pretrain_steps
        out = (self._compiled_pretrain if pretraining else self._compiled)(lr, hr)
        self._host_step += 1
        return out

    def _step(self, replica_step, lr, hr):
        """Runs ``replica_step(self, lr, hr)`` on every replica, sums the shares, records the step."""
        if self.strategy is None:
            out = replica_step(self, lr, hr)
        else:
            shares = self.strategy.run(replica_step, args=(self, lr, hr))
            out = {name: self.strategy.reduce(
                tf.distribute.ReduceOp.SUM if name in self.LOSS_NAMES else tf.distribute.ReduceOp.MEAN,
                value, axis=None) for name, value in shares.items()}
        self._record(out)
        return out

    def _record(self, out):
        # The counters, trackers and history move in the same graph call as the
        # weights, so a Ctrl-C between two Python statements cannot split them.
        self.step.assign_add(1)
        self.epoch_batches.assign_add(1)
        self.loss_sums.assign_add(tf.stack([out[name] for name in self.LOSS_NAMES]))
        self.loss_count.assign_add(1.0)
        row = tf.cast(self.step % self.HISTORY, tf.int32)
        self.history[row].assign(tf.stack([out[name] for name in self.SCALAR_NAMES]))

    def local_batch(self, batch):
        """The first replica's part of a (possibly distributed) batch, for previews."""
        if self.strategy is None:
            return batch
        return tuple(self.strategy.experimental_local_results(t)[0] for t in batch)


def build_networks(cfg, placement=None):
    """The generator and discriminator a configuration describes.

    Args:
        cfg: the run's :class:`config.Settings`.
        placement: a :class:`Placement`; under a strategy the networks are
            built in its scope, with batch norm over the global batch.

    Returns:
        (generator, discriminator) ``keras.Model`` pair.
    """
    policy = config.PRECISION_POLICIES[cfg.mixed_precision]
    synchronized = placement is not None and placement.replicas > 1
    scope = (placement.strategy.scope() if placement is not None and placement.strategy is not None
             else contextlib.nullcontext())
    with scope:
        generator = networks.build_generator(**cfg.architecture(), dtype_policy=policy,
                                             synchronized_bn=synchronized)
        discriminator = networks.build_discriminator(tuple(cfg.patch_shape) + (1,),
                                                     dtype_policy=policy, synchronized_bn=synchronized)
    return generator, discriminator
