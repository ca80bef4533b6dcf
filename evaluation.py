"""Evaluation: super-resolve each test volume from its degraded copy, compare with interpolation, write it all."""

import dataclasses
import os
import sys
import time

import numpy as np
from tqdm import tqdm

import degradation
import durable
import folders
import inference
import layouts
import metrics as metrics_lib
import nifti_io
import outputs as outputs_lib
import report
import report_figures
import run_records
import scans
import splits
import train_dataset as td
import utils
from errors import UserError
from training_loop import stop_between
from version import program


def evaluation_settings(cfg, checkpoint, variants):
    """What an evaluation's rows depend on: metrics.json, beside metrics.csv.

    Returns:
        dict str -> str; ``program`` and ``checkpoint`` (its path) inform,
        the others must match for a later run to resume the file.
    """
    return {
        "program": program(),
        "checkpoint": f"{checkpoint['path']} (step {checkpoint['step']})",
        "checkpoint_sha256": checkpoint["sha256"],
        "data_path": os.path.abspath(cfg.data_path),
        "bids_filter": cfg.bids_filter or "none",
        "upsampling_factor": cfg.upsampling_factor.text,
        "sigma": str(float(cfg.sigma)),
        "slice_profile": cfg.slice_profile,
        "volume_shape": ",".join(map(str, cfg.volume_shape)),
        "blend": cfg.blend,
        "tta": cfg.tta,
        "sr": variants[-1].label,
    }


def mosaic(subject, row, lr_nearest, tricubic, srs, hr):
    """The subject's slice mosaic: LR, tricubic, each SR variant, HR; titled, SR's and tricubic's metrics on top.

    The header gives the fair PSNR/SSIM (one data range for every method) of
    the SR written as ``_sr`` and of tricubic interpolation, side by side.
    """
    if len(srs) == 1:
        titles = ["SR"]
    else:
        titles = [f"SR {v.label}" for v in srs]
    return utils.slices_mosaic([lr_nearest, tricubic, *srs.values(), hr],
                               titles=["LR", "tricubic", *titles, "HR"], header=mosaic_header(subject, row))


def mosaic_header(subject, row):
    """The mosaic's header line: the subject, then SR's and tricubic's fair PSNR/SSIM side by side."""
    if not np.isfinite(row["psnr"]):
        return f"{subject.name}  empty brain mask: no PSNR/SSIM"
    return (f"{subject.name}  SR PSNR {row['psnr_fair']:.2f} dB SSIM {row['ssim_fair']:.4f} | tricubic PSNR "
            f"{row['psnr_tricubic_fair']:.2f} dB SSIM {row['ssim_tricubic_fair']:.4f} (one data range)")


@dataclasses.dataclass(frozen=True)
class Reference:
    """A subject's reference and the network's input, as evaluation and validation compare them.

    Attributes:
        image: the source volume as read; ``affine``, ``header``: its NIfTI geometry.
        hr: float32 (x, y, z), the canonical reference (``cfg.volume_shape``), source intensities.
        grid: ``td.to_canonical``'s grid, to put a canonical volume back on the source's.
        mask: bool (x, y, z), the canonical brain mask.
        lr_n: float32 (x/fx, y/fy, z/fz) in [-1, 1], the normalised reference blurred and decimated.
        nf: float, the normalisation factor (``utils.normalize``).
    """

    image: np.ndarray
    affine: np.ndarray
    header: object
    hr: np.ndarray
    grid: object
    mask: np.ndarray
    lr_n: np.ndarray
    nf: float


def interpolation_baselines(lr, cfg, hr_shape):
    """Nearest, trilinear and tricubic interpolation of ``lr`` read where its voxels lie (the profile's).

    Returns:
        dict method -> float32 ``hr_shape``.
    """
    return {method: utils.upsample_baseline(lr, cfg.upsampling_factor, order, hr_shape, cfg.slice_profile)
            for method, order in (("nearest", 0), ("trilinear", 1), ("tricubic", 3))}


def degradation_text(cfg):
    """How a description says the degradation: ``blurred (sigma 1.0 voxels) and decimated by 4``."""
    if cfg.slice_profile == "box":
        return (f"averaged over slabs of {cfg.upsampling_factor.text} voxels (box slice profile; each LR "
                "voxel lies at its slab's centre)")
    return f"blurred (sigma {cfg.sigma} voxels) and decimated by {cfg.upsampling_factor.text}"


def degradation_sidecar(cfg):
    """The degradation's sidecar fields: ``UpsamplingFactor``, ``SliceProfile`` and (gaussian) ``Sigma``."""
    out = {"UpsamplingFactor": cfg.upsampling_factor.value, "SliceProfile": cfg.slice_profile}
    if cfg.slice_profile == "gaussian":
        out["Sigma"] = float(cfg.sigma)
    return out


def load_reference(subject, cfg, log):
    """Reads a subject and degrades it as training does (``cfg.upsampling_factor``, ``cfg.slice_profile``, ``cfg.sigma``).

    Returns:
        a :class:`Reference`.

    Raises:
        nifti_io.DataError: the subject cannot be used (unreadable, too small, bad mask).
        nifti_io.PipelineError: the data folder has disappeared.
    """
    image, affine, header = nifti_io.load_volume(subject.image_path, log=log,
                                                 max_voxels=nifti_io.max_voxels_for(cfg.volume_shape))
    nifti_io.check_intensity(image, subject.image_path)
    too_small = nifti_io.size_problem(image.shape, cfg.patch_shape, cfg.upsampling_factor)
    if too_small:
        raise nifti_io.DataError(f"{subject.image_path}: {too_small}")
    mask = nifti_io.load_mask(subject, image, log=log)
    hr, grid = td.to_canonical(image, cfg.volume_shape)
    mask_c, _ = td.to_canonical(mask.astype(np.float32), cfg.volume_shape)
    hr_n, nf = utils.normalize(hr)
    lr_n = np.asarray(degradation.degrade(hr_n, cfg.upsampling_factor, cfg.sigma, cfg.slice_profile))
    return Reference(image, affine, header, hr, grid, mask_c.astype(bool), lr_n, nf)


def evaluate_subject(scan, cfg, predict, variants, outputs, provenance, log):
    """Evaluates one subject and writes its outputs; returns its metrics row (None: skipped).

    The volumes, mosaic and sidecars are written before the row is returned,
    so a subject with a row in metrics.csv has all its outputs.

    Raises:
        nifti_io.PipelineError: the data folder has disappeared.
        durable.OutputError: an output could not be written.
    """
    subject, f = scan.subject, cfg.upsampling_factor
    try:
        ref = load_reference(subject, cfg, log)
    except nifti_io.PipelineError:
        raise
    except nifti_io.DataError as err:
        log(f"skipping {subject.name}: {err}")
        return None
    affine, header, hr, grid, mask_c, lr_n, nf = (ref.affine, ref.header, ref.hr, ref.grid, ref.mask,
                                                 ref.lr_n, ref.nf)
    # to_canonical pads/crops without reordering axes: the source's left-right axis.
    flip_axis = utils.left_right_axis(affine) if any(v.flip for v in variants) else None
    estimates = inference.super_resolve_variants(predict, lr_n, f, cfg.patch_shape, cfg.patch_margin,
                                                 cfg.batch_size, variants, flip_axis, cfg.slice_profile)
    srs = {v: utils.denormalize(estimates[v], nf) for v in variants}
    sr = srs[variants[-1]]
    lr = utils.denormalize(lr_n, nf)
    baselines = interpolation_baselines(lr, cfg, hr.shape)
    others = {v.key: srs[v] for v in variants[:-1]}
    row = {"subject": subject.name, **metrics_lib.subject_metrics(hr, {"sr": sr, **baselines, **others}, mask_c)}
    if not mask_c.any():
        log(f"{subject.name}: its brain mask is empty inside the canonical volume: metrics NaN, "
            "left out of the summary")

    source = outputs.source(scan)
    sr_sidecar = {"Description": f"super-resolved x{f.text} from the _lr volume "
                                  f"({variants[-1].label})",
                  "Sources": [source], **provenance, **degradation_sidecar(cfg),
                  "Metrics": {k: v for k, v in row.items() if k != "subject"}}
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    outputs.write_volume(subject, "sr", td.from_canonical(sr, grid), affine, header, sidecar=sr_sidecar)
    outputs.write_volume(subject, "hr", td.from_canonical(hr, grid), affine, header, sidecar={
        "Description": "the reference: the source image on its own grid, zero outside the canonical "
                       f"{'x'.join(map(str, cfg.volume_shape))} region", "Sources": [source]})
    lr_affine = td.canonical_affine(affine, grid) @ utils.lr_grid_affine(f, cfg.slice_profile)
    outputs.write_volume(subject, "lr", lr, lr_affine, header, zooms=zooms * np.asarray(f.axes), sidecar={
        "Description": f"the network's input: the canonical reference {degradation_text(cfg)}",
        "Sources": [source], **degradation_sidecar(cfg)})
    outputs.write_slices(subject, mosaic(subject, row, baselines["nearest"], baselines["tricubic"], srs, hr))
    outputs.write_figure(subject, report_figures.evaluation_figure(hr, baselines["nearest"], baselines["tricubic"],
                                                                   sr, mask_c, zooms))
    return row


def evaluate(cfg, checkpoint_dir, log=print, explicit=frozenset()):
    """Evaluates a checkpoint on the test subjects (SPEC section 4, patch-stitched).

    Writes to ``cfg.path_volumes`` per subject the SR, reference and LR
    volumes, a slice mosaic and the report's figure (plain or BIDS-derivatives
    names, see ``outputs.PlainOutputs``, ``outputs.BidsOutputs``), and
    ``metrics.csv``, one row appended as each subject ends; at the end
    ``report.html`` from the whole metrics.csv. A folder whose metrics.csv was written with
    the same settings is resumed: the subjects it holds are skipped. With
    -blend/-tta, every variant of ``inference.inference_variants`` is measured and
    the last is written.

    Returns:
        list of per-subject dicts (every row of metrics.csv, numbers as floats).

    Raises:
        UserError: unusable checkpoint, data or output folder; metrics.csv of
            an evaluation with other settings; no subject could be evaluated.
        durable.LockedError: another run writes into the folder.
        durable.OutputError: an output could not be written.
    """
    out_dir = cfg.path_volumes
    layout = layouts.detect_layout(cfg.data_path, cfg.image_name)
    root = scans.data_root(cfg.data_path, layout)
    bids_filter = scans.bids_filter_for(cfg, cfg.data_path, explicit, log)
    subjects = splits.evaluation_subjects(cfg, checkpoint_dir, bids_filter, log)
    if not subjects:
        raise UserError(f"no test subject to evaluate in {cfg.data_path!r}")
    inputs = [scans.InputScan(s, root, layout == "bids") for s in subjects]
    folders.check_output_folder(out_dir, [(root, layout)])
    with durable.RunLock(out_dir, "evaluation"):
        durable.remove_stale_temporaries(out_dir)
        return evaluate_locked(cfg, checkpoint_dir, inputs, log)


def evaluate_locked(cfg, checkpoint_dir, inputs, log):
    """:func:`evaluate` once the output folder is locked."""
    variants = inference.inference_variants(cfg.blend, cfg.tta)
    # Read first: the checkpoint chosen is the one the settings, sidecars and rows name.
    predict, checkpoint = inference.restored_predictor(cfg, checkpoint_dir, log)
    outputs = outputs_lib.make_outputs(outputs_lib.output_scheme(cfg.output_layout, inputs),
                                       cfg.path_volumes, cfg.upsampling_factor)
    metrics = metrics_lib.MetricsFile(os.path.join(outputs.folder, outputs_lib.METRICS_NAME),
                                      metrics_lib.metric_columns(variants),
                                      evaluation_settings(cfg, checkpoint, variants))
    outputs.check_unique(inputs)
    outputs_lib.check_resumable_layout(outputs)
    done = metrics.done()
    todo = [s for s in inputs if s.subject.name not in done]
    log(f"evaluation: {len(inputs)} subject(s), {outputs.scheme} outputs in {outputs.folder}; "
        f"SR variants: {', '.join(v.label for v in variants)} (written: {variants[-1].label})")
    if len(todo) < len(inputs):
        log(f"resuming: {len(inputs) - len(todo)} of {len(inputs)} subject(s) already in "
            f"{metrics.path} are skipped")
    if todo:
        outputs.start(outputs_lib.generated_by(cfg, checkpoint), inputs)
        if not done:
            folders.overwrite_note([outputs.path(s.subject, "sr") for s in todo], log)
        provenance = outputs_lib.provenance(cfg, checkpoint)
        # SIGTERM/SIGUSR1: the subject under way is finished, then the run stops (128 + N).
        def stopped(n, total):
            return (f"after {n} of {total} subject(s): their rows are in {metrics.path}. Run the same "
                    f"evaluation again to do the other {total - n} (the finished ones are skipped)")
        bar = tqdm(todo, desc="evaluate", unit="volume", file=sys.stderr, dynamic_ncols=True)
        for scan in stop_between(bar, stopped):
            start = time.time()
            row = evaluate_subject(scan, cfg, predict, variants, outputs, provenance, log)
            if row is None:
                continue
            metrics.append(row)
            tqdm.write(f"{row['subject']}: SR PSNR {row['psnr_fair']:.4f} SSIM {row['ssim_fair']:.4f}, "
                       f"tricubic {row['psnr_tricubic_fair']:.4f} / {row['ssim_tricubic_fair']:.4f} "
                       f"(one data range) {time.time() - start:.1f} s", file=sys.stderr)
    rows = metrics.rows() if os.path.exists(metrics.path) else []
    if not rows:
        raise UserError("no test subject could be evaluated; see the messages above")
    for line in metrics_lib.summary_lines(rows, variants):
        log(line)
    log(f"volumes, slices PNGs and {outputs_lib.METRICS_NAME} written to {outputs.folder}")
    log(f"report: {write_report(cfg, checkpoint_dir, checkpoint, metrics, rows, variants, inputs, outputs, log)}")
    return rows


def write_report(cfg, checkpoint_dir, checkpoint, metrics, rows, variants, inputs, outputs, log):
    """Writes report.html from the whole metrics.csv and records the evaluation in the checkpoint folder.

    The record (``run_records.write_evaluation_record``) lets -export find
    these results wherever -path_volumes put them; a -model file has no
    folder to record in.

    Returns:
        str, the report's path.

    Raises:
        durable.OutputError: the report could not be written.
    """
    columns, _ = durable.read_csv_rows(metrics.path)
    figures = {s.subject.name: (outputs.figure_path(s.subject), outputs.slices_path(s.subject)) for s in inputs}
    path = report.write(os.path.join(outputs.folder, outputs_lib.REPORT_NAME), report.evaluation_page(
        cfg, checkpoint_dir, checkpoint, metrics.settings, rows, variants, columns, figures))
    if report.model_path(checkpoint_dir) is None:
        run_records.write_evaluation_record(checkpoint_dir, metrics.path, path, checkpoint["sha256"], log)
    return path

