"""Shared helpers: the 3-D voxel shuffle, intensity normalisation, metrics, orientation and durable output.

The numerical helpers are plain functions of their arguments, so the training,
evaluation and data code share one implementation of each rule. Every file the
project writes (JSON, CSV, NIfTI, PNG) goes through :func:`atomic_write`, which
either puts the complete new file in place or leaves the previous one as it was
and raises :class:`OutputError`; :class:`RunLock` keeps two runs out of one
folder.
"""

import csv
import datetime
import errno
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading

import numpy as np
import tensorflow as tf


# --------------------------------------------------------------------------- #
# 3-D periodic shuffle (sub-pixel convolution, Shi et al. 2016, in 3-D)
# --------------------------------------------------------------------------- #


def voxel_shuffle(x, r=2):
    """Rearranges channels into an ``r``-times finer 3-D grid (3-D pixel shuffle).

    Reproduces the channel order of the original ``subPixelConv3d`` (a
    split/concat/reshape chain): the output voxel at offsets ``(r1, r2, r3)``
    inside its ``r x r x r`` block, channel ``o`` of ``c``, takes input channel
    ``((r2 * r + r1) * r + r3) * c + o`` of its low-resolution voxel.

    Works for any batch and spatial size, also inside ``tf.function`` with
    unknown static shapes; only the channel count must be known.

    Args:
        x: float tensor (b, x, y, z, r**3 * c), channels-last.
        r: int >= 1, the upsampling factor of this stage.

    Returns:
        Tensor of x's dtype, (b, r*x, r*y, r*z, c).

    Raises:
        ValueError: if ``r`` is not a positive integer, ``x`` is not 5-D, or its
            channel count is unknown or not divisible by ``r**3``.
    """
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
        raise ValueError(f"voxel_shuffle factor r={r!r} must be a positive integer")
    x = tf.convert_to_tensor(x)
    if x.shape.rank is not None and x.shape.rank != 5:
        raise ValueError(f"voxel_shuffle expects a 5-D (b, x, y, z, c) tensor, got shape {x.shape}")
    channels = x.shape[-1]
    if channels is None:
        raise ValueError("voxel_shuffle needs a known channel count")
    if channels % (r ** 3):
        raise ValueError(
            f"voxel_shuffle: {channels} channels are not divisible by r**3 = {r ** 3} (r={r})")
    c = channels // r ** 3
    dyn = tf.shape(x)
    b, nx, ny, nz = dyn[0], dyn[1], dyn[2], dyn[3]
    # Channel index ((r2*r + r1)*r + r3)*c + o  ->  axes (r2, r1, r3, c).
    x = tf.reshape(x, tf.stack([b, nx, ny, nz, r, r, r, c]))  # (b, x, y, z, r2, r1, r3, c)
    x = tf.transpose(x, [0, 1, 5, 2, 4, 3, 6, 7])  # (b, x, r1, y, r2, z, r3, c)
    x = tf.reshape(x, tf.stack([b, nx * r, ny * r, nz * r, c]))  # (b, r*x, r*y, r*z, c)
    return x


def voxel_unshuffle(x, r=2):
    """Inverse of :func:`voxel_shuffle` (space-to-depth with the same channel order).

    Args:
        x: float tensor (b, r*x, r*y, r*z, c).
        r: int >= 1.

    Returns:
        Tensor (b, x, y, z, r**3 * c) with ``voxel_shuffle(voxel_unshuffle(x, r), r) == x``.

    Raises:
        ValueError: if ``r`` is not a positive integer, or the channel count is unknown.
    """
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
        raise ValueError(f"voxel_unshuffle factor r={r!r} must be a positive integer")
    x = tf.convert_to_tensor(x)
    c = x.shape[-1]
    if c is None:
        raise ValueError("voxel_unshuffle needs a known channel count")
    dyn = tf.shape(x)
    b, nx, ny, nz = dyn[0], dyn[1] // r, dyn[2] // r, dyn[3] // r
    x = tf.reshape(x, tf.stack([b, nx, r, ny, r, nz, r, c]))  # (b, x, r1, y, r2, z, r3, c)
    x = tf.transpose(x, [0, 1, 3, 5, 4, 2, 6, 7])  # (b, x, y, z, r2, r1, r3, c)
    return tf.reshape(x, tf.stack([b, nx, ny, nz, r ** 3 * c]))


# --------------------------------------------------------------------------- #
# Intensity normalisation (SPEC section 1)
# --------------------------------------------------------------------------- #


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
        is reached (``train_dataset.check_intensity``).
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
        if isinstance(data_range, bool) or not isinstance(data_range, (int, float, np.integer, np.floating)) \
                or not (math.isfinite(data_range) and data_range > 0):
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


def upsample_baseline(lr, upsampling_factor, order, out_shape=None):
    """Interpolates a low-resolution volume back to the high-resolution grid.

    Uses the geometry of the degradation ``x[::f]``: low-resolution voxel ``i``
    sits on high-resolution voxel ``f * i``, so high-resolution voxel ``j`` is
    read at low-resolution coordinate ``j / f`` (edges clamp to the border).

    Args:
        lr: float array (x, y, z).
        upsampling_factor: int f.
        order: 0 nearest, 1 trilinear, 3 tricubic (B-spline).
        out_shape: (X, Y, Z) of the result, default ``f`` times ``lr.shape``.

    Returns:
        float32 array ``out_shape``.
    """
    from scipy import ndimage

    lr = np.asarray(lr, dtype=np.float32)
    f = upsampling_factor
    out_shape = tuple(out_shape) if out_shape is not None else tuple(n * f for n in lr.shape)
    return ndimage.affine_transform(lr, np.full(3, 1.0 / f), output_shape=out_shape,
                                    order=order, mode="nearest", prefilter=order > 1)


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

    atomic_write(path, lambda tmp: io.imsave(tmp, image, check_contrast=False), suffix=".png")


# --------------------------------------------------------------------------- #
# Durable file output
# --------------------------------------------------------------------------- #

#: Prefix of every temporary file :func:`atomic_write` creates (``.tmp-<name>-<random><suffix>``).
TMP_PREFIX = ".tmp-"
# Temporary names keep at most this much of the destination's name, so they stay
# under the 255-byte limit of common filesystems.
_TMP_NAME_KEEP = 120


class OutputError(OSError):
    """A file could not be written; the previous file at ``path``, if any, is intact.

    ``str(err)`` is ``"cannot write {path}: {reason}"``. Raised by
    :func:`atomic_write` and every writer built on it, with the original
    exception as ``__cause__``.

    Attributes:
        path: the destination that was not written.
        reason: what went wrong, e.g. ``"No space left on device"``.
        errno: the OS error number when there was one (``errno.ENOSPC``), else None.
    """

    def __init__(self, path, reason, err_no=None):
        super().__init__(err_no, str(reason))
        self.path = os.fspath(path)
        self.reason = str(reason)
        self.filename = self.path

    def __str__(self):
        return f"cannot write {self.path}: {self.reason}"

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.errno)


def _output_error(path, err):
    """Returns the :class:`OutputError` for ``path`` that exception ``err`` means."""
    if isinstance(err, OutputError):
        return err
    err_no = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    elif err_no:
        reason = os.strerror(err_no)
    else:
        reason = f"{type(err).__name__}: {err}"
    return OutputError(path, reason, err_no)


_umask_guard = threading.Lock()
_umask_cache = None


def _file_mode():
    """Returns the permission bits a new file gets under this process's umask (0o644 for umask 022)."""
    global _umask_cache
    if _umask_cache is None:
        with _umask_guard:
            if _umask_cache is None:
                # The umask can only be read by setting it. It is read once and
                # cached; for the instant it is changed, a file another thread
                # creates gets the restrictive 0o077 rather than a world-writable 0.
                mask = os.umask(0o077)
                os.umask(mask)
                _umask_cache = mask
    return 0o666 & ~_umask_cache


def _fsync_path(path):
    """fsyncs a file's data to the disk (opened read-only: enough for fsync on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# fsync on a folder is refused with these by some filesystems (and platforms without
# O_DIRECTORY); the rename is then as durable as that filesystem makes it.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR,
                          errno.EACCES, errno.EPERM, errno.EROFS}


def _fsync_folder(folder):
    """fsyncs a folder so that a rename inside it survives a power cut (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _remove_quietly(path):
    """Removes a file, ignoring every error (clean-up after a failure that is being reported)."""
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write(path, write_fn, suffix=""):
    """Writes a file durably: a complete new file at ``path``, or the previous one untouched.

    ``write_fn`` writes a temporary sibling ``.tmp-<name>-<random><suffix>`` by
    path; the temporary is then fsynced, given the permissions the umask
    allows (``0o666 & ~umask``, not ``mkstemp``'s 0o600), renamed over
    ``path`` and the folder fsynced. Every step, the close of the file
    included, runs inside the error handling, so an error a full disk reports
    late (at fsync or close) is seen before the rename. A temporary left by a
    killed process is removed by :func:`remove_stale_temporaries`.

    Args:
        path: destination file; its folder is created if missing.
        write_fn: callable taking the temporary path (str) and writing the
            whole file there (``nib.save``, ``skimage.io.imsave``, ...).
        suffix: extension the temporary keeps (libraries such as nibabel pick
            the format from it, e.g. ``".nii.gz"``).

    Raises:
        OutputError: naming ``path`` and the reason, for any exception of
            ``write_fn`` or of the file system (the cause is chained). The
            temporary is removed and a previous file at ``path`` is left as it
            was; the one exception is an I/O error of the folder fsync, after
            the new file is in place. KeyboardInterrupt and SystemExit remove
            the temporary and propagate unchanged.
    """
    _atomic_write(path, write_fn, suffix, sync_tmp=True)


def _atomic_write(path, write_fn, suffix, sync_tmp):
    """:func:`atomic_write`; ``sync_tmp=False`` when ``write_fn`` fsyncs the file itself."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)[:_TMP_NAME_KEEP]
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}-", suffix=suffix, dir=folder)
        os.close(fd)
        write_fn(tmp)
        if sync_tmp:
            _fsync_path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(folder)
    except BaseException as e:
        if tmp is not None:
            _remove_quietly(tmp)
        if not isinstance(e, Exception):
            raise
        raise _output_error(path, e) from e


def write_text(path, text):
    """Writes a UTF-8 text file durably (see :func:`atomic_write`).

    Args:
        path: destination file.
        text: str, written as it is (no newline translation).

    Raises:
        OutputError: the file could not be written; a previous one is intact.
    """
    data = str(text).encode("utf-8")

    def write(tmp):
        # write, flush, fsync and close all inside atomic_write's error handling:
        # a full disk may report ENOSPC only at flush or close.
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_write(path, write, "", sync_tmp=False)


def write_json(path, data):
    """Writes ``data`` as JSON (indent 2, sorted keys, trailing newline) durably.

    Args:
        path: destination file.
        data: JSON-serialisable object.

    Raises:
        TypeError: if ``data`` is not JSON-serialisable (nothing is written).
        OutputError: the file could not be written; a previous one is intact.
    """
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- #
# Resumable CSV (one durable append per row)
# --------------------------------------------------------------------------- #


def _csv_value(value):
    """Formats one CSV cell: floats ``%.6f`` (``nan``, ``inf``), None empty, the rest ``str``."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return "nan" if math.isnan(value) else "%.6f" % value
    return str(value)


def _csv_line(cells):
    """Returns one CSV line (with its ``\\n``) of str cells."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


def _csv_header_of(fh):
    """Returns the header fields of a CSV file open in binary mode (None when it has no complete header line)."""
    fh.seek(0)
    for raw in fh:
        if not raw.endswith(b"\n"):
            return None
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("#"):
            continue
        return next(csv.reader([line]))
    return None


def _drop_partial_last_line(fh):
    """Truncates a binary file open for update after its last newline (a crash mid-append)."""
    size = fh.seek(0, os.SEEK_END)
    if size == 0:
        return
    fh.seek(size - 1)
    if fh.read(1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        fh.seek(start)
        at = fh.read(end - start).rfind(b"\n")
        if at >= 0:
            fh.truncate(start + at + 1)
            return
        end = start
    fh.truncate(0)


def append_csv_row(path, fieldnames, row, header_lines=()):
    """Appends one row to a CSV file durably, creating it (with its header) when missing.

    For results written one subject at a time and resumed after a crash: each
    call either adds one complete line or, on failure, leaves the file
    readable. A missing file (or one without a complete header line, e.g.
    emptied by a non-atomic writer) is written atomically with
    ``header_lines`` as leading ``# `` comments, the header and the row. An
    existing file must have the same columns; the row is appended, flushed and
    fsynced. A last line without its newline (a process killed mid-append) is
    cut off first, as :func:`read_csv_rows` ignores it anyway.

    Args:
        path: the CSV file.
        fieldnames: sequence of column names.
        row: dict column -> value; missing columns are written empty. Floats
            are written ``"%.6f"``, NaN as ``nan``.
        header_lines: strings written as ``# <line>`` before the header when the
            file is created (e.g. ``"upsampling_factor: 4"``); ignored afterwards.

    Raises:
        ValueError: if ``row`` has columns that are not in ``fieldnames``, a
            value or header line holds a newline, or the existing file's
            columns differ from ``fieldnames`` (message names the file and both).
        OutputError: the row could not be written.
    """
    path = os.fspath(path)
    fieldnames = [str(f) for f in fieldnames]
    extra = sorted(set(map(str, row)) - set(fieldnames))
    if extra:
        raise ValueError(f"row for {path} has columns {extra} that are not in the fieldnames {fieldnames}")
    cells = [_csv_value(row.get(f)) for f in fieldnames]
    comments = [str(line) for line in header_lines]
    if any("\n" in c or "\r" in c for c in cells + fieldnames + comments):
        raise ValueError(f"CSV values, column names and header lines for {path} must not contain newlines")
    line = _csv_line(cells)
    existing = None
    try:
        if os.path.exists(path):
            with open(path, "r+b") as fh:
                existing = _csv_header_of(fh)
                if existing == fieldnames:
                    _drop_partial_last_line(fh)
                    fh.seek(0, os.SEEK_END)
                    fh.write(line.encode("utf-8"))
                    fh.flush()
                    os.fsync(fh.fileno())
                    return
    except Exception as e:  # noqa: BLE001 - any failure is reported as this file's
        raise _output_error(path, e) from e
    if existing is not None:
        raise ValueError(f"{path} has the columns {existing}, expected {fieldnames}; move it away "
                         f"or write to another folder")
    text = "".join(f"# {c}\n" if not c.startswith("#") else f"{c}\n" for c in comments)
    write_text(path, text + _csv_line(fieldnames) + line)


def read_csv_rows(path):
    """Reads a CSV file written by :func:`append_csv_row`.

    Leading ``#`` comment lines are skipped; a last line without its newline
    (a crash mid-append) is ignored. Both ``\\n`` and ``\\r\\n`` line ends are read.

    Args:
        path: the CSV file.

    Returns:
        (fieldnames, rows): the header as a list of str and one dict column ->
        str value per row, in file order; ``(None, [])`` when the file does not
        exist or holds no complete header line.

    Raises:
        ValueError: if a row has a different number of fields than the header
            (message names the file and line number).
        OSError: if the file exists but cannot be read.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
    except FileNotFoundError:
        return None, []
    lines = text.split("\n")[:-1]  # the piece after the last newline is incomplete (or empty)
    fieldnames, rows = None, []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if fieldnames is None:
            if line.startswith("#"):
                continue
            fieldnames = next(csv.reader([line]))
            continue
        if not line:
            continue
        values = next(csv.reader([line]))
        if len(values) != len(fieldnames):
            raise ValueError(f"{path}, line {number}: {len(values)} fields, the header has {len(fieldnames)}")
        rows.append(dict(zip(fieldnames, values)))
    return fieldnames, rows


# --------------------------------------------------------------------------- #
# Stale temporaries and the run lock
# --------------------------------------------------------------------------- #

# What a killed process leaves behind, by name (checked against TF 2.21):
# - ".tmp-*" files: atomic_write's temporaries (this module).
# - "ckpt-<N>_temp/" folders: tf.train.CheckpointManager(..., checkpoint_name="ckpt")
#   saves checkpoint N through Checkpoint.write -> functional_saver, which writes
#   the shards to "<prefix>_temp/part-00000-of-00001.{index,data-...}.tempstate<random>"
#   and only then merges them into "ckpt-N.index" / renames "ckpt-N.data-*" (and
#   deletes the folder). SIGKILL during a 200 MB save left exactly "ckpt-21_temp/"
#   holding "part-00000-of-00001.data-00000-of-00001.tempstate<digits>".
# - "checkpoint.tmp<32 hex>" files: the "checkpoint" state file is written by
#   file_io.atomic_write_string_to_file through "<name>.tmp<uuid4 hex>" + rename.
# The merge itself writes "ckpt-N.index" in place; a kill there leaves files the
# "checkpoint" state file does not name (it is updated last), so they are never
# restored and are overwritten by the next save of N; they are not touched here.
_STALE_FILE_PATTERNS = (re.compile(re.escape(TMP_PREFIX) + r".+", re.S),
                        re.compile(r"checkpoint\.tmp[0-9a-f]{32}"))
_STALE_DIR_PATTERNS = (re.compile(r"ckpt-\d+_temp"),)


def remove_stale_temporaries(folder):
    """Removes the temporaries killed runs of this project left in one folder.

    Only in ``folder`` itself (not recursive), only regular files named
    ``.tmp-*`` (:func:`atomic_write`) or ``checkpoint.tmp<32 hex digits>``
    (TensorFlow's checkpoint state file) and real folders named
    ``ckpt-<N>_temp`` (a TensorFlow checkpoint save in progress); symbolic
    links and everything else are left alone. Call it only while holding the
    folder's :class:`RunLock`: the temporaries of a live run look the same.

    Args:
        folder: the folder to clean; a missing folder has nothing to remove.

    Returns:
        list of the removed paths (``folder`` joined with the name), sorted.

    Raises:
        OutputError: naming ``folder`` when it cannot be listed or a leftover
            cannot be removed (a folder this process cannot change).
    """
    folder = os.fspath(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise _output_error(folder, e) from e
    removed = []
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and any(p.fullmatch(entry.name) for p in _STALE_FILE_PATTERNS):
                os.remove(entry.path)
            elif entry.is_dir(follow_symlinks=False) and any(p.fullmatch(entry.name) for p in _STALE_DIR_PATTERNS):
                shutil.rmtree(entry.path)
            else:
                continue
        except FileNotFoundError:
            continue
        except OSError as e:
            err = _output_error(folder, e)
            raise OutputError(folder, f"cannot remove the stale temporary {entry.name!r}: {err.reason}",
                              err.errno) from e
        removed.append(entry.path)
    return removed


#: Name of the lock file :class:`RunLock` keeps in a run's folder.
LOCK_NAME = ".srgan.lock"


class LockedError(RuntimeError):
    """Another run (or this process) holds a folder's :class:`RunLock`; the message says who."""


# Lock files this process holds: realpath -> RunLock. flock() locks belong to an
# open file description, so a second open() of the same file in this process
# does conflict with the first (checked on Linux: LOCK_NB gives EWOULDBLOCK),
# but the holder recorded there would be this very process; the registry says so
# plainly, and catches it before any file is opened.
_held_locks = {}
_held_guard = threading.Lock()


def _close_locks_in_child():
    """After fork(): the child drops its copies of the lock fds, so the lock dies with the parent."""
    for lock in list(_held_locks.values()):
        try:
            os.close(lock._fd)
        except OSError:
            pass
        lock._fd = None
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


def _pid_alive(pid):
    """Whether a process with this PID exists on this machine."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class RunLock:
    """An exclusive lock on a run's folder, so that two runs never write there at once.

    The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<folder>/.srgan.lock``.
    The kernel releases it when the holder's process ends in any way (SIGKILL
    and the OOM killer included), so a killed run never blocks the next one:
    a lock file left behind is simply locked again. The holder writes JSON
    ``{pid, host, started, purpose, command}`` into the file, which a refused
    run quotes. The lock file is never deleted (deleting it would let a new
    run lock a fresh file while another still holds the old one). flock works
    on local filesystems; over NFS, Linux emulates it with byte-range locks.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`.

    Args:
        folder: the folder to lock (created if missing).
        purpose: short text saying what the holder does (``"training"``,
            ``"evaluation"``), shown to a refused run.
    """

    def __init__(self, folder, purpose):
        self.folder = os.fspath(folder)
        self.purpose = str(purpose)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._fd = None
        self._info = None

    @property
    def held(self):
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self):
        """Takes the lock without waiting.

        Returns:
            self.

        Raises:
            LockedError: if another process holds it (message: the folder, the
                holder's PID, host, start time, purpose and command, and what
                to do), or this process already holds it.
            OutputError: if the folder or lock file cannot be created or written.
        """
        import fcntl

        key = os.path.realpath(self.path)
        with _held_guard:
            other = _held_locks.get(key)
            if other is not None:
                raise LockedError(
                    f"{self.folder} is already locked by this process ({other.purpose}); "
                    f"one process cannot run two {self.purpose}/{other.purpose} jobs in one folder")
            try:
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as e:
                raise _output_error(self.path, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder(fd)
                os.close(fd)
                raise LockedError(self._refusal(holder)) from None
            except OSError as e:
                os.close(fd)
                raise OutputError(self.path, f"cannot lock it: {_output_error(self.path, e).reason}",
                                  e.errno) from e
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "purpose": self.purpose,
                "command": " ".join(sys.argv),
            }
            try:
                data = (json.dumps(info, sort_keys=True) + "\n").encode("utf-8")
                # Truncate only now that the lock is ours: the file holds the
                # previous holder's record until then.
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            except OSError as e:
                os.close(fd)  # releases the lock
                raise _output_error(self.path, e) from e
            self._fd, self._info = fd, info
            _held_locks[key] = self
        return self

    def release(self):
        """Releases the lock (nothing happens when it is not held). The lock file stays."""
        with _held_guard:
            if self._fd is None:
                return
            _held_locks.pop(os.path.realpath(self.path), None)
            fd, self._fd = self._fd, None
            try:
                # Emptied while still ours, so nobody quotes a holder that has left.
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, exc_type, exc, tb):
        self.release()
        return False

    @staticmethod
    def _read_holder(fd):
        """Returns the holder's record (dict) from an open lock file, or None when absent or unreadable."""
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict):
            return None
        # A record naming a process of this machine that no longer exists is a
        # dead holder's; the live holder has locked but not yet written its own.
        if info.get("host") == socket.gethostname() and "pid" in info and not _pid_alive(info["pid"]):
            return None
        return info

    def _refusal(self, holder):
        """The LockedError message for a lock held by ``holder`` (record dict or None)."""
        if holder is None:
            who = "another process (it has not recorded its PID yet)"
        else:
            who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                   f"{holder.get('started', '?')} ({holder.get('purpose', '?')}: "
                   f"{holder.get('command', '?')})")
        return (f"{self.folder} is in use by {who}; the {self.purpose} would write there too. Wait for "
                f"that run to finish or choose another folder. (The lock, {self.path}, is released "
                f"automatically when that process ends; do not delete it.)")


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
    atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=nifti_suffix(path))
