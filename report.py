"""report.html: the one page a person opens after -evaluate or -super_resolve, offline and self-contained.

An evaluation's page shows what was evaluated, the fair summary (SR against
nearest, trilinear and tricubic interpolation), the original rule's numbers,
each subject's metrics and figure, the training run's curves when the
checkpoint's folder has them and the model card of a ``-model`` file. A
-super_resolve page shows its inputs, outputs and a figure per scan.

The page is built with the standard library: every string that comes from
the user or the data (subject names, paths) is escaped (``html.escape``),
pictures are PNG data URIs, there is no script and no remote resource, so it
opens from disk, offline, also after the folder is copied elsewhere. The
numbers come from metrics.csv's columns by name (:data:`MEASURES`), so it is
rewritten from the whole file at the end of a resumed evaluation.
"""

import base64
import dataclasses
import datetime
import html
import math
import os

import numpy as np

import durable
import model_file
import report_figures
import run_records
import utils
import version

# The written SR against the baselines, as metrics.csv names them (metrics.METHODS).
BASELINES = ("tricubic", "trilinear", "nearest")


@dataclasses.dataclass(frozen=True)
class Measure:
    """A metric the tables show, found in metrics.csv by its column prefix.

    ``psnr`` reads ``psnr`` (the SR written as ``_sr``), ``psnr_tricubic``,
    ``psnr_sr_crop`` (another variant), each with ``_fair`` for one data
    range for every method.

    Attributes:
        prefix: the column prefix.
        heading: the table heading.
        decimals: digits shown.
        higher_is_better: whether SR "wins" a subject with a higher value
            (None: no winner is counted, e.g. a signed error).
    """

    prefix: str
    heading: str
    decimals: int
    higher_is_better: "bool | None" = True


# What the tables show; a metric metrics.csv gains is shown by adding it here.
MEASURES = (Measure("psnr", "PSNR (dB)", 2), Measure("ssim", "SSIM", 4))
# Columns starting with this prefix (the mean signed error per method: ``bias_fair`` in % of the
# reference's range, shown in the fair table) are shown when present.
BIAS = Measure("bias", "bias (% of range)", 2, None)


class Html(str):
    """A piece of HTML built here: :func:`element` and :func:`table` insert it as it is, not escaped."""


def escape(value):
    """``value`` as HTML text: escaped (quotes included) unless it is :class:`Html` already."""
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def element(tag, *children, **attributes):
    """``<tag attributes>children</tag>``; children and attribute values are escaped.

    Attribute names ending in ``_`` lose it (``class_``); ``data_x`` becomes ``data-x``.
    """
    attrs = "".join(f' {name.rstrip("_").replace("_", "-")}="{escape(value)}"'
                    for name, value in attributes.items() if value is not None)
    return Html(f"<{tag}{attrs}>" + "".join(escape(c) for c in children) + f"</{tag}>")


def table(header, rows, row_classes=None):
    """An HTML table: ``header`` cells, then rows of cells (str, :class:`Html` or a ``td`` element).

    Args:
        row_classes: optional CSS class per row (None: none).
    """
    def cells(row, tag):
        return Html("".join(c if isinstance(c, Html) and c.startswith(("<td", "<th")) else element(tag, c)
                            for c in row))
    classes = row_classes or [None] * len(rows)
    head = element("thead", element("tr", cells(header, "th")))
    body = element("tbody", Html("".join(element("tr", cells(row, "td"), class_=c)
                                         for row, c in zip(rows, classes))))
    return element("table", head, body)


def facts(pairs):
    """A two-column table of (what, value) pairs, for the page's first section."""
    return element("table", Html("".join(f"<tr>{element('th', k)}{element('td', v)}</tr>" for k, v in pairs)),
                   class_="facts")


def image(png, alt):
    """An ``<img>`` holding ``png`` (bytes) as a data URI: the page needs no other file."""
    return Html(f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
                f'alt="{escape(alt)}">')


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1250px; padding: 0 1em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
table.facts th { text-align: left; width: 14em; } table.facts td { text-align: left; word-break: break-all; }
tr.sr td { font-weight: 600; } img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
p.note, figcaption { color: #555; font-size: 0.9em; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def page(title, parts):
    """The whole document: one inline style sheet, no script, nothing fetched."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"{element('h1', title)}\n" + "\n".join(parts) + "\n</body>\n</html>\n")


def write(path, document):
    """Writes a page durably; returns its path.

    Raises:
        durable.OutputError: it could not be written.
    """
    durable.write_text(path, document)
    return path


# --------------------------------------------------------------------------- #
# The numbers: metrics.csv's columns by name
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Method:
    """A row of the summary: its label, its metrics.csv column suffix, whether it is the SR written."""

    label: str
    suffix: str
    written: bool = False


def methods(variants):
    """The summary's rows: each SR variant (the one written as ``_sr`` last), then the baselines."""
    several = len(variants) > 1
    rows = [Method(f"SR {v.label}" + (" (written as _sr)" if v == variants[-1] else "") if several else "SR",
                   "" if v == variants[-1] else f"_{v.key}", v == variants[-1]) for v in variants]
    return rows + [Method(name, f"_{name}") for name in BASELINES]


def measures(columns):
    """The measures a table shows: :data:`MEASURES`, and :data:`BIAS` when metrics.csv has such columns."""
    return MEASURES + ((BIAS,) if any(c.startswith(BIAS.prefix) for c in columns) else ())


def column(measure, method, fair, columns):
    """The metrics.csv column of a measure for a method (None: the file has none).

    ``fair``: the ``_fair`` column (one data range for every method); a
    measure without one (a signed error does not depend on the range) reads its plain column.
    """
    plain = f"{measure.prefix}{method.suffix}"
    for name in ((plain + "_fair", plain) if fair else (plain,)):
        if name in columns:
            return name
    return None


def usable(rows):
    """The rows with finite metrics (an empty mask gives NaN), as the printed summary keeps them."""
    return [r for r in rows if math.isfinite(r.get("psnr", math.nan)) and math.isfinite(r.get("ssim", math.nan))]


def mean_sd(values, decimals):
    """``"27.31 ± 0.35"`` (mean ± sample sd; the mean alone for one value)."""
    values = np.asarray(values, dtype=np.float64)
    text = f"{values.mean():.{decimals}f}"
    return text + (f" ± {values.std(ddof=1):.{decimals}f}" if values.size > 1 else "")


def summary_table(rows, variants, columns, fair):
    """The summary: a row per method, mean ± sd per measure, and the subjects SR wins against each.

    Each number cell carries its metrics.csv column (``data-column``), so
    the page can be checked against the file.
    """
    shown = measures(columns) if fair else MEASURES
    ranked = [m for m in shown if m.higher_is_better is not None]
    sr = next(m for m in methods(variants) if m.written)
    header = ["method", *(m.heading for m in shown), *(f"subjects SR wins: {m.heading}" for m in ranked)]
    body = []
    for method in methods(variants):
        cells = [method.label]
        for measure in shown:
            name = column(measure, method, fair, columns)
            cells.append(element("td", mean_sd([r[name] for r in rows], measure.decimals), data_column=name)
                         if name else "—")
        for measure in ranked:
            mine, theirs = column(measure, sr, fair, columns), column(measure, method, fair, columns)
            wins = sum(r[mine] > r[theirs] for r in rows) if mine and theirs and not method.written else None
            cells.append("—" if wins is None else f"{wins} of {len(rows)}")
        body.append(cells)
    return table(header, body, ["sr" if m.written else None for m in methods(variants)])


def subject_table(row, variants, columns):
    """One subject's metrics: a row per method, the fair measures then the original's."""
    fair, original = measures(columns), MEASURES
    header = ["method", *(f"{m.heading}, fair" if m in MEASURES else m.heading for m in fair),
              *(f"{m.heading}, original" for m in original)]
    body = []
    for method in methods(variants):
        names = [column(m, method, True, columns) for m in fair] + [column(m, method, False, columns)
                                                                    for m in original]
        decimals = [m.decimals for m in fair + original]
        body.append([method.label] + [element("td", f"{row[n]:.{d}f}", data_column=n) if n else "—"
                                      for n, d in zip(names, decimals)])
    return table(header, body)


# --------------------------------------------------------------------------- #
# The evaluation's page
# --------------------------------------------------------------------------- #


def model_path(source):
    """The -model file an inference run used (None: a checkpoint folder)."""
    return source if model_file.is_model_file(source) else None


def trained_checkpoint(source, checkpoint):
    """The path of the checkpoint the generator comes from: a model file's records the one it was exported from."""
    if model_path(source):
        return model_file.read_metadata(source).get("checkpoint", {}).get("path")
    return checkpoint["path"]


def source_facts(source, checkpoint):
    """What the generator came from: the checkpoint, or the model file and its checkpoint."""
    step = f"(step {checkpoint['step']})"
    if model_path(source):
        return [("model file", os.path.abspath(source)),
                ("exported from", f"{trained_checkpoint(source, checkpoint)} {step}")]
    return [("checkpoint", f"{checkpoint['path']} {step}")]


def evaluated_facts(cfg, source, checkpoint, settings, rows):
    """The (what, value) pairs of an evaluation's first section."""
    f = settings.get("upsampling_factor")
    source = source_facts(source, checkpoint)
    subjects = [r["subject"] for r in rows]
    return source + [
        ("checkpoint sha256", f"{checkpoint['sha256']} (of its .index file)"),
        ("upsampling", f"x{f}, {cfg.upsampling_mode}"),
        ("degradation", f"{model_file.degradation_text(settings, f)} along the upsampled axes, as in training"),
        ("inference", f"-blend {cfg.blend}, -tta {cfg.tta}; written as _sr: {settings.get('sr')}"),
        ("canonical volume", settings.get("volume_shape", "").replace(",", "×")),
        ("data", settings.get("data_path", cfg.data_path)
         + ("" if settings.get("bids_filter", "none") == "none" else f" (-bids_filter {settings['bids_filter']})")),
        (f"test subjects ({len(subjects)})", ", ".join(subjects)),
        ("program", versions()),
        ("written", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
    ]


def versions():
    """The program's, TensorFlow's and Keras's versions, as -version prints them."""
    return version.versions_line()


def summary_section(rows, variants, columns):
    """The fair table, the original rule's table, and what they mean."""
    scored = usable(rows)
    left_out = [r["subject"] for r in rows if r not in scored]
    if not scored:
        return element("p", "No subject has finite metrics (empty brain masks).", class_="note")
    parts = [element("h2", "Summary"),
             element("p", f"{len(scored)} subject(s). PSNR and SSIM inside the brain mask, with one data "
                          "range for every method (the reference's max − min): the fair comparison. Mean ± "
                          "sample standard deviation over the subjects; \"wins\" counts the subjects where "
                          "the written SR scores higher than that method."),
             summary_table(scored, variants, columns, fair=True),
             element("h3", "By the original's rule"),
             element("p", "Each pair's own data range (max − min of both volumes), as the original code "
                          "scored: an estimate that overshoots enlarges its own range and so its PSNR. "
                          "Shown for comparison with the paper; the table above is the fair one.",
                     class_="note"),
             summary_table(scored, variants, columns, fair=False)]
    if left_out:
        parts.append(element("p", f"Left out (empty brain mask, metrics NaN): {', '.join(left_out)}",
                             class_="note"))
    return Html("\n".join(parts))


def subjects_section(rows, variants, columns, figures):
    """One block per subject: its metrics and its figure (or the slice mosaic of an earlier version)."""
    parts = [element("h2", "Subjects"),
             element("p", "Per subject: its metrics, then the sagittal, coronal and axial mid-planes of the "
                          "reference (HR), the network's input (LR, nearest-upsampled), tricubic "
                          "interpolation and the SR on one grey scale, and the absolute errors of tricubic "
                          "and SR inside the brain mask on one shared colour scale.", class_="note")]
    for i, row in enumerate(rows):
        parts.append(element("h3", row["subject"], id=f"subject-{i + 1}"))
        if not math.isfinite(row.get("psnr", math.nan)):
            parts.append(element("p", "Empty brain mask inside the canonical volume: no metrics.", class_="note"))
        else:
            parts.append(subject_table(row, variants, columns))
        parts.append(subject_picture(row["subject"], figures.get(row["subject"], ())))
    return Html("\n".join(parts))


def subject_picture(name, paths):
    """The first of ``paths`` (figure, then mosaic) that exists, embedded; a note when none does."""
    for path in paths:
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                return image(fh.read(), f"{name}: mid-planes")
    return element("p", "No figure (evaluated by an earlier version).", class_="note")


def run_section(checkpoint_path):
    """The training run's curves, when the checkpoint's folder has losses.csv or validation.csv."""
    folder = run_records.run_folder(checkpoint_path)
    parts = [element("h2", "The training run")]
    if folder is None:
        parts.append(element("p", f"No {run_records.LOSSES_NAME} or {run_records.VALIDATION_NAME} beside "
                                  "the checkpoint (runs of earlier versions kept their losses in TensorBoard "
                                  "only).", class_="note"))
        return Html("\n".join(parts))
    losses = run_records.read_numbers(os.path.join(folder, run_records.LOSSES_NAME), "epoch")
    validations = run_records.read_numbers(os.path.join(folder, run_records.VALIDATION_NAME), "step")
    png = report_figures.curves_figure(losses, validations)
    parts.append(element("p", f"From {folder}: the mean losses of each epoch ({run_records.LOSSES_NAME}, "
                              f"{len(losses)} epoch(s))" + (f" and the validation fair PSNR of each validated "
                                                            f"step ({run_records.VALIDATION_NAME}, "
                                                            f"{len(validations)} validation(s))"
                                                            if validations else "") + "."))
    if png is not None:
        parts.append(image(png, "training curves"))
    scored = [r for r in validations if math.isfinite(r.get("psnr_fair", math.nan))]
    if scored:
        best = max(scored, key=lambda r: r["psnr_fair"])
        parts.append(element("p", f"Best validation: step {best['step']:.0f}, PSNR {best['psnr_fair']:.2f} dB, "
                                  f"SSIM {best.get('ssim_fair', math.nan):.4f}; "
                                  f"its checkpoint is in {os.path.join(folder, 'best')}."))
    return Html("\n".join(parts))


def model_card_section(model_path):
    """The model card stored in a -model file."""
    card = model_file.read_metadata(model_path).get("model_card", "")
    return Html(element("h2", "Model card") + "\n" + element("pre", card))


def evaluation_page(cfg, source, checkpoint, settings, rows, variants, columns, figures):
    """The evaluation's report.html.

    Args:
        cfg: the run's ``config.Settings``.
        source: the checkpoint folder or -model file evaluated.
        checkpoint: the identity ``inference.restored_predictor`` returns (path, step, sha256).
        settings: metrics.json's settings (``evaluation.evaluation_settings``).
        rows: every row of metrics.csv (``metrics.MetricsFile.rows``).
        variants: the evaluation's ``inference.Variant`` list.
        columns: metrics.csv's columns.
        figures: dict subject name -> paths of its figure and its slice mosaic.

    Returns:
        str, the HTML document.
    """
    parts = [element("h2", "What was evaluated"), facts(evaluated_facts(cfg, source, checkpoint, settings, rows)),
             element("p", Html(f'The numbers below are the means of {element("a", "metrics.csv", href="metrics.csv")}'
                               ' (one row per subject).'), class_="note"),
             summary_section(rows, variants, columns),
             subjects_section(rows, variants, columns, figures),
             run_section(trained_checkpoint(source, checkpoint))]
    if model_path(source):
        parts.append(model_card_section(source))
    f = settings.get("upsampling_factor")
    return page(f"{version.PROGRAM_NAME}: evaluation of a x{f} model, {len(rows)} subject(s)", parts)


# --------------------------------------------------------------------------- #
# The -super_resolve page
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class ScanResult:
    """What the -super_resolve page says of one scan.

    Attributes:
        source, output: the input file and the SR written.
        source_shape, output_shape: their voxel grids.
        source_zooms, output_zooms: their voxel sizes (mm).
        figure: PNG bytes (``report_figures.super_resolution_figure``).
    """

    source: str
    output: str
    source_shape: tuple
    output_shape: tuple
    source_zooms: tuple
    output_zooms: tuple
    figure: bytes


def grid_text(shape, zooms):
    """``"64×64×48, 1×1×1.2 mm"``."""
    return "×".join(map(str, shape)) + ", " + "×".join(f"{z:g}" for z in zooms) + " mm"


def super_resolution_page(cfg, source, checkpoint, results, skipped, folder):
    """The -super_resolve report.html: what ran, the inputs and outputs, a figure per scan.

    Args:
        cfg: the run's ``config.Settings``.
        source: the checkpoint folder or -model file used.
        checkpoint: the identity ``inference.restored_predictor`` returns.
        results: :class:`ScanResult` list, in input order.
        skipped: list of (input path, reason).
        folder: the output folder (outputs are linked relative to it).

    Returns:
        str, the HTML document.
    """
    f = cfg.upsampling_factor.text
    parts = [element("h2", "What was super-resolved"), facts([
        *source_facts(source, checkpoint), ("checkpoint sha256", f"{checkpoint['sha256']} (of its .index file)"),
        ("upsampling", f"x{f}, {cfg.upsampling_mode}; the scans as they are (no degradation)"),
        ("inference", f"-blend {cfg.blend}, -tta {cfg.tta}"),
        ("program", versions()),
        ("written", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))]),
        element("h2", "Scans"),
        table(["input", "input grid", "output", "output grid"],
              [[r.source, grid_text(r.source_shape, r.source_zooms),
                element("td", element("a", os.path.relpath(r.output, folder),
                                      href=os.path.relpath(r.output, folder).replace(os.sep, "/"))),
                grid_text(r.output_shape, r.output_zooms)] for r in results])]
    if skipped:
        parts += [element("h3", f"Skipped ({len(skipped)})"), table(["input", "reason"], skipped)]
    for r in results:
        parts += [element("h3", os.path.basename(r.source)),
                  element("p", "Mid-planes of the input (nearest-upsampled onto the SR grid) and of the SR, "
                               "on one grey scale.", class_="note"),
                  image(r.figure, f"{os.path.basename(r.source)}: input and SR")]
    if model_path(source):
        parts.append(model_card_section(source))
    return page(f"{version.PROGRAM_NAME}: super-resolution x{f}, {len(results)} scan(s)", parts)
