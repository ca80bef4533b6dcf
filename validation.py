"""Validation during training: the held-out subjects' fair PSNR/SSIM, validation.csv and the best checkpoint.

With ``-validation_fraction`` (or ``validation`` rows in a CSV list) a run
holds out some training subjects. Every ``-validate_steps`` steps (default:
each epoch end) and at the last step, right after a checkpoint, the chief
super-resolves each validation volume exactly as ``-evaluate`` does (patches,
stitching, the run's degradation) and scores it with the fair metrics; the
checkpoint with the highest mean fair PSNR so far is copied to
``<checkpoint_dir>/best``. GAN training oscillates, so the last checkpoint is
often not the best one (MONAI's checkpoint saver keyed on a metric and
nnU-Net's best checkpoint serve the same need).
"""

import glob
import math
import os
import time

import numpy as np
import tensorflow as tf

import checkpoints
import config
import durable
import evaluation
import inference
import metrics as metrics_lib
import nifti_io
import splits
import utils
from checkpoints import read_int
from errors import EXIT_PARTIAL, RunStopped

VALIDATION_NAME = "validation.csv"
BEST_FOLDER = "best"
# What validation.csv holds per validation: when, the scores, and whether it became the best.
# bias_fair: the mean signed error inside the mask, in % of the reference's range (metrics.bias_metrics).
COLUMNS = ("step", "epoch", "psnr_fair", "ssim_fair", "bias_fair", "psnr_tricubic_fair", "subjects", "best",
           "seconds")
# validation.csv of runs of earlier versions (resumed in their own columns).
EARLIER_COLUMNS = tuple(c for c in COLUMNS if c != "bias_fair")
# Beside best/ckpt-N.index: the validation record of that checkpoint.
SCORE_SUFFIX = ".validation.json"


class Validator:
    """Scores a generator on the validation subjects, as ``-evaluate`` scores the test subjects.

    Each volume is read and degraded again at each pass (memory stays that of
    one volume, whatever the number of subjects); tricubic interpolation's
    fair PSNR, the reference line, is computed once per subject.

    Args:
        subjects: the validation ``layouts.Subject`` list.
        cfg: the run's :class:`config.Settings` (geometry, factor, sigma,
            batch size, -blend).
        log: callable for notes (why a subject cannot be read is said the first time).
    """

    def __init__(self, subjects, cfg, log=print):
        self.subjects = list(subjects)
        self.cfg = cfg
        self.log = log
        self.variant = inference.Variant(cfg.blend, False)
        self.tricubic = {}  # subject name -> tricubic's fair PSNR
        self.skipped = set()
        self._predictor = (None, None)  # (generator, its traced predictor)

    def predictor(self, generator):
        """The traced inference function of ``generator`` (traced once per generator)."""
        if self._predictor[0] is not generator:
            self._predictor = (generator, inference.make_predictor(generator))
        return self._predictor[1]

    def score(self, generator):
        """The mean fair PSNR/SSIM of ``generator`` over the validation subjects.

        Args:
            generator: a ``keras.Model`` float32 (b, x, y, z, 1) -> (b, fx·x, fy·y, fz·z, 1).

        Returns:
            dict: ``psnr_fair``, ``ssim_fair``, ``bias_fair`` (SR; the bias in
            % of each reference's range), ``psnr_tricubic_fair`` (means over
            the subjects with a non-empty mask; NaN when none),
            ``subjects`` (how many were scored) and ``unreadable`` (the names
            of the subjects that could not be read at this pass).

        Raises:
            nifti_io.PipelineError: the data folder has disappeared.
        """
        predict = self.predictor(generator)
        rows, unreadable = [], []
        for subject in self.subjects:
            row = self.score_subject(subject, predict)
            if row is None:
                unreadable.append(subject.name)
            else:
                rows.append(row)
        finite = [r for r in rows if np.isfinite(r[0])]
        if not finite:
            return {"psnr_fair": math.nan, "ssim_fair": math.nan, "bias_fair": math.nan,
                    "psnr_tricubic_fair": math.nan, "subjects": 0, "unreadable": unreadable}
        psnr, ssim, tricubic, bias = (float(v) for v in np.mean(finite, axis=0))
        return {"psnr_fair": psnr, "ssim_fair": ssim, "bias_fair": bias, "psnr_tricubic_fair": tricubic,
                "subjects": len(finite), "unreadable": unreadable}

    def score_subject(self, subject, predict):
        """(psnr, ssim, tricubic psnr, bias in % of the range) of one subject, fair; None when it cannot be read."""
        cfg, f = self.cfg, self.cfg.upsampling_factor
        try:
            ref = evaluation.load_reference(subject, cfg, self.log)
        except nifti_io.PipelineError:
            raise
        except nifti_io.DataError as err:
            if subject.name not in self.skipped:
                self.log(f"validation: skipping {subject.name}: {err}")
                self.skipped.add(subject.name)
            return None
        estimate = inference.super_resolve_variants(predict, ref.lr_n, f, cfg.patch_shape, cfg.patch_margin,
                                                    cfg.batch_size, (self.variant,), None,
                                                    cfg.slice_profile)[self.variant]
        sr = utils.denormalize(estimate, ref.nf)
        psnr, ssim = metrics_lib.fair_metrics(ref.hr, sr, ref.mask)
        if subject.name not in self.tricubic:
            tricubic = utils.upsample_baseline(utils.denormalize(ref.lr_n, ref.nf), f, 3, ref.hr.shape,
                                               cfg.slice_profile)
            self.tricubic[subject.name] = metrics_lib.fair_metrics(ref.hr, tricubic, ref.mask)[0]
        return psnr, ssim, self.tricubic[subject.name], metrics_lib.bias_metrics(ref.hr, sr, ref.mask)[1]


def best_record(folder):
    """The validation record of the checkpoint in a best folder (None: no best yet).

    The newest complete ``ckpt-N`` is the best: a new best's ``.index`` is
    written last, after its data and its record.
    """
    prefix = checkpoints.latest(folder)
    return config.read_json(prefix + SCORE_SUFFIX) if prefix else None


def is_best_folder(folder):
    """bool, whether ``folder`` is a run's ``best/`` folder (it holds a ``ckpt-N.validation.json``)."""
    return bool(glob.glob(os.path.join(glob.escape(folder), "ckpt-*" + SCORE_SUFFIX)))


def results_in(folder):
    """What of a run's validation ``folder`` holds: ``best/ (step N)``, ``validation.csv``; [] for none.

    A new run in that folder would append to its validation.csv and compete
    with (and replace) its best checkpoint.
    """
    held = []
    best = os.path.join(folder, BEST_FOLDER)
    record = best_record(best) if os.path.isdir(best) else None
    if record or checkpoints.holds_checkpoints(best):
        held.append(f"{BEST_FOLDER}/" + (f" (step {record['step']})" if record else ""))
    if os.path.exists(os.path.join(folder, VALIDATION_NAME)):
        held.append(VALIDATION_NAME)
    return held


class BestCheckpoint:
    """``<checkpoint_dir>/best``: a normal checkpoint folder holding the best validated checkpoint.

    It holds ``ckpt-N.index``/``.data-*`` (a copy of the run's checkpoint of
    step N), its ``checkpoint`` state file, the run's ``config.json`` and
    ``split.json`` (so ``-evaluate``/``-export`` work on it) and
    ``ckpt-N.validation.json``, the scores. ``-keep_checkpoints`` never
    deletes it.

    A replacement copies the new checkpoint's data and record first and its
    ``.index`` last, then removes the old one: a kill at any moment leaves the
    old best or the new one complete (``checkpoints.latest`` reads the newest
    complete one).

    Args:
        run_dir: the run's checkpoint folder.
    """

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.folder = os.path.join(run_dir, BEST_FOLDER)
        self.record = best_record(self.folder)

    @property
    def psnr(self):
        """float, the best validation fair PSNR so far (-inf: none)."""
        return float(self.record["psnr_fair"]) if self.record else -math.inf

    def replace(self, prefix, record):
        """Makes the checkpoint at ``prefix`` (``.../ckpt-N``) the best one, with its ``record``.

        Raises:
            durable.OutputError: a file could not be written; the previous best is intact.
        """
        target = os.path.join(self.folder, os.path.basename(prefix))
        for name in (config.CONFIG_NAME, splits.SPLIT_NAME):
            if os.path.exists(os.path.join(self.run_dir, name)):
                durable.copy_file(os.path.join(self.run_dir, name), os.path.join(self.folder, name))
        for shard in sorted(glob.glob(glob.escape(prefix) + ".data-*")):
            durable.copy_file(shard, os.path.join(self.folder, os.path.basename(shard)))
        durable.write_json(target + SCORE_SUFFIX, record)
        durable.copy_file(prefix + ".index", target + ".index")  # complete from here on
        checkpoints.write_state(self.folder, target, [target])
        for path in glob.glob(os.path.join(glob.escape(self.folder), "ckpt-*")):
            if not os.path.basename(path).startswith(os.path.basename(target) + "."):
                os.remove(path)
        self.record = record

    def summary(self):
        """One line: the best checkpoint, its scores and how to evaluate it."""
        if not self.record:
            return "validation: no best checkpoint yet (no validation subject could be scored)"
        r = self.record
        return (f"best checkpoint: step {r['step']} (epoch {r['epoch']:.2f}), validation PSNR "
                f"{r['psnr_fair']:.2f} dB, SSIM {r['ssim_fair']:.4f} (tricubic {r['psnr_tricubic_fair']:.2f} dB) "
                f"in {self.folder}; evaluate it with -evaluate True -checkpoint_dir_restore {self.folder}")


class Validation:
    """What the training loop does about validation: when, and what follows a validation pass.

    Args:
        validator: a :class:`Validator`.
        run_dir: the run's checkpoint folder (validation.csv, best/).
        log_dir: the TensorBoard folder (scalars under ``validation/``).
        validate_steps: int, validate every this many steps (0: at epoch ends).
        last_step: int, the run's last step (always validated).
        batches_per_epoch: int, to give the epoch of a step.
        is_chief: bool; other workers only keep step with the chief.
        log: callable for messages.
    """

    def __init__(self, validator, run_dir, log_dir, validate_steps, last_step, batches_per_epoch,
                 is_chief=True, log=print):
        self.validator = validator
        self.csv_path = os.path.join(run_dir, VALIDATION_NAME)
        self.log_dir = log_dir
        self.validate_steps = int(validate_steps)
        self.last_step = int(last_step)
        self.batches_per_epoch = int(batches_per_epoch)
        self.is_chief = is_chief
        self.log = log
        self.best = BestCheckpoint(run_dir) if is_chief else None
        self._writer = None
        self.passes = 0
        self.failures = []  # (step, why) of this process's passes that were not compared

    def due(self, step, epoch_end):
        """bool, whether the checkpoint of ``step`` is validated (the same on every worker)."""
        if step == self.last_step:
            return True
        return step % self.validate_steps == 0 if self.validate_steps else epoch_end

    def columns(self):
        """The columns of this run's validation.csv: ``COLUMNS``, or an earlier version's (no bias)."""
        fieldnames, _ = durable.read_csv_rows(self.csv_path)
        return EARLIER_COLUMNS if fieldnames is not None and tuple(fieldnames) == EARLIER_COLUMNS else COLUMNS

    def validated_steps(self):
        """set of the steps validation.csv holds."""
        _, rows = durable.read_csv_rows(self.csv_path)
        return {int(r["step"]) for r in rows}

    def catch_up(self, trainer, path):
        """After a resume: validates the restored checkpoint if it was due and has no row yet.

        A kill or a stop signal can come between a checkpoint and its validation.
        """
        step = read_int(trainer.step)
        if (self.is_chief and step > 0 and self.due(step, read_int(trainer.epoch_batches) == 0)
                and step not in self.validated_steps()):
            self.run(trainer, path)

    def run(self, trainer, path):
        """Validates the generator saved at ``path``; records it; replaces the best checkpoint if it is better.

        A pass that could not read every validation subject (or scored
        another number of them than the best checkpoint's pass) is recorded
        and said, but not compared with the best. A pass of the checkpoint
        ``best/`` already holds (a kill came between its copy and its row) is
        recorded as the best without copying it again.

        Returns:
            dict, the validation record (step, epoch, the scores of
            :meth:`Validator.score`, checkpoint); None on other workers.

        Raises:
            RunStopped: validation.csv or the best checkpoint cannot be written
                (the run's checkpoint and the previous best are intact).
        """
        if not self.is_chief:
            return
        started = time.time()
        step = read_int(trainer.step)
        epoch = read_int(trainer.epoch) + read_int(trainer.epoch_batches) / self.batches_per_epoch
        scores = self.validator.score(trainer.generator)
        problem = self.not_comparable(scores)
        scores = {k: v for k, v in scores.items() if k != "unreadable"}
        record = {"step": step, "epoch": epoch, **scores, "checkpoint": os.path.abspath(path)}
        held = bool(self.best.record) and int(self.best.record["step"]) == step
        improved = bool(problem is None and not held and np.isfinite(scores["psnr_fair"])
                        and scores["psnr_fair"] > self.best.psnr)
        seconds = time.time() - started
        try:
            if improved:
                self.best.replace(path, record)
            columns = self.columns()
            durable.append_csv_row(self.csv_path, columns, {
                **{k: record[k] for k in columns if k in record}, "best": int(improved or held),
                "seconds": seconds})
        except durable.OutputError as err:
            raise RunStopped(f"cannot record the validation of step {step}: {err}. The checkpoint {path} "
                             f"and the previous best in {self.best.folder} are intact; make room and "
                             f"resume with -restore {os.path.dirname(path)}") from None
        self.passes += 1
        if problem:
            self.failures.append((step, problem))
        self.write_scalars(step, scores)
        self.log(self.line(record, improved, seconds, problem, held))
        return record

    def not_comparable(self, scores):
        """Why a pass's scores cannot be compared with the best checkpoint's (None: they can).

        Means over other subjects are other numbers: a pass that could not
        read a subject, or scored another number of subjects than the best
        checkpoint's pass, would otherwise win or lose by the subjects it lost.
        """
        unreadable = scores.get("unreadable", [])
        if unreadable:
            names = ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
            return f"{len(unreadable)} validation subject(s) could not be read ({names})"
        best = self.best.record
        if best and scores["subjects"] and int(best["subjects"]) != scores["subjects"]:
            return (f"{scores['subjects']} subject(s) were scored, the best checkpoint's pass scored "
                    f"{best['subjects']}")
        return None

    def line(self, record, improved, seconds, problem=None, held=False):
        """The console line of a validation pass."""
        where = f"validation at step {record['step']} (epoch {record['epoch']:.2f})"
        if problem and not record["subjects"]:
            text = f"{where} failed: {problem}; no subject was scored ({seconds:.1f} s)"
        else:
            text = (f"{where}: PSNR {record['psnr_fair']:.2f} dB, SSIM {record['ssim_fair']:.4f}, bias "
                    f"{record.get('bias_fair', math.nan):+.2f} % (tricubic {record['psnr_tricubic_fair']:.2f} dB), "
                    f"{record['subjects']} subject(s), {seconds:.1f} s")
            if problem:
                text += f"; incomplete: {problem}, so it is not compared with the best"
        if improved:
            return text + f"; new best, copied to {self.best.folder}"
        if held:
            return text + f"; the best, already in {self.best.folder} (copied before the run stopped)"
        if self.best.record:
            return text + f"; the best stays step {self.best.record['step']} ({self.best.psnr:.2f} dB)"
        return text

    def write_scalars(self, step, scores):
        """TensorBoard: ``validation/psnr_fair``, ``validation/ssim_fair`` in ``<log_dir>/validation``."""
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "validation"))
        with self._writer.as_default(step=step):
            for key in ("psnr_fair", "ssim_fair", "bias_fair", "psnr_tricubic_fair"):
                if np.isfinite(scores.get(key, math.nan)):
                    tf.summary.scalar(f"validation/{key}", scores[key])
        self._writer.flush()

    def summary(self):
        """The end-of-run lines about the best checkpoint and incomplete passes ('' on other workers)."""
        if not self.is_chief:
            return ""
        if not self.failures:
            return self.best.summary()
        (first, _), (last, why) = self.failures[0], self.failures[-1]
        return (f"{self.best.summary()}\nwarning: validation was incomplete at {len(self.failures)} of "
                f"{self.passes} pass(es) of this run, since step {first} (the last at step {last}: {why}); "
                "those passes were not compared with the best, so the best checkpoint above is the best "
                "of the complete passes")

    def incomplete(self):
        """The :class:`RunStopped` (exit code 4) that ends a run some of whose validations were incomplete.

        None when every pass of this process scored every validation subject.
        """
        if not self.is_chief or not self.failures:
            return None
        first, why = self.failures[0]
        return RunStopped(f"training ended, but validation was incomplete since step {first} ({why}; see "
                          f"the warning above). The checkpoints and {self.best.folder} are intact. Fix or put "
                          f"back the validation subjects' files before using {self.best.folder}: later passes "
                          f"are compared again once they score every subject (-restore "
                          f"{self.best.run_dir} to train on)", exit_code=EXIT_PARTIAL)
