"""3D SRGAN generator and least-squares discriminator (Keras 3, channels-last), and the 3-D voxel shuffle.

Sánchez & Vilaplana, "Brain MRI super-resolution using 3D generative adversarial
networks", MIDL 2018 (arXiv 1812.11440); the layer-by-layer reference is
``SPEC.md`` section 2. Tensors are ``(batch, x, y, z, channels)``.

Both builders take an optional Keras dtype policy (``"mixed_float16"``,
``"mixed_bfloat16"``): layers then compute in half precision while their
variables and the models' outputs stay float32.
"""

import keras
import tensorflow as tf

import factors
import utils

# Initialisers of the original (TensorFlow 1 / TensorLayer).
_CONV_STDDEV = 0.02
_BN_GAMMA_STDDEV = 0.002
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
_G_SLOPE = 0.25
_D_SLOPE = 0.3
# TensorLayer's DenseLayer default, which the original's discriminator kept.
_DENSE_STDDEV = 0.1
# Channels of every upsampling stage (fixed in the original, not feature_size).
_UPSAMPLING_FILTERS = 64

UPSAMPLING_MODES = ("subpixel", "nn", "subpixel_NN")


# 3-D periodic shuffle (sub-pixel convolution, Shi et al. 2016, in 3-D): the
# functions, then the layer built on them.


def shuffle_factors(r, name):
    """(rx, ry, rz) from an int or three ints >= 1; ValueError naming ``name`` and ``r=`` otherwise."""
    try:
        return utils.per_axis(r, name, 1)
    except ValueError:
        raise ValueError(f"{name} factor r={r!r} must be a positive integer or three of them "
                         "(one per axis)") from None


def voxel_shuffle(x, r=2):
    """Rearranges channels into a finer 3-D grid, ``r`` (or ``(rx, ry, rz)``) times finer per axis.

    Reproduces the channel order of the original ``subPixelConv3d`` (a
    split/concat/reshape chain): the output voxel at offsets ``(r1, r2, r3)``
    inside its ``rx x ry x rz`` block, channel ``o`` of ``c``, takes input
    channel ``((r2 * rx + r1) * rz + r3) * c + o`` of its low-resolution voxel
    (``((r2 * r + r1) * r + r3) * c + o`` when isotropic, as the original).
    A factor of 1 leaves that axis as it is (thick-slice scans upsample only
    their slice axis).

    Works for any batch and spatial size, also inside ``tf.function`` with
    unknown static shapes; only the channel count must be known.

    Args:
        x: float tensor (b, x, y, z, rx·ry·rz·c), channels-last.
        r: int >= 1 (every axis), or three ints >= 1 (one per axis).

    Returns:
        Tensor of x's dtype, (b, rx·x, ry·y, rz·z, c).

    Raises:
        ValueError: if a factor is not a positive integer, ``x`` is not 5-D, or
            its channel count is unknown or not divisible by ``rx·ry·rz``.
    """
    rx, ry, rz = shuffle_factors(r, "voxel_shuffle")
    x = tf.convert_to_tensor(x)
    if x.shape.rank is not None and x.shape.rank != 5:
        raise ValueError(f"voxel_shuffle expects a 5-D (b, x, y, z, c) tensor, got shape {x.shape}")
    channels, block = x.shape[-1], rx * ry * rz
    if channels is None:
        raise ValueError("voxel_shuffle needs a known channel count")
    if channels % block:
        product = f"r**3 = {block}" if rx == ry == rz else f"rx*ry*rz = {block}"
        raise ValueError(f"voxel_shuffle: {channels} channels are not divisible by {product} (r={r})")
    c = channels // block
    dyn = tf.shape(x)
    b, nx, ny, nz = dyn[0], dyn[1], dyn[2], dyn[3]
    # Channel index ((r2*rx + r1)*rz + r3)*c + o  ->  axes (r2, r1, r3, c).
    x = tf.reshape(x, tf.stack([b, nx, ny, nz, ry, rx, rz, c]))  # (b, x, y, z, r2, r1, r3, c)
    x = tf.transpose(x, [0, 1, 5, 2, 4, 3, 6, 7])  # (b, x, r1, y, r2, z, r3, c)
    return tf.reshape(x, tf.stack([b, nx * rx, ny * ry, nz * rz, c]))  # (b, rx*x, ry*y, rz*z, c)


def voxel_unshuffle(x, r=2):
    """Inverse of :func:`voxel_shuffle` (space-to-depth with the same channel order).

    Args:
        x: float tensor (b, rx·x, ry·y, rz·z, c).
        r: int >= 1, or three ints >= 1 (one per axis).

    Returns:
        Tensor (b, x, y, z, rx·ry·rz·c) with ``voxel_shuffle(voxel_unshuffle(x, r), r) == x``.

    Raises:
        ValueError: if a factor is not a positive integer, or the channel count is unknown.
    """
    rx, ry, rz = shuffle_factors(r, "voxel_unshuffle")
    x = tf.convert_to_tensor(x)
    c = x.shape[-1]
    if c is None:
        raise ValueError("voxel_unshuffle needs a known channel count")
    dyn = tf.shape(x)
    b, nx, ny, nz = dyn[0], dyn[1] // rx, dyn[2] // ry, dyn[3] // rz
    x = tf.reshape(x, tf.stack([b, nx, rx, ny, ry, nz, rz, c]))  # (b, x, r1, y, r2, z, r3, c)
    x = tf.transpose(x, [0, 1, 3, 5, 4, 2, 6, 7])  # (b, x, y, z, r2, r1, r3, c)
    return tf.reshape(x, tf.stack([b, nx, ny, nz, rx * ry * rz * c]))


@keras.saving.register_keras_serializable(package="srgan3d")
class VoxelShuffle(keras.layers.Layer):
    """3-D periodic shuffle layer: ``(b, x, y, z, rx·ry·rz·c) -> (b, rx·x, ry·y, rz·z, c)``.

    Thin wrapper of :func:`voxel_shuffle` (the original's channel order).

    Args:
        r: int >= 1 (every axis) or three ints (one per axis), the stage's factor.
    """

    def __init__(self, r=2, **kwargs):
        super().__init__(**kwargs)
        self.factors = shuffle_factors(r, "VoxelShuffle")
        # An isotropic factor stays an int, as in layers saved before per-axis factors.
        self.r = self.factors[0] if len(set(self.factors)) == 1 else self.factors

    def call(self, x):
        return voxel_shuffle(x, self.factors)

    def compute_output_shape(self, input_shape):
        b, *spatial, c = input_shape
        block = self.factors[0] * self.factors[1] * self.factors[2]
        if c is not None and c % block:
            raise ValueError(f"VoxelShuffle: {c} channels are not divisible by rx*ry*rz = {block}")
        scaled = tuple(None if n is None else n * f for n, f in zip(spatial, self.factors))
        return (b, *scaled, None if c is None else c // block)

    def get_config(self):
        return {**super().get_config(), "r": self.r if isinstance(self.r, int) else list(self.r)}


@keras.saving.register_keras_serializable(package="srgan3d")
class NearestNeighbourZoom(keras.initializers.Initializer):
    """Kernel initialiser of the checkerboard-free sub-pixel stage (Aitken et al. 2017).

    Draws a kernel ``zoom`` times smaller on each spatial axis from N(0, stddev)
    and repeats every tap ``zoom`` times along each spatial axis (nearest-neighbour
    zoom), as ``scipy.ndimage.zoom(w, [2, 2, 2, 1, 1], order=0)`` did in the
    original. For a stride-``zoom`` transposed convolution this makes every
    ``zoom³`` output block constant at initialisation (ICNR-equivalent). With
    one zoom per axis (a stage that upsamples some axes only), the taps repeat
    along the upsampled axes only.

    Args:
        stddev: standard deviation of the small kernel.
        zoom: int (every axis) or three ints, the repetition per spatial axis
            (the stage's strides).
        seed: optional int seed.
    """

    def __init__(self, stddev=_CONV_STDDEV, zoom=2, seed=None):
        self.stddev = float(stddev)
        self.zooms = utils.per_axis(zoom, "NearestNeighbourZoom zoom")
        # An isotropic zoom stays an int, as in initialisers saved before per-axis factors.
        self.zoom = self.zooms[0] if len(set(self.zooms)) == 1 else self.zooms
        self.seed = seed

    def __call__(self, shape, dtype=None):
        spatial, channels = tuple(shape[:3]), tuple(shape[3:])
        if any(k % z for k, z in zip(spatial, self.zooms)):
            raise ValueError(
                f"NearestNeighbourZoom: kernel size {spatial} is not divisible by zoom {self.zoom}")
        small = keras.random.normal(
            tuple(k // z for k, z in zip(spatial, self.zooms)) + channels,
            stddev=self.stddev, dtype=dtype or "float32", seed=self.seed)
        for axis, z in enumerate(self.zooms):
            if z > 1:  # only the upsampled axes: checkerboard-free along those
                small = keras.ops.repeat(small, z, axis=axis)
        return small

    def get_config(self):
        zoom = self.zoom if isinstance(self.zoom, int) else list(self.zoom)
        return {"stddev": self.stddev, "zoom": zoom, "seed": self.seed}


@keras.saving.register_keras_serializable(package="srgan3d")
class GlobalBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalisation over the global batch of a ``tf.distribute`` strategy.

    Keras's own ``synchronized=True`` computes the variance as E[x²] - E[x]²,
    which in float32 loses most digits where a channel's mean dwarfs its spread
    (the discriminator's 1x1x1 deepest features: mean/std ~ 160, ~3 digits
    left, enough to change its logits in the third decimal). This layer takes
    two all-reduce rounds instead: the global mean, then the global sum of
    squared deviations from it, so a distributed step computes the statistics
    of one device to float32 precision. On one replica (or no strategy) it is
    plain batch normalisation, same variables and names.
    """

    def __init__(self, **kwargs):
        kwargs["synchronized"] = True
        super().__init__(**kwargs)

    def _moments(self, inputs, mask):
        ctx = tf.distribute.get_replica_context()
        if mask is not None or ctx is None or ctx.num_replicas_in_sync == 1:
            return keras.ops.moments(inputs, axes=self._reduction_axes)
        x = tf.cast(inputs, tf.float32)  # float16 statistics would overflow
        axes = self._reduction_axes
        local_sum = tf.reduce_sum(x, axis=axes, keepdims=True)
        local_count = tf.reduce_sum(tf.ones_like(x), axis=axes, keepdims=True)
        total, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [local_sum, local_count])
        mean = tf.math.divide_no_nan(total, count)
        deviations = tf.reduce_sum(tf.square(x - mean), axis=axes, keepdims=True)
        variance = tf.math.divide_no_nan(ctx.all_reduce(tf.distribute.ReduceOp.SUM, deviations), count)
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        return tf.cast(mean, inputs.dtype), tf.cast(variance, inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.pop("synchronized", None)
        return config


def check_upsampling_mode(upsampling_mode):
    """Validates an upsampling mode name.

    Args:
        upsampling_mode: one of ``UPSAMPLING_MODES``.

    Returns:
        The name, unchanged.

    Raises:
        ValueError: naming the value and the accepted modes.
    """
    if upsampling_mode not in UPSAMPLING_MODES:
        raise ValueError(f"upsampling_mode {upsampling_mode!r} must be one of {', '.join(UPSAMPLING_MODES)}")
    return upsampling_mode


def _conv(filters, name, dtype, kernel_size=3, strides=1):
    return keras.layers.Conv3D(
        filters, kernel_size, strides=strides, padding="same", use_bias=True,
        kernel_initializer=keras.initializers.RandomNormal(stddev=_CONV_STDDEV),
        bias_initializer="zeros", name=name, dtype=dtype)


def _batch_norm(name, dtype, synchronized=False):
    # synchronized=True: under a tf.distribute strategy the statistics are
    # those of the global batch, as on one device (no effect without one).
    layer = GlobalBatchNormalization if synchronized else keras.layers.BatchNormalization
    return layer(
        momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, beta_initializer="zeros",
        gamma_initializer=keras.initializers.RandomNormal(mean=1.0, stddev=_BN_GAMMA_STDDEV),
        name=name, dtype=dtype)


def _lrelu(slope, name, dtype):
    # max(x, a*x) of the original equals LeakyReLU(a) for 0 < a < 1.
    return keras.layers.LeakyReLU(negative_slope=slope, name=name, dtype=dtype)


def subpixel_filters(strides):
    """Channels of a sub-pixel stage's convolution: the smallest multiple of its block >= 64.

    The shuffle needs a multiple of the block (sx·sy·sz voxels); for the
    original's ×2 stages (block 8, or 2 and 4 for thick slices) that is 64,
    as before. ×3: 81 (3 channels out), 1×1×3: 66 (22), 1×1×5: 65 (13).
    """
    block = strides[0] * strides[1] * strides[2]
    return -(-_UPSAMPLING_FILTERS // block) * block


def _upsampling_stage(x, stage, strides, mode, dt):
    """One stage: ×s along each axis whose stride s is > 1 (every axis for isotropic factors).

    An isotropic ×2 stage keeps the original's layers (``SPEC.md`` §2): the
    same kernels, names and parameter counts. A stage of another prime ``p``
    is the same construction by ``p``: a shuffle by ``p``, a resize by ``p``,
    or a stride-``p`` transposed convolution with ``3p`` taps (the original's
    kernel/stride ratio, 6/2) zoomed by ``p`` at initialisation. Returns
    (b, sx·x, sy·y, sz·z, c), c 64 (nn, subpixel_NN) or
    ``subpixel_filters(strides) / (sx·sy·sz)`` (subpixel: 8 for ×2).
    """
    up = _UPSAMPLING_FILTERS
    # Isotropic stages keep int arguments, as layers saved before per-axis factors.
    r = strides[0] if len(set(strides)) == 1 else tuple(strides)
    if mode == "subpixel_NN":
        kernel = 3 * r if isinstance(r, int) else tuple(3 * s for s in strides)
        x = keras.layers.Conv3DTranspose(
            up, kernel, strides=r, padding="same", use_bias=True,
            kernel_initializer=NearestNeighbourZoom(_CONV_STDDEV, zoom=r),
            bias_initializer="zeros", name=f"up{stage}_deconv", dtype=dt)(x)  # (b, sx*x, sy*y, sz*z, 64)
        return _lrelu(_G_SLOPE, f"up{stage}_lrelu", dt)(x)
    if mode == "nn":
        x = _conv(up, f"up{stage}_conv1", dt)(x)  # (b, x, y, z, 64)
        x = _lrelu(_G_SLOPE, f"up{stage}_lrelu1", dt)(x)
        x = keras.layers.UpSampling3D(r, name=f"up{stage}_resize", dtype=dt)(x)  # (b, sx*x, sy*y, sz*z, 64)
        x = _conv(up, f"up{stage}_conv2", dt)(x)
        return _lrelu(_G_SLOPE, f"up{stage}_lrelu2", dt)(x)
    x = _conv(subpixel_filters(strides), f"up{stage}_conv", dt)(x)  # (b, x, y, z, c*sx*sy*sz)
    x = _lrelu(_G_SLOPE, f"up{stage}_lrelu", dt)(x)
    return VoxelShuffle(r, name=f"up{stage}_shuffle", dtype=dt)(x)  # (b, sx*x, sy*y, sz*z, c)


def build_generator(upsampling_factor=4, residual_blocks=6, feature_size=32,
                    upsampling_mode="subpixel", dtype_policy=None, synchronized_bn=False,
                    name="generator"):
    """Builds the 3D SRGAN generator.

    SRResNet-style (Ledig et al. 2017, arXiv 1609.04802) in 3-D, as in Sánchez &
    Vilaplana, MIDL 2018: conv+BN+lrelu(0.25), ``residual_blocks`` residual
    blocks, conv+BN plus a long skip, one upsampling stage per prime factor of
    the factor (×2 stages for the original's 2 and 4), and a final convolution
    to one channel. Upsampling modes (``SPEC.md`` §2), for a ×2 stage:

    - ``subpixel`` (default): conv → 64, lrelu, 3-D periodic shuffle → 8 channels
      (Shi et al. 2016, arXiv 1609.05158); final conv 8 → 1, linear.
    - ``nn`` (resize-convolution): conv → 64 + lrelu, nearest-neighbour ×2,
      conv 64 → 64 + lrelu; final conv 64 → 1 with tanh.
    - ``subpixel_NN`` (checkerboard-free sub-pixel, Aitken et al. 2017,
      arXiv 1707.02937): 6×6×6 stride-2 transposed conv → 64 + lrelu, its kernel
      initialised by nearest-neighbour zoom of a 3×3×3 kernel; final conv
      64 → 1, linear. (The original's ``-subpixel_NN`` flag; it wins over ``-nn``
      when both are set, a rule applied by the command line.)

    A stage of another prime ``p`` (×3, ×5) is the same by ``p``: a shuffle by
    ``p`` after a conv to the smallest multiple of its block >= 64
    (:func:`subpixel_filters`), a resize by ``p``, or a stride-``p`` transposed
    conv with ``3p`` taps zoomed by ``p``. With one factor per axis
    (thick-slice scans, e.g. ``(1, 1, 3)``) each stage upsamples only the axes
    that still need it (``factors.UpsamplingFactor.stages``): ``6`` is ×2 then
    ×3, ``(2, 2, 6)`` is ×2 on every axis then ×3 along z. Powers of two build
    exactly the layers of earlier versions (and the original's when isotropic).

    Fully convolutional: any spatial size ``(x, y, z)`` works.

    Args:
        upsampling_factor: an int >= 2, three ints >= 1 (one per axis, at
            least one > 1), or a ``factors.UpsamplingFactor``.
        residual_blocks: int >= 0.
        feature_size: int >= 1, filters of the residual trunk.
        upsampling_mode: ``"subpixel"``, ``"nn"`` or ``"subpixel_NN"``.
        dtype_policy: None, a policy name such as ``"mixed_float16"`` or a
            ``keras.DTypePolicy``; the output is float32 whatever the policy.
        synchronized_bn: bool, batch norm over the global batch of a
            ``tf.distribute`` strategy (set when training on several replicas).
        name: model name.

    Returns:
        ``keras.Model`` mapping lr float32 (b, x, y, z, 1), normalised to [-1, 1],
        to sr float32 (b, fx·x, fy·y, fz·z, 1). 417,209 / 431,097 trainable
        parameters for subpixel ×2 / ×4 with the defaults.

    Raises:
        ValueError: for a factor that is not as above, ``feature_size``
            < 1, ``residual_blocks`` < 0 or an unknown ``upsampling_mode``.
    """
    factor = factors.UpsamplingFactor.of(upsampling_factor)
    utils.check_int("residual_blocks", residual_blocks, 0)
    utils.check_int("feature_size", feature_size, 1)
    mode = check_upsampling_mode(upsampling_mode)
    dt = dtype_policy

    lr = keras.Input(shape=(None, None, None, 1), name="lr")  # (b, x, y, z, 1)
    x = _conv(feature_size, "conv1", dt)(lr)  # (b, x, y, z, F)
    x = _batch_norm("bn1", dt, synchronized_bn)(x)
    s = x = _lrelu(_G_SLOPE, "lrelu1", dt)(x)
    for i in range(residual_blocks):
        block_input = x
        x = _conv(feature_size, f"rb{i}_conv1", dt)(x)
        x = _batch_norm(f"rb{i}_bn1", dt, synchronized_bn)(x)
        x = _lrelu(_G_SLOPE, f"rb{i}_lrelu", dt)(x)
        x = _conv(feature_size, f"rb{i}_conv2", dt)(x)
        x = _batch_norm(f"rb{i}_bn2", dt, synchronized_bn)(x)
        x = keras.layers.Add(name=f"rb{i}_add", dtype=dt)([x, block_input])
    x = _conv(feature_size, "conv2", dt)(x)
    x = _batch_norm("bn2", dt, synchronized_bn)(x)
    x = keras.layers.Add(name="long_skip", dtype=dt)([x, s])  # (b, x, y, z, F)

    for stage, strides in enumerate(factor.stages(), start=1):
        x = _upsampling_stage(x, stage, strides, mode, dt)  # (b, sx*x, sy*y, sz*z, c)

    x = _conv(1, "conv_last", dt)(x)  # (b, fx*x, fy*y, fz*z, 1)
    # The output layer computes in float32 so losses and outputs never see float16.
    sr = keras.layers.Activation("tanh" if mode == "nn" else "linear", name="sr",
                                 dtype="float32")(x)
    return keras.Model(lr, sr, name=name)


def build_discriminator(input_shape=(128, 128, 92, 1), dtype_policy=None, synchronized_bn=False,
                        name="discriminator"):
    """Builds the least-squares 3D SRGAN discriminator.

    SRGAN discriminator (Ledig et al. 2017) in 3-D as in Sánchez & Vilaplana,
    MIDL 2018: conv 32 + lrelu(0.3) without BN, then seven conv+BN+lrelu(0.3)
    with (filters, stride) (32, 2), (64, 1), (64, 2), (128, 1), (128, 2),
    (256, 1), (256, 2), flatten, dense 1024 + lrelu(0.3), dense 1. The output is
    the logit; the least-squares losses use it directly (no sigmoid).

    Args:
        input_shape: (x, y, z, 1) of the HR patches; fixed, because the dense
            layer's size depends on it. 128×128×92 → 8×8×6×256 → 98,304 features,
            104,180,321 trainable parameters.
        dtype_policy: None or a Keras dtype policy; the output is float32.
        synchronized_bn: bool, batch norm over the global batch of a
            ``tf.distribute`` strategy.
        name: model name.

    Returns:
        ``keras.Model`` mapping hr or sr float32 (b, x, y, z, 1) in [-1, 1] to a
        float32 logit (b, 1).

    Raises:
        ValueError: if ``input_shape`` is not four positive sizes ending in 1.
    """
    input_shape = tuple(input_shape)
    if (len(input_shape) != 4 or input_shape[-1] != 1
            or not all(utils.is_int(n, 1) for n in input_shape)):
        raise ValueError(
            f"discriminator input_shape {input_shape} must be (x, y, z, 1) with positive sizes")
    dt = dtype_policy
    hr = keras.Input(shape=input_shape, name="hr")  # (b, x, y, z, 1)
    x = _conv(32, "conv1", dt)(hr)
    x = _lrelu(_D_SLOPE, "lrelu1", dt)(x)
    for i, (filters, stride) in enumerate(
            [(32, 2), (64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2)], start=2):
        x = _conv(filters, f"conv{i}", dt, strides=stride)(x)  # stride 2 halves x, y, z (ceil)
        x = _batch_norm(f"bn{i}", dt, synchronized_bn)(x)
        x = _lrelu(_D_SLOPE, f"lrelu{i}", dt)(x)
    x = keras.layers.Flatten(name="flatten", dtype=dt)(x)  # (b, 8*6*8*256) for 128×128×92
    dense_init = keras.initializers.TruncatedNormal(stddev=_DENSE_STDDEV)
    x = keras.layers.Dense(1024, kernel_initializer=dense_init, bias_initializer="zeros",
                           name="dense1", dtype=dt)(x)
    x = _lrelu(_D_SLOPE, "lrelu_dense", dt)(x)
    x = keras.layers.Dense(1, kernel_initializer=dense_init, bias_initializer="zeros",
                           name="dense2", dtype=dt)(x)
    logit = keras.layers.Activation("linear", name="logit", dtype="float32")(x)  # (b, 1)
    return keras.Model(hr, logit, name=name)
