"""Evaluation metrics: per-subject PSNR/SSIM (the original's and fair), metrics.csv, the closing summary."""

import json
import math
import os

import numpy as np

import checkpoints
import durable
import utils
from errors import UserError
from inference import Variant

METHODS = ("sr", "nearest", "trilinear", "tricubic")
# Per subject: the original's metrics (data range of each pair: max - min of
# both volumes), then the same with one data range for every method, the
# reference's max - min ("fair": an estimate that overshoots no longer
# enlarges its own range and so its PSNR).
# Then each method's bias: the mean signed error (estimate - reference) inside
# the mask, in the image's intensities (``bias``), and the same in percent of
# the reference's max - min (``bias_fair``, the range the fair PSNR uses). A
# constant offset hides behind a low PSNR and a high SSIM; these columns show it.
METRIC_COLUMNS = (("subject", "psnr", "ssim", "psnr_nearest", "ssim_nearest", "psnr_trilinear",
                   "ssim_trilinear", "psnr_tricubic", "ssim_tricubic")
                  + tuple(f"{m}{'' if s == 'sr' else '_' + s}_fair"
                          for s in METHODS for m in ("psnr", "ssim"))
                  + tuple(f"bias{'' if s == 'sr' else '_' + s}{t}" for s in METHODS for t in ("", "_fair")))

# metrics.json settings that only inform; the others must match to resume.
INFORMATIONAL_SETTINGS = ("program", "checkpoint")
# Settings added after metrics.json was first written, and the value a file
# without them was computed with (so an earlier version's evaluation resumes).
LATER_SETTINGS = {"slice_profile": "gaussian"}


def metric_columns(variants=(Variant(),)):
    """The metrics.csv columns of an evaluation computing ``variants``.

    ``psnr``/``ssim`` (and their ``_fair`` pair) are the last variant's, the
    one written as ``_sr``; every other variant adds ``psnr_<key>``,
    ``ssim_<key>``, ``psnr_<key>_fair``, ``ssim_<key>_fair`` (key e.g.
    ``sr_crop``). With the default options: exactly ``METRIC_COLUMNS``.

    Returns:
        tuple of str.
    """
    return METRIC_COLUMNS + tuple(f"{m}_{v.key}{t}" for v in variants[:-1]
                                  for t in ("", "_fair") for m in ("psnr", "ssim", "bias"))


def without_bias(columns):
    """The columns an earlier version (before the bias columns) wrote for the same evaluation."""
    return tuple(c for c in columns if not c.startswith("bias"))


def subject_metrics(hr, estimates, mask):
    """Every metric of one subject: the original's and the fair ones.

    Args:
        hr: float32 (x, y, z), the reference in source intensities.
        estimates: dict method -> float32 (x, y, z) estimate: the ``METHODS``,
            and variant keys such as ``"sr_crop"``.
        mask: bool (x, y, z) brain mask.

    Returns:
        dict with the ``metric_columns`` keys but ``subject`` (NaN for an
        empty mask).
    """
    row = {}
    for method, estimate in estimates.items():
        suffix = "" if method == "sr" else f"_{method}"
        row[f"psnr{suffix}"], row[f"ssim{suffix}"] = utils.compute_metrics(hr, estimate, mask)
        row[f"psnr{suffix}_fair"], row[f"ssim{suffix}_fair"] = fair_metrics(hr, estimate, mask)
        row[f"bias{suffix}"], row[f"bias{suffix}_fair"] = bias_metrics(hr, estimate, mask)
    return row


def bias_metrics(hr, estimate, mask):
    """The mean signed error inside the mask: in intensities, and in % of the reference's max - min.

    Args:
        hr: float32 (x, y, z), the reference in source intensities.
        estimate: float32 (x, y, z), an estimate of it.
        mask: bool (x, y, z) brain mask.

    Returns:
        (bias, bias_fair) floats, ``mean(estimate - hr)`` over the mask and
        ``100 * bias / (max(hr) - min(hr))``; NaN for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return float("nan"), float("nan")
    bias = float(np.mean(np.asarray(estimate, np.float64)[mask] - np.asarray(hr, np.float64)[mask]))
    reference_range = float(hr.max() - hr.min()) or 1.0
    return bias, 100.0 * bias / reference_range


def fair_metrics(hr, estimate, mask):
    """PSNR and SSIM inside the mask with one data range for every method: the reference's max - min.

    Args:
        hr: float32 (x, y, z), the reference in source intensities.
        estimate: float32 (x, y, z), an estimate of it.
        mask: bool (x, y, z) brain mask.

    Returns:
        (psnr, ssim) floats; NaN for an empty mask.
    """
    reference_range = float(hr.max() - hr.min()) or 1.0
    return utils.compute_metrics(hr, estimate, mask, data_range=reference_range)


def read_header_lines(path):
    """The ``# key: value`` lines at the top of a CSV file, as a dict ({} when there are none).

    Only metrics.csv files of earlier versions have them (their settings now
    live in :func:`settings_path`).
    """
    settings = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.startswith("#"):
                    break
                key, sep, value = line[1:].strip().partition(": ")
                if sep:
                    settings[key] = value
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}")
    return settings


def settings_path(csv_path):
    """str, the JSON file beside a metrics CSV that holds its settings (``metrics.json``)."""
    return os.path.splitext(csv_path)[0] + ".json"


def read_settings(csv_path):
    """The settings a metrics CSV's rows were computed with.

    Returns:
        dict str -> str from its ``metrics.json``, or from the ``# key: value``
        lines of an earlier version's file; None when neither exists.

    Raises:
        UserError: ``metrics.json`` cannot be read or is not an object.
    """
    legacy = read_header_lines(csv_path)
    if legacy:
        return legacy
    path = settings_path(csv_path)
    try:
        with open(path, encoding="utf-8") as fh:
            settings = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}")
    if not isinstance(settings, dict):
        raise UserError(f"{path} holds {type(settings).__name__}, expected the settings of {csv_path} (an object)")
    return {str(k): str(v) for k, v in settings.items()}


def drop_header_lines(csv_path, settings):
    """Converts an earlier version's metrics CSV: its ``#`` lines go to ``metrics.json``, the CSV stays plain.

    Raises:
        durable.OutputError: a file could not be written (the CSV is then unchanged).
    """
    with open(csv_path, "rb") as fh:
        lines = fh.read().decode("utf-8").split("\n")
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    durable.write_json(settings_path(csv_path), settings)
    durable.write_text(csv_path, "\n".join(lines))


def same_setting(key, recorded, current):
    """bool, whether a metrics.json setting allows resuming: equal, or the same checkpoint digest.

    Earlier versions recorded the checkpoint's digest shortened to 16 hex digits.
    """
    if key == "checkpoint_sha256":
        return checkpoints.same_digest(recorded, current)
    return recorded == current


class MetricsFile:
    """metrics.csv: one row per subject, appended and flushed as each subject ends.

    A plain CSV (a header row, then the rows: every tool's defaults read it);
    what the rows depend on (the checkpoint, the data, sigma, the options) is
    in ``metrics.json`` beside it, written before the first row. A later
    evaluation into the same folder with the same settings resumes (skips the
    subjects it holds), one with other settings is refused. A metrics.csv of
    an earlier version (its settings as leading ``# key: value`` lines) is
    read the same way and, when resumed, converted (the lines move to
    metrics.json).

    Args:
        path: the CSV file.
        columns: its columns (:func:`metric_columns`).
        settings: dict of str -> str, the settings of this run.
    """

    def __init__(self, path, columns, settings):
        self.path = path
        self.columns = tuple(columns)
        self.settings = dict(settings)

    def done(self):
        """The subjects already in the file.

        Returns:
            set of subject names (empty for a new file).

        Raises:
            UserError: the file holds rows of an evaluation with other
                settings or columns, or has no settings to compare with (it
                is left untouched).
            durable.OutputError: an earlier version's file could not be converted.
        """
        if not os.path.exists(self.path):
            return set()
        old = read_settings(self.path)
        if old is None:
            raise UserError(f"{self.path} has no {os.path.basename(settings_path(self.path))} beside it: which "
                            "evaluation wrote its rows cannot be told, so they cannot be resumed. Choose another "
                            "-path_volumes, or move that metrics.csv away to start afresh")
        known = {**LATER_SETTINGS, **old}
        different = [f"{key}: {known.get(key, '(none)')} here, {value} now"
                     for key, value in self.settings.items()
                     if key not in INFORMATIONAL_SETTINGS and not same_setting(key, known.get(key), value)]
        try:
            fieldnames, rows = durable.read_csv_rows(self.path)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {self.path}: {err}")
        if fieldnames is not None and tuple(fieldnames) == without_bias(self.columns):
            # An earlier version's file: resumed in its own columns (no bias stored for it).
            self.columns = tuple(fieldnames)
        if not different and fieldnames is not None and tuple(fieldnames) != self.columns:
            different.append(f"columns {','.join(fieldnames)} here")
        if different:
            raise UserError(f"{self.path} holds the results of another evaluation ("
                            + "; ".join(different) + "); its rows cannot be mixed with this run's. "
                            "Choose another -path_volumes, or move that metrics.csv away to start afresh")
        if read_header_lines(self.path):
            drop_header_lines(self.path, old)
        return {row["subject"] for row in rows}

    def append(self, row):
        """Appends one subject's row durably (creating the file, after its metrics.json).

        Raises:
            durable.OutputError: the row could not be written.
        """
        if not os.path.exists(self.path):
            durable.write_json(settings_path(self.path), self.settings)
        durable.append_csv_row(self.path, self.columns, {k: v for k, v in row.items() if k in self.columns})

    def rows(self):
        """Every row in the file, numbers as floats (NaN kept)."""
        _, rows = durable.read_csv_rows(self.path)
        return [{k: (v if k == "subject" else float(v)) for k, v in row.items()} for row in rows]


def stats_line(label, values):
    return (f"{label}: mean {values.mean():.4f}  variance {values.var():.4f}  "
            f"max {values.max():.4f}  min {values.min():.4f}  median {np.median(values):.4f}")


def summary_lines(rows, variants=(Variant(),)):
    """The evaluation's closing report.

    Subjects whose metrics are not finite (an empty brain mask: NaN) are
    named and left out of every statistic.

    Args:
        rows: list of per-subject dicts (floats), as :meth:`MetricsFile.rows`.
        variants: the evaluation's variants; with more than one, a line each.

    Returns:
        list of str.
    """
    finite = [bool(np.isfinite(r["psnr"]) and np.isfinite(r["ssim"])) for r in rows]
    usable = [r for r, ok in zip(rows, finite) if ok]
    left_out = [r["subject"] for r, ok in zip(rows, finite) if not ok]
    lines = []
    if left_out:
        lines.append(f"left out of the summary, metrics not finite (empty brain mask): "
                     f"{len(left_out)} subject(s): " + ", ".join(left_out[:10])
                     + (" ..." if len(left_out) > 10 else ""))
    if not usable:
        lines.append("no subject with finite metrics to summarise")
        return lines

    lines += comparison_table(usable, variants)
    lines.append("SR by the original's rule, over the subjects:")
    for key, label in (("psnr", "PSNR"), ("ssim", "SSIM")):
        lines.append(stats_line(label, np.array([r[key] for r in usable], dtype=np.float64)))
    return lines


def comparison_table(rows, variants=(Variant(),)):
    """The summary's first lines: one row per method, the fair metrics first.

    Rows: each SR variant (the one written as ``_sr`` marked ``*``), then
    tricubic, trilinear and nearest; columns: mean PSNR and SSIM with one data
    range for every method (the reference's), then the same by the original's
    rule (each pair's own range), which flatters an estimate that overshoots,
    then the mean bias (signed error inside the mask) in % of the reference's range.

    Args:
        rows: per-subject dicts with finite metrics.
        variants: the evaluation's variants.

    Returns:
        list of str.
    """
    def mean(key):
        return float(np.mean([r[key] for r in rows]))

    def bias(suffix):
        # Rows of an earlier version's metrics.csv have no bias.
        values = [r.get(f"bias{suffix}_fair", math.nan) for r in rows]
        return f"{np.mean(values):+9.2f}" if all(np.isfinite(values)) else f"{'-':>9}"

    entries = [(f"SR {v.label}" + (" *" if v == variants[-1] and len(variants) > 1 else "") if len(variants) > 1
                else "SR", "" if v == variants[-1] else f"_{v.key}") for v in variants]
    entries += [(method, f"_{method}") for method in ("tricubic", "trilinear", "nearest")]
    lines = [f"{len(rows)} subject(s), mean PSNR (dB) and SSIM; fair: one data range for every method "
             "(the reference's max - min); original: each pair's own range",
             f"  {'method':<20} {'PSNR':>8} {'SSIM':>7}  | original {'PSNR':>8} {'SSIM':>7}  | bias (% of range)"]
    for label, suffix in entries:
        lines.append(f"  {label:<20} {mean(f'psnr{suffix}_fair'):8.4f} {mean(f'ssim{suffix}_fair'):7.4f}"
                     f"  |          {mean(f'psnr{suffix}'):8.4f} {mean(f'ssim{suffix}'):7.4f}  | {bias(suffix)}")
    if len(variants) > 1:
        lines.append("  (* written as _sr)")
    return lines
