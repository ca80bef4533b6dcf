"""Reproducible quality experiment on realistic synthetic data (not a test).

Step 1, ``build``: writes a dataset in the ADNI layout made from a real brain,
the skull-stripped MNI152 T1 template that nilearn ships inside its package
(read offline, nothing is downloaded). Every subject is the template under a
random rigid rotation, anisotropic scale and shift, times a smooth random bias
field, plus Rician noise, zero outside the brain mask, stored int16 with white
matter near 1000, on a 1 mm grid with a real (non-identity) affine. The same
seed gives the same data, voxel for voxel.

Benchmark-only dependencies: ``pip install -r requirements-bench.txt``.

Usage:
    python benchmarks/quality.py build --out DIR [--subjects 12] [--seed 0] [--shape X,Y,Z]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

import utils  # noqa: E402
from train_dataset import IMAGE_NAME, MASK_NAME, DataError  # noqa: E402

# Intensity the template's white matter is mapped to (before the bias field):
# int16 skull-stripped T1 volumes of scanners and ADNI's pipeline sit in this range.
WM_LEVEL = 1000.0
# The template's white-matter intensity is taken as this percentile of its brain
# voxels: white matter is the brightest tissue of a T1 and about 40 % of the
# brain (on MNI152 the 90th percentile, 0.87, equals the median intensity where
# nilearn's white-matter template exceeds 0.9).
WM_PERCENTILE = 90.0
SUBJECT_PREFIX = "mni_"
# Shifts are uniform in +-this many mm per axis: head positioning varies by a few mm
# once a scan is centred on the brain.
MAX_TRANSLATION_MM = 5.0
# Length that normalises coordinates for the bias polynomial: about half a brain,
# so the field's shape does not depend on the grid size.
_BIAS_LENGTH_MM = 80.0
# Zero voxels kept around the template's brain when it is cropped: enough for the
# cubic B-spline prefilter's support to see zeros, as on the full grid.
_CROP_MARGIN = 6
BUILD_RECORD = "quality_build.json"


# --------------------------------------------------------------------------- #
# Template
# --------------------------------------------------------------------------- #


def load_template(template=None):
    """Loads the skull-stripped brain every subject is made from.

    Args:
        template: None for nilearn's MNI152 T1 template (1 mm, 197x233x189,
            rescaled by nilearn to [0, 1]) times nilearn's MNI152 brain mask
            (template > 0.2); or the path of a 3-D NIfTI (4-D with one volume
            accepted), whose mask is then ``image > 0``.

    Returns:
        (image, mask, affine): float32 (x, y, z) brain intensities >= 0, zero
        outside the mask; bool (x, y, z) brain mask; float64 (4, 4)
        voxel-to-world affine (mm).

    Raises:
        DataError: if ``template`` cannot be read, is not one 3-D volume, or has
            no positive voxel.
        ImportError: if ``template`` is None and nilearn is not installed.
    """
    import nibabel as nib

    if template is None:
        try:
            from nilearn import datasets
        except ImportError as e:
            raise ImportError("the MNI152 template comes from nilearn: "
                              "pip install -r requirements-bench.txt") from e
        img = datasets.load_mni152_template(resolution=1)
        mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
        image = np.asarray(img.get_fdata(dtype=np.float32)) * mask
        return image.astype(np.float32), mask, np.asarray(img.affine, dtype=np.float64)

    path = os.fspath(template)
    try:
        img = nib.load(path)
        image = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises many types for unreadable files
        raise DataError(f"template {path}: cannot read it as NIfTI ({type(e).__name__}: {e})") from e
    if image.ndim == 4 and image.shape[3] == 1:
        image = image[..., 0]
    if image.ndim != 3:
        raise DataError(f"template {path}: expected one 3-D volume, got shape {image.shape}")
    image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    mask = image > 0
    if not mask.any():
        raise DataError(f"template {path}: no voxel > 0; expected a skull-stripped brain")
    return np.where(mask, image, 0).astype(np.float32), mask, np.asarray(img.affine, dtype=np.float64)


class _Template:
    """A template prepared once for many subjects: cropped and spline-filtered.

    Attributes:
        coeffs: float64 (x, y, z) cubic B-spline coefficients of the cropped brain.
        mask: float32 (x, y, z) 0/1 cropped brain mask (interpolated linearly).
        vox_from_world: float64 (4, 4), world mm -> cropped template voxel index.
        centre: float64 (3,) world mm, the centre of the brain's bounding box.
        wm: float, the template's white-matter intensity (``WM_PERCENTILE``).
        extent_mm: float64 (3,), the template grid's size in mm.
    """

    def __init__(self, image, mask, affine):
        idx = np.argwhere(mask)
        lo, hi = idx.min(0), idx.max(0)
        start = lo - _CROP_MARGIN
        # Pad with zeros where the margin runs off the template grid (the MNI
        # brain touches z = 0).
        crop = np.zeros(tuple(hi - lo + 1 + 2 * _CROP_MARGIN), np.float32)
        cmask = np.zeros(crop.shape, np.float32)
        src = [slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, crop.shape, image.shape)]
        dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
        crop[dst] = image[tuple(src)]
        cmask[dst] = mask[tuple(src)]
        self.coeffs = ndimage.spline_filter(crop, order=3, mode="mirror")
        self.mask = cmask
        shift = np.eye(4)
        shift[:3, 3] = -start
        self.vox_from_world = shift @ np.linalg.inv(affine)
        self.centre = (affine @ np.append((lo + hi) / 2.0, 1.0))[:3]
        self.wm = float(np.percentile(image[mask], WM_PERCENTILE))
        if self.wm <= 0:
            raise DataError(f"template white-matter intensity {self.wm} must be > 0")
        self.extent_mm = np.asarray(image.shape) * np.sqrt((affine[:3, :3] ** 2).sum(0))


# --------------------------------------------------------------------------- #
# Subjects
# --------------------------------------------------------------------------- #


def _rotation(angles):
    """Returns the float64 (3, 3) rotation by ``angles`` (radians) about x, then y, then z."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bias_field(rng, points, bias):
    """Returns a float32 (n,) multiplicative field spanning [1 - bias/2, 1 + bias/2] over ``points``.

    A random quadratic polynomial of the coordinates: smooth at the scale of the
    whole brain, like the receive-coil inhomogeneity of a T1. ``points`` is
    float64 (3, n), the brain voxels' positions in units of ``_BIAS_LENGTH_MM``.
    """
    x, y, z = points
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    coef = rng.standard_normal(len(terms))
    poly = sum(c * t for c, t in zip(coef, terms))
    lo, hi = float(poly.min()), float(poly.max())
    unit = (poly - lo) / (hi - lo) if hi > lo else np.full(poly.shape, 0.5)
    return (1.0 + bias * (unit - 0.5)).astype(np.float32)


def _subject(tpl, shape, rng, noise, bias, max_rotation_deg, scale_range):
    """Draws one subject; returns (int16 image, uint8 0/1 mask, float64 (4, 4) affine, params dict).

    Output voxel ``o`` lies at world ``p = o - c`` mm (``c`` the grid centre); the
    subject's brain is the template stretched by ``scale`` along the template's
    axes about its centre, rotated by ``R``, shifted by ``t``:
    ``p = R diag(scale) (q - centre) + t`` with ``q`` the template's world point.
    """
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    scale = rng.uniform(scale_range[0], scale_range[1], 3)
    shift = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    shape = np.asarray(shape)
    c = (shape - 1) / 2.0
    back = np.diag(1.0 / scale) @ _rotation(np.deg2rad(angles)).T  # p -> q - centre
    # Output voxel o -> cropped template voxel v = matrix @ o + offset.
    v3, vt = tpl.vox_from_world[:3, :3], tpl.vox_from_world[:3, 3]
    matrix = v3 @ back
    offset = v3 @ (tpl.centre - back @ (c + shift)) + vt

    # The mask is resampled on the output box the cropped template maps onto
    # (zero elsewhere); the image, the costly cubic part, only at the brain voxels
    # that mask keeps: a third of the box on a 1 mm grid.
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) \
        * (np.asarray(tpl.coeffs.shape) - 1)
    o = np.linalg.solve(matrix, (corners - offset).T).T
    box_lo = np.clip(np.floor(o.min(0)).astype(int) - 1, 0, shape)
    box_hi = np.clip(np.ceil(o.max(0)).astype(int) + 2, 0, shape)
    box = tuple(int(n) for n in box_hi - box_lo)
    inside = ndimage.affine_transform(tpl.mask, matrix, offset + matrix @ box_lo, output_shape=box,
                                      order=1, mode="constant", cval=0.0, output=np.float32) >= 0.5
    voxels = np.stack(np.nonzero(inside)) + box_lo[:, None]  # int64 (3, n) output indices
    brain = ndimage.map_coordinates(tpl.coeffs, matrix @ voxels + offset[:, None], order=3,
                                    mode="constant", cval=0.0, prefilter=False, output=np.float32)
    signal = np.maximum(brain, 0) * np.float32(WM_LEVEL / tpl.wm)
    signal *= _bias_field(rng, (voxels - c[:, None]) / _BIAS_LENGTH_MM, bias)
    # Magnitude images have Rician noise: Gaussian on the real and imaginary channels.
    sigma = np.float32(noise * WM_LEVEL)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    signal = np.clip(np.rint(np.sqrt(real * real + imag * imag)), 0, np.iinfo(np.int16).max)

    image = np.zeros(tuple(shape), np.int16)
    mask = np.zeros(tuple(shape), np.uint8)
    image[tuple(voxels)] = signal.astype(np.int16)
    mask[tuple(voxels)] = 1
    affine = np.eye(4)
    affine[:3, 3] = -c  # 1 mm, axis-aligned (RAS), world origin at the grid centre
    params = {"rotation_deg": [round(float(a), 4) for a in angles],
              "scale": [round(float(s), 5) for s in scale],
              "translation_mm": [round(float(t), 4) for t in shift]}
    return image, mask, affine, params


def _check_args(subjects, seed, shape, noise, bias, max_rotation_deg, scale_range):
    """Validates build_dataset's arguments; returns (shape tuple or None, scale_range tuple)."""
    if isinstance(subjects, bool) or not isinstance(subjects, (int, np.integer)) or subjects < 1:
        raise ValueError(f"subjects {subjects!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed {seed!r} must be an integer >= 0")
    if shape is not None:
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"shape {shape!r} must be 3 integers") from None
        if len(shape) != 3 or min(shape) < 8:
            raise ValueError(f"shape {shape} must be 3 integers >= 8")
    if not noise >= 0:
        raise ValueError(f"noise {noise!r} must be >= 0 (a fraction of the white-matter intensity)")
    if not 0 <= bias < 2:
        raise ValueError(f"bias {bias!r} must be in [0, 2) (peak-to-peak of a field around 1)")
    if not 0 <= max_rotation_deg <= 180:
        raise ValueError(f"max_rotation_deg {max_rotation_deg!r} must be in [0, 180]")
    try:
        lo, hi = (float(s) for s in scale_range)
    except (TypeError, ValueError):
        raise ValueError(f"scale_range {scale_range!r} must be two numbers (low, high)") from None
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range {scale_range!r} must satisfy 0 < low <= high")
    return shape, (lo, hi)


def build_dataset(out_dir, subjects=12, seed=0, shape=None, template=None, noise=0.02, bias=0.3,
                  max_rotation_deg=10, scale_range=(0.9, 1.1), log=print):
    """Writes realistic synthetic T1 subjects in the ADNI layout.

    Subject ``i`` (folder ``mni_000``, ``mni_001``, ...; the same names with a
    custom ``template``) is the template brain

    - resampled (cubic B-spline; the mask linearly, then >= 0.5) under a random
      rotation, uniform in +-``max_rotation_deg`` about each axis, an
      anisotropic scale uniform in ``scale_range`` per template axis, and a
      shift uniform in +-``MAX_TRANSLATION_MM`` mm per axis, the brain's
      bounding-box centre at the grid centre before the shift;
    - scaled so that the template's white matter (its ``WM_PERCENTILE``-th
      percentile inside the brain) becomes ``WM_LEVEL`` = 1000;
    - multiplied by a bias field, a random quadratic polynomial of the
      coordinates rescaled to span exactly [1 - bias/2, 1 + bias/2] over the
      brain (``bias`` is its peak-to-peak amplitude);
    - given Rician noise, sigma = ``noise`` x 1000 on each of the real and
      imaginary channels;
    - rounded, zero outside the mask (skull-stripped).

    Files per subject: ``IMAGE_NAME`` (int16, >= 0) and ``MASK_NAME`` (uint8
    0/1), 1 mm voxels, axis-aligned, world origin at the grid centre. The
    draws of subject ``i`` depend only on (``seed``, ``i``), so a seed gives the
    same voxels on every run and a larger ``subjects`` only adds subjects.
    ``out_dir/quality_build.json`` records the arguments and every subject's
    transform (``find_subjects`` ignores it). Other folders in ``out_dir`` are
    left alone. About 1 s per 1 mm MNI152 subject on one core.

    Args:
        out_dir: dataset root to create (or add to).
        subjects: int >= 1, number of subjects.
        seed: int >= 0.
        shape: optional (x, y, z) ints >= 8, the output grid (1 mm voxels);
            default the template grid's extent in mm (197x233x189 for MNI152).
            A grid smaller than the brain cuts it (mask included).
        template: optional path of a NIfTI brain to use instead of nilearn's
            MNI152 template (see :func:`load_template`).
        noise: float >= 0, Rician sigma as a fraction of white matter.
        bias: float in [0, 2), peak-to-peak amplitude of the bias field.
        max_rotation_deg: float in [0, 180], rotation range about each axis.
        scale_range: (low, high) floats, 0 < low <= high, scale range per axis.
        log: callable taking one message string.

    Returns:
        list of the subject folders written, sorted.

    Raises:
        ValueError: if an argument is invalid, or ``shape`` places no brain
            voxel of some subject on the grid.
        DataError: if ``template`` cannot be used (see :func:`load_template`).
    """
    shape, scale_range = _check_args(subjects, seed, shape, noise, bias, max_rotation_deg, scale_range)
    start = time.perf_counter()
    tpl = _Template(*load_template(template))
    if shape is None:
        shape = tuple(int(round(e)) for e in tpl.extent_mm)
    log(f"Template: {template or 'nilearn MNI152 T1 (1 mm) x brain mask'}, white matter "
        f"{tpl.wm:.4g} -> {WM_LEVEL:g}; prepared in {time.perf_counter() - start:.1f} s")

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    folders, records = [], []
    for i in range(int(subjects)):
        t0 = time.perf_counter()
        rng = np.random.default_rng([int(seed), i])
        image, mask, affine, params = _subject(tpl, shape, rng, float(noise), float(bias),
                                               float(max_rotation_deg), scale_range)
        name = f"{SUBJECT_PREFIX}{i:03d}"
        if not mask.any():
            raise ValueError(f"shape {shape}: subject {name} has no brain voxel on the grid")
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        utils.save_nifti(os.path.join(folder, IMAGE_NAME), image, affine, dtype=np.int16)
        utils.save_nifti(os.path.join(folder, MASK_NAME), mask, affine, dtype=np.uint8)
        folders.append(folder)
        records.append({"subject": name, **params})
        log(f"{name}: rotation {params['rotation_deg']} deg, scale {params['scale']}, "
            f"shift {params['translation_mm']} mm; {time.perf_counter() - t0:.2f} s")

    record = {"seed": int(seed), "subjects": int(subjects), "shape": list(shape),
              "template": None if template is None else os.path.abspath(os.fspath(template)),
              "noise": float(noise), "bias": float(bias), "max_rotation_deg": float(max_rotation_deg),
              "scale_range": list(scale_range), "max_translation_mm": MAX_TRANSLATION_MM,
              "wm_level": WM_LEVEL, "template_wm": tpl.wm, "subject_params": records}
    utils.atomic_write(os.path.join(out_dir, BUILD_RECORD),
                       lambda tmp: _write_json(tmp, record), suffix=".json")
    log(f"Wrote {len(folders)} subject(s) of {shape[0]}x{shape[1]}x{shape[2]} to {out_dir} "
        f"in {time.perf_counter() - start:.1f} s")
    return sorted(folders)


def _write_json(path, obj):
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _ints(text, n, flag):
    """Parses ``n`` comma-separated ints for ``flag``; argparse error otherwise."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{flag} {text!r} must be {n} comma-separated integers")
    return values


def _floats(text, n, flag):
    """Parses ``n`` comma-separated floats for ``flag``; argparse error otherwise."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{flag} {text!r} must be {n} comma-separated numbers")
    return values


def make_parser():
    """Returns the argparse parser, one sub-command per experiment step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the synthetic MNI152-based dataset (ADNI layout)")
    b.add_argument("--out", required=True, help="dataset root to write")
    b.add_argument("--subjects", type=int, default=12)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--shape", type=lambda s: _ints(s, 3, "--shape"), default=None,
                   help="output grid X,Y,Z in 1 mm voxels (default: the template's, 197,233,189)")
    b.add_argument("--template", default=None, help="NIfTI brain to use instead of nilearn's MNI152")
    b.add_argument("--noise", type=float, default=0.02, help="Rician sigma / white matter")
    b.add_argument("--bias", type=float, default=0.3, help="bias field peak-to-peak")
    b.add_argument("--max-rotation-deg", type=float, default=10.0)
    b.add_argument("--scale-range", type=lambda s: _floats(s, 2, "--scale-range"), default=(0.9, 1.1),
                   help="LOW,HIGH scale per axis")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.command == "build":
        try:
            build_dataset(args.out, subjects=args.subjects, seed=args.seed, shape=args.shape,
                          template=args.template, noise=args.noise, bias=args.bias,
                          max_rotation_deg=args.max_rotation_deg, scale_range=args.scale_range)
        except (ValueError, ImportError) as e:  # DataError is a ValueError
            print(f"quality.py build: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
