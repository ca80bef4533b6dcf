"""The training loop: epochs and steps around the trainer, the checkpoint policy, stop signals, guards.

:class:`TrainingLoop` drives an ``trainer.SRGANTrainer`` through epochs:
it checkpoints by a :class:`CheckpointPolicy` and at every epoch end, turns
SIGTERM/SIGUSR1 (:class:`StopSignals`) and Ctrl-C into a checkpoint and a
stop, stops a run whose losses or checkpointed state turn non-finite without saving them, and makes
the workers of a multi-worker run agree on all of it at the same steps.
"""

import signal
import threading
import time

import numpy as np
import tensorflow as tf

import checkpoints
import losses as losses_lib
from checkpoints import read_int
from errors import EXIT_DIVERGED, RunStopped


class CheckpointPolicy:
    """When to checkpoint inside an epoch: every ``minutes`` of training and/or every ``steps`` steps.

    The end of every epoch is a checkpoint anyway; this adds the ones inside
    long epochs, so a killed run loses minutes, not an epoch.

    Args:
        minutes: float >= 0; 0 turns the timer off.
        steps: int >= 0; 0 turns the step interval off.
        clock: callable returning seconds (monotonic), for tests.
    """

    def __init__(self, minutes=30.0, steps=0, clock=time.monotonic):
        self.seconds = float(minutes) * 60.0
        self.steps = int(steps)
        self.clock = clock
        self.last = clock()

    def due(self, step):
        """bool, whether a checkpoint is due after ``step`` (1-based)."""
        by_steps = self.steps > 0 and step % self.steps == 0
        by_time = self.seconds > 0 and self.clock() - self.last >= self.seconds
        return by_steps or by_time

    def saved(self):
        """Restarts the timer (a checkpoint was just written)."""
        self.last = self.clock()


class StopSignals:
    """SIGTERM and SIGUSR1 as a request to checkpoint and stop, inside a ``with`` block.

    SLURM and Kubernetes send SIGTERM before they kill a pre-empted job;
    ``sbatch --signal=USR1@120`` sends SIGUSR1 ahead of the time limit. The
    handler only records the signal: the training loop checkpoints at the next
    step boundary and stops. Handlers are installed in the main thread only
    and the previous ones restored on exit.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def stop(self, what):
        """The :class:`RunStopped` for the signal received: ``received SIGTERM <what>``, exit 128 + N."""
        signum = self.received or signal.SIGTERM
        return RunStopped(f"received {signal.Signals(signum).name} {what}", exit_code=128 + int(signum))

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False



def stop_between(items, said):
    """Yields ``items`` with SIGTERM/SIGUSR1 recorded; after one, stops if a signal came and some are left.

    The item under way is always finished: the check runs when the loop asks
    for the next one. The handlers are those of :class:`StopSignals`,
    installed while the loop runs and restored after it.

    Args:
        items: a sized iterable (a list, a tqdm over one).
        said: callable ``(done, total) -> str``, what the stop message adds
            after ``received SIGTERM``.

    Raises:
        RunStopped: exit code 128 + N, when a signal N came before the last item.
    """
    total = len(items)
    with StopSignals() as signals:
        for done, item in enumerate(items, 1):
            yield item
            if signals.received is not None and done < total:
                raise signals.stop(said(done, total))


class NullReporter:
    """Says nothing: what a :class:`TrainingLoop` reports to by default (and on non-chief workers).

    ``reporting.TrainingReporter`` is the one a person sees.
    """

    def start_epoch(self, epoch, skip):
        pass

    def after_step(self, trainer, step, batch):
        pass

    def flush(self, trainer, step):
        pass

    def checkpointed(self, step, path):
        pass

    def end_epoch(self, epoch, losses, path):
        pass

    def close(self):
        pass


class NullValidation:
    """No validation: what a :class:`TrainingLoop` validates by default (``validation.Validation`` does)."""

    def due(self, step, epoch_end):
        return False

    def run(self, trainer, path):
        pass


class TrainingLoop:
    """Runs a trainer's epochs: steps, checkpoints, stop signals and the divergence guard.

    Args:
        trainer: an ``trainer.SRGANTrainer`` (its state is the loop's state:
            epoch, batches done, step, the checkpoint).
        reporter: a :class:`NullReporter` (``reporting.TrainingReporter``
            for a person); None says nothing.
        policy: a :class:`CheckpointPolicy` for checkpoints inside epochs
            (None: only at epoch ends).
        log: callable for messages.
        validation: a :class:`NullValidation` (``validation.Validation``
            validates some checkpoints right after they are written); None
            validates nothing.
        batch_voxels: int, voxels of a global batch of HR patches: losses
            that explode (``losses.exploded``) stop the run as non-finite ones
            do; None checks finiteness only.
    """

    # Steps between two looks at the device: the finiteness guard, and on
    # several workers the agreement on checkpoints and stop requests.
    CHECK_EVERY = 10

    def __init__(self, trainer, reporter=None, policy=None, log=print, validation=None, batch_voxels=None):
        self.trainer = trainer
        self.batch_voxels = batch_voxels
        self.reporter = reporter or NullReporter()
        self.policy = policy or CheckpointPolicy(minutes=0, steps=0)
        self.log = log
        self.validation = validation or NullValidation()
        self.checked_step = read_int(trainer.step)

    def fit(self, epoch_data, epochs):
        """Trains up to ``epochs`` epochs, checkpointing by the policy and after each epoch.

        SIGTERM/SIGUSR1 and Ctrl-C checkpoint and stop; losses that turn
        non-finite stop the run without saving.

        Args:
            epoch_data: callable ``(epoch, skip) -> iterable of (lr, hr, nf)``
                batches of that epoch, its first ``skip`` batches left out.
            epochs: total epochs to reach.

        Returns:
            dict, the last epoch's mean losses ({} when nothing was trained).

        Raises:
            KeyboardInterrupt: after saving a checkpoint.
            RunStopped: on a stop signal (after saving), on divergence (without
                saving) or when a checkpoint cannot be written.
        """
        trainer = self.trainer
        losses = {}
        self.checked_step = read_int(trainer.step)
        with StopSignals() as signals:
            try:
                while read_int(trainer.epoch) < epochs:
                    epoch, skip = read_int(trainer.epoch), read_int(trainer.epoch_batches)
                    self.train_epoch(epoch_data(epoch, skip), epoch, skip, signals)
                    losses = self.end_epoch(epoch, signals)
            except KeyboardInterrupt:
                path = self.save(read_int(trainer.step))
                self.log(f"\ninterrupted: saved {path} (epoch {read_int(trainer.epoch) + 1}, "
                         f"{read_int(trainer.epoch_batches)} batches in); resume with "
                         f"-restore {trainer.checkpoint_dir}")
                raise
            finally:
                self.reporter.close()
        return losses

    def end_epoch(self, epoch, signals=None):
        """Closes an epoch: guard, counters, checkpoint, report, then a requested stop.

        Returns:
            dict, the epoch's mean losses.
        """
        trainer = self.trainer
        self.guard_finite(read_int(trainer.step))
        losses = trainer.epoch_losses()
        trainer.end_epoch()
        path = self.save(read_int(trainer.step))
        self.policy.saved()
        self.reporter.end_epoch(epoch, losses, path)
        # A stop request goes first: the resumed run validates this checkpoint.
        stopping = signals is not None and signals.received is not None
        if not stopping and self.validation.due(read_int(trainer.step), epoch_end=True):
            self.validation.run(trainer, path)
        self.stop_if_requested(signals, path)
        return losses

    def train_epoch(self, batches, epoch, skip, signals=None):
        """Runs the steps of one epoch (from batch ``skip`` on).

        Returns:
            int, the number of steps run.
        """
        trainer, reporter = self.trainer, self.reporter
        step = read_int(trainer.step)
        reporter.start_epoch(epoch, skip)
        done, pending = 0, None
        for batch in batches:
            # Checks for the previous step once the next batch is there: after
            # an epoch's last step the epoch's own checkpoint follows anyway.
            if pending is not None:
                self.between_steps(pending, signals)
            trainer.train_step(batch[0], batch[1])
            step += 1
            done += 1
            reporter.after_step(trainer, step, trainer.local_batch(batch))
            pending = step
        reporter.flush(trainer, step)
        return done

    def between_steps(self, step, signals):
        """Checkpoints when due (or to validate) and stops on request, every worker at the same step."""
        several_workers = self.trainer.workers > 1
        at_check = step % self.CHECK_EVERY == 0
        requested = signals is not None and signals.received is not None
        validate = self.validation.due(step, epoch_end=False)  # a function of the step: every worker agrees
        if several_workers:
            if not (at_check or validate):
                return  # workers decide together, at steps every one of them knows
        elif not (at_check or requested or validate or self.policy.due(step)):
            return
        self.guard_finite(step)
        save, stop = self.policy.due(step) or validate, requested
        if several_workers:
            save, stop = self.agree(save, stop)
        if not (save or stop):
            return
        path = self.save(step)
        self.policy.saved()
        self.reporter.checkpointed(step, path)
        if stop:
            self.stopped(signals, path)
        if validate:
            self.validation.run(self.trainer, path)

    def stop_if_requested(self, signals, path):
        """After a checkpoint at ``path``: stops if a signal asked for it (on any worker)."""
        stop = signals is not None and signals.received is not None
        if self.trainer.workers > 1:
            (stop,) = self.agree(stop)
        if stop:
            self.stopped(signals, path)

    def stopped(self, signals, path):
        """Raises the :class:`RunStopped` of a stop signal, after the checkpoint at ``path``."""
        trainer = self.trainer
        signum = (signals.received if signals is not None else None) or signal.SIGTERM
        name = signal.Signals(signum).name
        raise RunStopped(
            f"received {name} at step {read_int(trainer.step)} (epoch {read_int(trainer.epoch) + 1}, "
            f"{read_int(trainer.epoch_batches)} batches in): saved {path}. Resume with "
            f"-restore {trainer.checkpoint_dir}", exit_code=128 + int(signum))

    def agree(self, *flags):
        """Each flag true on any worker becomes true on all (a tiny all-reduce)."""
        strategy = self.trainer.strategy
        local = tf.constant([float(bool(f)) for f in flags])
        shares = strategy.run(lambda: tf.identity(local))
        # tf.distribute reduces by SUM or MEAN only: a sum above 0 is "any".
        agreed = strategy.reduce(tf.distribute.ReduceOp.SUM, shares, axis=None).numpy()
        return tuple(bool(v > 0) for v in agreed)

    def save(self, step):
        """Writes a checkpoint once both guards pass: finite losses and a finite state.

        Returns:
            str, the checkpoint path.

        Raises:
            RunStopped: a loss or a checkpointed value is non-finite (nothing
                is written), or the checkpoint cannot be written.
        """
        self.guard_finite(step)
        self.guard_state(step)
        return self.trainer.save()

    def guard_state(self, step):
        """Stops the run, saving nothing, if anything a checkpoint holds is NaN or infinite.

        The losses can stay finite while an optimiser's moments overflow; a
        checkpoint holding them would diverge again on resume. One device call.

        Raises:
            RunStopped: naming the parts and variables and the last good checkpoint.
        """
        bad = self.trainer.non_finite_state()
        if not bad:
            return
        parts = sorted({label for label, _ in bad})
        parts = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
        names = ", ".join(name for _, name in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise RunStopped(
            f"training diverged: at step {step} these turned non-finite: {parts} "
            f"({names}), while the losses were still finite. Nothing of it was saved; "
            f"{self.last_good()}", exit_code=EXIT_DIVERGED)

    def last_good(self):
        """str, the sentence naming the last good checkpoint and the command that resumes from it.

        The learning rate offered is a tenth of the run's: should that diverge
        too, nothing of it is saved and the same checkpoint is offered again.
        The message ends with the command, so that it can be copied as it is.
        """
        trainer = self.trainer
        rate = float(trainer.schedule.initial_learning_rate)
        latest = checkpoints.latest(trainer.checkpoint_dir) if trainer.checkpoint_dir else None
        if not latest:
            return (f"no checkpoint had been written yet: start again with a lower -learning_rate than this "
                    f"run's {rate:g}, e.g. -learning_rate {rate / 10:g}")
        return (f"the last good checkpoint is {latest}; resume from it with a lower -learning_rate than this "
                f"run's {rate:g}: -restore {trainer.checkpoint_dir} -learning_rate {rate / 10:g}")

    def guard_finite(self, step):
        """Stops the run, saving nothing, if a loss since the last look is NaN, infinite or has exploded.

        A step's d_loss, mse and gdl come from the state before its updates:
        when one of them has exploded, a checkpoint of the step before holds
        the state that gave it and is set aside (:meth:`set_aside_ruined`).

        Raises:
            RunStopped: naming the first bad step and the last good checkpoint.
        """
        trainer = self.trainer
        for s, values in trainer.recent_scalars(self.checked_step + 1, step):
            bad = {k: v for k, v in values.items() if not np.isfinite(v)}
            big = {} if bad or not self.batch_voxels else losses_lib.exploded(values, self.batch_voxels)
            if not (bad or big):
                continue
            # Only an explosion tells of the state: a NaN may come from the step's own input.
            aside = self.set_aside_ruined(s - 1) if set(big) & set(losses_lib.STATE_LOSSES) else ""
            if bad:
                shown = ", ".join(f"{k} {v}" for k, v in bad.items())
                raise RunStopped(
                    f"training diverged: the losses turned non-finite at step {s} ({shown}). "
                    f"The non-finite weights were not saved; {self.last_good()}", exit_code=EXIT_DIVERGED)
            shown = ", ".join(f"{k} {v:.3g}" for k, v in big.items())
            raise RunStopped(
                f"training diverged: the losses exploded at step {s} ({shown}; per voxel for mse and "
                f"gdl, per patch for d_loss and adv: beyond {losses_lib.EXPLODED:g}, errors a thousand "
                "times the [-1, 1] range the networks work in). The state of that step is finite but "
                f"ruined and was not saved; {aside}{self.last_good()}", exit_code=EXIT_DIVERGED)
        self.checked_step = max(step, self.checked_step)

    def set_aside_ruined(self, step):
        """Moves the checkpoint of ``step``, whose state gave the next step's bad losses, out of -restore's way.

        Returns:
            str, the sentence saying so ('' when there is no such checkpoint here).
        """
        trainer = self.trainer
        if not (trainer.is_chief and trainer.checkpoint_dir):
            return ""
        try:
            moved = checkpoints.set_aside(trainer.checkpoint_dir, step)
        except OSError as err:
            return (f"ckpt-{step} holds the state that gave them but could not be moved aside ({err}): "
                    f"move its files out of {trainer.checkpoint_dir} before resuming; ")
        if moved is None:
            return ""
        return f"ckpt-{step} holds the state that gave them: it was moved to {moved} (kept, not resumed from); "
