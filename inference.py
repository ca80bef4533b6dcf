"""Inference: the generator over a volume patch by patch, stitched, with optional Gaussian blending and flip TTA."""

import dataclasses

import numpy as np
import tensorflow as tf

import checkpoints
import config
import model_file
import networks
import train_dataset as td
from factors import UpsamplingFactor


def make_predictor(generator):
    """A compiled inference function, traced once for any patch size."""
    return tf.function(lambda x: generator(x, training=False), autograph=False,
                       input_signature=[tf.TensorSpec((None, None, None, None, 1), tf.float32)])


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of super-resolving a volume: a patch blending and whether to flip.

    Attributes:
        blend: one of ``td.BLEND_MODES`` ("crop": the original's; "gaussian").
        flip: bool, average with the pass on the left-right mirrored volume.
    """

    blend: str = "crop"
    flip: bool = False

    @property
    def label(self):
        """str, e.g. ``"crop"`` or ``"gaussian+flip"`` (reports, mosaic titles)."""
        return self.blend + ("+flip" if self.flip else "")

    @property
    def key(self):
        """str, the metrics.csv column stem, e.g. ``"sr_gaussian_flip"``."""
        return "sr_" + self.label.replace("+", "_")


def inference_variants(blend="crop", tta="none"):
    """The variants an evaluation computes so that each option's effect shows in one run.

    Always the original's (crop, no flip) first; then the -blend alone when it
    is not crop; then the -blend with the flip when -tta is flip. The last one
    has every option and is the one written as ``_sr``.

    Args:
        blend: one of ``td.BLEND_MODES``.
        tta: one of ``config.TTA_MODES``.

    Returns:
        tuple of :class:`Variant`, 1 to 3 of them.

    Raises:
        ValueError: for an unknown blend or tta.
    """
    if blend not in td.BLEND_MODES:
        raise ValueError(f"-blend {blend!r} must be one of {', '.join(td.BLEND_MODES)}")
    if tta not in config.TTA_MODES:
        raise ValueError(f"-tta {tta!r} must be one of {', '.join(config.TTA_MODES)}")
    variants = [Variant("crop", False)]
    if blend != "crop":
        variants.append(Variant(blend, False))
    if tta == "flip":
        variants.append(Variant(blend, True))
    return tuple(variants)


def predict_patches(predict, lr, upsampling_factor, patch_shape, margin, batch_size):
    """Runs the generator over the LR patches of a volume.

    Returns:
        (sr_patches float32 (n, fx·px', fy·py', fz·pz', 1), hr_margin (3,)
        ints, hr_shape (3,) ints) for :func:`td.stitch_patches`.
    """
    factors = UpsamplingFactor.of(upsampling_factor).axes
    lr_patch = tuple(min(p // f, n) for p, n, f in zip(patch_shape, lr.shape, factors))
    cap = (min(lr_patch) - 1) // 2
    lr_margin = tuple(min(margin // f, cap) for f in factors)
    patches = td.extract_patches(lr, lr_patch, lr_margin)
    outputs = [np.asarray(predict(tf.constant(patches[i:i + batch_size])))
               for i in range(0, len(patches), batch_size)]
    return (np.concatenate(outputs, axis=0), tuple(m * f for m, f in zip(lr_margin, factors)),
            tuple(n * f for n, f in zip(lr.shape, factors)))


def super_resolve_variants(predict, lr, upsampling_factor, patch_shape, margin, batch_size=2,
                           variants=(Variant(),), flip_axis=None, slice_profile="gaussian"):
    """Super-resolves a volume patch by patch, once per variant, sharing the network passes.

    The low-resolution patches use the training geometry divided by the factor
    (``patch_shape / f``, ``margin / f``); an axis shorter than a patch is
    processed whole. The network runs at most twice (the volume, and its
    mirror along ``flip_axis`` when a variant flips); each blending stitches
    those outputs. A flip variant is the mean of the plain result and the
    mirrored volume's result mirrored back and put back on the grid
    (:func:`align_mirrored_pass`).

    Args:
        predict: callable float32 (n, x, y, z, 1) -> (n, fx·x, fy·y, fz·z, 1).
        lr: float32 (x, y, z) in [-1, 1].
        upsampling_factor: int f, (fx, fy, fz) or a ``factors.UpsamplingFactor``.
        patch_shape: HR patch (px, py, pz), divisible by the factors.
        margin: HR margin, divisible by every factor.
        batch_size: patches per generator call.
        variants: sequence of :class:`Variant`.
        flip_axis: int in {0, 1, 2}, the voxel axis that is left-right
            (``utils.left_right_axis`` of the volume's affine); needed when a
            variant flips.
        slice_profile: the degradation the generator learnt (``"gaussian"`` or
            ``"box"``): where an LR voxel lies, which the mirrored pass needs.

    Returns:
        dict :class:`Variant` -> float32 (fx·x, fy·y, fz·z).

    Raises:
        ValueError: if a variant flips and ``flip_axis`` is not 0, 1 or 2.
    """
    lr = np.asarray(lr, dtype=np.float32)
    if any(v.flip for v in variants) and flip_axis not in (0, 1, 2):
        raise ValueError(f"flip_axis {flip_axis!r} must be 0, 1 or 2 for a flip variant")
    passes = {}

    def network_pass(flipped):
        if flipped not in passes:
            source = np.ascontiguousarray(np.flip(lr, flip_axis)) if flipped else lr
            passes[flipped] = predict_patches(predict, source, upsampling_factor, patch_shape,
                                               margin, batch_size)
        return passes[flipped]

    stitched = {}

    def stitch(blend, flipped):
        if (blend, flipped) not in stitched:
            patches, hr_margin, hr_shape = network_pass(flipped)
            volume = td.stitch_patches(patches, hr_shape, hr_margin, blend=blend)
            stitched[blend, flipped] = np.flip(volume, flip_axis) if flipped else volume
        return stitched[blend, flipped]

    out = {}
    for variant in variants:
        plain = stitch(variant.blend, False)
        if variant.flip:
            mirrored = align_mirrored_pass(stitch(variant.blend, True), plain, flip_axis,
                                            upsampling_factor, slice_profile)
            out[variant] = (0.5 * (plain + mirrored)).astype(np.float32)
        else:
            out[variant] = plain
    return out


def align_mirrored_pass(mirrored, plain, axis, upsampling_factor, slice_profile="gaussian"):
    """Puts the mirrored pass back on the plain pass's grid.

    The network learnt that LR voxel ``k`` lies at HR voxel ``f·k + o``
    (``factors.UpsamplingFactor.lr_origin``). Mirrored, it stands for HR voxel
    ``f·k + f − 1 − o`` of the mirrored block, so the mirrored pass, mirrored
    back, estimates the volume ``f − 1 − 2·o`` voxels further along ``axis``:
    ``f − 1`` for the ``gaussian`` profile's ``x[::f]`` (the first voxel of
    each block of f), shifted back here; 0 for ``box`` (a slab's centre
    mirrors onto a slab's centre). The last shifted slices have no mirrored
    estimate and keep the plain pass's.

    Args:
        mirrored: float32 (X, Y, Z), the mirrored volume's result mirrored back.
        plain: float32 (X, Y, Z), the plain result.
        axis: int, the mirrored axis.
        upsampling_factor: int f, (fx, fy, fz) or a ``factors.UpsamplingFactor``.
        slice_profile: ``"gaussian"`` or ``"box"``, the degradation the network learnt.

    Returns:
        float32 (X, Y, Z).
    """
    factor = UpsamplingFactor.of(upsampling_factor)
    shift = int(round(factor.axes[axis] - 1 - 2 * factor.lr_origin(slice_profile)[axis]))
    if shift == 0:
        return mirrored
    aligned = plain.copy()
    head = [slice(None)] * 3
    tail = [slice(None)] * 3
    head[axis], tail[axis] = slice(0, plain.shape[axis] - shift), slice(shift, None)
    aligned[tuple(head)] = mirrored[tuple(tail)]
    return aligned


def super_resolve_volume(predict, lr, upsampling_factor, patch_shape, margin, batch_size=2,
                         blend="crop", flip_axis=None, slice_profile="gaussian"):
    """Super-resolves a whole volume patch by patch and stitches the result.

    With the defaults, the original's way: each patch keeps the half of every
    overlap nearest its centre, as the training patches.

    Args:
        predict, lr, upsampling_factor, patch_shape, margin, batch_size: as
            :func:`super_resolve_variants`.
        blend: "crop" or "gaussian" (``td.stitch_patches``).
        flip_axis: None, or the left-right voxel axis: then also the mirrored
            volume is super-resolved, mirrored back and averaged in (TTA).
        slice_profile: as :func:`super_resolve_variants`.

    Returns:
        float32 (f·x, f·y, f·z).
    """
    variant = Variant(blend, flip_axis is not None)
    return super_resolve_variants(predict, lr, upsampling_factor, patch_shape, margin, batch_size,
                                  (variant,), flip_axis, slice_profile)[variant]


def restored_predictor(cfg, source, log):
    """The predict callable of the trained generator in ``source``, and what identifies that generator.

    Every inference pass goes through the returned callable, float32
    (n, x, y, z, 1) -> (n, f·x, f·y, f·z, 1), so it may be swapped for one
    that spreads each batch over several devices. The identity is that of
    the checkpoint the weights were read from (chosen once: a training run
    in the folder may prune its checkpoints meanwhile); a model file carries
    its checkpoint's step and hash, so outputs and metrics files agree
    whichever of the two an inference run used.

    Args:
        cfg: the :class:`config.Settings` (the architecture of a checkpoint).
        source: a checkpoint folder (the generator of ``cfg`` is built and
            its weights restored) or a ``.keras`` model file from -export.
        log: callable for messages.

    Returns:
        (predict, identity): identity a dict with ``path``, ``step`` and
        ``sha256`` (``checkpoints.identify``).

    Raises:
        UserError: the checkpoint does not fit ``cfg`` or is damaged, or the file cannot be read.
    """
    if model_file.is_model_file(source):
        identity = model_file.identity(source, model_file.read_metadata(source))
        generator = model_file.load_generator(source)
        log(f"loaded generator from {source}")
        return make_predictor(generator), identity
    generator = networks.build_generator(
        **cfg.architecture(), dtype_policy=config.PRECISION_POLICIES[cfg.mixed_precision])
    identity = checkpoints.restore_generator(generator, source, log)
    log(f"restored generator from {identity['path']}")
    return make_predictor(generator), identity
