"""Generator/discriminator architecture, voxel shuffle and serialisation tests."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import factors
import networks


def _trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


# ----------------------------------------------------------------------------
# Parameter counts of the original (SPEC section 2)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, factor, expected", [
    ("subpixel", 2, 417_209),
    ("subpixel", 4, 431_097),
    ("nn", 2, 529_377),
    ("nn", 4, 750_689),
    ("subpixel_NN", 2, 805_793),
    ("subpixel_NN", 4, 1_690_593),
])
def test_generator_parameter_counts_match_original(mode, factor, expected):
    g = networks.build_generator(upsampling_factor=factor, residual_blocks=6, feature_size=32,
                                 upsampling_mode=mode)
    assert _trainable_params(g) == expected


def test_discriminator_parameter_count_matches_original():
    d = networks.build_discriminator((128, 128, 92, 1))
    assert _trainable_params(d) == 104_180_321
    assert d.get_layer("flatten").output.shape[-1] == 98_304 == 8 * 8 * 6 * 256


@pytest.mark.parametrize("mode", ["", "subpixel-NN", "NN", None, True])
def test_unknown_upsampling_mode_is_rejected_by_name(mode):
    with pytest.raises(ValueError, match="upsampling_mode"):
        networks.build_generator(2, 1, 4, upsampling_mode=mode)


def test_synchronized_batch_norm_is_the_same_model_without_a_strategy():
    keras.utils.set_random_seed(2)
    plain = networks.build_generator(2, 1, 4)
    keras.utils.set_random_seed(2)
    synced = networks.build_generator(2, 1, 4, synchronized_bn=True)
    assert synced.get_layer("bn1").synchronized and not plain.get_layer("bn1").synchronized
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(plain(x, training=True).numpy(), synced(x, training=True).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert [w.name for w in plain.weights] == [w.name for w in synced.weights]


def test_tanh_only_at_the_end_of_nn_mode():
    for mode, activation in [("subpixel", "linear"), ("nn", "tanh"), ("subpixel_NN", "linear")]:
        g = networks.build_generator(2, 1, 4, upsampling_mode=mode)
        assert g.layers[-1].get_config()["activation"] == activation
        y = g(np.full((1, 4, 4, 4, 1), 50.0, np.float32), training=False).numpy()
        if activation == "tanh":
            assert np.all(np.abs(y) <= 1.0)


# ----------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------

SHAPES = [(1, 8, 6, 5, 1), (3, 4, 4, 4, 1), (2, 5, 7, 3, 1), (1, 1, 1, 1, 1)]


@pytest.mark.parametrize("mode", networks.UPSAMPLING_MODES)
@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_generator_output_shape(mode, factor, shape):
    g = _small_generator(factor, mode)
    y = g(np.random.rand(*shape).astype(np.float32), training=False)
    b, x, yy, z, c = shape
    assert tuple(y.shape) == (b, factor * x, factor * yy, factor * z, 1)
    assert y.dtype == tf.float32


_GENERATORS = {}


def _small_generator(factor, mode):
    # Built once per configuration: the shape table reuses them for every input size.
    key = (factor, mode)
    if key not in _GENERATORS:
        _GENERATORS[key] = networks.build_generator(factor, residual_blocks=1, feature_size=8,
                                                    upsampling_mode=mode)
    return _GENERATORS[key]


@pytest.mark.parametrize("mode", networks.UPSAMPLING_MODES)
def test_generator_in_tf_function_with_unknown_shapes(mode):
    g = _small_generator(2, mode)
    fn = tf.function(lambda x: g(x, training=False),
                     input_signature=[tf.TensorSpec((None, None, None, None, 1), tf.float32)])
    for shape in [(1, 4, 6, 3, 1), (2, 5, 3, 7, 1)]:
        x = np.random.rand(*shape).astype(np.float32)
        y = fn(x)
        assert tuple(y.shape) == (shape[0], 2 * shape[1], 2 * shape[2], 2 * shape[3], 1)
        np.testing.assert_allclose(y.numpy(), g(x, training=False).numpy(), rtol=1e-5, atol=1e-6)


# The original's 128x128x92 (8 * 8 * 6 * 256 features, 104 M weights to build):
# test_discriminator_parameter_count_matches_original.
@pytest.mark.parametrize("input_shape, features", [((16, 16, 12, 1), 1 * 1 * 1 * 256),
                                                   ((32, 24, 20, 1), 2 * 2 * 2 * 256)])
def test_discriminator_shapes(input_shape, features):
    d = networks.build_discriminator(input_shape)
    assert d.get_layer("flatten").output.shape[-1] == features
    logit = d(np.random.rand(3, *input_shape).astype(np.float32), training=False)
    assert tuple(logit.shape) == (3, 1)


# ----------------------------------------------------------------------------
# Voxel shuffle
# ----------------------------------------------------------------------------

def _original_subpixel(i, r=2):
    """NumPy transcription of the original's split/concat/reshape ``subPixelConv3d``."""
    b, x, y, z, k = i.shape
    xs = np.split(i, r, axis=4)
    xr = np.concatenate(xs, axis=3)
    xss = np.split(xr, r, axis=4)
    xrr = np.concatenate(xss, axis=2)
    return xrr.reshape(b, r * x, r * y, r * z, k // r ** 3)


def _spec_formula(i, r=2):
    """SPEC §2 rule written voxel by voxel: channel ((r2*r + r1)*r + r3)*c + o."""
    b, x, y, z, k = i.shape
    c = k // r ** 3
    out = np.zeros((b, r * x, r * y, r * z, c), i.dtype)
    for r1 in range(r):
        for r2 in range(r):
            for r3 in range(r):
                first = ((r2 * r + r1) * r + r3) * c
                out[:, r1::r, r2::r, r3::r, :] = i[..., first:first + c]
    return out


@pytest.mark.parametrize("shape", [(1, 2, 2, 2, 8), (2, 3, 4, 5, 16), (3, 1, 5, 2, 64), (1, 4, 3, 2, 8)])
def test_voxel_shuffle_matches_original(shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    y = networks.voxel_shuffle(x, 2).numpy()
    np.testing.assert_array_equal(y, _original_subpixel(x))
    np.testing.assert_array_equal(y, _spec_formula(x))


def test_voxel_shuffle_r3_and_round_trip():
    x = np.random.default_rng(1).normal(size=(2, 2, 3, 2, 27 * 2)).astype(np.float32)
    y = networks.voxel_shuffle(x, 3).numpy()
    np.testing.assert_array_equal(y, _original_subpixel(x, 3))
    np.testing.assert_array_equal(networks.voxel_unshuffle(y, 3).numpy(), x)
    z = np.random.default_rng(2).normal(size=(1, 4, 6, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(networks.voxel_shuffle(networks.voxel_unshuffle(z, 2), 2).numpy(), z)


def test_voxel_shuffle_unknown_shapes_in_tf_function():
    fn = tf.function(lambda x: networks.voxel_shuffle(x, 2),
                     input_signature=[tf.TensorSpec((None, None, None, None, 16), tf.float32)])
    x = np.random.rand(2, 3, 1, 4, 16).astype(np.float32)
    np.testing.assert_array_equal(fn(x).numpy(), _original_subpixel(x))


@pytest.mark.parametrize("channels, r", [(12, 2), (9, 2), (26, 3)])
def test_voxel_shuffle_rejects_bad_channels(channels, r):
    with pytest.raises(ValueError, match=f"{channels} channels are not divisible by r\\*\\*3 = {r ** 3}"):
        networks.voxel_shuffle(np.zeros((1, 2, 2, 2, channels), np.float32), r)


def test_voxel_shuffle_rejects_bad_factor():
    with pytest.raises(ValueError, match="r=0"):
        networks.voxel_shuffle(np.zeros((1, 2, 2, 2, 8), np.float32), 0)


# ----------------------------------------------------------------------------
# Checkerboard-free initialisation
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [2, 4])
def test_subpixel_nn_stages_are_constant_on_2x2x2_blocks_at_init(factor):
    g = networks.build_generator(factor, residual_blocks=1, feature_size=8, upsampling_mode="subpixel_NN")
    stages = [g.get_layer(f"up{s}_lrelu").output for s in range(1, int(np.log2(factor)) + 1)]
    probe = keras.Model(g.input, stages)
    outs = probe(np.random.default_rng(3).normal(size=(2, 5, 4, 3, 1)).astype(np.float32), training=False)
    for out in (outs if isinstance(outs, (list, tuple)) else [outs]):
        out = out.numpy()
        b, x, y, z, c = out.shape
        blocks = out.reshape(b, x // 2, 2, y // 2, 2, z // 2, 2, c)
        assert np.ptp(blocks, axis=(2, 4, 6)).max() < 1e-6 * max(1.0, np.abs(out).max())
        assert np.abs(out).max() > 0  # the stage is not trivially zero


def test_nearest_neighbour_zoom_kernel_is_repeated_3x3x3():
    k = networks.NearestNeighbourZoom(0.02, zoom=2)((6, 6, 6, 5, 4)).numpy()
    small = k[::2, ::2, ::2]
    np.testing.assert_array_equal(k, np.repeat(np.repeat(np.repeat(small, 2, 0), 2, 1), 2, 2))
    assert 0.01 < small.std() < 0.03


def test_subpixel_checkerboard_is_not_suppressed_without_icnr():
    # Counter-check: a plain sub-pixel stage is NOT block-constant, so the test above can fail.
    g = networks.build_generator(2, residual_blocks=1, feature_size=8)
    probe = keras.Model(g.input, g.get_layer("up1_shuffle").output)
    out = probe(np.random.default_rng(3).normal(size=(1, 4, 4, 4, 1)).astype(np.float32)).numpy()
    blocks = out.reshape(1, 4, 2, 4, 2, 4, 2, 8)
    assert np.ptp(blocks, axis=(2, 4, 6)).max() > 1e-4


# ----------------------------------------------------------------------------
# Initialisers and layer settings of the original
# ----------------------------------------------------------------------------

def test_initialisers_and_batch_norm_settings():
    g = networks.build_generator(4, residual_blocks=2, feature_size=32)
    conv = g.get_layer("rb0_conv1")
    kernel = conv.kernel.numpy()
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
    assert np.all(conv.bias.numpy() == 0)
    bn = g.get_layer("rb0_bn1")
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5
    assert np.all(bn.beta.numpy() == 0)
    assert abs(bn.gamma.numpy().mean() - 1) < 0.002 and 0 < bn.gamma.numpy().std() < 0.005
    assert g.get_layer("lrelu1").negative_slope == 0.25
    d = networks.build_discriminator((16, 16, 12, 1))
    assert d.get_layer("lrelu1").negative_slope == pytest.approx(0.3)
    assert not any(isinstance(l, keras.layers.BatchNormalization) and l.name == "bn1" for l in d.layers)


# ----------------------------------------------------------------------------
# Serialisation and mixed precision
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", networks.UPSAMPLING_MODES)
def test_generator_keras_round_trip(tmp_path, mode):
    g = networks.build_generator(4, residual_blocks=1, feature_size=4, upsampling_mode=mode)
    path = tmp_path / "g.keras"
    g.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(4).normal(size=(2, 3, 4, 2, 1)).astype(np.float32)
    np.testing.assert_array_equal(g(x, training=False).numpy(), loaded(x, training=False).numpy())
    assert _trainable_params(loaded) == _trainable_params(g)


def test_discriminator_keras_round_trip(tmp_path):
    d = networks.build_discriminator((16, 16, 12, 1))
    d.save(tmp_path / "d.keras")
    loaded = keras.models.load_model(tmp_path / "d.keras")
    x = np.random.default_rng(5).normal(size=(2, 16, 16, 12, 1)).astype(np.float32)
    np.testing.assert_array_equal(d(x, training=False).numpy(), loaded(x, training=False).numpy())


def test_custom_objects_have_complete_config():
    layer = networks.VoxelShuffle(2, name="vs")
    clone = networks.VoxelShuffle.from_config(layer.get_config())
    assert clone.r == 2 and clone.name == "vs"
    init = networks.NearestNeighbourZoom(0.05, zoom=2, seed=7)
    assert networks.NearestNeighbourZoom.from_config(init.get_config()).get_config() == init.get_config()


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_outputs_float32(policy):
    g = networks.build_generator(2, residual_blocks=1, feature_size=8, upsampling_mode="subpixel_NN",
                                 dtype_policy=policy)
    assert g.get_layer("rb0_conv1").compute_dtype in ("float16", "bfloat16")
    assert g.get_layer("rb0_conv1").kernel.dtype == "float32"
    y = g(np.random.rand(1, 4, 4, 4, 1).astype(np.float32), training=False)
    assert y.dtype == tf.float32 and tuple(y.shape) == (1, 8, 8, 8, 1)
    d = networks.build_discriminator((16, 16, 12, 1), dtype_policy=policy)
    assert d(np.random.rand(2, 16, 16, 12, 1).astype(np.float32)).dtype == tf.float32


# ----------------------------------------------------------------------------
# Bad hyperparameters
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"upsampling_factor": 1}, "upsampling_factor 1"),
    ({"upsampling_factor": (1, 1, 1)}, "upsampling_factor 1,1,1 upsamples no axis"),
    ({"upsampling_factor": 0}, "upsampling_factor 0"),
    ({"upsampling_factor": 2.0}, "upsampling_factor 2.0"),
    ({"upsampling_factor": True}, "upsampling_factor True"),
    ({"feature_size": 0}, "feature_size 0"),
    ({"feature_size": -4}, "feature_size -4"),
    ({"residual_blocks": -1}, "residual_blocks -1"),
    ({"residual_blocks": 1.5}, "residual_blocks 1.5"),
])
def test_bad_generator_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        networks.build_generator(**kwargs)


@pytest.mark.parametrize("shape", [(128, 128, 92), (128, 128, 92, 2), (0, 16, 16, 1)])
def test_bad_discriminator_shape(shape):
    with pytest.raises(ValueError, match="input_shape"):
        networks.build_discriminator(shape)


def test_zero_residual_blocks_is_allowed():
    g = networks.build_generator(2, residual_blocks=0, feature_size=4)
    assert not any(l.name.startswith("rb") for l in g.layers)
    assert tuple(g(np.zeros((1, 2, 2, 2, 1), np.float32)).shape) == (1, 4, 4, 4, 1)


# ----------------------------------------------------------------------------
# Per-axis factors (thick-slice scans)
# ----------------------------------------------------------------------------

def _numpy_shuffle(x, factors):
    """The per-axis shuffle written out voxel by voxel: the reference."""
    rx, ry, rz = factors
    b, nx, ny, nz, channels = x.shape
    c = channels // (rx * ry * rz)
    out = np.zeros((b, nx * rx, ny * ry, nz * rz, c), x.dtype)
    for i, j, k in np.ndindex(nx, ny, nz):
        for r1, r2, r3 in np.ndindex(rx, ry, rz):
            first = ((r2 * rx + r1) * rz + r3) * c
            out[:, i * rx + r1, j * ry + r2, k * rz + r3, :] = x[:, i, j, k, first:first + c]
    return out


@pytest.mark.parametrize("factors", [(1, 1, 2), (2, 2, 1), (1, 2, 4), (2, 2, 2), (3, 1, 2), (3, 3, 3),
                                     (1, 1, 3), (1, 1, 5), (2, 3, 1)])
def test_per_axis_voxel_shuffle_matches_numpy_and_round_trips(factors):
    channels = 2 * factors[0] * factors[1] * factors[2]
    x = np.random.default_rng(1).normal(size=(2, 3, 2, 4, channels)).astype(np.float32)
    y = networks.voxel_shuffle(x, factors).numpy()
    np.testing.assert_array_equal(y, _numpy_shuffle(x, factors))
    np.testing.assert_array_equal(networks.voxel_unshuffle(y, factors).numpy(), x)
    layer = networks.VoxelShuffle(factors)
    assert layer.compute_output_shape((None, 3, 2, 4, channels)) == (None, 3 * factors[0], 2 * factors[1],
                                                                    4 * factors[2], 2)
    assert networks.VoxelShuffle.from_config(layer.get_config()).factors == factors


def test_isotropic_factors_given_per_axis_shuffle_as_the_original():
    x = np.random.default_rng(2).normal(size=(1, 2, 3, 2, 16)).astype(np.float32)
    np.testing.assert_array_equal(networks.voxel_shuffle(x, (2, 2, 2)).numpy(), networks.voxel_shuffle(x, 2).numpy())
    assert networks.VoxelShuffle((2, 2, 2)).get_config()["r"] == 2  # saved as before


@pytest.mark.parametrize("factor, strides", [
    (4, [(2, 2, 2), (2, 2, 2)]), ((1, 1, 4), [(1, 1, 2), (1, 1, 2)]), ((2, 2, 1), [(2, 2, 1)]),
    ((1, 2, 4), [(1, 2, 2), (1, 1, 2)]), ((8, 8, 8), [(2, 2, 2)] * 3),
    # Other primes: one stage per prime factor, smallest first, each on the axes that still need it.
    (3, [(3, 3, 3)]), (5, [(5, 5, 5)]), (6, [(2, 2, 2), (3, 3, 3)]), ((1, 1, 3), [(1, 1, 3)]),
    ((1, 1, 5), [(1, 1, 5)]), ((2, 2, 6), [(2, 2, 2), (1, 1, 3)]), ((1, 2, 3), [(1, 2, 1), (1, 1, 3)]),
    (12, [(2, 2, 2), (2, 2, 2), (3, 3, 3)])])
def test_stages_upsample_only_the_axes_that_still_need_it(factor, strides):
    stages = factors.UpsamplingFactor.of(factor).stages()
    assert list(stages) == strides
    assert tuple(np.prod(stages, axis=0)) == factors.UpsamplingFactor.of(factor).axes


@pytest.mark.parametrize("factor", [1, 0, -2, (1, 1, 1), (2, 2), (0, 2, 2), (True, 2, 2), 2.0, "a", (1, 1, 4, 2)])
def test_bad_factors_are_refused(factor):
    with pytest.raises(ValueError, match="upsampling_factor"):
        factors.UpsamplingFactor.of(factor)


@pytest.mark.parametrize("mode", networks.UPSAMPLING_MODES)
@pytest.mark.parametrize("factor, lr_shape", [
    ((1, 1, 4), (6, 5, 3)), ((2, 2, 1), (4, 6, 5)), ((1, 2, 4), (3, 4, 2)), (3, (2, 3, 2)), (5, (2, 1, 2)),
    (6, (1, 2, 1)), ((1, 1, 3), (4, 3, 2)), ((1, 1, 5), (3, 4, 2)), ((2, 2, 6), (2, 3, 1)),
    ((1, 2, 3), (3, 2, 2))])
def test_generator_output_shapes_for_any_integer_factor(mode, factor, lr_shape):
    g = networks.build_generator(factor, residual_blocks=1, feature_size=4, upsampling_mode=mode)
    x = np.random.default_rng(0).uniform(-1, 1, (2, *lr_shape, 1)).astype(np.float32)
    y = g(x, training=False).numpy()
    axes = factors.UpsamplingFactor.of(factor).axes
    assert y.shape == (2, *(n * f for n, f in zip(lr_shape, axes)), 1) and np.isfinite(y).all()


@pytest.mark.parametrize("strides, filters", [((2, 2, 2), 64), ((1, 1, 2), 64), ((1, 2, 2), 64), ((3, 3, 3), 81),
                                              ((1, 1, 3), 66), ((1, 1, 5), 65), ((5, 5, 5), 125)])
def test_subpixel_stage_filters_are_the_smallest_multiple_of_the_block_from_64(strides, filters):
    assert networks.subpixel_filters(strides) == filters


@pytest.mark.parametrize("mode", networks.UPSAMPLING_MODES)
def test_isotropic_factor_per_axis_builds_the_same_generator(mode):
    keras.utils.set_random_seed(5)
    a = networks.build_generator(2, residual_blocks=1, feature_size=4, upsampling_mode=mode)
    keras.utils.set_random_seed(5)
    b = networks.build_generator((2, 2, 2), residual_blocks=1, feature_size=4, upsampling_mode=mode)
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    assert all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights()))


def test_per_axis_icnr_kernel_repeats_along_the_upsampled_axes_only():
    k = networks.NearestNeighbourZoom(0.02, zoom=(1, 2, 2), seed=3)((3, 6, 6, 2, 2)).numpy()
    np.testing.assert_array_equal(k[:, 0::2], k[:, 1::2])  # zoomed along y
    np.testing.assert_array_equal(k[:, :, 0::2], k[:, :, 1::2])  # and z
    assert not np.array_equal(k[0], k[1])  # x keeps three distinct taps
    # The stage it initialises is checkerboard-free along y and z: every 1x2x2 output block is constant.
    g = networks.build_generator((1, 2, 2), residual_blocks=0, feature_size=2, upsampling_mode="subpixel_NN")
    deconv = keras.Model(g.input, g.get_layer("up1_deconv").output)
    out = deconv(np.random.default_rng(0).normal(size=(1, 4, 4, 4, 1)).astype(np.float32)).numpy()
    inner = out[:, :, 2:-2, 2:-2]
    np.testing.assert_allclose(inner[:, :, 0::2, 0::2], inner[:, :, 1::2, 1::2], atol=1e-6)


@pytest.mark.parametrize("factor, block", [(3, (3, 3, 3)), ((1, 1, 3), (1, 1, 3)), ((1, 1, 5), (1, 1, 5))])
def test_icnr_stage_of_another_prime_is_checkerboard_free(factor, block):
    """A stride-p stage with 3p taps zoomed by p: every p-block of its output is constant at initialisation."""
    g = networks.build_generator(factor, residual_blocks=0, feature_size=2, upsampling_mode="subpixel_NN")
    layer = g.get_layer("up1_deconv")
    assert layer.kernel_size == tuple(3 * s for s in block) and layer.strides == block
    deconv = keras.Model(g.input, layer.output)
    out = deconv(np.random.default_rng(0).normal(size=(1, 4, 4, 4, 1)).astype(np.float32)).numpy()
    bx, by, bz = block
    blocks = out.reshape(1, 4, bx, 4, by, 4, bz, -1)
    inner = blocks[:, 1:-1, :, 1:-1, :, 1:-1]  # away from the zero padding
    spread = inner.max(axis=(2, 4, 6)) - inner.min(axis=(2, 4, 6))
    assert spread.max() < 1e-6 * max(1.0, np.abs(inner).max()) and np.abs(inner).max() > 0
