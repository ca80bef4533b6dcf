"""What a training run records beside its checkpoints for people to read back: losses, validations, its last evaluation.

A run's folder (``-checkpoint_dir``) holds, besides the checkpoints and
``config.json``/``split.json``:

- ``losses.csv``: one row per finished epoch, its mean losses (written by
  ``reporting.TrainingReporter``);
- ``validation.csv``: one row per validation (written by ``validation.Validation``);
- ``evaluation.json``: where the last ``-evaluate`` of the folder's
  checkpoint wrote its results, so that ``-export`` finds them wherever they
  went (``-path_volumes`` is free).

Both CSV files are appended row by row through ``durable`` and so survive a
kill and a resumed run. ``report.py`` draws their curves.
"""

import datetime
import math
import os

import config
import durable
from errors import UserError

LOSSES_NAME = "losses.csv"
# Per epoch: which one, the step it ended at, then the trainer's mean losses.
LOSS_COLUMNS = ("epoch", "step", "d_loss", "g_loss", "mse", "gdl", "adv", "seconds")
# validation.py writes it; its columns are validation.COLUMNS.
VALIDATION_NAME = "validation.csv"
EVALUATION_NAME = "evaluation.json"


def append_epoch_losses(folder, epoch, step, losses, seconds):
    """Appends one finished epoch's mean losses to ``folder/losses.csv``.

    Args:
        folder: the run's checkpoint folder.
        epoch: int, the epoch's number counted from 1.
        step: int, the training step the epoch ended at.
        losses: dict of the mean losses (``LOSS_COLUMNS`` names; others are ignored).
        seconds: float, the epoch's wall time (of this process: a resumed
            epoch counts from the resume).

    Raises:
        durable.OutputError: the row could not be written.
    """
    row = {k: float(v) for k, v in losses.items() if k in LOSS_COLUMNS}
    durable.append_csv_row(os.path.join(folder, LOSSES_NAME), LOSS_COLUMNS,
                           {**row, "epoch": int(epoch), "step": int(step), "seconds": float(seconds)})


def read_numbers(path, key):
    """The rows of a run's CSV file as dicts of floats, one per ``key`` value (the last row wins), sorted.

    A row written twice (a run resumed from an older checkpoint trains an
    epoch again) is kept once, as written last; a cell that is not a number
    is NaN.

    Returns:
        list of dicts; [] when the file is missing or unreadable.
    """
    try:
        _, rows = durable.read_csv_rows(path)
    except (OSError, ValueError):
        return []

    def number(text):
        try:
            return float(text)
        except (TypeError, ValueError):
            return math.nan
    by_key = {}
    for row in rows:
        values = {k: number(v) for k, v in row.items()}
        if math.isfinite(values.get(key, math.nan)):
            by_key[values[key]] = values
    return [by_key[k] for k in sorted(by_key)]


def run_folder(checkpoint_path):
    """The folder holding the records of the run a checkpoint comes from (None: none found).

    The checkpoint's own folder when it holds ``losses.csv`` or
    ``validation.csv``; for a best checkpoint (``RUN/best``, which holds a
    copy of the run's ``config.json``) the run's folder above it.

    Args:
        checkpoint_path: a ``.../ckpt-N`` prefix (a model file's recorded checkpoint too).
    """
    if not checkpoint_path:
        return None
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    parent = os.path.dirname(folder)
    for candidate in (folder, parent):
        if any(os.path.isfile(os.path.join(candidate, n)) for n in (LOSSES_NAME, VALIDATION_NAME)):
            if candidate == folder or same_run(folder, parent):
                return candidate
    return None


def same_run(folder, parent):
    """bool, whether ``folder`` (e.g. ``RUN/best``) holds a copy of ``parent``'s config.json."""
    name = config.CONFIG_NAME
    try:
        mine = config.read_json(os.path.join(folder, name))
        return mine is not None and mine == config.read_json(os.path.join(parent, name))
    except UserError:
        return False


def write_evaluation_record(checkpoint_dir, metrics_path, report_path, checkpoint_sha256, log=print):
    """Records in a checkpoint folder where its last evaluation wrote its results (``evaluation.json``).

    A folder that cannot be written (a shared, read-only model) keeps its old
    record; a note says so and the evaluation's results are not affected.

    Args:
        checkpoint_dir: the evaluated checkpoint folder.
        metrics_path: the evaluation's metrics.csv.
        report_path: its report.html.
        checkpoint_sha256: the evaluated checkpoint's digest (``checkpoints.checkpoint_identity``).
        log: callable for the note.
    """
    record = {"metrics": os.path.abspath(metrics_path), "report": os.path.abspath(report_path),
              "checkpoint_sha256": checkpoint_sha256,
              "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        durable.write_json(os.path.join(checkpoint_dir, EVALUATION_NAME), record)
    except durable.OutputError as err:
        log(f"note: could not record this evaluation in {checkpoint_dir} ({err}); -export of it "
            f"will look for its metrics in its default -path_volumes only")


def recorded_evaluation(checkpoint_dir):
    """The folder where the last evaluation of a checkpoint folder wrote its metrics.csv (None: no record).

    An unreadable record counts as none: it only helps to find results.
    """
    try:
        record = config.read_json(os.path.join(checkpoint_dir, EVALUATION_NAME))
    except UserError:
        return None
    if isinstance(record, dict) and isinstance(record.get("metrics"), str):
        return os.path.dirname(record["metrics"])
    return None
