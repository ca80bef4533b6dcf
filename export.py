"""-export: the generator of a checkpoint as one file (``model_file``), with its provenance and model card."""

import math
import os

import checkpoints
import config
import durable
import metrics
import model_file
import networks
import outputs
import run_records
import splits
from errors import UserError


def training_description(checkpoint_dir, saved):
    """What a checkpoint's generator was trained on, from its config.json and split.json.

    Args:
        checkpoint_dir: the training run's folder.
        saved: its config.json dict (None: unknown).

    Returns:
        dict: ``data`` (the training data's folder), ``layout`` description,
        ``train_subjects``/``test_subjects`` (counts; None when unknown),
        ``epochs``, ``batch_size``, ``learning_rate``.
    """
    saved = saved or {}
    split = config.read_json(os.path.join(checkpoint_dir, splits.SPLIT_NAME)) or {}
    return {"data": saved.get("data_path", split.get("data_path")),
            "train_subjects": len(split["train"]) if "train" in split else None,
            "test_subjects": len(split["test"]) if "test" in split else None,
            "epochs": saved.get("epochs"), "batch_size": saved.get("batch_size"),
            "learning_rate": saved.get("learning_rate")}


def last_evaluation(folder, sha256):
    """The mean fair metrics of the evaluation in ``folder`` of the checkpoint with ``sha256``, or None.

    Args:
        folder: an evaluation's output folder (holds ``metrics.csv`` and its settings).
        sha256: the checkpoint's hash (``checkpoints.checkpoint_identity``);
            an evaluation of another checkpoint is not reported.
    """
    path = os.path.join(folder, outputs.METRICS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        if not checkpoints.same_digest((metrics.read_settings(path) or {}).get("checkpoint_sha256"), sha256):
            return None
        _, rows = durable.read_csv_rows(path)
    except (UserError, OSError, ValueError):
        return None
    keys = ("psnr_fair", "ssim_fair", "psnr_tricubic_fair", "ssim_tricubic_fair")
    usable = [r for r in rows if all(k in r and math.isfinite(float(r[k])) for k in keys)]
    if not usable:
        return None
    means = {k: sum(float(r[k]) for r in usable) / len(usable) for k in keys}
    return {"subjects": len(usable), "metrics_file": os.path.abspath(path), **means}


def checkpoint_evaluation(checkpoint_dir, path_volumes, sha256):
    """The mean fair metrics of the last evaluation of a checkpoint, or None.

    Looked for where the checkpoint folder's ``evaluation.json`` says its last
    evaluation went (``-evaluate`` records it, whatever its -path_volumes),
    then in ``path_volumes`` (the default ``<checkpoint>/volumes``, or the flag).
    """
    for folder in (run_records.recorded_evaluation(checkpoint_dir), path_volumes):
        found = last_evaluation(folder, sha256) if folder else None
        if found:
            return found
    return None


def export_model(cfg, checkpoint_dir, path, saved=None, log=print):
    """Writes the generator of a checkpoint folder as one model file and prints its model card.

    Args:
        cfg: the :class:`config.Settings` of the checkpoint (from its config.json).
        checkpoint_dir: the training run's folder (-checkpoint_dir_restore).
        path: the file to write (-export), ending in ``.keras``.
        saved: the checkpoint's config.json dict (what it was trained with).
        log: callable for messages.

    Returns:
        str, the path written.

    Raises:
        UserError: the checkpoint does not fit the settings.
        durable.OutputError: the file could not be written.
    """
    generator = networks.build_generator(**cfg.architecture(),
                                         dtype_policy=config.PRECISION_POLICIES[cfg.mixed_precision])
    identity = checkpoints.restore_generator(generator, checkpoint_dir, log)
    # The checkpoint's own progress: a run's config.json holds its total of epochs.
    training = {**training_description(checkpoint_dir, saved), "steps": identity["step"],
                "epochs_done": identity["epoch"], "epoch_batches": identity["epoch_batches"]}
    record = config.config_record(cfg)
    for key in ("strategy", "replicas", "workers"):
        record.pop(key)
    metadata = {"settings": record, "checkpoint": identity, "training": training,
                "normalisation": model_file.NORMALISATION,
                "evaluation": checkpoint_evaluation(checkpoint_dir, cfg.path_volumes, identity["sha256"])}
    metadata["model_card"] = model_file.model_card(metadata)
    if os.path.exists(path):
        log(f"note: replacing the existing file {path}")
    model_file.write(path, generator, metadata)
    log(metadata["model_card"])
    log(f"exported the generator of {identity['path']} to {path}")
    return path
