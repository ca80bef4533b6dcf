"""Reproducible quality experiment on realistic synthetic data (not a test).

Step 1, ``build``: writes a dataset in the ADNI layout made from a real brain,
the skull-stripped MNI152 T1 template that nilearn ships inside its package
(read offline, nothing is downloaded). Every subject is the template under a
random rigid rotation, anisotropic scale and shift, times a smooth random bias
field, plus Rician noise, zero outside the brain mask, stored int16 with white
matter near 1000, on a 1 mm grid with a real (non-identity) affine. The same
seed gives the same data, voxel for voxel.

Step 2, ``run``: builds that data into ``OUT/data`` (or takes ``--data``),
trains the given configuration in-process with the project's own trainer for
exactly ``--steps`` steps, saving a checkpoint and evaluating the test subjects
every ``--eval-every`` steps (the learning curve, plus training diagnostics:
discriminator logits and the generator's gradient norm per loss term on a
fixed probe batch, and the size of an optimiser step). With
``--validation-fraction`` (default 0.2; 0: off) that share of the training
subjects is held out and validated at the same steps, as ``model.py
-validation_fraction`` does, and the best checkpoint by validation PSNR is
kept in ``OUT/checkpoints/best``. Then it evaluates the last checkpoint (and
the best one) with the real command line (``model.py -evaluate True``) and writes
``OUT/table.md`` / ``table.csv`` (GAN vs nearest / trilinear / tricubic, fair
masked PSNR and SSIM mean +- sd over the test subjects, the original rule's
means), ``results.json``, ``curve.csv``, ``losses.csv`` (every step's losses)
and ``learning_curve.png``.

Benchmark-only dependencies: ``pip install -r requirements-bench.txt``. On
CPUs where TensorFlow leaves oneDNN off by default (AMD), exporting
``TF_ENABLE_ONEDNN_OPTS=1`` makes a training step about 3x faster.

Usage:
    python benchmarks/quality.py build --out DIR [--subjects 12] [--seed 0] [--shape X,Y,Z]
    python benchmarks/quality.py run --out DIR --quick                      # minutes on 2 cores
    python benchmarks/quality.py run --out DIR --factor 2 --mode subpixel --steps 1500 \
        [--geometry quick|crop96|crop96x72|crop96x70|default] [--volume-shape X,Y,Z --patch-shape X,Y,Z --margin M] \
        [--learning-rate 1e-4] [--pretrain-steps 0] [--feature-size 32] [--residual-blocks 6] [--seed 0]
    python benchmarks/quality.py run --out DIR --factor 1,1,3 --slice-profile box --geometry crop96x72 \
        --seeds 0,1,2          # one run per seed in DIR/seed-S, then mean +- sd over seeds x subjects
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

import config  # noqa: E402
import durable  # noqa: E402
import layouts  # noqa: E402
import nifti_io  # noqa: E402
import phantoms  # noqa: E402
import utils  # noqa: E402
from factors import SLICE_PROFILES, UpsamplingFactor  # noqa: E402
from layouts import IMAGE_NAME, MASK_NAME  # noqa: E402
from nifti_io import DataError  # noqa: E402

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
    back = np.diag(1.0 / scale) @ phantoms.rotation(np.deg2rad(angles)).T  # p -> q - centre
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
    durable.atomic_write(os.path.join(out_dir, BUILD_RECORD),
                         lambda tmp: _write_json(tmp, record), suffix=".json")
    log(f"Wrote {len(folders)} subject(s) of {shape[0]}x{shape[1]}x{shape[2]} to {out_dir} "
        f"in {time.perf_counter() - start:.1f} s")
    return sorted(folders)


def _write_json(path, obj):
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")


# --------------------------------------------------------------------------- #
# Run: settings and data
# --------------------------------------------------------------------------- #

MODES = ("subpixel", "nn", "subpixel_NN")

# Geometry presets. data_shape: the grid the builder writes (None: the
# template's own, 197x233x189 mm for MNI152); volume_shape, patch_shape,
# margin: the model's -volume_shape, -patch_shape, -patch_margin.
GEOMETRIES = {
    # The central 64x64x48 mm of the brain; 32x32x24 patches, 27 per volume.
    "quick": {"data_shape": (64, 64, 48), "volume_shape": (64, 64, 48),
              "patch_shape": (32, 32, 24), "margin": 4},
    # The central 96x96x64 mm (basal ganglia, ventricles, insula, deep white
    # matter, some cortex) at 1 mm; 48x48x32 patches, 27 per volume.
    "crop96": {"data_shape": (96, 96, 64), "volume_shape": (96, 96, 64),
               "patch_shape": (48, 48, 32), "margin": 8},
    # The central 96x96x72 mm for thick slices of 3 mm (and 2, 4, 6, 8, 9, 12): 48x48x36
    # patches, margin 6, 27 per volume.
    "crop96x72": {"data_shape": (96, 96, 72), "volume_shape": (96, 96, 72),
                  "patch_shape": (48, 48, 36), "margin": 6},
    # The same for thick slices of 5 mm (and 7, 10, 14): 96x96x70, 48x48x35 patches, margin 5.
    "crop96x70": {"data_shape": (96, 96, 70), "volume_shape": (96, 96, 70),
                  "patch_shape": (48, 48, 35), "margin": 5},
    # The original's geometry (SPEC section 1) on the whole template grid.
    "default": {"data_shape": None, "volume_shape": (224, 224, 152),
                "patch_shape": (128, 128, 92), "margin": 16},
}
# What --quick sets unless the flag is given: a run of a few minutes on 2 CPU cores.
QUICK = {"geometry": "quick", "subjects": 10, "steps": 150, "eval_every": 50}
# Defaults of the run flags that --quick may replace.
RUN_DEFAULTS = {"geometry": "crop96", "subjects": 20, "steps": 1000, "eval_every": None}
METHOD_LABELS = {"sr": "GAN", "nearest": "nearest", "trilinear": "trilinear", "tricubic": "tricubic"}
TABLE_COLUMNS = ("method", "n", "psnr_fair_mean", "psnr_fair_sd", "ssim_fair_mean", "ssim_fair_sd",
                 "bias_fair_mean", "bias_fair_sd", "psnr_mean", "ssim_mean")
CURVE_COLUMNS = ("step", "epoch", "psnr_fair", "ssim_fair", "bias_fair", "val_psnr_fair", "mse", "gdl", "adv", "d_loss",
                 "d_hr", "d_sr", "grad_mse", "grad_gdl", "grad_adv", "adv_share", "seconds")
LOSS_COLUMNS = ("step",) + ("d_loss", "g_loss", "mse", "gdl", "adv", "flipped", "learning_rate")


def run_settings(args):
    """Resolves the ``run`` flags (``--quick`` presets, geometry overrides) into one dict.

    Args:
        args: ``argparse.Namespace`` of the ``run`` sub-command; None = not given.

    Returns:
        dict with ``out, data, template, subjects, train_fraction, factor,
        mode, steps, eval_every, geometry`` (name, or "custom"), ``data_shape,
        volume_shape, patch_shape, margin, learning_rate, pretrain_steps, gan_lr_scale,
        feature_size, residual_blocks, seed, batch_size, quick``.

    Raises:
        ValueError: naming the flag and value when something cannot work.
    """
    preset = dict(RUN_DEFAULTS, **(QUICK if args.quick else {}))
    s = {k: (getattr(args, k) if getattr(args, k) is not None else preset[k]) for k in preset}
    geometry = dict(GEOMETRIES[s["geometry"]])
    overrides = {"volume_shape": args.volume_shape, "patch_shape": args.patch_shape, "margin": args.margin}
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        geometry.update(given)
        # The builder's grid is the volume itself (a central crop of the brain).
        geometry["data_shape"] = geometry["volume_shape"]
        s["geometry"] = "custom"
    s.update(geometry)
    s.update(out=args.out, data=args.data, template=args.template, factor=args.factor, mode=args.mode,
             slice_profile=args.slice_profile,
             train_fraction=args.train_fraction, validation_fraction=args.validation_fraction,
             learning_rate=args.learning_rate,
             data_seed=(args.data_seed if args.data_seed is not None
                        else 0 if getattr(args, "seeds", None) else args.seed),
             pretrain_steps=args.pretrain_steps, feature_size=args.feature_size,
             gan_lr_scale=(args.gan_lr_scale if args.gan_lr_scale is not None
                           else config.defaults()["gan_lr_scale"]),
             residual_blocks=args.residual_blocks, seed=args.seed, batch_size=args.batch_size,
             quick=bool(args.quick))
    if s["steps"] < 1:
        raise ValueError(f"--steps {s['steps']} must be >= 1")
    if s["eval_every"] is None:
        s["eval_every"] = max(1, s["steps"] // 10)
    if s["eval_every"] < 1:
        raise ValueError(f"--eval-every {s['eval_every']} must be >= 1")
    if s["subjects"] < 2:
        raise ValueError(f"--subjects {s['subjects']} must be >= 2 (train and test)")
    if not 0 < s["train_fraction"] < 1:
        raise ValueError(f"--train-fraction {s['train_fraction']} must be in (0, 1)")
    if not 0 <= s["validation_fraction"] < 1:
        raise ValueError(f"--validation-fraction {s['validation_fraction']} must be in [0, 1)")
    if s["pretrain_steps"] < 0:
        raise ValueError(f"--pretrain-steps {s['pretrain_steps']} must be >= 0")
    if not 0 < s["gan_lr_scale"] <= 1:
        raise ValueError(f"--gan-lr-scale {s['gan_lr_scale']} must be in (0, 1]")
    factor = UpsamplingFactor.of(s["factor"], "--factor")
    problem = (factor.shape_problem("--volume-shape", s["volume_shape"], "--factor")
               or factor.shape_problem("--patch-shape", s["patch_shape"], "--factor")
               or factor.margin_problem("--margin", s["margin"], "--factor"))
    if problem:
        raise ValueError(problem)
    return s


def prepare_data(s, log=print):
    """The dataset a run trains on: ``--data``, or built once into ``OUT/data``.

    A dataset already in ``OUT/data`` is reused when its build record names the
    same subjects, seed, grid and template; anything else is an error (a
    benchmark must not silently mix two datasets).

    Returns:
        str, the dataset root.

    Raises:
        ValueError: if ``OUT/data`` holds a different build.
    """
    if s["data"] is not None:
        if not os.path.isdir(s["data"]):
            raise ValueError(f"--data {s['data']!r} is not a folder")
        return s["data"]
    data = os.path.join(s["out"], "data")
    template = None if s["template"] is None else os.path.abspath(s["template"])
    data_seed = s.get("data_seed", s["seed"])
    wanted = {"seed": data_seed, "subjects": s["subjects"], "template": template,
              "shape": None if s["data_shape"] is None else list(s["data_shape"])}
    record_path = os.path.join(data, BUILD_RECORD)
    if os.path.exists(record_path):
        with open(record_path) as fh:
            record = json.load(fh)
        found = {k: record.get(k) for k in wanted}
        if wanted["shape"] is None:
            found["shape"] = None
        if found != wanted:
            raise ValueError(f"{data} holds another build ({found}); this run needs {wanted}. "
                             "Choose another --out, or pass --data")
        log(f"Reusing the dataset in {data}")
        return data
    build_dataset(data, subjects=s["subjects"], seed=data_seed, shape=s["data_shape"],
                  template=s["template"], log=log)
    return data


def model_argv(s, data, checkpoint_dir, epochs):
    """The model.py command line of a run's training configuration."""
    shape = lambda v: ",".join(map(str, v))  # noqa: E731
    return ["-data_path", data, "-checkpoint_dir", checkpoint_dir,
            "-upsampling_factor", UpsamplingFactor.of(s["factor"]).flag_text,
            "-slice_profile", s["slice_profile"],
            "-residual_blocks", str(s["residual_blocks"]),
            "-feature_size", str(s["feature_size"]),
            "-subpixel_NN", str(s["mode"] == "subpixel_NN"), "-nn", str(s["mode"] == "nn"),
            "-volume_shape", shape(s["volume_shape"]), "-patch_shape", shape(s["patch_shape"]),
            "-patch_margin", str(s["margin"]), "-learning_rate", repr(s["learning_rate"]),
            "-pretrain_steps", str(s["pretrain_steps"]), "-gan_lr_scale", repr(s["gan_lr_scale"]),
            "-seed", str(s["seed"]),
            "-train_fraction", repr(s["train_fraction"]), "-batch_size", str(s["batch_size"]),
            "-validation_fraction", repr(s["validation_fraction"]), "-validate_steps", str(s["eval_every"]),
            "-epochs", str(epochs)]


# --------------------------------------------------------------------------- #
# Run: in-process evaluation (the learning curve) and training diagnostics
# --------------------------------------------------------------------------- #


class CurveEvaluator:
    """Fair PSNR/SSIM of the generator on the test subjects, as ``evaluation.evaluate`` computes them.

    The volumes, masks, degraded inputs and interpolation baselines are
    prepared once; each call super-resolves the test subjects with the
    generator's current weights (``training=False``), patch by patch with the
    training geometry, exactly as the evaluation command does.

    Args:
        cfg: the run's resolved model configuration.
        subjects: the test ``layouts.Subject`` list.
        log: callable for messages.
    """

    def __init__(self, cfg, subjects, log=print):
        import evaluation
        import metrics as metrics_lib
        import model  # noqa: F401 (TensorFlow imported quietly)

        self.cfg = cfg
        self.items = []
        for subject in subjects:
            ref = evaluation.load_reference(subject, cfg, log)
            lr = utils.denormalize(ref.lr_n, ref.nf)
            baselines = evaluation.interpolation_baselines(lr, cfg, ref.hr.shape)
            metrics = metrics_lib.subject_metrics(ref.hr, baselines, ref.mask)
            self.items.append((subject.name, ref.hr, ref.mask, ref.lr_n, ref.nf, metrics))
        self.baselines = {m: float(np.mean([it[5][f"psnr_{m}_fair"] for it in self.items]))
                          for m in ("nearest", "trilinear", "tricubic")}
        self.baselines_ssim = {m: float(np.mean([it[5][f"ssim_{m}_fair"] for it in self.items]))
                               for m in ("nearest", "trilinear", "tricubic")}

    def __call__(self, generator):
        """Returns (mean fair PSNR, mean fair SSIM, list of per-subject (psnr, ssim))."""
        import inference
        import metrics as metrics_lib

        cfg = self.cfg
        predict = inference.make_predictor(generator)
        per_subject, biases = [], []
        for _, hr, mask_c, lr_n, nf, _ in self.items:
            sr = utils.denormalize(inference.super_resolve_volume(
                predict, lr_n, cfg.upsampling_factor, cfg.patch_shape, cfg.patch_margin,
                cfg.batch_size, slice_profile=cfg.slice_profile), nf)
            per_subject.append(metrics_lib.fair_metrics(hr, sr, mask_c))
            biases.append(metrics_lib.bias_metrics(hr, sr, mask_c)[1])
        psnr, ssim = np.mean(per_subject, axis=0)
        self.last_bias = float(np.mean(biases))
        return float(psnr), float(ssim), per_subject


def probe_diagnostics(trainer, lr, hr):
    """What one training step would see on a fixed probe batch, without changing any state.

    Runs both networks as a training step does (``training=True``, batch
    statistics) and puts the batch-norm moving averages back afterwards.

    Args:
        trainer: the ``trainer.SRGANTrainer``.
        lr: float32 (b, x/f, y/f, z/f, 1) in [-1, 1].
        hr: float32 (b, x, y, z, 1) in [-1, 1].

    Returns:
        dict of floats: ``d_hr``, ``d_sr`` (mean discriminator logits of the
        HR and SR patches; the targets are ~0.95 for real and ~0.15 for fake)
        and ``grad_mse``, ``grad_gdl``, ``grad_adv`` (global norm of the
        generator's gradient of each term of its loss, the adversarial term
        with its 0.1 weight and the target 0.95, the middle of U(0.7, 1.2)), and
        ``adv_share``, ``grad_adv`` over the norm of the whole loss's gradient.
    """
    import tensorflow as tf

    import losses

    g, d = trainer.generator, trainer.discriminator
    frozen = g.non_trainable_variables + d.non_trainable_variables
    saved = [v.numpy() for v in frozen]
    try:
        with tf.GradientTape(persistent=True) as tape:
            sr = g(lr, training=not trainer.freeze_generator_statistics)
            d_sr = d(sr, training=True)
            terms = {"mse": tf.reduce_sum(tf.square(sr - hr)),
                     "gdl": losses.gradient_difference_loss(hr, sr),
                     "adv": 0.1 * tf.reduce_mean(tf.square(d_sr - 0.95))}
            terms["total"] = terms["mse"] + terms["gdl"] + terms["adv"]
        out = {f"grad_{k}": float(tf.linalg.global_norm(
            [x for x in tape.gradient(v, g.trainable_variables) if x is not None]))
            for k, v in terms.items()}
        # How much of the generator's update the adversarial term drives: the
        # norm of its gradient over the norm of the whole loss's gradient.
        out["adv_share"] = out["grad_adv"] / max(out.pop("grad_total"), 1e-12)
        del tape
        out["d_sr"] = float(tf.reduce_mean(d_sr))
        out["d_hr"] = float(tf.reduce_mean(d(hr, training=True)))
    finally:
        for v, value in zip(frozen, saved):
            v.assign(value)
    return out


class UpdateMeter:
    """Size of one optimiser step: how far a step moves the weights.

    :meth:`before` copies the weights; :meth:`after` (after the next step)
    returns the step's relative size ``||w' - w|| / ||w||`` and its mean
    absolute change per weight (Adam moves each weight by about the learning
    rate, whatever the scale of the loss).
    """

    def __init__(self, models):
        self.models = models
        self.saved = None

    def before(self):
        self.saved = {name: [w.numpy() for w in m.trainable_weights] for name, m in self.models.items()}

    def after(self):
        if self.saved is None:
            return None
        out = {}
        for name, m in self.models.items():
            now = [w.numpy() for w in m.trainable_weights]
            diff = sum(float(np.sum((a - b) ** 2)) for a, b in zip(now, self.saved[name]))
            norm = sum(float(np.sum(b ** 2)) for b in self.saved[name])
            count = sum(b.size for b in self.saved[name])
            mean_abs = sum(float(np.sum(np.abs(a - b))) for a, b in zip(now, self.saved[name])) / count
            out[f"{name}_rel"] = float(np.sqrt(diff / norm))
            out[f"{name}_mean_abs"] = mean_abs
        self.saved = None
        return out


# --------------------------------------------------------------------------- #
# Run: training with the learning curve
# --------------------------------------------------------------------------- #


def train_with_curve(cfg, s, train_subjects, evaluator, log=print, validation_subjects=()):
    """Trains exactly ``s["steps"]`` steps with the project's trainer, crossing epochs.

    At every ``eval_every``-th step and at the last one: a checkpoint, the test
    subjects' fair PSNR/SSIM (:class:`CurveEvaluator`), the probe
    diagnostics (:func:`probe_diagnostics`, on the first training batch) and,
    with validation subjects, the project's validation (``validation.Validation``:
    validation.csv and the best checkpoint in ``checkpoints/best``).

    Returns:
        dict: ``curve`` (list of dicts, ``CURVE_COLUMNS``), ``losses`` (one
        dict per step, ``LOSS_COLUMNS``), ``updates`` (step sizes measured at
        step 1 and after each evaluation), ``train_seconds``, ``eval_seconds``
        and ``checkpoint`` (the last one's path).
    """
    import keras

    import trainer as trainer_lib
    import training
    import validation as validation_lib

    keras.utils.set_random_seed(cfg.seed)
    generator, discriminator = trainer_lib.build_networks(cfg)
    trainer = trainer_lib.SRGANTrainer(generator, discriminator, cfg.learning_rate, seed=cfg.seed,
                                     checkpoint_dir=cfg.checkpoint_dir, pretrain_steps=cfg.pretrain_steps,
                                     gan_lr_scale=cfg.gan_lr_scale)
    stream = training.TrainingStream(train_subjects, cfg, log=log)
    validation = None
    if validation_subjects:
        validation = validation_lib.Validation(
            validation_lib.Validator(validation_subjects, cfg, log), cfg.checkpoint_dir, cfg.log_dir,
            s["eval_every"], s["steps"], stream.batches_per_epoch, log=log)
    probe = next(iter(stream(0)))
    meter = UpdateMeter({"g": generator, "d": discriminator})
    steps, every = s["steps"], s["eval_every"]
    curve, losses, updates = [], [], []
    train_seconds = eval_seconds = 0.0
    step = read = 0
    meter.before()
    tick = time.perf_counter()
    path = None
    while step < steps:
        epoch, taken = int(trainer.epoch), 0
        for batch in stream(epoch):
            trainer.train_step(batch[0], batch[1])
            step += 1
            taken += 1
            if meter.saved is not None:
                updates.append({"step": step, **meter.after()})
            if step - read >= trainer_lib.SRGANTrainer.HISTORY // 2 or step % every == 0 or step == steps:
                losses.extend({"step": k, **v} for k, v in trainer.recent_scalars(read + 1, step))
                read = step
            if step % every == 0 or step == steps:
                train_seconds += time.perf_counter() - tick
                tick = time.perf_counter()
                path = trainer.save()
                psnr, ssim, _ = evaluator(generator)
                validated = validation.run(trainer, path) if validation else {"psnr_fair": float("nan")}
                window = [r for r in losses if r["step"] > step - every]
                row = {"step": step, "epoch": step / stream.batches_per_epoch, "psnr_fair": psnr,
                       "ssim_fair": ssim, "bias_fair": evaluator.last_bias,
                       "val_psnr_fair": validated["psnr_fair"],
                       **{k: float(np.mean([r[k] for r in window]))
                                             for k in ("mse", "gdl", "adv", "d_loss")},
                       **probe_diagnostics(trainer, probe[0], probe[1]),
                       "seconds": train_seconds}
                curve.append(row)
                log(f"step {step}/{steps} (epoch {row['epoch']:.2f}): GAN {psnr:.2f} dB / {ssim:.4f} "
                    f"(tricubic {evaluator.baselines['tricubic']:.2f} / "
                    f"{evaluator.baselines_ssim['tricubic']:.4f}); bias {row['bias_fair']:+.2f} % of range; mse {row['mse']:.4g} gdl "
                    f"{row['gdl']:.4g} adv {row['adv']:.3g} d_loss {row['d_loss']:.3g}; "
                    f"D(HR) {row['d_hr']:.3g} D(SR) {row['d_sr']:.3g}; adversarial share of the G "
                    f"gradient {row['adv_share']:.3f}; "
                    f"{train_seconds / step:.2f} s/step")
                eval_seconds += time.perf_counter() - tick
                meter.before()
                tick = time.perf_counter()
            if step == steps:
                break
        else:
            if taken == 0:
                raise ValueError(f"epoch {epoch} gave no training batch; see the messages above")
            trainer.end_epoch()
    return {"curve": curve, "losses": losses, "updates": updates, "train_seconds": train_seconds,
            "eval_seconds": eval_seconds, "checkpoint": path,
            "batches_per_epoch": stream.batches_per_epoch,
            "best": validation.best.record if validation else None}


# --------------------------------------------------------------------------- #
# Run: final evaluation through the command line, table, plot
# --------------------------------------------------------------------------- #


def evaluate_with_cli(checkpoint_dir, volumes_dir, log_path):
    """Runs ``python model.py -evaluate True`` on a checkpoint and reads its metrics.csv.

    Returns:
        list of dicts, one per test subject, ``metrics.METRIC_COLUMNS`` (floats
        but ``subject``).

    Raises:
        RuntimeError: if the command fails (its output is in ``log_path``).
    """
    import subprocess

    model_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model.py")
    command = [sys.executable, model_py, "-evaluate", "True", "-checkpoint_dir_restore", checkpoint_dir,
               "-path_volumes", volumes_dir]
    with open(log_path, "w") as fh:
        fh.write(" ".join(command) + "\n")
        fh.flush()
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}; see {log_path}")
    _, rows = durable.read_csv_rows(os.path.join(volumes_dir, "metrics.csv"))
    return [{k: (v if k == "subject" else float(v)) for k, v in row.items()} for row in rows]


def best_checkpoint_results(cfg, record, checkpoint_dir, out, test_subjects):
    """The best checkpoint (by validation PSNR) evaluated with the command line, as the last one is.

    Args:
        record: the best checkpoint's validation record (``validation.best_record``).

    Returns:
        dict: ``step``, ``validation_psnr_fair``, ``table`` (:func:`summarize`),
        ``paired`` (:func:`paired_difference`), ``error_phase_pattern`` and
        ``subjects`` (the per-subject rows).
    """
    import validation as validation_lib

    volumes = os.path.join(out, "volumes_best")
    rows = evaluate_with_cli(os.path.join(checkpoint_dir, validation_lib.BEST_FOLDER), volumes,
                             os.path.join(out, "evaluate_best.log"))
    return {"step": record["step"], "validation_psnr_fair": record["psnr_fair"], "table": summarize(rows),
            "paired": paired_difference(rows), "subjects": rows,
            "error_phase_pattern": texture_of_evaluation(cfg, test_subjects, volumes)}


def _mean_sd(values):
    values = np.asarray(values, dtype=np.float64)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), sd


def summarize(rows):
    """Per method: mean and sample sd (ddof 1) of the fair metrics, means of the original's.

    Args:
        rows: the per-subject metric dicts of :func:`evaluate_with_cli`.

    Returns:
        list of dicts with ``TABLE_COLUMNS``, GAN first, then the baselines.
    """
    table = []
    for method, label in METHOD_LABELS.items():
        suffix = "" if method == "sr" else f"_{method}"
        psnr_fair = _mean_sd([r[f"psnr{suffix}_fair"] for r in rows])
        ssim_fair = _mean_sd([r[f"ssim{suffix}_fair"] for r in rows])
        bias = _mean_sd([r.get(f"bias{suffix}_fair", np.nan) for r in rows])
        table.append({"method": label, "n": len(rows),
                      "psnr_fair_mean": psnr_fair[0], "psnr_fair_sd": psnr_fair[1],
                      "ssim_fair_mean": ssim_fair[0], "ssim_fair_sd": ssim_fair[1],
                      "bias_fair_mean": bias[0], "bias_fair_sd": bias[1],
                      "psnr_mean": float(np.mean([r[f"psnr{suffix}"] for r in rows])),
                      "ssim_mean": float(np.mean([r[f"ssim{suffix}"] for r in rows]))})
    return table


def paired_difference(rows, baseline="tricubic"):
    """GAN minus a baseline, per subject: mean and sd of the PSNR and SSIM differences, and the wins."""
    dp = [r["psnr_fair"] - r[f"psnr_{baseline}_fair"] for r in rows]
    ds = [r["ssim_fair"] - r[f"ssim_{baseline}_fair"] for r in rows]
    return {"baseline": baseline, "psnr": _mean_sd(dp), "ssim": _mean_sd(ds),
            "psnr_wins": int(np.sum(np.asarray(dp) > 0)), "ssim_wins": int(np.sum(np.asarray(ds) > 0)),
            "n": len(rows)}


def _pm(mean, sd, digits):
    return f"{mean:.{digits}f}" + ("" if np.isnan(sd) else f" ± {sd:.{digits}f}")


def header_lines(s, info):
    """The settings lines above the table (markdown list items)."""
    x = lambda v: "×".join(map(str, v))  # noqa: E731
    data_grid = "the template's grid" if s["data_shape"] is None else f"{x(s['data_shape'])} (central crop)"
    return [
        f"upsampling factor ×{UpsamplingFactor.of(s['factor']).text} ({s['slice_profile']} slice profile), "
        f"mode {s['mode']}, F={s['feature_size']}, "
        f"{s['residual_blocks']} residual blocks",
        f"geometry {s['geometry']}: data {data_grid}, 1 mm; volume {x(s['volume_shape'])}, "
        f"patches {x(s['patch_shape'])}, margin {s['margin']} ({info['patches_per_volume']} per volume)",
        f"training: {s['steps']} steps of batch {s['batch_size']} ({info['epochs']:.2f} epochs of "
        f"{info['batches_per_epoch']} batches), learning rate {s['learning_rate']:g} "
        f"(inverse-time decay), pretrain steps {s['pretrain_steps']}, GAN-phase generator rate "
        f"×{gan_lr_scale_of(s)}, seed {s['seed']}",
        f"subjects: {info['train']} train / {info.get('validation', 0)} validation / {info['test']} test "
        f"({info['data']})",
        f"wall time: {info['wall_seconds'] / 60:.1f} min (training {info['train_seconds'] / 60:.1f}, "
        f"learning-curve evaluations {info['eval_seconds'] / 60:.1f}, final evaluation "
        f"{info['final_eval_seconds'] / 60:.1f})",
        f"hardware: {info['hardware']}",
    ]


def write_table(out, s, info, table, paired, texture=None, best=None):
    """Writes ``out/table.md`` and ``out/table.csv``; returns the markdown text.

    Args:
        out: the experiment folder.
        s: the run settings (:func:`run_settings`).
        info: dict of the run's facts for the header (:func:`header_lines`).
        table: rows of :func:`summarize` (the last checkpoint).
        paired: :func:`paired_difference` of the GAN against tricubic.
        texture: optional dict method -> :func:`error_phase_pattern` amplitude.
        best: optional :func:`best_checkpoint_results`: its GAN row follows the
            last checkpoint's, labelled ``GAN best`` (table.csv) with its step.
    """
    if best:
        last = dict(table[0], method=f"GAN last (step {s['steps']})")
        best_row = dict(best["table"][0], method=f"GAN best (step {best['step']}, by validation)")
        table = [last, best_row] + table[1:]
    lines = ["# 3D SRGAN vs interpolation", ""] + [f"- {h}" for h in header_lines(s, info)] + [
        "- metrics: masked PSNR (dB) and 3-D SSIM on the test subjects, mean ± sample sd; "
        "fair = one data range for every method (the reference's max - min); original rule = "
        "max - min of both volumes of each pair", "",
        "| method | PSNR fair | SSIM fair | bias (% of range) | PSNR original rule | SSIM original rule |",
        "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {_pm(r['psnr_fair_mean'], r['psnr_fair_sd'], 2)} | "
                     f"{_pm(r['ssim_fair_mean'], r['ssim_fair_sd'], 4)} | "
                     f"{_pm(r.get('bias_fair_mean', np.nan), r.get('bias_fair_sd', np.nan), 2)} | "
                     f"{r['psnr_mean']:.2f} | {r['ssim_mean']:.4f} |")
    for label, p in (("GAN", paired),) if not best else (("GAN last", paired), ("GAN best", best["paired"])):
        lines += ["", f"{label} - {p['baseline']}, paired over the {p['n']} test subjects: PSNR "
                  f"{_pm(*p['psnr'], 2)} dB ({label} higher on {p['psnr_wins']}), SSIM "
                  f"{_pm(*p['ssim'], 4)} ({label} higher on {p['ssim_wins']})."]
    if texture:
        f = UpsamplingFactor.of(s["factor"]).text
        phases = UpsamplingFactor.of(s["factor"]).voxels
        lines += ["", f"Period-{f} error pattern (RMS over the {phases} voxel phases of the mean error, "
                  "% of the mean brain intensity; 0 = no checkerboard): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in texture.items()) + "."]
        if best:
            lines[-1] += f" GAN best: {best['error_phase_pattern']['GAN']:.3f}."
    lines.append("")
    text = "\n".join(lines)
    durable.write_text(os.path.join(out, "table.md"), text)
    csv_lines = [",".join(TABLE_COLUMNS)] + [
        ",".join(str(r[c]).split(" (")[0] if c in ("method", "n") else f"{r[c]:.6f}" for c in TABLE_COLUMNS)
        for r in table]
    durable.write_text(os.path.join(out, "table.csv"), "\n".join(csv_lines) + "\n")
    return text


def plot_curve(path, curve, baselines, title):
    """Writes the learning curve: test fair PSNR vs step with the baselines; the loss terms below.

    Args:
        path: PNG to write.
        curve: the ``curve`` rows of :func:`train_with_curve`.
        baselines: dict method -> mean fair PSNR.
        title: str.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in curve]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    top.plot(steps, [r["psnr_fair"] for r in curve], "o-", color="black", label="GAN, test", markersize=3)
    validated = [r.get("val_psnr_fair", float("nan")) for r in curve]
    if np.isfinite(validated).any():
        # The validation subjects are other brains: their level differs; their ups and downs pick the best.
        top.plot(steps, validated, "s--", color="tab:gray", label="GAN, validation", markersize=3)
    for (name, value), style in zip(sorted(baselines.items(), key=lambda kv: -kv[1]), ("--", "-.", ":")):
        top.axhline(value, linestyle=style, color="tab:blue", label=f"{name} {value:.2f}")
    top.set_ylabel("PSNR, fair (dB)")
    top.set_title(title, fontsize=9)
    top.legend(fontsize=8, loc="lower right")
    top.grid(alpha=0.3)
    for key, color in (("mse", "tab:red"), ("gdl", "tab:orange"), ("adv", "tab:green"),
                       ("d_loss", "tab:purple")):
        values = [r[key] for r in curve]
        if any(v > 0 for v in values):
            bottom.plot(steps, values, "o-", color=color, label=key, markersize=3)
    bottom.set_yscale("log")
    bottom.set_xlabel("training step")
    bottom.set_ylabel("loss (mean over window)")
    bottom.legend(fontsize=8, ncol=4)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    durable.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), suffix=".png")
    plt.close(fig)


def error_phase_pattern(estimate, hr, mask, factor):
    """The period-``factor`` part of an estimate's error: its mean at each voxel phase.

    Sub-pixel upsampling computes the ``fx·fy·fz`` voxels of each output block
    from different output channels, so a network that has not equalised them
    leaves a periodic pattern (the checkerboard) that this measures. Voxel
    ``(x, y, z)`` has phase ``(x % fx, y % fy, z % fz)`` on the canonical grid,
    where low-resolution voxel ``i`` sits on high-resolution voxel ``f * i``.
    The reference's own noise averages out over the many voxels of a phase.

    Args:
        estimate: float (x, y, z), the estimate on the canonical grid.
        hr: float (x, y, z), the reference, same grid.
        mask: bool (x, y, z), the voxels to use (e.g. the eroded brain mask).
        factor: int f, or (fx, fy, fz).

    Returns:
        (amplitude, pattern): the RMS over phases of ``pattern`` minus its mean,
        and float64 (fx, fy, fz), the mean error at each phase; both in percent
        of the mean reference intensity inside ``mask``.
    """
    fx, fy, fz = UpsamplingFactor.of(factor).axes
    error = np.asarray(estimate, np.float64) - np.asarray(hr, np.float64)
    scale = float(np.mean(np.asarray(hr, np.float64)[mask])) / 100.0
    pattern = np.zeros((fx, fy, fz))
    for p in np.ndindex(fx, fy, fz):
        sel = mask[p[0]::fx, p[1]::fy, p[2]::fz]
        pattern[p] = error[p[0]::fx, p[1]::fy, p[2]::fz][sel].mean() / scale
    return float(np.sqrt(np.mean((pattern - pattern.mean()) ** 2))), pattern


def texture_of_evaluation(cfg, subjects, volumes_dir):
    """:func:`error_phase_pattern` amplitudes of the GAN and tricubic outputs the evaluation wrote.

    Reads ``<subject>_sr/_hr/_lr.nii.gz`` from ``volumes_dir``, brings them
    back to the canonical grid, and uses the brain mask eroded by 2 voxels
    (the brain's edge is a step the upsampling cannot place exactly).

    Returns:
        dict method -> mean amplitude over the subjects (percent), for
        ``GAN`` and ``tricubic``.
    """
    import nibabel as nib

    import train_dataset as td

    f, shape = cfg.upsampling_factor, cfg.volume_shape
    amplitudes = {"GAN": [], "tricubic": []}
    for subject in subjects:
        read = lambda kind: np.asarray(nib.load(os.path.join(  # noqa: E731
            volumes_dir, f"{subject.name}_{kind}.nii.gz")).dataobj, np.float32)
        hr, _ = td.to_canonical(read("hr"), shape)
        sr, _ = td.to_canonical(read("sr"), shape)
        mask, _ = td.to_canonical(nifti_io.load_mask(subject, log=lambda m: None).astype(np.float32), shape)
        mask = ndimage.binary_erosion(mask > 0.5, iterations=2)
        tricubic = utils.upsample_baseline(read("lr"), f, 3, hr.shape, cfg.slice_profile)
        amplitudes["GAN"].append(error_phase_pattern(sr, hr, mask, f)[0])
        amplitudes["tricubic"].append(error_phase_pattern(tricubic, hr, mask, f)[0])
    return {k: float(np.mean(v)) for k, v in amplitudes.items()}


def _hardware():
    """One line: CPU model and cores, GPUs seen by TensorFlow, oneDNN setting."""
    import tensorflow as tf

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")
    return (f"CPU {cpu}, {os.cpu_count()} cores (TF_ENABLE_ONEDNN_OPTS={onednn}); "
            f"GPU: {', '.join(g.name for g in gpus) if gpus else 'none'}; TensorFlow {tf.__version__}")


def _write_csv(path, columns, rows):
    lines = [",".join(columns)] + [",".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c])
                                            for c in columns) for r in rows]
    durable.write_text(path, "\n".join(lines) + "\n")


def run_experiment(s, log=print):
    """The whole experiment: data, training with the learning curve, final evaluation, table, plot.

    Writes into ``s["out"]``: ``data/`` (unless ``--data``), ``checkpoints/``,
    ``volumes/`` (the evaluation command's outputs and metrics.csv),
    ``evaluate.log``, ``table.md``, ``table.csv``, ``results.json``,
    ``curve.csv``, ``losses.csv`` and ``learning_curve.png``.

    Returns:
        dict, what results.json holds.

    Raises:
        ValueError: bad settings or data, or ``OUT/checkpoints`` already holding a run.
        RuntimeError: if the evaluation command fails.
    """
    started = time.perf_counter()
    out = os.path.abspath(s["out"])
    os.makedirs(out, exist_ok=True)
    checkpoint_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} already holds a run; choose another --out "
                         f"(pass --data {os.path.join(out, 'data')} to reuse its dataset)")
    data = prepare_data(dict(s, out=out), log)

    import config
    import errors
    import model
    import splits
    import train_dataset as td

    ppv = td.patches_per_volume(s["volume_shape"], s["patch_shape"], s["margin"])
    subjects, _ = layouts.find_subjects(data, log=log)
    train = splits.split_subjects(subjects, s["train_fraction"])[0]
    if s["validation_fraction"]:
        train = splits.hold_out(train, s["validation_fraction"], s["seed"])[0]
    n_train = len(train)
    epochs = -(-s["steps"] // td.batches_per_epoch(n_train, s["batch_size"], s["volume_shape"],
                                                   s["patch_shape"], s["margin"]))
    try:
        cfg = model.parse_command(model_argv(s, data, checkpoint_dir, epochs), log=log).settings
    except errors.UserError as e:
        raise ValueError(str(e)) from e
    split = splits.training_split(cfg, log)
    test_subjects = split.test
    if not test_subjects:
        raise ValueError(f"no test subject in {data} with --train-fraction {s['train_fraction']}")
    os.makedirs(checkpoint_dir, exist_ok=True)
    durable.write_json(os.path.join(checkpoint_dir, config.CONFIG_NAME), config.config_record(cfg))
    splits.write_split(checkpoint_dir, data, cfg.train_fraction, split)

    evaluator = CurveEvaluator(cfg, test_subjects, log)
    trained = train_with_curve(cfg, s, split.train, evaluator, log, split.validation)
    t0 = time.perf_counter()
    rows = evaluate_with_cli(checkpoint_dir, os.path.join(out, "volumes"), os.path.join(out, "evaluate.log"))
    best = trained["best"] and best_checkpoint_results(cfg, trained["best"], checkpoint_dir, out, test_subjects)
    final_eval_seconds = time.perf_counter() - t0

    table = summarize(rows)
    paired = paired_difference(rows)
    texture = texture_of_evaluation(cfg, test_subjects, os.path.join(out, "volumes"))
    info = {"patches_per_volume": ppv, "batches_per_epoch": trained["batches_per_epoch"],
            "epochs": s["steps"] / trained["batches_per_epoch"], "train": len(split.train),
            "validation": len(split.validation), "test": len(test_subjects), "data": data,
            "train_seconds": trained["train_seconds"],
            "eval_seconds": trained["eval_seconds"], "final_eval_seconds": final_eval_seconds,
            "wall_seconds": time.perf_counter() - started, "hardware": _hardware()}
    text = write_table(out, s, info, table, paired, texture, best)
    _write_csv(os.path.join(out, "curve.csv"), CURVE_COLUMNS, trained["curve"])
    _write_csv(os.path.join(out, "losses.csv"), LOSS_COLUMNS, trained["losses"])
    plot_curve(os.path.join(out, "learning_curve.png"), trained["curve"], evaluator.baselines,
               f"x{UpsamplingFactor.of(s['factor']).text} {s['slice_profile']} profile, {s['mode']}, lr {s['learning_rate']:g}, "
               f"pretrain {s['pretrain_steps']}, "
               f"{s['geometry']} geometry, {len(test_subjects)} test subjects")
    results = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
               "info": info, "table": table, "paired_vs_tricubic": paired, "subjects": rows,
               "error_phase_pattern": texture, "best": best,
               "curve": trained["curve"], "updates": trained["updates"],
               "curve_baselines_psnr_fair": evaluator.baselines,
               "curve_baselines_ssim_fair": evaluator.baselines_ssim,
               # The in-process curve and the evaluation command must agree on the last checkpoint.
               "last_curve_minus_cli_psnr_fair": trained["curve"][-1]["psnr_fair"] - table[0]["psnr_fair_mean"]}
    durable.write_json(os.path.join(out, "results.json"), results)
    log(text)
    return results


# --------------------------------------------------------------------------- #
# Seeds: one configuration, several training seeds, one table
# --------------------------------------------------------------------------- #


def seed_folder(out, seed):
    """str, the experiment folder of one seed of a ``--seeds`` run."""
    return os.path.join(out, f"seed-{seed}")


def run_seeds(s, seeds, log=print):
    """Runs one configuration once per training seed on one dataset, then summarises over seeds.

    The data are built once into ``OUT/data`` from ``--data-seed`` (or ``--data``),
    so the seeds differ only in the training (weights, data order, label
    noise, validation subjects). Each seed is a whole :func:`run_experiment` in
    ``OUT/seed-<S>``; one whose ``results.json`` exists is not run again, so a
    killed ``--seeds`` run continues where it stopped.

    Returns:
        dict, what ``OUT/seeds.json`` holds (:func:`summarize_seeds`).
    """
    out = os.path.abspath(s["out"])
    os.makedirs(out, exist_ok=True)
    data = prepare_data(dict(s, out=out), log)
    results = {}
    for seed in seeds:
        folder = seed_folder(out, seed)
        done = os.path.join(folder, "results.json")
        if os.path.exists(done):
            log(f"seed {seed}: done before ({done})")
        else:
            log(f"seed {seed}: training into {folder}")
            run_experiment(dict(s, out=folder, data=data, seed=seed), log)
        with open(done) as fh:
            results[seed] = json.load(fh)
    summary = summarize_seeds(results)
    durable.write_json(os.path.join(out, "seeds.json"), summary)
    text = seeds_table(s, summary)
    durable.write_text(os.path.join(out, "table.md"), text)
    log(text)
    return summary


def summarize_seeds(results):
    """Mean ± sd over every seed × test subject pair, per checkpoint (last, best), and the wins.

    Args:
        results: dict seed -> that seed's results.json.

    Returns:
        dict with ``seeds`` and, per checkpoint in ``last``/``best`` (best only
        when every seed has one): ``pairs``, ``gan``/``tricubic`` (PSNR, SSIM,
        bias mean and sd), ``difference`` (GAN - tricubic PSNR and SSIM, mean
        and sd), ``psnr_wins``, ``ssim_wins`` (pairs where the GAN is higher),
        ``seeds_won`` (seeds whose mean GAN PSNR is above tricubic's) and
        ``per_seed`` (seed -> mean GAN and tricubic PSNR, the best step).
    """
    kinds = {"last": {k: r["subjects"] for k, r in results.items()}}
    if all(r.get("best") for r in results.values()):
        kinds["best"] = {k: r["best"]["subjects"] for k, r in results.items()}
    out = {"seeds": sorted(results)}
    for kind, by_seed in kinds.items():
        rows = [row for seed in sorted(by_seed) for row in by_seed[seed]]
        pick = lambda key: [r.get(key, np.nan) for r in rows]  # noqa: E731
        dp = np.subtract(pick("psnr_fair"), pick("psnr_tricubic_fair"))
        ds = np.subtract(pick("ssim_fair"), pick("ssim_tricubic_fair"))
        per_seed = {seed: {"gan_psnr": float(np.mean([r["psnr_fair"] for r in seed_rows])),
                           "tricubic_psnr": float(np.mean([r["psnr_tricubic_fair"] for r in seed_rows])),
                           "step": (results[seed]["best"]["step"] if kind == "best"
                                    else results[seed]["settings"]["steps"])}
                    for seed, seed_rows in sorted(by_seed.items())}
        out[kind] = {
            "pairs": len(rows),
            "gan": {m: _mean_sd(pick(f"{m}_fair")) for m in ("psnr", "ssim", "bias")},
            "tricubic": {m: _mean_sd(pick(f"{m}_tricubic_fair")) for m in ("psnr", "ssim", "bias")},
            "difference": {"psnr": _mean_sd(dp), "ssim": _mean_sd(ds)},
            "psnr_wins": int(np.sum(dp > 0)), "ssim_wins": int(np.sum(ds > 0)),
            "seeds_won": int(sum(v["gan_psnr"] > v["tricubic_psnr"] for v in per_seed.values())),
            "per_seed": per_seed}
    return out


def seeds_table(s, summary):
    """The markdown of a ``--seeds`` run: a row per checkpoint, then a line per seed."""
    n_seeds = len(summary["seeds"])
    lines = [f"# 3D SRGAN vs tricubic over {n_seeds} seeds ({', '.join(map(str, summary['seeds']))})", "",
             f"- x{UpsamplingFactor.of(s['factor']).text} ({s['slice_profile']} slice profile), {s['mode']}, "
             f"lr {s['learning_rate']:g}, pretrain {s['pretrain_steps']}, GAN-phase rate ×{gan_lr_scale_of(s)}, "
             f"{s['steps']} steps, "
             f"geometry {s['geometry']}, data seed {s['data_seed']}",
             "- fair metrics (one data range), mean ± sd over every seed × test subject pair; bias in % "
             "of the reference's range", "",
             "| checkpoint | pairs | GAN PSNR | tricubic PSNR | GAN - tricubic PSNR (pairs won) | GAN SSIM | "
             "tricubic SSIM | GAN - tricubic SSIM (pairs won) | GAN bias | seeds won (PSNR) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("last", "best"):
        k = summary.get(kind)
        if not k:
            continue
        lines.append(f"| {kind} | {k['pairs']} | {_pm(*k['gan']['psnr'], 2)} | {_pm(*k['tricubic']['psnr'], 2)} | "
                     f"{_pm(*k['difference']['psnr'], 2)} ({k['psnr_wins']}/{k['pairs']}) | "
                     f"{_pm(*k['gan']['ssim'], 4)} | {_pm(*k['tricubic']['ssim'], 4)} | "
                     f"{_pm(*k['difference']['ssim'], 4)} ({k['ssim_wins']}/{k['pairs']}) | "
                     f"{_pm(*k['gan']['bias'], 2)} | {k['seeds_won']}/{n_seeds} |")
    for kind in ("last", "best"):
        for seed, v in (summary.get(kind) or {}).get("per_seed", {}).items():
            lines.append(f"- {kind}, seed {seed} (step {v['step']}): GAN {v['gan_psnr']:.2f} dB, "
                         f"tricubic {v['tricubic_psnr']:.2f} dB")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- #
# Compare: several runs in one table and one plot
# --------------------------------------------------------------------------- #


def gan_lr_scale_of(settings):
    """The -gan_lr_scale of a run's settings (runs recorded before it existed ran at the legacy value)."""
    return settings.get("gan_lr_scale", config.LEGACY_VALUES["gan_lr_scale"])


def _run_label(settings):
    box = " box" if settings.get("slice_profile") == "box" else ""
    label = f"x{UpsamplingFactor.of(settings['factor']).text}{box} {settings['mode']}, lr {settings['learning_rate']:g}"
    if settings["pretrain_steps"]:
        label += (", no adversarial term" if settings["pretrain_steps"] >= settings["steps"]
                  else f", {settings['pretrain_steps']} pretrain steps, GAN rate ×{gan_lr_scale_of(settings)}")
    return label


def compare_runs(run_dirs, markdown_path, png_path=None):
    """One table (a row per run) and optionally one plot of GAN minus tricubic PSNR vs step.

    Args:
        run_dirs: experiment folders written by ``run`` (each with results.json).
        markdown_path: the table to write.
        png_path: optional PNG: for every run, the learning curve's fair PSNR
            minus the tricubic baseline's (0 = as good as tricubic).

    Returns:
        str, the markdown table.

    Raises:
        ValueError: if a folder has no results.json.
    """
    runs = []
    for folder in run_dirs:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise ValueError(f"{folder}: no results.json (not a finished quality.py run)")
        with open(path) as fh:
            runs.append(json.load(fh))
    lines = ["| run | steps | train time | GAN PSNR | tricubic PSNR | GAN - tricubic PSNR | GAN SSIM | "
             "tricubic SSIM | GAN - tricubic SSIM | period-f pattern GAN / tricubic | "
             "best by validation: step, GAN PSNR, - tricubic |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s, table, paired = r["settings"], {t["method"]: t for t in r["table"]}, r["paired_vs_tricubic"]
        gan, tri = table["GAN"], table["tricubic"]
        pattern = r.get("error_phase_pattern") or {}
        lines.append(
            f"| {_run_label(s)} | {s['steps']} | {r['info']['train_seconds'] / 60:.0f} min | "
            f"{_pm(gan['psnr_fair_mean'], gan['psnr_fair_sd'], 2)} | "
            f"{_pm(tri['psnr_fair_mean'], tri['psnr_fair_sd'], 2)} | "
            f"{_pm(*paired['psnr'], 2)} ({paired['psnr_wins']}/{paired['n']}) | "
            f"{_pm(gan['ssim_fair_mean'], gan['ssim_fair_sd'], 4)} | "
            f"{_pm(tri['ssim_fair_mean'], tri['ssim_fair_sd'], 4)} | "
            f"{_pm(*paired['ssim'], 4)} ({paired['ssim_wins']}/{paired['n']}) | "
            + (f"{pattern['GAN']:.2f} / {pattern['tricubic']:.2f} |" if pattern else "- |")
            + (f" {r['best']['step']}, {r['best']['table'][0]['psnr_fair_mean']:.2f}, "
               f"{_pm(*r['best']['paired']['psnr'], 2)} |" if r.get("best") else " - |"))
    text = "\n".join(lines) + "\n"
    durable.write_text(markdown_path, text)
    if png_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for r in runs:
            base = r["curve_baselines_psnr_fair"]["tricubic"]
            ax.plot([c["step"] for c in r["curve"]], [c["psnr_fair"] - base for c in r["curve"]],
                    "o-", markersize=3, label=_run_label(r["settings"]))
        ax.axhline(0.0, color="black", linewidth=1)
        ax.set_xlabel("training step (batch 2)")
        ax.set_ylabel("GAN - tricubic, test PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        durable.atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), suffix=".png")
        plt.close(fig)
    return text


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _factor(text):
    """Parses --factor as -upsampling_factor does (3, or 1,1,3); returns its persisted value (int or 3 ints)."""
    try:
        return UpsamplingFactor.of(text, "--factor").value
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _numbers(text, n, flag, kind=int):
    """Parses ``n`` comma-separated numbers of ``kind`` for ``flag``; argparse error otherwise."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        words = "integers" if kind is int else "numbers"
        raise argparse.ArgumentTypeError(f"{flag} {text!r} must be {n} comma-separated {words}")
    return values


def make_parser():
    """Returns the argparse parser, one sub-command per experiment step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the synthetic MNI152-based dataset (ADNI layout)")
    b.add_argument("--out", required=True, help="dataset root to write")
    b.add_argument("--subjects", type=int, default=12)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--shape", type=lambda s: _numbers(s, 3, "--shape"), default=None,
                   help="output grid X,Y,Z in 1 mm voxels (default: the template's, 197,233,189)")
    b.add_argument("--template", default=None, help="NIfTI brain to use instead of nilearn's MNI152")
    b.add_argument("--noise", type=float, default=0.02, help="Rician sigma / white matter")
    b.add_argument("--bias", type=float, default=0.3, help="bias field peak-to-peak")
    b.add_argument("--max-rotation-deg", type=float, default=10.0)
    b.add_argument("--scale-range", type=lambda s: _numbers(s, 2, "--scale-range", float), default=(0.9, 1.1),
                   help="LOW,HIGH scale per axis")

    r = sub.add_parser("run", help="build the data if needed, train, evaluate, write the table and curve")
    r.add_argument("--out", required=True, help="experiment folder (data/, checkpoints/, volumes/, table.md, ...)")
    r.add_argument("--data", default=None, help="dataset to use instead of building one into OUT/data")
    r.add_argument("--template", default=None, help="NIfTI brain for the built data instead of MNI152")
    r.add_argument("--subjects", type=int, default=None,
                   help=f"subjects to build (default {RUN_DEFAULTS['subjects']}; --quick {QUICK['subjects']})")
    r.add_argument("--train-fraction", type=float, default=0.8, help="the model's -train_fraction")
    r.add_argument("--validation-fraction", type=float, default=0.2,
                   help="the model's -validation_fraction: training subjects held out to pick the best "
                        "checkpoint, validated every --eval-every steps (0: no validation)")
    r.add_argument("--factor", type=_factor, default=4,
                   help="upsampling factor: an integer >= 2, or one per axis such as 1,1,3 (thick slices)")
    r.add_argument("--slice-profile", choices=SLICE_PROFILES, default="gaussian",
                   help="the degradation: gaussian (blur, then every f-th voxel) or box (slab means)")
    r.add_argument("--mode", choices=MODES, default="subpixel", help="upsampling mode")
    r.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {RUN_DEFAULTS['steps']}; --quick {QUICK['steps']})")
    r.add_argument("--eval-every", type=int, default=None,
                   help="steps between two learning-curve points (default steps/10)")
    r.add_argument("--geometry", choices=tuple(GEOMETRIES), default=None,
                   help=f"geometry preset (default {RUN_DEFAULTS['geometry']}; --quick quick); "
                        "--volume-shape/--patch-shape/--margin make it custom")
    r.add_argument("--volume-shape", type=lambda t: _numbers(t, 3, "--volume-shape"), default=None,
                   help="X,Y,Z canonical volume (and the built data's grid)")
    r.add_argument("--patch-shape", type=lambda t: _numbers(t, 3, "--patch-shape"), default=None,
                   help="X,Y,Z HR training patch")
    r.add_argument("--margin", type=int, default=None, help="patch margin")
    r.add_argument("--learning-rate", type=float, default=1e-4, help="initial Adam learning rate")
    r.add_argument("--pretrain-steps", type=int, default=0,
                   help="first N steps: generator on the content loss alone, D warming up (the model's -pretrain_steps)")
    r.add_argument("--gan-lr-scale", type=float, default=None,
                   help="the generator's rate in the GAN steps as a share of the schedule's (the model's "
                        f"-gan_lr_scale, default {config.defaults()['gan_lr_scale']})")
    r.add_argument("--feature-size", type=int, default=32)
    r.add_argument("--residual-blocks", type=int, default=6)
    r.add_argument("--batch-size", type=int, default=2)
    r.add_argument("--seed", type=int, default=0, help="weights and training seed (and the data's, "
                   "unless --data-seed)")
    r.add_argument("--seeds", type=lambda t: _numbers(t, len(t.split(",")), "--seeds"), default=None,
                   help="run once per training seed, e.g. 0,1,2, on one dataset; OUT/table.md summarises")
    r.add_argument("--data-seed", type=int, default=None,
                   help="seed of the built data (default: --seed; 0 with --seeds)")
    r.add_argument("--quick", action="store_true",
                   help=f"geometry quick, {QUICK['subjects']} subjects, {QUICK['steps']} steps, "
                        f"a curve point every {QUICK['eval_every']}: minutes on 2 CPU cores")
    c = sub.add_parser("compare", help="one table and one plot of several finished runs")
    c.add_argument("runs", nargs="+", help="experiment folders written by run")
    c.add_argument("--table", required=True, help="markdown table to write")
    c.add_argument("--png", default=None, help="plot of GAN - tricubic PSNR vs step to write")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    try:
        if args.command == "build":
            build_dataset(args.out, subjects=args.subjects, seed=args.seed, shape=args.shape,
                          template=args.template, noise=args.noise, bias=args.bias,
                          max_rotation_deg=args.max_rotation_deg, scale_range=args.scale_range)
        elif args.command == "run" and args.seeds:
            run_seeds(run_settings(args), args.seeds)
        elif args.command == "run":
            run_experiment(run_settings(args))
        else:
            print(compare_runs(args.runs, args.table, args.png))
    except (ValueError, ImportError) as e:  # DataError is a ValueError
        print(f"quality.py {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
