"""NIfTI reading and header checks: one 3-D volume of a real scalar type, of plausible size.

A volume is ``(x, y, z)`` in voxel-index order of its file, read as float32
with the file's scaling applied (:func:`load_volume`); :func:`header_problem`
checks a file from its header alone, cheaply enough for hundreds of subjects.

Bad data never crash a run: a problem of one file (unreadable, corrupt,
truncated, wrong shape or type, an implausible header) is a :class:`DataError`
naming the file, which the caller reports and skips. Everything that is not a
problem of one file (out of memory, a disk error) propagates unchanged, and a
data folder that disappeared is a :class:`PipelineError`: both stop a run
instead of silently emptying it. Wrong arguments are :class:`ValueError`.
"""

import errno
import math
import os

import numpy as np

import factors
import utils

#: The original's canonical volume, 224x224x152 (``train_dataset.VOLUME_SHAPE``):
#: :func:`max_voxels_for` never allows fewer than ``MAX_VOXELS_FACTOR`` times it.
REFERENCE_SHAPE = (224, 224, 152)
#: A header claiming more voxels than this many canonical volumes is taken as
#: corrupt (see :func:`max_voxels_for`): reading it could take gigabytes.
MAX_VOXELS_FACTOR = 16


class DataError(ValueError):
    """A problem with the user's data (missing folder, unreadable file, ...).

    The message names the offending path and what was expected there.
    """


class PipelineError(DataError):
    """A data failure that is not one subject's bad file: it stops training.

    E.g. the data folder disappeared (moved, unmounted) while a run was
    reading it. Also what :func:`train_dataset.unwrap_pipeline_error` returns
    when the original exception of a failed ``tf.data`` pipeline is unknown.
    """


def check_shape(name, shape, minimum=1):
    """Returns ``shape`` as a tuple of 3 ints >= ``minimum``; ValueError naming ``name`` otherwise."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"{name} {shape!r} must be 3 integers") from None
    if len(shape) != 3 or min(shape) < minimum:
        raise ValueError(f"{name} {shape} must be 3 integers >= {minimum}")
    return shape


def shape_str(shape):
    """Returns a shape as ``"224x224x152"``."""
    return "x".join(str(int(s)) for s in shape)


def max_voxels_for(volume_shape=REFERENCE_SHAPE):
    """The most voxels a NIfTI header may claim before it is refused as corrupt.

    ``MAX_VOXELS_FACTOR`` (16) times the canonical volume, and never less than
    16 times the default 224x224x152 (122 million voxels, 0.5 GB as float32),
    so that a small ``volume_shape`` chosen for a quick run still accepts
    ordinary high-resolution scans (a 0.5 mm 512x512x400 scan is 105 million).

    Args:
        volume_shape: (3,) ints, the canonical shape.

    Returns:
        int.

    Raises:
        ValueError: if ``volume_shape`` is not 3 positive integers.
    """
    volume_shape = check_shape("volume_shape", volume_shape)
    return MAX_VOXELS_FACTOR * max(math.prod(volume_shape), math.prod(REFERENCE_SHAPE))


# --------------------------------------------------------------------------- #
# Header checks
# --------------------------------------------------------------------------- #

# OS errors of reading one file that are that file's problem; any other errno
# (EIO, ESTALE, EMFILE, ENOMEM, ...) is the machine's, and stops a run.
_FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}


def _vanished_folder(path):
    """Returns the topmost missing folder above ``path`` when its folder is gone, else None."""
    gone = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(gone):
        return None
    while True:
        parent = os.path.dirname(gone)
        if parent == gone or os.path.isdir(parent):
            return gone
        gone = parent


def _read_failure(path, what, err):
    """Classifies an exception raised while reading one NIfTI file.

    Args:
        path: the file being read.
        what: ``"header"`` or ``"data"``, for the message.
        err: the exception.

    Returns:
        The exception to raise instead, chained to ``err``: a :class:`DataError`
        naming ``path`` when ``err`` is this file's problem (unreadable,
        corrupt, truncated: nibabel, gzip and zlib raise many types for those),
        a :class:`PipelineError` when the file's folder is gone; or None when
        ``err`` is not about this file (MemoryError, an OS error such as EIO or
        ENOSPC, KeyboardInterrupt) and must propagate as it is.
    """
    if isinstance(err, DataError):
        return err
    if not isinstance(err, Exception) or isinstance(err, (MemoryError, RecursionError)):
        return None
    if isinstance(err, OSError):
        # nibabel turns any failed stat() into a FileNotFoundError without errno.
        if isinstance(err, FileNotFoundError) or err.errno == errno.ENOENT:
            gone = _vanished_folder(path)
            if gone is not None:
                return PipelineError(f"data folder {gone} has disappeared (reading {path}); was it moved, "
                                     f"renamed or unmounted? Put it back and resume the run")
        # nibabel reports short reads as OSError without errno; gzip's BadGzipFile has none either.
        elif err.errno is not None and err.errno not in _FILE_ERRNOS:
            return None
    return DataError(f"{path}: cannot read the NIfTI {what} ({type(err).__name__}: {err})")


def _dtype_problem(dtype):
    """Returns why a NIfTI data type cannot be a scalar intensity image, or None when it can."""
    dtype = np.dtype(dtype)
    if dtype.fields is None and dtype.kind in "biuf":
        return None
    kind = "colour (RGB/RGBA)" if dtype.fields is not None else "complex" if dtype.kind == "c" else "non-numeric"
    return (f"data type {dtype} is not a real scalar type: {kind} images are not supported "
            f"(expected one intensity per voxel)")


def _voxels_problem(spatial, max_voxels):
    """Returns why a header's spatial shape is implausibly large, or None (always None without a limit)."""
    if max_voxels is None:
        return None
    n = math.prod(int(s) for s in spatial)
    if n <= max_voxels:
        return None
    return (f"header claims {n} voxels ({shape_str(spatial)}), more than the limit {int(max_voxels)} "
            f"({MAX_VOXELS_FACTOR}x the canonical volume, at least {MAX_VOXELS_FACTOR}x "
            f"{shape_str(REFERENCE_SHAPE)}); the header is probably corrupt")


def _raw_voxel_sizes(path, header_class):
    """Returns the (3,) voxel sizes (pixdim[1:4]) exactly as stored in the file."""
    # nib.load quietly turns zero voxel sizes into 1 and negative ones into
    # their absolute value; the check must see what the file says.
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as fh:
        raw = header_class.from_fileobj(fh, check=False)
    return tuple(float(z) for z in raw["pixdim"][1:4])


def header_problem(path, min_shape=None, max_voxels=None):
    """Checks one NIfTI file from its header only.

    Refuses: an empty or unreadable file, a shape that is not one 3-D volume,
    a non-scalar data type (RGB/RGBA, complex), non-positive voxel sizes, a
    volume smaller than ``min_shape``, a header claiming more than
    ``max_voxels`` voxels, and an uncompressed file shorter than its header says.

    Args:
        path: the NIfTI file.
        min_shape: optional (3,) ints, the smallest accepted (x, y, z) shape.
        max_voxels: optional int, the most voxels the header may claim
            (usually :func:`max_voxels_for`).

    Returns:
        (problem, spatial_shape): problem is None for a usable file, else the
        reason; spatial_shape is the (x, y, z) shape when it could be read.

    Raises:
        PipelineError: if the file's folder has disappeared.
        MemoryError, OSError: failures that are not this file's (see
            :func:`_read_failure`) propagate.
    """
    import nibabel as nib

    try:
        if os.path.getsize(path) == 0:
            return "file is empty (0 bytes)", None
        img = nib.load(path)
        header = img.header
        shape = tuple(int(s) for s in img.shape)
        dtype = header.get_data_dtype()
        zooms = _raw_voxel_sizes(path, type(header))
    except Exception as e:  # noqa: BLE001 - classified: a bad file is a problem, the rest propagates
        failure = _read_failure(path, "header", e)
        if failure is None:
            raise
        if isinstance(failure, PipelineError):
            raise failure from e
        return f"cannot read the NIfTI header ({type(e).__name__}: {e})", None
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        return (f"expected a 3-D volume (or 4-D with one volume), got shape "
                f"{shape_str(shape)}"), None
    spatial = shape[:3]
    if min(spatial) <= 0:
        return f"empty volume, shape {shape_str(spatial)}", None
    problem = _dtype_problem(dtype)
    if problem is not None:
        return problem, spatial
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        return f"voxel sizes must be positive, got {zooms}", None
    if min_shape is not None and any(s < m for s, m in zip(spatial, min_shape)):
        return (f"volume {shape_str(spatial)} is smaller than the minimum "
                f"{shape_str(min_shape)}"), spatial
    problem = _voxels_problem(spatial, max_voxels)
    if problem is not None:
        return problem, spatial
    # An uncompressed file shorter than its header says is caught here for
    # free; a truncated .nii.gz only shows when its data are read.
    if not path.endswith(".gz"):
        try:
            # dataobj.offset, not the header's vox_offset, which may be 0 in a
            # valid single file (the data then start right after the header).
            # math.prod of Python ints: NIfTI-2 dimensions could overflow int64.
            needed = int(img.dataobj.offset) + math.prod(shape) * np.dtype(dtype).itemsize
        except Exception:  # noqa: BLE001
            needed = 0
        if os.path.getsize(path) < needed:
            return (f"file is truncated: {os.path.getsize(path)} bytes, the header "
                    f"needs {needed}"), spatial
    return None, spatial


def minimum_image_shape(patch_shape, factor):
    """The smallest (x, y, z) image worth one patch: the LR patch, and at least 2 x factor a side.

    Args:
        patch_shape: (3,) ints, the HR patch.
        factor: int, the upsampling factor, or three (one per axis).

    Returns:
        tuple of 3 ints.
    """
    axes = factors.UpsamplingFactor.of(factor).axes
    return tuple(max(-(-int(p) // f), 2 * f) for p, f in zip(patch_shape, axes))


def size_problem(shape, patch_shape, factor):
    """Why an image is too small to train on or to score (None when it is not).

    A 1x1x1 image would be padded into a whole canonical volume and score a
    meaningless PSNR; anything with an axis smaller than
    :func:`minimum_image_shape` is refused with its shape.
    """
    minimum = minimum_image_shape(patch_shape, factor)
    if any(int(s) < m for s, m in zip(shape, minimum)):
        return (f"image {shape_str(shape)} is smaller than one patch's worth: each axis needs at "
                f"least {shape_str(minimum)} voxels (the LR patch of -patch_shape "
                f"{','.join(map(str, patch_shape))}, and 2 x -upsampling_factor {factors.UpsamplingFactor.of(factor).text})")
    return None


# --------------------------------------------------------------------------- #
# Reading volumes
# --------------------------------------------------------------------------- #


def load_volume(path, log=print, max_voxels=None):
    """Reads a NIfTI volume as float32.

    The header is checked before any data are read: one 3-D volume, a real
    scalar data type (not RGB/RGBA or complex) and, with ``max_voxels``, a
    plausible size, so a small corrupt file claiming 10^9 voxels is refused
    without allocating them.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file, 3-D or 4-D with one volume.
        log: callable taking one message string; told (path and count) when
            NaN/inf voxels are found.
        max_voxels: optional int, the most voxels the header may claim
            (usually :func:`max_voxels_for`); None: no limit.

    Returns:
        (data, affine, header): data float32 (x, y, z) with the file's scaling
        applied and NaN/inf set to 0; affine float64 (4, 4) voxel-to-world;
        the file's ``nib.Nifti1Header`` (or ``Nifti2Header``).

    Raises:
        DataError: naming ``path`` and the reason if the file cannot be read
            (missing, bad header, truncated data), is not a single 3-D volume
            of a real scalar type, or claims more than ``max_voxels`` voxels.
        PipelineError: (a DataError) if the file's folder has disappeared.
        MemoryError, OSError: failures that are not this file's (out of
            memory, a disk or network error) propagate unchanged.
    """
    import nibabel as nib

    path = os.fspath(path)
    try:
        img = nib.load(path)
    except Exception as e:  # noqa: BLE001 - classified by _read_failure
        failure = _read_failure(path, "header", e)
        if failure is None:
            raise
        raise failure from e
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise DataError(f"{path}: expected a 3-D volume (or 4-D with one volume), "
                        f"got shape {shape_str(shape)}")
    for problem in (_dtype_problem(img.get_data_dtype()), _voxels_problem(shape[:3], max_voxels)):
        if problem is not None:
            raise DataError(f"{path}: {problem}")
    try:
        data = img.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as e:  # noqa: BLE001 - zlib/EOF/short-read errors of bad files; the rest propagates
        failure = _read_failure(path, "data", e)
        if failure is None:
            raise
        raise failure from e
    data = data.reshape(shape[:3])
    if data.size == 0:
        raise DataError(f"{path}: empty volume, shape {shape_str(data.shape)}")
    bad = ~np.isfinite(data)
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        log(f"{path}: {n_bad} NaN/inf voxel(s) set to 0")
        data[bad] = 0.0
    return data, np.array(img.affine, dtype=np.float64), img.header


def check_intensity(volume, path):
    """Refuses a volume whose maximum intensity is not positive.

    Normalisation divides by ``max / 2``: a non-positive maximum (an empty
    image, or only negative intensities, which some converters write) would
    flip the image's sign or divide by zero, so such a volume is refused
    rather than trained on or evaluated.

    Args:
        volume: array (x, y, z), the volume as read (source intensities).
        path: its file, for the message.

    Returns:
        The maximum intensity, a Python float > 0.

    Raises:
        DataError: "{path}: maximum intensity {m} <= 0; ..." (also for an
            empty array or a NaN maximum).
    """
    volume = np.asarray(volume)
    if volume.size == 0:
        raise DataError(f"{path}: empty volume, shape {volume.shape}")
    m = float(np.max(volume))
    if not m > 0:
        raise DataError(f"{path}: maximum intensity {m:g} <= 0; expected a non-negative image with "
                        f"some positive voxels")
    return m


def load_mask(subject, image=None, log=print):
    """Reads a subject's brain mask, or derives it as ``image > 0``.

    Args:
        subject: a :class:`layouts.Subject`.
        image: optional float (x, y, z) image of the subject, already read;
            used for ``image > 0`` and to check the mask's shape. Read from
            ``subject.image_path`` when needed and not given.
        log: callable taking one message string.

    Returns:
        bool (x, y, z) mask on the subject's own grid.

    Raises:
        DataError: if a file cannot be read, or the mask's grid differs from
            the image's: its shape, or its affine by more than
            ``GRID_TOLERANCE_MM`` (message names the mask path and the difference).
    """
    if subject.mask_path is None:
        if image is None:
            image, _, _ = load_volume(subject.image_path, log=log)
        return np.asarray(image) > 0
    mask, mask_affine, _ = load_volume(subject.mask_path, log=log)
    if image is not None and tuple(mask.shape) != tuple(np.shape(image)[:3]):
        raise DataError(f"{subject.mask_path}: mask shape {shape_str(mask.shape)} differs from "
                        f"the image's {shape_str(np.shape(image)[:3])}")
    problem = grid_problem(mask_affine, image_affine(subject.image_path))
    if problem:
        raise DataError(f"{subject.mask_path}: the mask is not on the image's grid ({problem}); "
                        f"resample it onto {subject.image_path}, or remove it to use image > 0")
    return mask > 0


#: Largest difference (mm) between a mask's and its image's affine entries taken as the same grid.
GRID_TOLERANCE_MM = 1e-3


def image_affine(path):
    """The voxel-to-world affine of a NIfTI file, from its header alone.

    Raises:
        DataError: the header cannot be read.
    """
    import nibabel as nib

    try:
        return np.asarray(nib.load(path).affine, dtype=np.float64)
    except Exception as err:  # nibabel raises many kinds for a bad header
        failure = _read_failure(path, "header", err)
        if failure is None:
            raise
        raise failure from err


def grid_problem(mask_affine, affine, tolerance=GRID_TOLERANCE_MM):
    """What differs between a mask's grid and its image's (None when they match).

    Args:
        mask_affine, affine: 4x4 voxel-to-world affines (mm).
        tolerance: largest difference of any entry, in mm.

    Returns:
        str naming the largest difference, or None.
    """
    diff = np.abs(np.asarray(mask_affine, np.float64) - np.asarray(affine, np.float64))
    if diff.max() <= tolerance:
        return None
    shift = np.asarray(mask_affine)[:3, 3] - np.asarray(affine)[:3, 3]
    return (f"affines differ by up to {diff.max():.4g} mm, origin shifted by "
            f"({', '.join(f'{v:.4g}' for v in shift)}) mm; tolerance {tolerance:g} mm")
