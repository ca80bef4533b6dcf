"""-demo: phantoms made once, a small training run and its evaluation, end to end."""

import os
import shutil
import time

import checkpoints
import evaluation
import outputs
import phantoms
import training

DEMO_SUBJECTS = 10
DEMO_SHAPE = (72, 76, 56)


def run_demo(cfg, log=print, placement=None, explicit=frozenset()):
    """Makes the phantoms (once), trains on them and evaluates the result.

    Args:
        cfg: the demo's :class:`config.Settings` (``config.DEMO`` under the flags).
        log: callable for messages.
        placement: a ``placement.Placement`` (None: one device).
        explicit: the settings given on the command line; the demo replaces
            its own previous run only in folders it chose itself.

    Returns:
        list of the evaluation's per-subject rows.
    """
    data = cfg.data_path
    if not (os.path.isdir(data) and os.listdir(data)):
        log(f"writing {DEMO_SUBJECTS} demo phantoms {DEMO_SHAPE} to {data}")
        phantoms.make_demo_data(data, subjects=DEMO_SUBJECTS, shape=DEMO_SHAPE, seed=cfg.seed)
    ckpt = cfg.checkpoint_dir
    if checkpoints.latest(ckpt) is not None and "checkpoint_dir" not in explicit:
        log(f"note: replacing the previous demo run in {ckpt}")
        shutil.rmtree(ckpt)
    volumes = cfg.path_volumes
    if os.path.isdir(volumes) and "path_volumes" not in explicit:
        # Its metrics.csv belongs to the previous demo checkpoint: not to be resumed.
        log(f"note: replacing the previous demo outputs in {volumes}")
        shutil.rmtree(volumes)
    started = time.time()
    result = training.train(cfg, log=log, placement=placement)
    rows = evaluation.evaluate(cfg, ckpt, log=log, explicit=explicit)
    log("")
    log(f"demo finished in {time.time() - started:.0f} s")
    log(f"  checkpoints : {ckpt} (latest {result['checkpoint']})")
    log(f"  predictions : {cfg.path_prediction}")
    log(f"  TensorBoard : tensorboard --logdir {cfg.log_dir}")
    log(f"  volumes     : {cfg.path_volumes} (*_sr/_hr/_lr.nii.gz, *_slices.png)")
    log(f"  metrics     : {os.path.join(cfg.path_volumes, outputs.METRICS_NAME)}")
    log(f"  report      : {os.path.join(cfg.path_volumes, outputs.REPORT_NAME)} (open it in a browser)")
    return rows
