"""Which subjects train and which test: the split of a new run, split.json of a resumed one, evaluation's."""

import os

import config
import durable
import layouts
import nifti_io
from errors import UserError

SPLIT_NAME = "split.json"


def subjects_named(names, subjects, role, log):
    """The usable subjects of a split.json list, in its order; missing ones are reported."""
    by_name = {s.name: s for s in subjects}
    missing = [n for n in names if n not in by_name]
    if missing:
        log(f"note: {len(missing)} {role} subject(s) of {SPLIT_NAME} are not usable now and are "
            "left out: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return [by_name[n] for n in names if n in by_name]


def saved_split(folder, subjects, cfg, log):
    """The train/test lists of a run being resumed, from its split.json.

    A resumed run must train on the subjects it started with, whatever has been
    added to or removed from the data folder since.
    """
    split = config.read_json(os.path.join(folder, SPLIT_NAME))
    if split is None:
        log(f"note: {folder} has no {SPLIT_NAME}; splitting the sorted subjects again")
        return layouts.split_subjects(subjects, cfg.train_fraction)
    lists = [subjects_named(split[key], subjects, key, log) for key in ("train", "test")]
    new = len(subjects) - sum(len(x) for x in lists)
    if new:
        log(f"note: {new} subject(s) in {cfg.data_path} are not in the run's {SPLIT_NAME} "
            "and are not used")
    return lists[0], lists[1]


def training_split(cfg, log):
    """The (train, test) subjects of a new or resumed run.

    Raises:
        UserError: when no subject is left for training.
    """
    subjects, _ = layouts.find_subjects(cfg.data_path, cfg.image_name, cfg.mask_name, log=log,
                                        bids_filter=cfg.bids_filter)
    if cfg.restore:
        train_subjects, test_subjects = saved_split(cfg.restore, subjects, cfg, log)
    else:
        train_subjects, test_subjects = layouts.split_subjects(subjects, cfg.train_fraction)
    if not train_subjects:
        raise UserError(f"no training subject in {cfg.data_path!r} with -train_fraction "
                        f"{cfg.train_fraction}")
    log(f"{len(train_subjects)} train and {len(test_subjects)} test subjects")
    return train_subjects, test_subjects


def write_split(folder, data_path, train_fraction, train_subjects, test_subjects):
    """Writes a run's split.json (the subjects it trains and tests on), durably.

    Raises:
        durable.OutputError: the file could not be written.
    """
    durable.write_json(os.path.join(folder, SPLIT_NAME), {
        "data_path": os.path.abspath(data_path), "train_fraction": train_fraction,
        "train": [s.name for s in train_subjects], "test": [s.name for s in test_subjects]})


def evaluation_subjects(cfg, checkpoint_dir, bids_filter, log):
    """The test subjects: split.json's for the training data, else the data's own test split or all.

    Args:
        cfg: the run's :class:`config.Settings` (data_path, names, train_fraction).
        checkpoint_dir: the evaluated checkpoint's folder (its split.json).
        bids_filter: the -bids_filter to read the data with (``scans.bids_filter_for``).
        log: callable for notes.

    Returns:
        list of ``layouts.Subject``.
    """
    subjects, _ = layouts.find_subjects(cfg.data_path, cfg.image_name, cfg.mask_name, log=log,
                                        bids_filter=bids_filter,
                                        max_voxels=nifti_io.max_voxels_for(cfg.volume_shape))
    # A model file (-model) carries no split.json.
    split = config.read_json(os.path.join(checkpoint_dir, SPLIT_NAME)) if os.path.isdir(checkpoint_dir) else None
    if split is not None and os.path.abspath(cfg.data_path) == split.get("data_path"):
        return subjects_named(split["test"], subjects, "test", log)
    if all(s.split is not None for s in subjects):
        log(f"note: using the test rows of the split column of {cfg.data_path}")
        return layouts.split_subjects(subjects)[1]
    if split is not None:
        log(f"note: {cfg.data_path} is not the training data; evaluating all its subjects")
        return subjects
    _, test = layouts.split_subjects(subjects, cfg.train_fraction)
    log(f"note: no {SPLIT_NAME} next to the checkpoint; using the last "
        f"{1 - cfg.train_fraction:.0%} of the sorted subjects")
    return test
