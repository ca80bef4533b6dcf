"""Which subjects train, validate and test: the split of a new run, split.json of a resumed one, evaluation's."""

import dataclasses
import math
import os

import numpy as np

import config
import durable
import layouts
import nifti_io
import utils
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


def split_subjects(subjects, train_fraction=0.8):
    """Train/test split: the subjects' own ``split`` when they carry one, else deterministic by name.

    When every subject has a ``split`` (a CSV list with a split column), the
    train list is those marked ``"train"`` and the test list those marked
    ``"test"``, each in name order; ``train_fraction`` is then not used (but
    still validated). Those marked ``"validation"`` are in neither list
    (:func:`marked_validation` returns them).

    Otherwise the subjects are sorted by name and the rounding rule is
    ``n_train = floor(train_fraction * n + 0.5)`` (round half up), then, when
    ``n >= 2`` and ``train_fraction < 1``, clamped to ``[1, n - 1]`` so that
    neither list is empty. With one subject, it trains and the test list is
    empty. 589 subjects at 0.8 give 471 / 118.

    Args:
        subjects: sequence of ``layouts.Subject``.
        train_fraction: float in (0, 1].

    Returns:
        (train, test): two lists of ``layouts.Subject``, each in name order.

    Raises:
        ValueError: if ``train_fraction`` is not in (0, 1], some subjects carry
            a split and others not, or a split is not one of ``layouts.SPLITS``.
    """
    if not (utils.is_real(train_fraction) and 0 < train_fraction <= 1):
        raise ValueError(f"train_fraction {train_fraction!r} must be a number in (0, 1]")
    ordered = sorted(subjects, key=lambda s: s.name)
    given = [s for s in ordered if s.split is not None]
    if given:
        if len(given) != len(ordered):
            missing = [s.name for s in ordered if s.split is None]
            raise ValueError(f"{len(given)} subject(s) carry a split and {len(missing)} do not "
                             f"(e.g. {missing[0]!r}); give every subject a split or none")
        bad = [s for s in given if s.split not in layouts.SPLITS]
        if bad:
            raise ValueError(f"subject {bad[0].name!r} has split {bad[0].split!r}; expected one of {layouts.SPLITS}")
        return [s for s in ordered if s.split == "train"], [s for s in ordered if s.split == "test"]
    n = len(ordered)
    n_train = int(math.floor(float(train_fraction) * n + 0.5))
    if n >= 2 and train_fraction < 1:
        n_train = min(max(n_train, 1), n - 1)
    n_train = min(max(n_train, 1 if n else 0), n)
    return ordered[:n_train], ordered[n_train:]


def marked_validation(subjects):
    """The subjects a CSV split column marks ``"validation"``, in name order (none: an empty list)."""
    return sorted((s for s in subjects if s.split == "validation"), key=lambda s: s.name)


@dataclasses.dataclass(frozen=True)
class Split:
    """The subjects a run trains, validates and tests on (lists of ``layouts.Subject``, name order)."""

    train: list
    validation: list
    test: list


def hold_out(train_subjects, fraction, seed):
    """Splits a validation set off the training subjects: ``fraction`` of them, at least one, by ``seed``.

    ``n = max(1, floor(fraction * len + 0.5))`` subjects are drawn with
    ``numpy.random.default_rng(seed)``; the same subjects and seed give the
    same draw.

    Args:
        train_subjects: the training ``layouts.Subject`` list.
        fraction: float in (0, 1).
        seed: int, the run's -seed.

    Returns:
        (train, validation): two lists of ``layouts.Subject`` in name order.

    Raises:
        UserError: fewer than two training subjects (one must be left to train on).
    """
    ordered = sorted(train_subjects, key=lambda s: s.name)
    n = max(1, int(math.floor(float(fraction) * len(ordered) + 0.5)))
    if len(ordered) - n < 1:
        raise UserError(f"-validation_fraction {fraction} leaves no subject to train on: there are "
                        f"{len(ordered)} training subject(s) and at least one is held out; add subjects "
                        "or use -validation_fraction 0")
    drawn = set(np.random.default_rng(int(seed)).permutation(len(ordered))[:n].tolist())
    return ([s for i, s in enumerate(ordered) if i not in drawn],
            [s for i, s in enumerate(ordered) if i in drawn])


def new_split(subjects, cfg, log):
    """The :class:`Split` of a new run: a CSV split column's, else by -train_fraction and -validation_fraction."""
    train, test = split_subjects(subjects, cfg.train_fraction)
    marked = marked_validation(subjects)
    if marked:
        if cfg.validation_fraction > 0:
            log(f"note: the split column of {cfg.data_path} names the validation subjects; "
                f"-validation_fraction {cfg.validation_fraction} is not used")
        return Split(train, marked, test)
    if cfg.validation_fraction > 0:
        train, validation = hold_out(train, cfg.validation_fraction, cfg.seed)
        return Split(train, validation, test)
    return Split(train, [], test)


def saved_split(folder, subjects, cfg, log):
    """The :class:`Split` of a run being resumed, from its split.json.

    A resumed run must train (and validate) on the subjects it started with,
    whatever has been added to or removed from the data folder since.
    """
    split = config.read_json(os.path.join(folder, SPLIT_NAME))
    if split is None:
        log(f"note: {folder} has no {SPLIT_NAME}; splitting the sorted subjects again")
        return new_split(subjects, cfg, log)
    # split.json of versions before validation has no "validation" list.
    lists = [subjects_named(split.get(key, []), subjects, key, log) for key in ("train", "validation", "test")]
    new = len(subjects) - sum(len(x) for x in lists)
    if new:
        log(f"note: {new} subject(s) in {cfg.data_path} are not in the run's {SPLIT_NAME} "
            "and are not used")
    return Split(*lists)


def kept_split_settings(cfg, split, log):
    """A resumed run's settings with the split settings of the run it resumes, which keeps its split.json.

    A -train_fraction or -validation_fraction other than the run's would not
    change the split (the run trains and validates on the subjects it started
    with), yet would be written to config.json: it is said and replaced by the
    run's value, so that config.json describes what runs.

    Args:
        cfg: the resumed run's :class:`config.Settings` (``cfg.restore`` set).
        split: its :class:`Split`, from its split.json.
        log: callable for the note.

    Returns:
        :class:`config.Settings`.
    """
    if not cfg.restore or not os.path.exists(os.path.join(cfg.restore, SPLIT_NAME)):
        return cfg  # no split.json: the subjects were split again with these settings
    saved = config.read_json(os.path.join(cfg.restore, config.CONFIG_NAME)) or {}
    # config.json of versions before validation has no validation_fraction: they validated nothing.
    runs = {"train_fraction": saved.get("train_fraction"),
            "validation_fraction": saved.get("validation_fraction", None if split.validation else 0.0)}
    kept = {k: v for k, v in runs.items() if v is not None and v != getattr(cfg, k)}
    if kept:
        log(f"note: the run keeps its {SPLIT_NAME} ({len(split.train)} train, {len(split.validation)} "
            f"validation, {len(split.test)} test subjects): "
            + ", ".join(f"-{k} {getattr(cfg, k)}" for k in kept) + " is not used; "
            + ", ".join(f"-{k} {v}" for k, v in kept.items()) + f" (the run's) stays in {config.CONFIG_NAME}")
    return cfg.replace(**kept)


def training_split(cfg, log):
    """The :class:`Split` of a new or resumed run.

    Raises:
        UserError: when no subject is left for training.
    """
    subjects, _ = layouts.find_subjects(cfg.data_path, cfg.image_name, cfg.mask_name, log=log,
                                        bids_filter=cfg.bids_filter)
    split = saved_split(cfg.restore, subjects, cfg, log) if cfg.restore else new_split(subjects, cfg, log)
    if not split.train:
        raise UserError(f"no training subject in {cfg.data_path!r} with -train_fraction "
                        f"{cfg.train_fraction}")
    held = f", {len(split.validation)} validation" if split.validation else ""
    log(f"{len(split.train)} train{held} and {len(split.test)} test subjects")
    return split


def write_split(folder, data_path, train_fraction, split):
    """Writes a run's split.json (the subjects it trains, validates and tests on), durably.

    Args:
        folder: the run's checkpoint folder.
        data_path: the data the names refer to.
        train_fraction: the run's -train_fraction (informs).
        split: a :class:`Split`.

    Raises:
        durable.OutputError: the file could not be written.
    """
    durable.write_json(os.path.join(folder, SPLIT_NAME), {
        "data_path": os.path.abspath(data_path), "train_fraction": train_fraction,
        **{key: [s.name for s in getattr(split, key)] for key in ("train", "validation", "test")}})


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
        return split_subjects(subjects)[1]
    if split is not None:
        log(f"note: {cfg.data_path} is not the training data; evaluating all its subjects")
        return subjects
    _, test = split_subjects(subjects, cfg.train_fraction)
    log(f"note: no {SPLIT_NAME} next to the checkpoint; using the last "
        f"{1 - cfg.train_fraction:.0%} of the sorted subjects")
    return test
