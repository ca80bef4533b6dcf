"""What a person sees of a training run: progress bars, epoch lines, losses.csv, TensorBoard, preview patches."""

import os
import sys
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm

import checkpoints
import durable
import factors
import run_records
import train_dataset as td
import utils
from trainer import SRGANTrainer
from training_loop import NullReporter


class TrainingReporter(NullReporter):
    """What a person sees of a training run.

    A progress bar per epoch (running losses, volumes per second, time left),
    TensorBoard scalars for every step (read from the trainer's on-device
    history every ``log_every`` steps, so the loop does not wait on each step),
    an LR|SR|HR image every ``image_every`` steps, and every 20 volumes (the
    original's interval) the HR/LR/SR of a patch as NIfTI with its PSNR/SSIM.
    Each finished epoch's mean losses are also appended to the run's
    ``losses.csv`` (``run_records``), which report.html draws.

    Args:
        cfg: the run's :class:`config.Settings`.
        batches_per_epoch: int, steps of a full epoch.
        log: callable for the epoch lines.
        log_every: steps between two reads of the trainer's scalars.
        image_every: steps between two TensorBoard images.
    """

    def __init__(self, cfg, batches_per_epoch, log=print, log_every=10, image_every=200):
        self.cfg = cfg
        self.log = log
        self.batches_per_epoch = batches_per_epoch
        self.log_every = min(log_every, SRGANTrainer.HISTORY)
        self.image_every = image_every
        self.patches_per_volume = td.patches_per_volume(cfg.volume_shape, cfg.patch_shape,
                                                        cfg.patch_margin)
        # Previews every 20 volumes, as the original.
        self.preview_every = max(1, (20 * self.patches_per_volume) // cfg.batch_size)
        self.writer = tf.summary.create_file_writer(cfg.log_dir)
        self.bar = None
        self.logged_step = None

    def start_epoch(self, epoch, skip):
        self.epoch, self.batch_index = epoch, skip
        self.started, self.done = time.time(), 0
        self.bar = tqdm(total=self.batches_per_epoch, initial=skip,
                        desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch",
                        dynamic_ncols=True, file=sys.stderr)

    def after_step(self, trainer, step, batch):
        if self.logged_step is None:
            self.logged_step = step - 1
        lr, hr = batch[0], batch[1]
        f = self.cfg.upsampling_factor
        if step % self.image_every == 1 or self.image_every == 1:
            sr = trainer.generator(lr[:1], training=False).numpy()
            with self.writer.as_default(step=step):
                tf.summary.image("lr_sr_hr_axial", display_slices(
                    np.asarray(lr)[:1], sr, np.asarray(hr)[:1], f))
        if self.batch_index % self.preview_every == 0 and len(batch) > 2:
            self._preview(trainer, step, batch)
        self.batch_index += 1
        self.done += 1
        self.bar.update(1)
        if step % self.log_every == 0:
            self.flush(trainer, step)

    def _preview(self, trainer, step, batch):
        lr, hr = batch[0], batch[1]
        f = self.cfg.upsampling_factor
        tag = f"e{self.epoch + 1}_s{step}"
        try:
            psnr, ssim = write_preview(trainer, np.asarray(lr), np.asarray(hr), np.asarray(batch[2]),
                                        self.cfg.path_prediction, tag, f, self.cfg.slice_profile)
        except durable.OutputError as err:
            # Previews are for looking at; a full disk stops the run at the
            # next checkpoint, with the message that matters.
            self.bar.write(f"warning: preview not written: {err}")
            return
        with self.writer.as_default(step=step):
            tf.summary.scalar("preview/psnr", psnr)
            tf.summary.scalar("preview/ssim", ssim)
        self.bar.write(f"epoch {self.epoch + 1} step {step}: preview patch PSNR {psnr:.2f} dB, "
                       f"SSIM {ssim:.4f} -> {self.cfg.path_prediction}")

    def write(self, message):
        """Says ``message`` through ``log`` without breaking the epoch's progress bar."""
        if self.bar is None:
            self.log(message)
            return
        with self.bar.external_write_mode():
            self.log(message)

    def checkpointed(self, step, path):
        self.bar.write(f"step {step}: saved {path}")

    def flush(self, trainer, step):
        if self.logged_step is None or step <= self.logged_step:
            return
        with self.writer.as_default():
            for s, values in trainer.recent_scalars(self.logged_step + 1, step):
                for name in SRGANTrainer.LOSS_NAMES:
                    tf.summary.scalar(f"loss/{name}", values[name], step=s)
                tf.summary.scalar("learning_rate", values["learning_rate"], step=s)
        self.logged_step = step
        running = trainer.epoch_losses()
        elapsed = max(time.time() - self.started, 1e-9)
        self.bar.set_postfix(d=f"{running['d_loss']:.3g}", g=f"{running['g_loss']:.4g}",
                             mse=f"{running['mse']:.4g}", gdl=f"{running['gdl']:.4g}",
                             adv=f"{running['adv']:.3g}",
                             vol_s=f"{self.done * self.cfg.batch_size / self.patches_per_volume / elapsed:.2f}")

    def end_epoch(self, epoch, losses, path):
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()
        self.log(f"epoch {epoch + 1}/{self.cfg.epochs}: " +
                 " ".join(f"{k} {v:.5g}" for k, v in losses.items()) + f"; saved {path}")
        try:
            run_records.append_epoch_losses(self.cfg.checkpoint_dir, epoch + 1, checkpoints.number(path),
                                            losses, time.time() - self.started)
        except durable.OutputError as err:
            # A record for looking at, as the previews: the checkpoint is what matters.
            self.log(f"warning: {run_records.LOSSES_NAME} not written for epoch {epoch + 1}: {err}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


def write_preview(trainer, lr, hr, nf, folder, tag, f, slice_profile="gaussian"):
    """HR, LR and SR of the first patch of a batch, de-normalised, plus its PSNR/SSIM.

    The LR patch's affine places its voxels where the profile says they lie
    (``utils.lr_grid_affine``), so the three overlay in a viewer.
    """
    sr = trainer.generator(lr[:1], training=False).numpy()[0, ..., 0]
    nf = float(nf[0])
    hr_p = utils.denormalize(hr[0, ..., 0], nf)
    lr_p = utils.denormalize(lr[0, ..., 0], nf)
    sr_p = utils.denormalize(sr, nf)
    eye = np.eye(4)
    utils.save_nifti(os.path.join(folder, f"{tag}_hr.nii.gz"), hr_p, eye)
    utils.save_nifti(os.path.join(folder, f"{tag}_lr.nii.gz"), lr_p, utils.lr_grid_affine(f, slice_profile))
    utils.save_nifti(os.path.join(folder, f"{tag}_sr.nii.gz"), sr_p, eye)
    return utils.compute_metrics(hr_p, sr_p)


def display_slices(lr, sr, hr, f):
    """One TensorBoard image: axial mid-slices of LR (nearest-upsampled), SR, HR."""
    fx, fy, fz = factors.UpsamplingFactor.of(f).axes
    z = hr.shape[3] // 2
    lr_up = np.repeat(np.repeat(lr[0, :, :, z // fz, 0], fx, axis=0), fy, axis=1)
    row = np.concatenate([lr_up, sr[0, :, :, z, 0], hr[0, :, :, z, 0]], axis=1)
    return np.clip((row[None, ..., None] + 1) / 2, 0, 1)
