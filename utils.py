"""Shared helpers without TensorFlow: intensity normalisation, metrics, interpolation baselines,
orientation, slice previews and NIfTI/PNG output.

The numerical helpers are plain functions of their arguments, so the training,
evaluation and data code share one implementation of each rule. The NIfTI and
PNG writers go through :func:`durable.atomic_write`: a complete new file or the
previous one untouched.
"""

import math
import os

import numpy as np

import durable
import factors

# --------------------------------------------------------------------------- #
# Intensity normalisation (SPEC section 1)
# --------------------------------------------------------------------------- #


def is_int(value, minimum):
    """bool, whether ``value`` is an integer (Python or NumPy, not a bool) >= ``minimum``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def check_int(name, value, minimum=1):
    """Returns ``value`` as an int when it is an integer >= ``minimum`` (bools refused).

    Raises:
        ValueError: ``"<name> <value> must be an integer >= <minimum>"``.
    """
    if not is_int(value, minimum):
        raise ValueError(f"{name} {value!r} must be an integer >= {minimum}")
    return int(value)


def per_axis(value, name, minimum=1):
    """One integer per spatial axis, from an int (the same on every axis) or three ints.

    Args:
        value: int, or a sequence of three ints, each >= ``minimum`` (bools refused).
        name: the argument's name, for the message.
        minimum: the smallest value allowed.

    Returns:
        tuple (x, y, z) of ints.

    Raises:
        ValueError: ``"<name> <value> must be an integer >= <minimum> or three of them"``.
    """
    values = (value,) * 3 if is_int(value, minimum) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(values) != 3 or not all(is_int(v, minimum) for v in values):
        raise ValueError(f"{name} {value!r} must be an integer >= {minimum} or three of them (one per axis)")
    return tuple(int(v) for v in values)


def is_real(value):
    """bool, whether ``value`` is a finite real number (Python or NumPy, not a bool)."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(value))


def normalize(x):
    """Maps an image to [-1, 1] with the original's rule ``nf = max / 2``.

    Args:
        x: array-like (any shape), non-negative intensities.

    Returns:
        (normalised float32 array of x's shape, nf as a Python float). When the
        maximum is not positive (an all-zero image, a background patch, or a
        volume with only negative intensities, which some converters write)
        the image is returned unchanged with ``nf = 0.0``: dividing by a
        negative factor would flip the sign of the image, and
        :func:`denormalize` with ``nf = 0`` is the identity, so the pair stays
        consistent. Whole volumes with such a maximum are refused before this
        is reached (``nifti_io.check_intensity``).
    """
    x = np.asarray(x, dtype=np.float32)
    nf = float(np.max(x)) / 2.0 if x.size else 0.0
    # "not nf > 0" also catches a NaN maximum.
    if not nf > 0:
        return x.copy(), 0.0
    return (x - nf) / nf, nf


def denormalize(y, nf):
    """Inverse of :func:`normalize`: ``(y + 1) * nf`` (identity when ``nf == 0``).

    Args:
        y: array-like in [-1, 1].
        nf: the factor :func:`normalize` returned.

    Returns:
        float32 array of y's shape in the source intensity range.
    """
    y = np.asarray(y, dtype=np.float32)
    if nf == 0:
        return y.copy()
    return (y + 1.0) * np.float32(nf)


# --------------------------------------------------------------------------- #
# Evaluation: metrics, interpolation baselines, slice previews
# --------------------------------------------------------------------------- #


def compute_metrics(hr, sr, mask=None, data_range=None):
    """PSNR and 3-D SSIM of a super-resolved volume, as the original evaluation.

    Both volumes are multiplied by the brain mask and SSIM runs over the 3-D
    volume (``skimage.metrics``, 7-voxel window). By default ``data_range`` is
    ``max(hr, sr) - min(hr, sr)`` over the unmasked volumes (the original's
    rule), so it depends on the estimate; passing the reference's
    ``hr.max() - hr.min()`` for every method compares methods on one scale.

    Args:
        hr: float array (x, y, z), the reference in source intensities.
        sr: float array (x, y, z), the estimate, same shape and intensities.
        mask: optional bool/0-1 array (x, y, z); None means the whole volume.
        data_range: None for the original's rule (1.0 when both volumes are
            constant), or a finite number > 0 used as it is.

    Returns:
        (psnr in dB, ssim in [-1, 1]) as Python floats. PSNR is ``inf`` (and
        SSIM 1.0) for volumes identical inside a non-empty mask. A mask with no
        voxel gives ``(nan, nan)``: there is nothing to measure, and an ``inf``
        would turn every mean it enters into ``inf``; summaries leave NaN out.

    Raises:
        ValueError: if the shapes differ or ``data_range`` is not a finite number > 0.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    hr = np.asarray(hr, dtype=np.float64)
    sr = np.asarray(sr, dtype=np.float64)
    if hr.shape != sr.shape:
        raise ValueError(f"metrics need equal shapes, got hr {hr.shape} and sr {sr.shape}")
    if data_range is None:
        data_range = max(hr.max(), sr.max()) - min(hr.min(), sr.min())
        if data_range <= 0:
            data_range = 1.0
    else:
        if not (is_real(data_range) and data_range > 0):
            raise ValueError(f"data_range {data_range!r} must be a finite number > 0 (or None)")
        data_range = float(data_range)
    if mask is not None:
        m = np.asarray(mask, dtype=np.float64)
        if m.shape != hr.shape:
            raise ValueError(f"metrics need a mask of the volumes' shape {hr.shape}, got {m.shape}")
        if not np.any(m):
            return float("nan"), float("nan")
        hr, sr = hr * m, sr * m
    if np.array_equal(hr, sr):
        return float("inf"), 1.0
    psnr = peak_signal_noise_ratio(hr, sr, data_range=data_range)
    win = min(7, *[n if n % 2 else n - 1 for n in hr.shape])
    ssim = structural_similarity(hr, sr, data_range=data_range, win_size=max(win, 3))
    return float(psnr), float(ssim)


def upsample_baseline(lr, upsampling_factor, order, out_shape=None, slice_profile="gaussian"):
    """Interpolates a low-resolution volume back to the high-resolution grid, where its voxels lie.

    LR voxel ``k`` lies at HR voxel ``f·k + o`` (``factors.UpsamplingFactor.lr_origin``:
    ``o = 0`` for the ``gaussian`` profile's ``x[::f]``, ``(f − 1)/2`` for the
    ``box`` profile's slab means), so HR voxel ``j`` is read at LR coordinate
    ``(j − o) / f`` (edges clamp to the border). Reading a box-degraded volume
    at ``j / f`` would shift it by a third of a slice (f = 3) and flatter a
    method that learnt the right place.

    Args:
        lr: float array (x, y, z).
        upsampling_factor: int >= 1, three ints >= 1 or a ``factors.UpsamplingFactor``:
            each axis is interpolated by its own factor (a factor 1 copies that axis).
        order: 0 nearest, 1 trilinear, 3 tricubic (B-spline).
        out_shape: (X, Y, Z) of the result, default the factors times ``lr.shape``.
        slice_profile: ``"gaussian"`` or ``"box"``, how ``lr`` was degraded.

    Returns:
        float32 array ``out_shape``.
    """
    from scipy import ndimage

    axes = (upsampling_factor.axes if isinstance(upsampling_factor, factors.UpsamplingFactor)
            else per_axis(upsampling_factor, "upsampling_factor"))  # 1,1,1 copies the volume
    lr = np.asarray(lr, dtype=np.float32)
    scale = np.asarray(axes, dtype=np.float64)
    origin = np.asarray(factors.lr_origin(axes, slice_profile), dtype=np.float64)
    out_shape = tuple(out_shape) if out_shape is not None else tuple(int(n * f) for n, f in zip(lr.shape, scale))
    return ndimage.affine_transform(lr, 1.0 / scale, offset=-origin / scale, output_shape=out_shape,
                                    order=order, mode="nearest", prefilter=order > 1)


def lr_grid_affine(upsampling_factor, slice_profile):
    """Where the LR grid lies on the HR grid: LR voxel ``k`` at HR voxel ``f·k + origin`` per axis.

    ``origin`` is 0 for the ``gaussian`` profile (``x[::f]``) and ``(f − 1)/2``
    for ``box`` (the slab's centre): ``HR affine @ lr_grid_affine`` places the
    LR volume so that it overlays the HR in a viewer.

    Returns:
        float64 (4, 4).
    """
    f = factors.UpsamplingFactor.of(upsampling_factor)
    out = np.diag([*map(float, f.axes), 1.0])
    out[:3, 3] = f.lr_origin(slice_profile)
    return out


def left_right_axis(affine):
    """The voxel axis that a voxel-to-world affine maps onto world left-right.

    World x is left-right in both RAS (NIfTI) and LPS conventions. Oblique
    affines are resolved as nibabel does (``nibabel.orientations.io_orientation``:
    each voxel axis goes to the world axis it is closest to), so permuted,
    flipped and rotated grids all work; a flip along this axis mirrors the
    head left to right.

    Args:
        affine: (4, 4) voxel-to-world matrix (float, finite).

    Returns:
        int in {0, 1, 2}.

    Raises:
        ValueError: if ``affine`` is not a finite (4, 4) matrix or no voxel
            axis maps onto world x (a degenerate affine).
    """
    from nibabel.orientations import io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"left_right_axis needs a finite (4, 4) affine, got shape {affine.shape}")
    ornt = io_orientation(affine)
    axes = [i for i in range(3) if ornt[i, 0] == 0]
    if not axes:
        raise ValueError(f"affine {affine.tolist()} maps no voxel axis onto world left-right (x)")
    return axes[0]


ROW_LABELS = ("sagittal", "coronal", "axial")
MOSAIC_FONT_SIZE = 14


def _mosaic_panels(columns, window, min_panel):
    """The bare mosaic of :func:`slices_mosaic` and where its panels are.

    Returns:
        (uint8 (h, w) image, rows, cols): rows is one ``(top, bottom)`` pixel
        span per plane, cols one ``(left, right)`` span per column (over the
        widest row).
    """
    vols = [np.asarray(v, dtype=np.float32) for v in columns]
    shape = vols[0].shape
    if any(v.shape != shape for v in vols):
        raise ValueError(f"slices_mosaic needs equal shapes, got {[v.shape for v in vols]}")
    lo, hi = window if window is not None else (0.0, float(np.percentile(vols[-1], 99.5)))
    if hi <= lo:
        hi = lo + 1.0
    cx, cy, cz = (n // 2 for n in shape)
    gap = 2
    rows = []
    for take in (lambda v: v[cx, :, :], lambda v: v[:, cy, :], lambda v: v[:, :, cz]):
        # rot90 puts the second voxel axis upwards, as viewers show radiological slices.
        cells = [np.rot90(take(v)) for v in vols]
        h = cells[0].shape[0]
        sep = np.zeros((h, gap), np.float32) + lo
        row = [c if i == 0 else np.concatenate([sep, c], axis=1) for i, c in enumerate(cells)]
        rows.append(np.concatenate(row, axis=1))
    width = max(r.shape[1] for r in rows)
    padded = []
    for i, r in enumerate(rows):
        r = np.pad(r, ((0 if i == 0 else gap, 0), (0, width - r.shape[1])), constant_values=lo)
        padded.append(r)
    img = np.concatenate(padded, axis=0)
    # Small volumes are magnified (nearest neighbour) so each panel is readable.
    scale = max(1, min_panel // max(shape))
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    img = (np.clip((img - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)
    heights = [r.shape[0] for r in rows]
    tops = [sum(heights[:i]) + i * gap for i in range(3)]
    row_spans = [(t * scale, (t + h) * scale) for t, h in zip(tops, heights)]
    cell_w = (width - gap * (len(vols) - 1)) // len(vols)
    col_spans = [(j * (cell_w + gap) * scale, (j * (cell_w + gap) + cell_w) * scale) for j in range(len(vols))]
    return img, row_spans, col_spans


def slices_mosaic(columns, window=None, min_panel=192, titles=None, row_labels=None, header=None):
    """Mid-slices of several same-shaped volumes, side by side, as one image.

    Rows are the sagittal, coronal and axial mid-slices (x, y and z planes);
    columns are the volumes in the order given. One intensity window is shared
    by all panels so they compare fairly. Optional white text on the black
    background (Pillow's default font, ``MOSAIC_FONT_SIZE`` pixels): a header line on top, a title above
    each column, a label left of each row. The panels themselves are the same
    pixels with or without text.

    Args:
        columns: list of float arrays (x, y, z), all the same shape.
        window: optional (low, high) intensities mapped to black and white;
            default (0, 99.5th percentile of the last column).
        min_panel: panels of volumes smaller than this many pixels are
            magnified by an integer factor.
        titles: optional list of one string per column (e.g. ``"LR"``,
            ``"tricubic"``, ``"SR"``, ``"HR"``); cut to the column's width.
        row_labels: optional 3 strings, one per row; default
            :data:`ROW_LABELS` when ``titles`` are given, none otherwise.
        header: optional one-line string above everything, e.g.
            ``"sub-01  PSNR 31.20 dB  SSIM 0.9412"``; the image widens to hold it.

    Returns:
        uint8 array (height, width): a 2-voxel black gap between panels; with
        no text exactly the panels, with text the panels offset down (header
        and titles) and right (row labels).

    Raises:
        ValueError: if the shapes differ, or ``titles``/``row_labels`` do not
            have one entry per column/row.
    """
    panels, row_spans, col_spans = _mosaic_panels(columns, window, min_panel)
    if titles is None and row_labels is None and header is None:
        return panels
    if titles is not None:
        titles = [str(t) for t in titles]
        if len(titles) != len(col_spans):
            raise ValueError(f"slices_mosaic: {len(titles)} titles for {len(col_spans)} columns")
        if row_labels is None:
            row_labels = ROW_LABELS
    if row_labels is not None:
        row_labels = [str(r) for r in row_labels]
        if len(row_labels) != 3:
            raise ValueError(f"slices_mosaic: row_labels needs 3 entries (one per plane), got {len(row_labels)}")
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=MOSAIC_FONT_SIZE)
    except (TypeError, ImportError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    pad = 4

    def text_width(s):
        left, _, right, _ = font.getbbox(s)
        return right - left

    line_h = font.getbbox("Ag")[3] + 2 * pad
    header_h = line_h if header is not None else 0
    title_h = line_h if titles is not None else 0
    left = max(text_width(r) for r in row_labels) + 2 * pad if row_labels is not None else 0
    top = header_h + title_h
    width = max(left + panels.shape[1], text_width(header) + 2 * pad if header is not None else 0)
    canvas = Image.new("L", (width, top + panels.shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    if header is not None:
        draw.text((pad, pad), header, fill=255, font=font)
    if titles is not None:
        for title, (c0, c1) in zip(titles, col_spans):
            while len(title) > 1 and text_width(title) > c1 - c0:
                title = title[:-1]
            draw.text((left + (c0 + c1 - text_width(title)) // 2, header_h + pad), title, fill=255, font=font)
    if row_labels is not None:
        for label, (r0, r1) in zip(row_labels, row_spans):
            draw.text((pad, top + (r0 + r1 - line_h) // 2 + pad), label, fill=255, font=font)
    out = np.array(canvas, dtype=np.uint8)
    out[top:, left:left + panels.shape[1]] = panels
    return out


def save_png(path, image):
    """Writes a uint8 (h, w) or (h, w, 3) image as PNG, atomically."""
    from skimage import io

    durable.atomic_write(path, lambda tmp: io.imsave(tmp, image, check_contrast=False), suffix=".png")


def nifti_suffix(path):
    """Returns ``.nii.gz`` or ``.nii`` for a NIfTI path (``.nii.gz`` when unknown)."""
    return ".nii" if os.fspath(path).endswith(".nii") else ".nii.gz"


def save_nifti(path, data, affine, header=None, zooms=None, dtype=np.float32):
    """Saves a 3-D volume as NIfTI-1, atomically.

    Args:
        path: destination ending in ``.nii`` or ``.nii.gz``.
        data: array (x, y, z).
        affine: (4, 4) voxel-to-world matrix of the volume.
        header: optional nibabel header to copy metadata (units, the q/sform
            codes that say which space the affine maps to) from; its data
            shape and type are replaced. Without one the codes are 1 (scanner).
        zooms: optional voxel sizes (3,), default: those implied by ``affine``.
        dtype: on-disk data type (float32 for results; int16/uint8 for phantoms).
    """
    import nibabel as nib

    data = np.asarray(data, dtype=dtype)
    affine = np.asarray(affine, dtype=np.float64)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, affine, header=hdr)
    img.set_data_dtype(dtype)
    # A copied header may carry the source's scaling; our data are real values.
    img.header.set_slope_inter(1.0, 0.0)
    if header is None:
        img.header.set_xyzt_units("mm", "sec")
    codes = ((int(header["qform_code"]) or 1), (int(header["sform_code"]) or 1)) if header is not None \
        else (1, 1)
    img.set_qform(affine, code=codes[0])
    img.set_sform(affine, code=codes[1])
    if zooms is not None:
        img.header.set_zooms(tuple(float(z) for z in zooms))
    durable.atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=nifti_suffix(path))
