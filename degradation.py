"""The degradation of training, validation and evaluation: the slice profile along each upsampled axis,
then decimation by the upsampling factor (``SPEC.md`` section 6, rows 4 and 5).

Pure TensorFlow, so it runs inside ``tf.data`` and on a GPU, on whole volumes
and on patches alike. Where each low-resolution voxel then lies on the
high-resolution grid is ``factors.UpsamplingFactor.lr_origin``'s.
"""

import numpy as np

import factors
import quiet

# Imported at the first degradation: the command line reads this module's
# importers before it knows there is work for TensorFlow.
tf = quiet.Deferred("tensorflow")

# scipy.ndimage.gaussian_filter's default: the kernel reaches 4 sigma.
_TRUNCATE = 4.0


def _gaussian_kernel(sigma):
    """Returns (float32 (2r+1,) weights summing to 1, radius r) of scipy.ndimage's truncated Gaussian."""
    radius = int(_TRUNCATE * sigma + 0.5)  # scipy.ndimage's rule
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).astype(np.float32), radius


def _reflect(index, n):
    """Maps int tensor indices (any, also out of [0, n)) into [0, n) by reflection."""
    # scipy.ndimage 'reflect' (= tf.pad 'SYMMETRIC', edge voxel repeated),
    # folded as often as needed so tiny axes work too.
    period = tf.math.floormod(index, 2 * n)
    return tf.where(period >= n, 2 * n - 1 - period, period)


def _blur_decimate_axis(x, axis, weights, radius, factor):
    """Blurs float32 (b, x, y, z, 1) along spatial ``axis`` (1..3) and keeps every ``factor``-th voxel."""
    # Reflect-pad one spatial axis, then a 1-D convolution strided by the
    # factor: blur and x[::f] in one op, computing the kept voxels and one
    # more. That extra output voxel (``factor`` more padded voxels), dropped
    # after, is there because oneDNN's strided 1-D convolution along the last
    # spatial axis returns garbage when its output there is one voxel long
    # (TensorFlow 2.21 on x86, e.g. an LR z of 1).
    n = tf.shape(x)[axis]
    x = tf.gather(x, _reflect(tf.range(-radius, n + radius + factor), n), axis=axis)
    kernel_shape = [1, 1, 1, 1, 1]
    kernel_shape[axis - 1] = len(weights)
    strides = [1, 1, 1, 1, 1]
    strides[axis] = factor
    y = tf.nn.conv3d(x, tf.constant(weights.reshape(kernel_shape)), strides, "VALID")
    size = [-1, -1, -1, -1, -1]
    size[axis] = -(-n // factor)
    return tf.slice(y, [0, 0, 0, 0, 0], tf.stack(size))


def _box_decimate_axis(x, axis, factor):
    """Means float32 (b, x, y, z, 1) over slabs of ``factor`` voxels along spatial ``axis`` (1..3)."""
    # Slab k is voxels f*k .. f*k + f - 1: a VALID convolution of f equal taps,
    # strided by f. An axis that is not a multiple of f (never the canonical
    # grid's) is reflect-padded at its end, so its last slab has ceil(n/f) too.
    n = tf.shape(x)[axis]
    x = tf.gather(x, _reflect(tf.range(0, -(-n // factor) * factor), n), axis=axis)
    return _blur_decimate_axis(x, axis, np.full(factor, 1.0 / factor, np.float32), 0, factor)


def degrade(x, upsampling_factor, sigma=1.0, slice_profile="gaussian"):
    """The one degradation of training and evaluation: the slice profile, then decimation by the factor.

    ``gaussian`` (the original's): each volume or patch is blurred on its own,
    in 3-D only (never across the batch or channel axes), with a separable
    Gaussian of ``sigma`` voxels truncated at 4 sigma and reflected borders,
    then ``x[::f]``, i.e. ``scipy.ndimage.gaussian_filter(x, sigma)[::f, ::f, ::f]``.
    Away from the borders, degrading a patch whose start is a multiple of
    ``f`` equals cutting the degraded volume. With one factor per axis
    (``(1, 1, 3)``: thick slices along z) only the axes whose factor is > 1
    are blurred (``sigma`` in HR voxels along them) and decimated, i.e.
    ``gaussian_filter(x, sigma * (f > 1))[::fx, ::fy, ::fz]``.

    ``box`` (a 2-D acquisition's contiguous slices): LR voxel ``k`` of each
    upsampled axis is the mean of HR voxels ``f·k … f·k + f − 1``, i.e.
    ``x.reshape(n // f, f).mean(1)`` per axis; ``sigma`` is not used. A patch
    whose start is a multiple of ``f`` gives exactly the cut of the degraded
    volume (no border effect). Pure TensorFlow: runs in ``tf.data`` and on a GPU.

    Args:
        x: array or tensor, (x, y, z) or channels-last (b, x, y, z, c), real values.
        upsampling_factor: int >= 2, three ints >= 1, or a ``factors.UpsamplingFactor``.
        sigma: float >= 0, the Gaussian's blur in HR voxels; 0 only decimates.
        slice_profile: ``"gaussian"`` or ``"box"`` (``factors.SLICE_PROFILES``).

    Returns:
        float32 tensor (ceil(x/fx), ceil(y/fy), ceil(z/fz)) or
        (b, ceil(x/fx), ceil(y/fy), ceil(z/fz), c).

    Raises:
        ValueError: if ``upsampling_factor``, ``sigma`` or ``slice_profile`` is
            invalid, or ``x`` is neither 3-D nor 5-D.
    """
    factor = factors.UpsamplingFactor.of(upsampling_factor)
    factors.check_slice_profile(slice_profile)
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma {sigma!r} must be a finite number >= 0")
    x = tf.convert_to_tensor(x)
    if x.dtype != tf.float32:
        x = tf.cast(x, tf.float32)
    rank = x.shape.rank
    if rank not in (3, 5):
        raise ValueError(f"degrade expects (x, y, z) or (b, x, y, z, c), got shape {x.shape}")
    y = x[None, ..., None] if rank == 3 else x
    channels = y.shape[-1]
    if channels != 1:
        # Channels are separate images: fold them into the batch.
        dyn = tf.shape(y)
        y = tf.reshape(tf.transpose(y, [0, 4, 1, 2, 3]), tf.stack([-1, dyn[1], dyn[2], dyn[3], 1]))
    if sigma > 0:
        weights, radius = _gaussian_kernel(float(sigma))
    else:
        weights, radius = np.ones(1, np.float32), 0
    for axis, f in zip((1, 2, 3), factor.axes):
        if f == 1:
            continue
        if slice_profile == "box":
            y = _box_decimate_axis(y, axis, f)
        else:
            y = _blur_decimate_axis(y, axis, weights, radius, f)
    if channels != 1:
        dyn = tf.shape(y)
        y = tf.reshape(y, tf.stack([tf.shape(x)[0], -1, dyn[1], dyn[2], dyn[3]]))
        y = tf.transpose(y, [0, 2, 3, 4, 1])
    return y[0, ..., 0] if rank == 3 else y
