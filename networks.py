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
    if not utils.is_int(r, 1):
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
    if not utils.is_int(r, 1):
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


@keras.saving.register_keras_serializable(package="srgan3d")
class VoxelShuffle(keras.layers.Layer):
    """3-D periodic shuffle layer: ``(b, x, y, z, r³·c) -> (b, r·x, r·y, r·z, c)``.

    Thin wrapper of :func:`voxel_shuffle` (the original's channel order).

    Args:
        r: int >= 1, the upsampling factor of the stage.
    """

    def __init__(self, r=2, **kwargs):
        super().__init__(**kwargs)
        self.r = int(r)

    def call(self, x):
        return voxel_shuffle(x, self.r)

    def compute_output_shape(self, input_shape):
        b, x, y, z, c = input_shape
        scale = lambda n: None if n is None else n * self.r  # noqa: E731
        if c is not None and c % self.r ** 3:
            raise ValueError(
                f"VoxelShuffle: {c} channels are not divisible by r**3 = {self.r ** 3}")
        return (b, scale(x), scale(y), scale(z), None if c is None else c // self.r ** 3)

    def get_config(self):
        return {**super().get_config(), "r": self.r}


@keras.saving.register_keras_serializable(package="srgan3d")
class NearestNeighbourZoom(keras.initializers.Initializer):
    """Kernel initialiser of the checkerboard-free sub-pixel stage (Aitken et al. 2017).

    Draws a kernel ``zoom`` times smaller on each spatial axis from N(0, stddev)
    and repeats every tap ``zoom`` times along each spatial axis (nearest-neighbour
    zoom), as ``scipy.ndimage.zoom(w, [2, 2, 2, 1, 1], order=0)`` did in the
    original. For a stride-``zoom`` transposed convolution this makes every
    ``zoom³`` output block constant at initialisation (ICNR-equivalent).

    Args:
        stddev: standard deviation of the small kernel.
        zoom: repetition factor on each spatial axis (the stage's stride).
        seed: optional int seed.
    """

    def __init__(self, stddev=_CONV_STDDEV, zoom=2, seed=None):
        self.stddev = float(stddev)
        self.zoom = int(zoom)
        self.seed = seed

    def __call__(self, shape, dtype=None):
        spatial, channels = tuple(shape[:3]), tuple(shape[3:])
        if any(k % self.zoom for k in spatial):
            raise ValueError(
                f"NearestNeighbourZoom: kernel size {spatial} is not divisible by zoom {self.zoom}")
        small = keras.random.normal(
            tuple(k // self.zoom for k in spatial) + channels,
            stddev=self.stddev, dtype=dtype or "float32", seed=self.seed)
        for axis in range(3):
            small = keras.ops.repeat(small, self.zoom, axis=axis)
        return small

    def get_config(self):
        return {"stddev": self.stddev, "zoom": self.zoom, "seed": self.seed}


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


def upsampling_stages(upsampling_factor):
    """Number of ×2 stages for an upsampling factor.

    Args:
        upsampling_factor: int, a power of two >= 2.

    Returns:
        int, ``log2(upsampling_factor)``.

    Raises:
        ValueError: if the factor is not an integer power of two >= 2.
    """
    f = upsampling_factor
    if not utils.is_int(f, 2) or f & (f - 1):
        raise ValueError(
            f"upsampling_factor {f!r} must be a power of two >= 2 (2, 4, 8, ...)")
    return int(f).bit_length() - 1


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


def build_generator(upsampling_factor=4, residual_blocks=6, feature_size=32,
                    upsampling_mode="subpixel", dtype_policy=None, synchronized_bn=False,
                    name="generator"):
    """Builds the 3D SRGAN generator.

    SRResNet-style (Ledig et al. 2017, arXiv 1609.04802) in 3-D, as in Sánchez &
    Vilaplana, MIDL 2018: conv+BN+lrelu(0.25), ``residual_blocks`` residual
    blocks, conv+BN plus a long skip, one ×2 upsampling stage per factor of two,
    and a final convolution to one channel. Upsampling modes (``SPEC.md`` §2):

    - ``subpixel`` (default): conv → 64, lrelu, 3-D periodic shuffle → 8 channels
      (Shi et al. 2016, arXiv 1609.05158); final conv 8 → 1, linear.
    - ``nn`` (resize-convolution): conv → 64 + lrelu, nearest-neighbour ×2,
      conv 64 → 64 + lrelu; final conv 64 → 1 with tanh.
    - ``subpixel_NN`` (checkerboard-free sub-pixel, Aitken et al. 2017,
      arXiv 1707.02937): 6×6×6 stride-2 transposed conv → 64 + lrelu, its kernel
      initialised by nearest-neighbour zoom of a 3×3×3 kernel; final conv
      64 → 1, linear. (The original's ``-subpixel_NN`` flag; it wins over ``-nn``
      when both are set, a rule applied by the command line.)

    Fully convolutional: any spatial size ``(x, y, z)`` works.

    Args:
        upsampling_factor: int, power of two >= 2 (2, 4, 8, ...).
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
        to sr float32 (b, f·x, f·y, f·z, 1). 417,209 / 431,097 trainable
        parameters for subpixel ×2 / ×4 with the defaults.

    Raises:
        ValueError: for a factor that is not a power of two >= 2, ``feature_size``
            < 1, ``residual_blocks`` < 0 or an unknown ``upsampling_mode``.
    """
    stages = upsampling_stages(upsampling_factor)
    utils.check_int("residual_blocks", residual_blocks, 0)
    utils.check_int("feature_size", feature_size, 1)
    mode = check_upsampling_mode(upsampling_mode)
    dt = dtype_policy
    up = _UPSAMPLING_FILTERS

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

    for stage in range(1, stages + 1):
        if mode == "subpixel_NN":
            x = keras.layers.Conv3DTranspose(
                up, 6, strides=2, padding="same", use_bias=True,
                kernel_initializer=NearestNeighbourZoom(_CONV_STDDEV, zoom=2),
                bias_initializer="zeros", name=f"up{stage}_deconv", dtype=dt)(x)  # (b, 2x, 2y, 2z, 64)
            x = _lrelu(_G_SLOPE, f"up{stage}_lrelu", dt)(x)
        elif mode == "nn":
            x = _conv(up, f"up{stage}_conv1", dt)(x)  # (b, x, y, z, 64)
            x = _lrelu(_G_SLOPE, f"up{stage}_lrelu1", dt)(x)
            x = keras.layers.UpSampling3D(2, name=f"up{stage}_resize", dtype=dt)(x)  # (b, 2x, 2y, 2z, 64)
            x = _conv(up, f"up{stage}_conv2", dt)(x)
            x = _lrelu(_G_SLOPE, f"up{stage}_lrelu2", dt)(x)
        else:
            x = _conv(up, f"up{stage}_conv", dt)(x)  # (b, x, y, z, 64)
            x = _lrelu(_G_SLOPE, f"up{stage}_lrelu", dt)(x)
            x = VoxelShuffle(2, name=f"up{stage}_shuffle", dtype=dt)(x)  # (b, 2x, 2y, 2z, 8)

    x = _conv(1, "conv_last", dt)(x)  # (b, f*x, f*y, f*z, 1)
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
