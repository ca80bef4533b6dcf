"""Shared helpers: the 3-D voxel shuffle, intensity normalisation and atomic NIfTI I/O.

Everything here is a plain function of its arguments (no global state), so the
training, evaluation and data code share one implementation of each rule.
"""

import os
import tempfile

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
        (normalised float32 array of x's shape, nf as a Python float). When
        ``nf == 0`` (an all-zero image) the image is returned unchanged.
    """
    x = np.asarray(x, dtype=np.float32)
    nf = float(np.max(x)) / 2.0 if x.size else 0.0
    if nf == 0:
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
# Atomic file output
# --------------------------------------------------------------------------- #


def atomic_write(path, write_fn, suffix=""):
    """Writes a file through a temporary sibling and renames it into place.

    A crash mid-write leaves the previous file (or nothing) at ``path``, never a
    half-written one.

    Args:
        path: destination file.
        write_fn: callable taking the temporary path and writing the file there.
        suffix: extension the temporary file keeps (libraries such as nibabel
            pick the format from it, e.g. ``".nii.gz"``).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def nifti_suffix(path):
    """Returns ``.nii.gz`` or ``.nii`` for a NIfTI path (``.nii.gz`` when unknown)."""
    return ".nii" if os.fspath(path).endswith(".nii") else ".nii.gz"


def save_nifti(path, data, affine, header=None, zooms=None):
    """Saves a 3-D volume as NIfTI-1, atomically.

    Args:
        path: destination ending in ``.nii`` or ``.nii.gz``.
        data: array (x, y, z); written as float32.
        affine: (4, 4) voxel-to-world matrix of the volume.
        header: optional nibabel header to copy metadata (units, orientation codes)
            from; its data shape and type are replaced.
        zooms: optional voxel sizes (3,), default: those implied by ``affine``.
    """
    import nibabel as nib

    data = np.asarray(data, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, affine, header=hdr)
    img.set_data_dtype(np.float32)
    # A copied header may carry the source's scaling; our data are real values.
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if zooms is not None:
        img.header.set_zooms(tuple(float(z) for z in zooms))
    atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=nifti_suffix(path))
