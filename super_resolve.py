"""-super_resolve: super-resolve low-resolution scans as they are (no degradation) onto a finer grid."""

import os
import sys

import numpy as np
from tqdm import tqdm

import durable
import factors
import folders
import inference
import layouts
import nifti_io
import outputs as outputs_lib
import report
import report_figures
import scans
import utils
from errors import EXIT_PARTIAL, RunStopped, UserError

# Output voxel sizes further apart than this ratio get a warning: the scan's
# voxel sizes do not fit the model's per-axis factors.
ANISOTROPY_WARNING = 1.3


def check_scan_fits_factors(path, zooms, upsampling_factor, log):
    """Matches a scan's voxel sizes against a model's per-axis factors.

    A thick-slice model (e.g. 1,1,4) upsamples one voxel axis: the scan's
    slice axis (its largest voxel size) must be one the model upsamples, and
    the output voxels should come out about isotropic. Isotropic models are
    not checked (they super-resolve any scan, as the original).

    Args:
        path: the scan, for messages.
        zooms: (3,) voxel sizes of its voxel axes (mm).
        upsampling_factor: the model's factor.
        log: callable for the warning.

    Raises:
        nifti_io.DataError: the scan's slice axis is one the model does not upsample.
    """
    factor = factors.UpsamplingFactor.of(upsampling_factor)
    if factor.isotropic:
        return
    zooms = np.asarray(zooms, dtype=np.float64)
    sizes, model = "x".join(f"{z:g}" for z in zooms), factor.text
    thick = int(np.argmax(zooms))
    if zooms[thick] > 1.01 * zooms.min() and factor.axes[thick] == 1:
        raise nifti_io.DataError(
            f"{path}: its thickest voxel axis is axis {thick} ({sizes} mm), but the model upsamples "
            f"{model} (axis {thick} not at all); reorient the scan so its slice axis is one the model "
            "upsamples, or use a model trained for it")
    out = zooms / np.asarray(factor.axes)
    if out.max() > ANISOTROPY_WARNING * out.min():
        log(f"warning: {path} has voxels of {sizes} mm; the model's factors {model} make them "
            f"{'x'.join(f'{z:g}' for z in out)} mm, not isotropic: its voxel-size ratio does not fit "
            "the model's")


def output_affine(affine, upsampling_factor, slice_profile):
    """The affine of a scan's super-resolved volume: its thin voxels inside the scan's own voxels.

    Output voxel ``j`` of an upsampled axis lies at input voxel ``(j − o) / f``,
    ``o`` the profile's origin (``utils.lr_grid_affine``): ``j / f`` for
    ``gaussian`` (the point-sample convention), ``(j − (f − 1)/2) / f`` for
    ``box`` (the f thin slices fill the thick slice's slab), so the output
    overlays the input in a viewer and, for ``box``, covers the same extent.

    Args:
        affine: float (4, 4), the input scan's voxel-to-world affine.
        upsampling_factor: the model's factor.
        slice_profile: the model's ``"gaussian"`` or ``"box"``.

    Returns:
        float64 (4, 4).
    """
    return np.asarray(affine, dtype=np.float64) @ np.linalg.inv(utils.lr_grid_affine(upsampling_factor,
                                                                                      slice_profile))


def super_resolve_scan(scan, cfg, predict, outputs, provenance, log):
    """Super-resolves one scan as it is and writes it with its sidecar.

    Returns:
        a ``report.ScanResult`` (the paths, grids and the report's figure).

    Raises:
        nifti_io.DataError: the scan cannot be read or its maximum is <= 0.
        durable.OutputError: the output could not be written.
    """
    f = cfg.upsampling_factor
    path = scan.subject.image_path
    image, affine, header = nifti_io.load_volume(path, log=log, max_voxels=nifti_io.max_voxels_for(cfg.volume_shape))
    nifti_io.check_intensity(image, path)
    check_scan_fits_factors(path, header.get_zooms()[:3], f, log)
    lr_n, nf = utils.normalize(image)
    variant = inference.inference_variants(cfg.blend, cfg.tta)[-1]
    flip_axis = utils.left_right_axis(affine) if variant.flip else None
    sr = utils.denormalize(inference.super_resolve_variants(
        predict, lr_n, f, cfg.patch_shape, cfg.patch_margin, cfg.batch_size, (variant,),
        flip_axis, cfg.slice_profile)[variant], nf)
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64) / np.asarray(f.axes)
    sidecar = {"Description": f"super-resolved x{f.text} from the source as it is ({variant.label})",
               "Sources": [outputs.source(scan)], **provenance}
    out = outputs.write_volume(scan.subject, "sr", sr, output_affine(affine, f, cfg.slice_profile),
                               header, zooms=zooms, sidecar=sidecar)
    tqdm.write(f"{path} {image.shape} -> {out} {sr.shape}", file=sys.stderr)
    return report.ScanResult(path, out, image.shape, sr.shape, tuple(header.get_zooms()[:3]), tuple(zooms),
                             report_figures.super_resolution_figure(image, sr, f, zooms, cfg.slice_profile))


def super_resolve_file(cfg, checkpoint_dir, log=print, explicit=frozenset()):
    """-super_resolve: super-resolves low-resolution inputs as they are (no degradation).

    ``cfg.super_resolve`` lists NIfTI files, folders (any layout
    ``find_subjects`` reads, BIDS included) and .csv lists. Each scan gives an
    SR volume of f × its shape with the affine of :func:`output_affine` (its
    thin voxels inside the input's), so it overlays the input, and a JSON sidecar (factor, mode,
    checkpoint, options); plain names (``<name>_sr.nii.gz``) or BIDS
    derivatives (``..._rec-SRx<f>_T1w.nii.gz``) as ``outputs.output_scheme``
    says. A progress bar runs over the inputs. With several inputs an
    unreadable one (or one whose maximum is <= 0) is reported and skipped,
    and the run ends with exit code 4 once the others are written; the
    entries that a folder's or list's checks left out count as skipped too.
    ``report.html`` beside them shows each input beside its SR. A run that
    writes no scan removes the output folder again if it created it.

    Returns:
        list of the SR paths written.

    Raises:
        UserError: unusable checkpoint, output folder or inputs; the only scan
            is unusable; no scan could be read.
        RunStopped: exit code 4, after writing the others, when some inputs were skipped.
        nifti_io.DataError: a single scan that cannot be read or has a maximum <= 0.
        durable.LockedError: another run writes into the folder.
        durable.OutputError: an output could not be written.
    """
    inputs, unlisted = scans.super_resolve_inputs(cfg, explicit, log)
    outputs = outputs_lib.make_outputs(outputs_lib.output_scheme(cfg.output_layout, inputs),
                                       cfg.path_volumes, cfg.upsampling_factor)
    outputs.check_unique(inputs)
    sources = [(s.root, "bids" if s.bids else None) for s in inputs if s.root is not None]
    sources += [(os.path.abspath(p), layouts.detect_layout(p, cfg.image_name))
                for p in cfg.super_resolve if os.path.isdir(p)]
    created = folders.new_folders(outputs.folder)
    folders.check_output_folder(outputs.folder, sources)
    with durable.RunLock(outputs.folder, "super-resolution"):
        # A run that writes no scan leaves no folder of its own making behind.
        with folders.removed_unless_written(created, outputs.metadata_names()):
            results, skipped = super_resolve_locked(cfg, checkpoint_dir, inputs, unlisted, outputs, log)
    written = [r.output for r in results]
    log(f"{len(written)} super-resolved scan(s) written to {outputs.folder} ({outputs.scheme} names)"
        + (f"; {len(skipped)} skipped" if skipped else "")
        + (f" ({len(unlisted)} of them when their folder or list was read)" if unlisted else ""))
    log(f"report: {os.path.join(outputs.folder, outputs_lib.REPORT_NAME)}")
    if skipped:
        raise partial_failure(written, [path for path, _ in skipped])
    return written


def super_resolve_locked(cfg, checkpoint_dir, inputs, unlisted, outputs, log):
    """:func:`super_resolve_file` once the output folder is locked: every scan, then report.html.

    Args:
        unlisted: the problems of entries a folder's or list's checks left out ("path: reason").

    Returns:
        (list of ``report.ScanResult``, list of (skipped path or list row, reason)).

    Raises:
        UserError: no scan could be super-resolved.
        nifti_io.DataError: the only scan cannot be read or has a maximum <= 0.
    """
    durable.remove_stale_temporaries(outputs.folder)
    predict, checkpoint = inference.restored_predictor(cfg, checkpoint_dir, log)
    outputs.start(outputs_lib.generated_by(cfg, checkpoint), inputs)
    # After every check that can refuse: a refusal replaces nothing.
    folders.overwrite_note([outputs.path(s.subject, "sr") for s in inputs], log)
    provenance = outputs_lib.provenance(cfg, checkpoint)
    # What the folders' and lists' checks left out counts as skipped too (said when listed).
    results = []
    skipped = [tuple(problem.split(": ", 1)) if ": " in problem else (problem, "") for problem in unlisted]
    for scan in tqdm(inputs, desc="super-resolve", unit="scan", file=sys.stderr, dynamic_ncols=True,
                     disable=len(inputs) == 1):
        try:
            results.append(super_resolve_scan(scan, cfg, predict, outputs, provenance, log))
        except nifti_io.PipelineError:
            raise
        except nifti_io.DataError as err:
            if len(inputs) == 1:
                raise
            log(f"skipping: {err}")
            skipped.append((scan.subject.image_path, str(err)))
    if not results:
        raise UserError("no scan could be super-resolved; see the messages above")
    report.write(os.path.join(outputs.folder, outputs_lib.REPORT_NAME), report.super_resolution_page(
        cfg, checkpoint_dir, checkpoint, results, skipped, outputs.folder))
    return results, skipped


def partial_failure(written, skipped):
    """The :class:`RunStopped` (exit code 4) of a run that skipped some inputs and wrote the others.

    Args:
        written: the paths written.
        skipped: the inputs skipped (paths, or list rows), also those a folder's or list's checks left out.
    """
    shown = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
    return RunStopped(f"{len(skipped)} of {len(written) + len(skipped)} inputs were skipped ({shown}; "
                      f"the reasons are above); the other {len(written)} were written. Fix or drop the "
                      "skipped ones and run again for them", exit_code=EXIT_PARTIAL)

