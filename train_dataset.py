"""Patch pipeline: canonical grid, patches and stitching, the tf.data training stream (degraded by
:mod:`degradation`).

The geometry and intensity rules are those of the original research code
(``SPEC.md`` section 1); the places where the port deliberately differs
(a 3-D-only blur, one degradation for training and evaluation, the mask
cropped like the image, the source affine kept) are ``SPEC.md`` section 6,
rows 4, 5, 7 and 12 (rows 1 and 2, the subjects' order and split, are in
:mod:`layouts`).

Layout conventions: a volume is ``(x, y, z)`` in voxel-index order of its file;
patches and batches are channels-last ``(b, x, y, z, 1)``. ``hr`` is a
high-resolution patch, ``lr`` its degraded version, ``sr`` a network output.

Bad data never crashes a run: :func:`make_train_dataset` reports and skips a
subject whose own file turns out bad when read (e.g. a truncated ``.nii.gz``)
without stopping the epoch. Everything that is not a problem of one subject's
file (out of memory, a data folder that disappeared, a disk error) stops the
epoch instead of silently emptying it. Bad files are
:class:`nifti_io.DataError`; wrong arguments are :class:`ValueError`.
"""

import dataclasses
import os
import re

import numpy as np

import degradation
import factors
import nifti_io
import quiet
import utils

# The command line reads this module's defaults before TensorFlow loads.
tf = quiet.Deferred("tensorflow")

VOLUME_SHAPE = (224, 224, 152)
PATCH_SHAPE = (128, 128, 92)
MARGIN = 16
# How stitch_patches merges overlapping patches: the original's crop, or MONAI's Gaussian weights.
BLEND_MODES = ("crop", "gaussian")


# --------------------------------------------------------------------------- #
# Canonical volume (SPEC section 1: pad to 256x256x184, crop [16:240, 16:240, 16:168])
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class CanonicalGrid:
    """Where a canonical volume sits on its subject's own voxel grid.

    Source voxel index = canonical voxel index + :meth:`offset`. Per axis, the
    canonical volume is the source padded by ``pad_before`` zeros at the start
    (and what it takes at the end), or cropped from ``crop_start`` on; at most
    one of the two is non-zero.

    Attributes:
        source_shape: (3,) ints, the subject's (x, y, z) shape.
        volume_shape: (3,) ints, the canonical shape.
        pad_before: (3,) ints >= 0, zeros added before the source on each axis.
        crop_start: (3,) ints >= 0, first source voxel kept on each axis.
    """

    source_shape: tuple
    volume_shape: tuple
    pad_before: tuple
    crop_start: tuple

    def offset(self):
        """Returns int64 (3,): source index = canonical index + offset (may be negative)."""
        return np.asarray(self.crop_start, dtype=np.int64) - np.asarray(self.pad_before, dtype=np.int64)

    def _overlap(self):
        """Returns per axis (first canonical voxel, first source voxel, length) of the shared region."""
        out = []
        for s, v, o in zip(self.source_shape, self.volume_shape, self.offset()):
            c0 = max(0, -int(o))
            s0 = c0 + int(o)
            out.append((c0, s0, max(0, min(v - c0, s - s0))))
        return out


def canonical_grid(source_shape, volume_shape=VOLUME_SHAPE):
    """The canonical placement of a source shape (see :func:`to_canonical`).

    Args:
        source_shape: (3,) ints, the subject's (x, y, z) shape.
        volume_shape: (3,) ints, the canonical shape.

    Returns:
        A :class:`CanonicalGrid`.

    Raises:
        ValueError: if a shape is not 3 positive integers.
    """
    source_shape = nifti_io.check_shape("source_shape", source_shape)
    volume_shape = nifti_io.check_shape("volume_shape", volume_shape)
    # offset = floor((s - v) / 2) on every axis is exactly the original's
    # "pad to 256x256x184, extra voxel first, crop 16 from the start" for any
    # source up to 256x256x184 (the 32-voxel crop is even), and continues it
    # as a central crop for larger sources.
    offset = [(s - v) // 2 for s, v in zip(source_shape, volume_shape)]
    return CanonicalGrid(
        source_shape=source_shape,
        volume_shape=volume_shape,
        pad_before=tuple(max(0, -o) for o in offset),
        crop_start=tuple(max(0, o) for o in offset),
    )


def to_canonical(volume, volume_shape=VOLUME_SHAPE):
    """Central zero-pad/crop of a volume to ``volume_shape`` (the original's rule).

    For sources up to 256x256x184 and the default ``volume_shape`` this equals
    the original exactly: zero-pad symmetrically to 256x256x184 with the extra
    voxel of an odd padding at the start, then crop ``[16:240, 16:240, 16:168]``.
    Larger axes are cropped centrally (the extra voxel of an odd crop is dropped
    at the start), which is the same formula, ``source = canonical + floor((s - v) / 2)``.

    Args:
        volume: array (x, y, z), any dtype (an image or a mask).
        volume_shape: (3,) ints, the canonical shape.

    Returns:
        (canonical, grid): array of ``volume``'s dtype, shape ``volume_shape``,
        zeros where the source does not reach; the :class:`CanonicalGrid` that
        :func:`from_canonical` and :func:`canonical_affine` need.

    Raises:
        ValueError: if ``volume`` is not 3-D or a shape is invalid.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"to_canonical expects an (x, y, z) volume, got shape {volume.shape}")
    grid = canonical_grid(volume.shape, volume_shape)
    out = np.zeros(grid.volume_shape, dtype=volume.dtype)
    (cx, sx, nx), (cy, sy, ny), (cz, sz, nz) = grid._overlap()
    out[cx:cx + nx, cy:cy + ny, cz:cz + nz] = volume[sx:sx + nx, sy:sy + ny, sz:sz + nz]
    return out, grid


def from_canonical(canonical, grid, fill=0.0):
    """Puts a canonical volume back on its subject's own grid.

    Args:
        canonical: array (x, y, z) of shape ``grid.volume_shape``, any dtype.
        grid: the :class:`CanonicalGrid` from :func:`to_canonical`.
        fill: value of the source voxels the canonical volume does not cover
            (those cropped away).

    Returns:
        array of ``canonical``'s dtype, shape ``grid.source_shape``; every voxel
        the canonical volume covers is back where it came from.

    Raises:
        ValueError: if ``canonical`` does not have shape ``grid.volume_shape``.
    """
    canonical = np.asarray(canonical)
    if tuple(canonical.shape) != tuple(grid.volume_shape):
        raise ValueError(f"from_canonical: canonical shape {canonical.shape} differs from the "
                         f"grid's volume_shape {tuple(grid.volume_shape)}")
    out = np.full(grid.source_shape, fill, dtype=canonical.dtype)
    (cx, sx, nx), (cy, sy, ny), (cz, sz, nz) = grid._overlap()
    out[sx:sx + nx, sy:sy + ny, sz:sz + nz] = canonical[cx:cx + nx, cy:cy + ny, cz:cz + nz]
    return out


def canonical_affine(affine, grid):
    """Voxel-to-world affine of a canonical volume.

    Canonical voxel ``i`` lies where source voxel ``i + grid.offset()`` lies, so
    a canonical result written with this affine overlays its source.

    Args:
        affine: (4, 4) voxel-to-world affine of the source volume.
        grid: its :class:`CanonicalGrid`.

    Returns:
        float64 (4, 4): ``affine @ translation(grid.offset())``.
    """
    shift = np.eye(4)
    shift[:3, 3] = grid.offset()
    return np.asarray(affine, dtype=np.float64) @ shift


# --------------------------------------------------------------------------- #
# Patches
# --------------------------------------------------------------------------- #


def _axis_starts(v, p, margin):
    """Returns the patch starts on one axis of length ``v`` for patch length ``p`` (validated by the caller)."""
    step = p - 2 * margin
    starts = list(range(0, v - p + 1, step))
    if starts[-1] + p < v:
        starts.append(v - p)  # last position moved back to end at the border
    return starts


def patch_starts(volume_shape, patch_shape=PATCH_SHAPE, margin=MARGIN):
    """Start corners of the patches covering a volume, x-major (the original's order).

    Per axis the positions are ``0, step, 2*step, ...`` with
    ``step = patch - 2 * margin``, the last one moved back to end at the border
    when the step does not divide. 224x224x152 with 128x128x92, margin 16 gives
    x in {0, 96}, y in {0, 96}, z in {0, 60}: 8 patches.

    Args:
        volume_shape: (3,) ints, the (x, y, z) volume shape.
        patch_shape: (3,) ints, the patch shape.
        margin: int >= 0, voxels dropped at inner patch borders when stitching;
            or three ints, one per axis (the LR patches of a per-axis factor).

    Returns:
        list of (x, y, z) int tuples, x outermost, z innermost.

    Raises:
        ValueError: if the volume is smaller than a patch, or the margin leaves
            no step (``patch - 2 * margin < 1``) on some axis; the message has
            the numbers.
    """
    volume_shape = nifti_io.check_shape("volume_shape", volume_shape)
    patch_shape = nifti_io.check_shape("patch_shape", patch_shape)
    margins = utils.per_axis(margin, "margin", 0)
    if any(v < p for v, p in zip(volume_shape, patch_shape)):
        raise ValueError(f"volume_shape {volume_shape} is smaller than patch_shape {patch_shape} "
                         f"on some axis; every axis must hold one patch")
    if any(p - 2 * m < 1 for p, m in zip(patch_shape, margins)):
        raise ValueError(f"margin {margin} leaves no step for patch_shape {patch_shape}: "
                         f"patch - 2 * margin must be >= 1 on every axis")
    xs, ys, zs = (_axis_starts(v, p, m) for v, p, m in zip(volume_shape, patch_shape, margins))
    return [(x, y, z) for x in xs for y in ys for z in zs]


def patches_per_volume(volume_shape=VOLUME_SHAPE, patch_shape=PATCH_SHAPE, margin=MARGIN):
    """Number of patches :func:`extract_patches` cuts from one volume (8 by default).

    Args:
        volume_shape, patch_shape, margin: as in :func:`patch_starts`.

    Returns:
        int >= 1.

    Raises:
        ValueError: as :func:`patch_starts`.
    """
    return len(patch_starts(volume_shape, patch_shape, margin))


def extract_patches(volume, patch_shape=PATCH_SHAPE, margin=MARGIN):
    """Cuts a volume into overlapping patches (see :func:`patch_starts`).

    Args:
        volume: array (x, y, z) or (x, y, z, 1), any real dtype.
        patch_shape: (3,) ints.
        margin: int >= 0, or three (one per axis).

    Returns:
        float32 (n, px, py, pz, 1), patches in x-major order, values as in ``volume``.

    Raises:
        ValueError: if ``volume`` is not (x, y, z) or (x, y, z, 1), or as
            :func:`patch_starts` (volume smaller than a patch, no step).
    """
    volume = np.asarray(volume)
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise ValueError(f"extract_patches expects an (x, y, z) or (x, y, z, 1) volume, "
                         f"got shape {volume.shape}")
    patch_shape = nifti_io.check_shape("patch_shape", patch_shape)
    starts = patch_starts(volume.shape, patch_shape, margin)
    px, py, pz = patch_shape
    out = np.empty((len(starts), px, py, pz, 1), dtype=np.float32)
    for i, (x, y, z) in enumerate(starts):
        out[i, ..., 0] = volume[x:x + px, y:y + py, z:z + pz]
    return out


def _axis_keep(starts, p, v):
    """Returns per patch start the [lo, hi) it keeps on one axis: the half of each overlap nearest its centre.

    With an odd overlap the extra voxel goes to the later patch.
    """
    bounds = [0] + [(starts[i + 1] + starts[i] + p) // 2 for i in range(len(starts) - 1)] + [v]
    return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]


def _gaussian_profile(p, sigma_scale):
    """Returns float64 (p,): a Gaussian of sigma ``sigma_scale * p`` centred on the patch, peak 1."""
    # MONAI centres its importance map on voxel p // 2; the true centre
    # (p - 1) / 2 keeps the map symmetric, so a flipped patch gets the same weights.
    x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
    g = np.exp(-0.5 * (x / (sigma_scale * p)) ** 2)
    return g / g.max()


def stitch_patches(patches, volume_shape, margin=MARGIN, blend="crop", sigma_scale=0.125):
    """Reassembles a volume from its overlapping patches.

    Two ways to merge the overlaps:

    - ``"crop"`` (the original's): each patch contributes the half of every
      overlap nearest its centre (with the default geometry: all but
      ``margin`` voxels at each inner border), so patch borders, where a
      network sees least context, are dropped. The exact inverse of
      :func:`extract_patches`.
    - ``"gaussian"`` (MONAI's sliding-window ``mode="gaussian"``): every
      patch is weighted by a Gaussian importance map, per axis sigma =
      ``sigma_scale`` x patch size, centred on the patch; the weighted patches
      are summed and divided by the summed weights. A voxel only one patch
      covers gets that patch's value exactly; a constant stays constant. As
      MONAI, the map is clamped to a tiny positive minimum so that the division
      is safe however small ``sigma_scale`` is.

    Args:
        patches: array (n, px, py, pz, 1) or (n, px, py, pz), in the order of
            :func:`patch_starts` for ``volume_shape``; e.g. network outputs.
        volume_shape: (3,) ints, the (x, y, z) volume shape.
        margin: int >= 0 (or three, one per axis), as used to cut them.
        blend: one of :data:`BLEND_MODES`.
        sigma_scale: float > 0, the Gaussian's sigma as a fraction of the
            patch size (``"gaussian"`` only; MONAI's default 0.125).

    Returns:
        float32 (x, y, z) of shape ``volume_shape``.

    Raises:
        ValueError: if the patch count or shape does not fit ``volume_shape``,
            ``blend`` is unknown, or ``sigma_scale`` is not a positive number.
    """
    if blend not in BLEND_MODES:
        raise ValueError(f"blend {blend!r} must be one of {', '.join(BLEND_MODES)}")
    if blend == "gaussian" and not (utils.is_real(sigma_scale) and sigma_scale > 0):
        raise ValueError(f"sigma_scale {sigma_scale!r} must be a finite number > 0")
    patches = np.asarray(patches)
    if patches.ndim == 5 and patches.shape[4] == 1:
        patches = patches[..., 0]
    if patches.ndim != 4:
        raise ValueError(f"stitch_patches expects (n, px, py, pz, 1) patches, got shape {patches.shape}")
    volume_shape = nifti_io.check_shape("volume_shape", volume_shape)
    patch_shape = tuple(int(s) for s in patches.shape[1:])
    starts = patch_starts(volume_shape, patch_shape, margin)
    if len(starts) != patches.shape[0]:
        raise ValueError(f"stitch_patches: {patches.shape[0]} patches given, but volume_shape "
                         f"{volume_shape} with patch_shape {patch_shape} and margin {margin} "
                         f"has {len(starts)}")
    if blend == "gaussian":
        px, py, pz = patch_shape
        weight = (_gaussian_profile(px, sigma_scale)[:, None, None] * _gaussian_profile(py, sigma_scale)[None, :, None]
                  * _gaussian_profile(pz, sigma_scale)[None, None, :])
        weight = np.maximum(weight, np.finfo(np.float32).tiny)
        # float64 sums: (v * w) / w comes back as the float32 v exactly.
        total = np.zeros(volume_shape, np.float64)
        weights = np.zeros(volume_shape, np.float64)
        for patch, (sx, sy, sz) in zip(patches, starts):
            total[sx:sx + px, sy:sy + py, sz:sz + pz] += weight * patch
            weights[sx:sx + px, sy:sy + py, sz:sz + pz] += weight
        total /= weights
        return total.astype(np.float32)
    keep = {}
    for axis in range(3):
        axis_starts = sorted({s[axis] for s in starts})
        keep[axis] = dict(zip(axis_starts, _axis_keep(axis_starts, patch_shape[axis], volume_shape[axis])))
    out = np.empty(volume_shape, dtype=np.float32)
    for patch, start in zip(patches, starts):
        (x0, x1), (y0, y1), (z0, z1) = (keep[a][start[a]] for a in range(3))
        sx, sy, sz = start
        out[x0:x1, y0:y1, z0:z1] = patch[x0 - sx:x1 - sx, y0 - sy:y1 - sy, z0 - sz:z1 - sz]
    return out


# --------------------------------------------------------------------------- #
# Training stream
# --------------------------------------------------------------------------- #


def epoch_order(n_subjects, seed=0, epoch=0):
    """The subject order of one epoch, a function of ``(seed, epoch)`` only.

    A run resumed at epoch k therefore sees the order an uninterrupted run
    would have seen.

    Args:
        n_subjects: int >= 0.
        seed: int >= 0, the run's seed.
        epoch: int >= 0, the epoch index.

    Returns:
        int64 (n_subjects,), a permutation of ``range(n_subjects)``.
    """
    return np.random.default_rng([int(seed), int(epoch)]).permutation(int(n_subjects))


def batches_per_epoch(n_subjects, batch_size=2, volume_shape=VOLUME_SHAPE, patch_shape=PATCH_SHAPE,
                      margin=MARGIN):
    """Batches :func:`make_train_dataset` yields when every subject decodes.

    Args:
        n_subjects: int >= 0.
        batch_size: int >= 1.
        volume_shape, patch_shape, margin: the patch geometry.

    Returns:
        int, ``ceil(n_subjects * patches_per_volume / batch_size)`` (the last
        partial batch is kept).
    """
    n = int(n_subjects) * patches_per_volume(volume_shape, patch_shape, margin)
    return -(-n // int(batch_size))


def load_training_patches(path, volume_shape=VOLUME_SHAPE, patch_shape=PATCH_SHAPE, margin=MARGIN,
                          log=print, with_norm_factor=False):
    """Reads one subject and returns its normalised HR patches.

    Args:
        path: the subject's image file.
        volume_shape, patch_shape, margin: the patch geometry.
        log: callable taking one message string.
        with_norm_factor: bool, also return the factors.

    Returns:
        float32 (n, px, py, pz, 1), each patch mapped to [-1, 1] on its own
        (``utils.normalize``, SPEC section 1), x-major order; with
        ``with_norm_factor``, a tuple of it and float32 (n,) factors ``nf``.

    Raises:
        nifti_io.DataError: if the file cannot be read, its header claims
            more than :func:`nifti_io.max_voxels_for` (``volume_shape``)
            voxels, or its maximum intensity is not positive
            (:func:`nifti_io.check_intensity`).
        nifti_io.PipelineError: if the file's folder has disappeared.
        MemoryError, OSError: failures that are not this file's propagate.
    """
    volume, _, _ = nifti_io.load_volume(path, log=log, max_voxels=nifti_io.max_voxels_for(volume_shape))
    nifti_io.check_intensity(volume, path)
    canonical, _ = to_canonical(volume, volume_shape)
    del volume
    patches = extract_patches(canonical, patch_shape, margin)
    norms = np.zeros(len(patches), np.float32)
    for i in range(len(patches)):
        patches[i], norms[i] = utils.normalize(patches[i])
    return (patches, norms) if with_norm_factor else patches


def _check_stream_args(patch_shape, upsampling_factor, batch_size, sigma, slice_profile):
    """Validates :func:`make_train_dataset`'s factor, batch size, blur and profile; returns the factor."""
    f = factors.UpsamplingFactor.of(upsampling_factor)
    problem = f.shape_problem("patch_shape", patch_shape)
    if problem:
        raise ValueError(f"{problem}: the network's output must match the HR patch")
    utils.check_int("batch_size", batch_size, 1)
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma {sigma!r} must be a finite number >= 0")
    factors.check_slice_profile(slice_profile)
    return f


def _subject_loader(volume_shape, patch_shape, margin, log, on_skip, failures):
    """Returns ``load(path)``: one subject's ``(patches, factors)``, or none when its file is bad.

    A bad file (a DataError that is not a PipelineError) is reported via
    ``log`` and ``on_skip`` and gives no patch; any other exception is
    appended to ``failures`` and raised (see :func:`make_train_dataset`).
    """
    empty = (np.zeros((0, *patch_shape, 1), np.float32), np.zeros(0, np.float32))

    def load(path):
        path = path.decode() if isinstance(path, bytes) else str(path)
        try:
            try:
                return load_training_patches(path, volume_shape, patch_shape, margin, log=log,
                                             with_norm_factor=True)
            except nifti_io.PipelineError:
                raise
            except nifti_io.DataError as e:
                # Only this subject's file is bad: skip it, keep the epoch going.
                log(f"Skipping subject this epoch: {e}")
                if on_skip is not None:
                    reason = str(e)
                    on_skip(path, reason[len(path) + 2:] if reason.startswith(f"{path}: ") else reason)
                return empty
        except BaseException as e:
            # Not a bad file: the epoch must stop rather than quietly run short
            # (or empty). tf.data will wrap this; keep the original for the consumer.
            if failures is not None:
                failures.append(e)
            raise

    return load


def make_train_dataset(subjects, upsampling_factor, *, batch_size=2, volume_shape=VOLUME_SHAPE,
                       patch_shape=PATCH_SHAPE, margin=MARGIN, seed=0, epoch=0, sigma=1.0,
                       slice_profile="gaussian", with_norm_factor=False, log=print, on_skip=None,
                       failures=None, shard=(0, 1)):
    """One epoch of ``(lr, hr)`` training batches, streamed from the NIfTI files.

    Subjects come in the order :func:`epoch_order` draws from ``(seed, epoch)``;
    each gives its patches in x-major order (as the original). NIfTI decoding
    runs in parallel (order kept), the degradation runs in TensorFlow inside
    the pipeline, and batches are prefetched. Only the volumes being decoded
    and the prefetch buffers are in memory, whatever the number of subjects.
    Batches span volumes when ``patches_per_volume`` is not a multiple of
    ``batch_size``; the last partial batch is kept.

    A subject whose own file is bad (a :class:`nifti_io.DataError`:
    unreadable, truncated, wrong shape or type, implausible header, maximum
    intensity <= 0) is reported via ``log`` and ``on_skip`` and contributes no
    patch; the epoch goes on. Any other failure (MemoryError, a disk or
    network error, the data folder disappearing:
    :class:`nifti_io.PipelineError`) stops the epoch: it is appended to
    ``failures`` and raised inside the pipeline, where ``tf.data`` turns it
    into a ``tf.errors.OpError`` (UnknownError, InvalidArgumentError,
    ResourceExhaustedError, ...) for the consumer;
    :func:`unwrap_pipeline_error` gets the original back.

    Args:
        subjects: sequence of :class:`layouts.Subject` (usually the train list).
        upsampling_factor: int >= 2, three ints or a ``factors.UpsamplingFactor``, dividing
            ``patch_shape`` on every axis.
        batch_size: int >= 1 (2: one default volume is 4 batches).
        volume_shape: (3,) ints, the canonical shape.
        patch_shape: (3,) ints, the HR patch shape.
        margin: int >= 0, patch overlap margin.
        seed: int >= 0, the run's seed.
        epoch: int >= 0, the epoch this dataset is for.
        sigma: float >= 0, blur of the degradation in voxels (``gaussian`` profile).
        slice_profile: ``"gaussian"`` or ``"box"``, the degradation's (:func:`degrade`).
        with_norm_factor: bool, also yield each patch's normalisation factor
            ``nf`` (float32 (b,)) so that outputs can be de-normalised.
        log: callable taking one message string; called from tf.data threads.
        on_skip: optional callable ``(path, reason)`` for each skipped subject
            (reason: the DataError's message without the leading path);
            called from tf.data threads, after ``log``.
        failures: optional list; the original exception of a failure that
            stops the epoch is appended to it (from a tf.data thread) before
            it is raised. Pass a fresh list per dataset.
        shard: (index, count): read only the subjects at positions index,
            index + count, ... of the epoch's order (one worker of ``count``);
            (0, 1) reads them all.

    Returns:
        ``tf.data.Dataset`` of ``(lr, hr)``: hr float32 (b, px, py, pz, 1) in
        [-1, 1] (normalised per patch), lr = :func:`degrade` (hr) float32
        (b, px/f, py/f, pz/f, 1); b = ``batch_size`` except possibly the last.
        ``(lr, hr, nf)`` with ``with_norm_factor``.

    Raises:
        ValueError: for an invalid geometry (volume smaller than a patch, no
            step), a ``batch_size`` < 1, or a factor that does not divide
            ``patch_shape``.
        tf.errors.OpError: while iterating, for a failure that stops the
            epoch (see above).
    """
    volume_shape = nifti_io.check_shape("volume_shape", volume_shape)
    patch_shape = nifti_io.check_shape("patch_shape", patch_shape)
    patch_starts(volume_shape, patch_shape, margin)  # validates the geometry early
    f = _check_stream_args(patch_shape, upsampling_factor, batch_size, sigma, slice_profile)

    shard_index, shard_count = (int(n) for n in shard)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard} must be (index, count) with 0 <= index < count")
    subjects = list(subjects)
    order = epoch_order(len(subjects), seed, epoch)
    # Several workers: each reads every shard_count-th subject of the epoch's
    # order (whole subjects, so each worker decodes only its own volumes).
    order = order[shard_index::shard_count]
    paths = [os.fspath(subjects[i].image_path) for i in order]
    load = _subject_loader(volume_shape, patch_shape, margin, log, on_skip, failures)

    def load_tf(path):
        patches, norms = tf.numpy_function(load, [path], (tf.float32, tf.float32), stateful=False)
        patches.set_shape((None, *patch_shape, 1))
        norms.set_shape((None,))
        return patches, norms

    def add_lr(hr, nf):
        lr = degradation.degrade(hr, f, sigma, slice_profile)
        return (lr, hr, nf) if with_norm_factor else (lr, hr)

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, dtype=tf.string) if paths
                                            else tf.zeros([0], tf.string))
    ds = ds.map(load_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.unbatch()
    ds = ds.batch(int(batch_size), drop_remainder=False)
    ds = ds.map(add_lr, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def unwrap_pipeline_error(error, failures=None):
    """The original exception behind a failed training pipeline.

    ``tf.data`` reports a Python exception raised while loading as a
    ``tf.errors.OpError`` whose type depends on the exception's (MemoryError:
    ResourceExhaustedError, ValueError: InvalidArgumentError, ...) and whose
    message holds its text; the exception object itself is lost.
    :func:`make_train_dataset` keeps it in its ``failures`` list.

    Args:
        error: the exception the consumer caught while iterating.
        failures: the list given to :func:`make_train_dataset` (or None).

    Returns:
        The recorded original exception whose ``"Type: message"`` appears in
        ``error``'s message (the first recorded one when none does); without
        recorded failures, ``error`` itself unless it is a ``tf.errors.OpError``,
        which becomes a :class:`nifti_io.PipelineError` carrying its message.
    """
    text = str(getattr(error, "message", None) or error)
    failures = list(failures or ())
    if failures:
        for failure in failures:
            if f"{type(failure).__name__}: {failure}" in text:
                return failure
        return failures[0]
    if isinstance(error, tf.errors.OpError):
        # Keep "Type: message" of the Python error; drop TF's node prefix and the traceback.
        text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text.split("\nTraceback")[0]).strip()
        return nifti_io.PipelineError(f"the training data pipeline failed ({type(error).__name__}): {text}")
    return error
