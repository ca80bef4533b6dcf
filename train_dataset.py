"""NIfTI data pipeline: subjects, canonical volumes, patches, degradation, tf.data.

The geometry and intensity rules are those of the original research code
(``SPEC.md`` section 1); the places where the port deliberately differs
(sorted subjects and a deterministic split, a 3-D-only blur, one degradation
for training and evaluation, the mask cropped like the image, the source
affine kept) are ``SPEC.md`` section 6, rows 1, 2, 4, 5, 7 and 12.

Layout conventions: a volume is ``(x, y, z)`` in voxel-index order of its file;
patches and batches are channels-last ``(b, x, y, z, 1)``. ``hr`` is a
high-resolution patch, ``lr`` its degraded version, ``sr`` a network output.

Three input layouts are read (:func:`detect_layout`): the original ADNI
layout or a flat folder of NIfTI files, a BIDS dataset, and a CSV file list;
each has its own small reader, and all share one header check and one report.

Bad data never crashes a run: :func:`find_subjects` checks every subject from
its header and reports the bad ones in one summary, and :func:`make_train_dataset`
reports and skips a subject whose own file turns out bad when read (e.g. a
truncated ``.nii.gz``) without stopping the epoch. Everything that is not a
problem of one subject's file (out of memory, a data folder that disappeared,
a disk error) stops the epoch instead of silently emptying it. Failures the
user must fix (a missing or empty data folder, a bad file) are
:class:`DataError`; wrong arguments are :class:`ValueError`.
"""

import csv
import dataclasses
import errno
import fnmatch
import math
import os
import re

import numpy as np
import tensorflow as tf

import utils

IMAGE_NAME = "T1_brain_extractedBrainExtractionBrain.nii.gz"
MASK_NAME = "T1_brain_extractedBrainExtractionMask.nii.gz"
VOLUME_SHAPE = (224, 224, 152)
PATCH_SHAPE = (128, 128, 92)
MARGIN = 16
# How stitch_patches merges overlapping patches: the original's crop, or MONAI's Gaussian weights.
BLEND_MODES = ("crop", "gaussian")

# scipy.ndimage.gaussian_filter's default: the kernel reaches 4 sigma.
_TRUNCATE = 4.0
_NIFTI_SUFFIXES = (".nii.gz", ".nii")

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
    reading it. Also what :func:`unwrap_pipeline_error` returns when the
    original exception of a failed ``tf.data`` pipeline is unknown.
    """


def max_voxels_for(volume_shape=VOLUME_SHAPE):
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
    volume_shape = _check_shape("volume_shape", volume_shape)
    return MAX_VOXELS_FACTOR * max(math.prod(volume_shape), math.prod(VOLUME_SHAPE))


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
    return (f"header claims {n} voxels ({_shape_str(spatial)}), more than the limit {int(max_voxels)} "
            f"({MAX_VOXELS_FACTOR}x the canonical volume, at least {MAX_VOXELS_FACTOR}x "
            f"{_shape_str(VOLUME_SHAPE)}); the header is probably corrupt")


# --------------------------------------------------------------------------- #
# Subjects: three input layouts, one header check, one report
# --------------------------------------------------------------------------- #

LAYOUTS = ("folders", "bids", "csv")
BIDS_T1W_PATTERN = "sub-<label>/[ses-<label>/]anat/*_T1w.nii[.gz]"
BIDS_MASK_PATTERN = "*_desc-brain_mask.nii[.gz]"
CSV_COLUMNS = ("image", "mask", "subject", "split")
SPLITS = ("train", "test")
# Entities that say which grid a derivative lives on: a mask fits an image only
# when they agree (both absent counts as agreeing).
_BIDS_GRID_ENTITIES = ("space", "res", "den")
_BIDS_ENTITY = re.compile(r"([A-Za-z0-9]+)-([A-Za-z0-9]+)")


@dataclasses.dataclass(frozen=True)
class Subject:
    """One subject (for BIDS: one subject-session) of a dataset.

    Attributes:
        name: the subject ID, unique in its dataset and used in output file
            names: the subject's folder name, or for a flat folder its file
            name without ``.nii``/``.nii.gz``; for BIDS ``"sub-X_ses-Y"`` (or
            ``"sub-X"`` without sessions); for a CSV list its ``subject`` cell,
            by default the image file name without ``.nii``/``.nii.gz``.
        image_path: path of its T1 image.
        mask_path: path of its brain mask, or None when it has none (its mask
            is then ``image > 0``).
        split: ``"train"`` or ``"test"`` when the dataset fixes it (a CSV list
            with a ``split`` column), else None (:func:`split_subjects` decides).
        entities: for BIDS, the image file's entities as ordered ``(key, value)``
            pairs, e.g. ``(("sub", "ADNI002S0295"), ("ses", "M00"))``, plus
            ``("acq", ...)``, ``("desc", ...)``... when its name has them; empty
            for the other layouts.
    """

    name: str
    image_path: str
    mask_path: "str | None" = None
    split: "str | None" = None
    entities: tuple = ()


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """One entry a layout reader found, before the shared header check.

    ``problem`` is set when the reader already knows the entry is unusable;
    ``where`` names the entry when its path alone does not (a CSV row).
    """

    name: str
    image_path: str
    mask_path: "str | None" = None
    problem: "str | None" = None
    where: "str | None" = None
    split: "str | None" = None
    entities: tuple = ()


@dataclasses.dataclass
class _Listing:
    """What a layout reader returns: its candidates and the words to report them with."""

    description: str  # first log line: "data: <description> <path> (...)"
    unit: str  # "subject" or "subject-session"
    expected: str  # what a usable entry looks like, for the "no usable subject" error
    mask_source: str  # "N of M subject(s) have no <mask_source>; their mask is image > 0"
    candidates: list
    notes: list = dataclasses.field(default_factory=list)


def _strip_nifti_suffix(filename):
    """Returns ``filename`` without ``.nii.gz``/``.nii``, or None when it has neither."""
    for suffix in _NIFTI_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return None


def _plural(n, word):
    """Returns ``"1 subject"`` / ``"3 subjects"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _listdir(path):
    """Returns the sorted non-hidden entries of a folder ([] when it is not one)."""
    if not os.path.isdir(path):
        return []
    return sorted(e for e in os.listdir(path) if not e.startswith("."))


def _shape_str(shape):
    """Returns a shape as ``"224x224x152"``."""
    return "x".join(str(int(s)) for s in shape)


def _raw_voxel_sizes(path, header_class):
    """Returns the (3,) voxel sizes (pixdim[1:4]) exactly as stored in the file."""
    # nib.load quietly turns zero voxel sizes into 1 and negative ones into
    # their absolute value; the check must see what the file says.
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as fh:
        raw = header_class.from_fileobj(fh, check=False)
    return tuple(float(z) for z in raw["pixdim"][1:4])


def _header_problem(path, min_shape=None, max_voxels=None):
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
                f"{_shape_str(shape)}"), None
    spatial = shape[:3]
    if min(spatial) <= 0:
        return f"empty volume, shape {_shape_str(spatial)}", None
    problem = _dtype_problem(dtype)
    if problem is not None:
        return problem, spatial
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        return f"voxel sizes must be positive, got {zooms}", None
    if min_shape is not None and any(s < m for s, m in zip(spatial, min_shape)):
        return (f"volume {_shape_str(spatial)} is smaller than the minimum "
                f"{_shape_str(min_shape)}"), spatial
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


def detect_layout(data_path, image_name=IMAGE_NAME):
    """Says which input layout ``data_path`` is.

    Args:
        data_path: the ``-data_path`` given.
        image_name: the image file name of the ADNI layout; a folder whose
            ``sub-*`` folders hold it directly is that layout, not BIDS.

    Returns:
        ``"csv"`` for a ``.csv`` (or tab-separated ``.tsv``) file list;
        ``"bids"`` for a folder with ``dataset_description.json`` or a
        ``sub-*`` folder; ``"folders"`` otherwise (subject folders and/or
        NIfTI files, the original layout).

    Raises:
        DataError: if ``data_path`` does not exist, or is a file that is not a
            ``.csv``/``.tsv`` list.
    """
    data_path = os.fspath(data_path)
    if not os.path.exists(data_path):
        raise DataError(f"data path {data_path!r} does not exist; expected a folder (one sub-folder "
                        f"per subject, NIfTI files, or a BIDS dataset) or a .csv file list")
    if not os.path.isdir(data_path):
        if data_path.lower().endswith((".csv", ".tsv")):
            return "csv"
        raise DataError(f"data path {data_path!r} is a file, not a folder (or a .csv file list); "
                        f"expected a folder with one sub-folder per subject holding {image_name!r}, "
                        f"a BIDS dataset, or a .csv list with an image column")
    if os.path.isfile(os.path.join(data_path, "dataset_description.json")):
        return "bids"
    subs = [e for e in _listdir(data_path) if e.startswith("sub-") and os.path.isdir(os.path.join(data_path, e))]
    # ADNI-layout subjects that happen to be called sub-* keep today's behaviour.
    if subs and not any(os.path.isfile(os.path.join(data_path, s, image_name)) for s in subs):
        return "bids"
    return "folders"


def _folder_candidates(data_path, image_name, mask_name):
    """Reads the original layouts: one folder per subject and/or NIfTI files in the root.

    Other files (the ADNI clinical CSV, stray files) and hidden entries are
    ignored; a folder without ``image_name`` is a bad subject.
    """
    candidates, folders, files = [], 0, 0
    for entry in _listdir(data_path):
        full = os.path.join(data_path, entry)
        if os.path.isdir(full):
            folders += 1
            image_path = os.path.join(full, image_name)
            mask_path = os.path.join(full, mask_name)
            if not os.path.isfile(image_path):
                candidates.append(_Candidate(entry, full, problem=f"no image {image_name!r} in this folder"))
                continue
            candidates.append(_Candidate(entry, image_path, mask_path if os.path.isfile(mask_path) else None))
        elif os.path.isfile(full):
            name = _strip_nifti_suffix(entry)
            if name:
                files += 1
                candidates.append(_Candidate(name, full))
    if folders and files:
        description = "ADNI layout (one folder per subject) with NIfTI files beside"
    elif files:
        description = "folder of NIfTI files (one subject per file)"
    else:
        description = "ADNI layout (one folder per subject)"
    return _Listing(description=description, unit="subject",
                    expected=f"sub-folders holding {image_name!r} or .nii/.nii.gz files",
                    mask_source=repr(mask_name), candidates=candidates)


def parse_bids_filter(text):
    """Parses ``-bids_filter``: key-value BIDS entities separated by commas.

    Args:
        text: e.g. ``"desc-brain,acq-mprage"``; None or ``""`` for no filter.

    Returns:
        tuple of ``(key, value)`` string pairs in the order given; a T1w file
        is kept when its name carries every one of them.

    Raises:
        ValueError: naming the token that is not ``key-value`` (letters and
            digits on both sides of one ``-``), or a key given twice.
    """
    if text is None:
        return ()
    if not isinstance(text, str):
        raise ValueError(f"-bids_filter {text!r} must be a string such as 'desc-brain,acq-mprage'")
    if not text.strip():
        return ()
    pairs = []
    for token in text.split(","):
        token = token.strip()
        match = _BIDS_ENTITY.fullmatch(token)
        if match is None:
            raise ValueError(f"-bids_filter {text!r}: {token!r} is not a BIDS entity key-value such as "
                             f"'desc-brain' or 'acq-mprage' (entities are separated by commas)")
        key, value = match.groups()
        if key in dict(pairs):
            raise ValueError(f"-bids_filter {text!r}: entity {key!r} is given twice")
        pairs.append((key, value))
    return tuple(pairs)


def _bids_entities(filename):
    """Returns (entities, suffix) of a BIDS file name: ordered ``(key, value)`` pairs and e.g. ``"T1w"``.

    Parts of the name that are not ``key-value`` are left out.
    """
    stem = _strip_nifti_suffix(filename) or filename
    parts = stem.split("_")
    entities = tuple(m.groups() for m in map(_BIDS_ENTITY.fullmatch, parts[:-1]) if m is not None)
    return entities, parts[-1]


def _bids_filter_hint(files):
    """Returns a ``-bids_filter`` value that would pick one of ``files`` (empty when none would)."""
    names = [_bids_entities(f)[0] for f in files]
    shared = set.intersection(*(set(n) for n in names))
    for entities in names:
        own = [f"{k}-{v}" for k, v in entities if (k, v) not in shared]
        if own:
            return ",".join(own)
    return ""


def _bids_convention_mask(anat, entities):
    """Finds the image's ``*_desc-brain_mask`` in its anat folder (BIDS derivatives convention).

    A mask fits when its entities (``desc`` aside) are all the image's and it
    is on the same grid (same ``space``/``res``/``den``); the most specific
    fitting mask wins.

    Returns:
        (mask_path or None, problem or None): a problem when two masks fit equally well.
    """
    image = {k: v for k, v in entities if k != "desc"}
    fitting = []
    for f in _listdir(anat):
        if not f.endswith(("_desc-brain_mask.nii.gz", "_desc-brain_mask.nii")):
            continue
        mask = {k: v for k, v in _bids_entities(f)[0] if k != "desc"}
        if any(image.get(k) != v for k, v in mask.items()):
            continue
        if any(image.get(k) != mask.get(k) for k in _BIDS_GRID_ENTITIES):
            continue
        fitting.append((len(mask), f))
    if not fitting:
        return None, None
    best = max(n for n, _ in fitting)
    winners = [f for n, f in fitting if n == best]
    if len(winners) > 1:
        return None, (f"{len(winners)} brain masks fit equally well ({', '.join(winners)}); "
                      f"name one with -mask_name")
    return os.path.join(anat, winners[0]), None


def _bids_pattern_mask(anat, image_file, pattern, subject, session):
    """Finds the mask matching the user's ``-mask_name`` glob in the anat folder.

    Returns:
        (mask_path or None, problem or None): a problem when several files match.
    """
    pattern = pattern.format(subject=subject, session=session or "")
    matches = [f for f in _listdir(anat) if f != image_file and fnmatch.fnmatchcase(f, pattern)]
    if len(matches) > 1:
        return None, (f"{len(matches)} files match -mask_name {pattern!r} ({', '.join(matches)}); "
                      f"make the pattern narrower (it may use {{subject}} and {{session}})")
    return (os.path.join(anat, matches[0]) if matches else None), None


def _bids_candidates(data_path, mask_name, bids_filter):
    """Reads a BIDS dataset: one candidate per subject-session holding a T1w image.

    Only ``sub-*`` folders are scanned (``derivatives/``, ``sourcedata/``,
    ``code/`` are not). A subject with ``ses-*`` folders gives one candidate
    per session, one without gives one. ``bids_filter`` (parsed pairs) keeps
    the T1w files whose names carry all its entities; exactly one must remain.
    The mask is the BIDS derivatives ``*_desc-brain_mask`` beside the image
    when ``mask_name`` is None or the ADNI default, else the file of the anat
    folder matching the glob ``mask_name`` (``{subject}``/``{session}`` are
    replaced by the labels).
    """
    convention = mask_name is None or mask_name == MASK_NAME
    if not convention:
        try:
            mask_name.format(subject="", session="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"-mask_name {mask_name!r}: a BIDS mask pattern may use {{subject}} and "
                             f"{{session}} only ({type(e).__name__}: {e})") from None
    filter_text = ",".join(f"{k}-{v}" for k, v in bids_filter)
    candidates, without_t1w = [], []
    for sub in _listdir(data_path):
        sub_dir = os.path.join(data_path, sub)
        if not sub.startswith("sub-") or not os.path.isdir(sub_dir):
            continue
        sessions = [s for s in _listdir(sub_dir) if s.startswith("ses-") and os.path.isdir(os.path.join(sub_dir, s))]
        for ses in sessions or [None]:
            name = sub if ses is None else f"{sub}_{ses}"
            anat = os.path.join(sub_dir, "anat") if ses is None else os.path.join(sub_dir, ses, "anat")
            t1w = [f for f in _listdir(anat) if f.endswith(("_T1w.nii.gz", "_T1w.nii"))
                   and os.path.isfile(os.path.join(anat, f))]
            if not t1w:
                without_t1w.append(name)
                continue
            chosen = [f for f in t1w if set(bids_filter) <= set(_bids_entities(f)[0])]
            if not chosen:
                candidates.append(_Candidate(name, anat, problem=(
                    f"none of its T1w files ({', '.join(t1w)}) has the entities of -bids_filter {filter_text}")))
                continue
            if len(chosen) > 1:
                hint = _bids_filter_hint(chosen)
                candidates.append(_Candidate(name, anat, problem=(
                    f"{len(chosen)} T1w files ({', '.join(chosen)}); choose one with -bids_filter"
                    + (f" (e.g. -bids_filter {','.join(filter(None, [filter_text, hint]))})" if hint else ""))))
                continue
            image_path = os.path.join(anat, chosen[0])
            file_entities = _bids_entities(chosen[0])[0]
            labels = dict(file_entities)
            expected = {"sub": sub[4:], "ses": None if ses is None else ses[4:]}
            wrong = [f"{k}-{labels[k]}" for k in ("sub", "ses") if k in labels and labels[k] != expected[k]]
            if wrong:
                candidates.append(_Candidate(name, image_path, problem=(
                    f"its name's entities ({', '.join(wrong)}) do not match its folder {name}")))
                continue
            # sub and ses from the folders, first (BIDS order), whether or not the name repeats them.
            entities = tuple((k, v) for k, v in expected.items() if v is not None) + tuple(
                (k, v) for k, v in file_entities if k not in expected)
            if convention:
                mask_path, problem = _bids_convention_mask(anat, entities)
            else:
                mask_path, problem = _bids_pattern_mask(anat, chosen[0], mask_name, expected["sub"], expected["ses"])
            candidates.append(_Candidate(name, image_path, mask_path, problem=problem, entities=entities))
    if not candidates:
        raise DataError(f"BIDS dataset {data_path!r} has no T1w image: looked for {BIDS_T1W_PATTERN} "
                        f"in its sub-* folders ({_plural(len(without_t1w), 'subject-session')} found "
                        f"without one)")
    notes = []
    if without_t1w:
        shown = ", ".join(without_t1w[:5]) + (", ..." if len(without_t1w) > 5 else "")
        notes.append(f"note: {_plural(len(without_t1w), 'subject-session')} without an anat/*_T1w "
                     f"image left out: {shown}")
    return _Listing(description="BIDS dataset", unit="subject-session",
                    expected=(f"{BIDS_T1W_PATTERN}" + (f" with entities {filter_text}" if filter_text else "")),
                    mask_source=BIDS_MASK_PATTERN if convention else f"file matching {mask_name!r}",
                    candidates=candidates, notes=notes)


def _csv_candidates(csv_path):
    """Reads a CSV (``.tsv``: tab-separated) file list, one candidate per row.

    Columns (header names case-insensitive, others ignored): ``image``
    (required), ``mask``, ``subject``, ``split``. Paths are relative to the
    list's folder. Rows that name missing files, an empty image or split cell,
    a split other than train/test, or a subject ID another row has, are bad
    entries named by their row (the header is row 1).

    Raises:
        DataError: if the file cannot be read or has no ``image`` column.
    """
    delimiter = "\t" if csv_path.lower().endswith(".tsv") else ","
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read the file list ({type(e).__name__}: {e})") from e
    columns_text = "columns image (required), mask, subject, split"
    if not rows:
        raise DataError(f"{csv_path}: the file list is empty; expected a header row with {columns_text}")
    header = [h.strip().lower() for h in rows[0][1]]
    if "image" not in header:
        raise DataError(f"{csv_path}: no 'image' column in the header row {rows[0][1]}; expected "
                        f"{columns_text}")
    for column in CSV_COLUMNS:
        if header.count(column) > 1:
            raise DataError(f"{csv_path}: the header row has {header.count(column)} {column!r} columns")
    index = {c: header.index(c) for c in CSV_COLUMNS if c in header}
    base = os.path.dirname(csv_path)

    entries = []  # (row number, candidate)
    for line, row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue

        def cell(column, row=row):
            i = index.get(column)
            return row[i].strip() if i is not None and i < len(row) else ""

        where = f"{csv_path} row {line}"
        image, mask, name, split = cell("image"), cell("mask"), cell("subject"), cell("split").lower()
        image_path = os.path.normpath(os.path.join(base, os.path.expanduser(image))) if image else ""
        mask_path = os.path.normpath(os.path.join(base, os.path.expanduser(mask))) if mask else None
        if not name and image:
            base_name = os.path.basename(image_path)
            name = _strip_nifti_suffix(base_name) or base_name
        problem = None
        if not image:
            problem = "empty image cell"
        elif not os.path.isfile(image_path):
            problem = f"image {image!r} not found (no file {image_path})"
        elif mask_path is not None and not os.path.isfile(mask_path):
            problem = f"mask {mask!r} not found (no file {mask_path})"
        elif "/" in name or os.sep in name or name in (".", ".."):
            problem = f"subject {name!r} cannot be used in file names (no '/' allowed)"
        elif "split" in index and split not in SPLITS:
            problem = ("empty split cell (with a split column every row needs train or test)" if not split
                       else f"split {cell('split')!r} must be train or test")
        entries.append((line, _Candidate(name, image_path, mask_path, problem=problem, where=where,
                                         split=split if "split" in index else None)))

    # Duplicate IDs: no row of them is used, every one is named.
    rows_of = {}
    for line, c in entries:
        if c.problem is None:
            rows_of.setdefault(c.name, []).append(line)
    candidates = []
    for line, c in entries:
        others = [str(n) for n in rows_of.get(c.name, []) if n != line]
        if c.problem is None and others:
            c = dataclasses.replace(c, problem=(
                f"subject {c.name!r} is also row {', '.join(others)}'s; subject IDs must be unique "
                f"(give a subject column)"))
        candidates.append(c)
    notes = []
    if "split" in index:
        notes.append(f"note: train/test split from the split column of {csv_path} (-train_fraction not used)")
    return _Listing(description="CSV file list", unit="subject",
                    expected="rows naming existing NIfTI files in an image column",
                    mask_source="mask in the list", candidates=candidates, notes=notes)


def find_subjects(data_path, image_name=IMAGE_NAME, mask_name=MASK_NAME, min_shape=None, log=print,
                  bids_filter=None, max_voxels=None):
    """Lists the usable subjects of a dataset, checking each from its header.

    The layout is detected by :func:`detect_layout`:

    - ``"folders"`` (the original): one folder per subject holding
      ``image_name`` and optionally ``mask_name`` (the ADNI layout), and/or
      ``.nii``/``.nii.gz`` files directly in the root, one subject per file
      (without a mask). Other files and hidden entries are ignored; a subject
      folder without ``image_name`` is a bad subject.
    - ``"bids"``: one subject per ``sub-X[/ses-Y]/anat/*_T1w.nii[.gz]``, named
      ``sub-X_ses-Y``; ``bids_filter`` picks among several T1w files; the mask
      is the ``*_desc-brain_mask.nii[.gz]`` beside the image (BIDS derivatives
      convention) unless ``mask_name`` is not the ADNI default, when it is the
      anat file matching that glob (``{subject}``/``{session}`` replaced by
      the labels). ``image_name`` is not used.
    - ``"csv"``: one subject per row of a ``.csv``/``.tsv`` list with columns
      ``image`` and optionally ``mask``, ``subject``, ``split`` (paths relative
      to the list). ``image_name`` and ``mask_name`` are not used.

    Every candidate then gets the same checks, from its header only (cheap
    even for hundreds of subjects): readable, 3-D or 4-D with a single volume,
    non-empty, positive voxel sizes, optionally at least ``min_shape``; an
    existing mask must be readable and have the image's shape. The log gets,
    in order: one line naming the layout and the counts, the notes of the
    layout reader, one summary of the bad entries (left out), and one line
    counting the subjects without a mask.

    Args:
        data_path: the dataset folder, or a ``.csv``/``.tsv`` file list.
        image_name: file name of the image inside a subject folder.
        mask_name: file name of the brain mask inside a subject folder; for
            BIDS a glob pattern (the default means the BIDS convention).
        min_shape: optional (3,) ints; a subject whose raw (x, y, z) shape is
            smaller on any axis is reported as bad.
        log: callable taking one message string.
        bids_filter: optional ``-bids_filter`` string, e.g. ``"desc-brain"``
            (see :func:`parse_bids_filter`); BIDS only.
        max_voxels: optional int passed to the header check.

    Returns:
        (subjects, problems): the usable :class:`Subject` list sorted by name,
        and one ``"<path or list row>: <reason>"`` string per bad entry.

    Raises:
        DataError: if ``data_path`` does not exist or is a non-list file, a
            BIDS dataset has no T1w image, a CSV list has no ``image`` column,
            ``bids_filter`` is given for a non-BIDS layout, or no usable
            subject remains (the message lists the problems found).
        ValueError: for a malformed ``bids_filter``, ``mask_name`` pattern or
            ``min_shape``.
    """
    data_path = os.fspath(data_path)
    layout = detect_layout(data_path, image_name)
    entities_filter = parse_bids_filter(bids_filter)
    if min_shape is not None:
        min_shape = tuple(int(m) for m in min_shape)
        if len(min_shape) != 3:
            raise ValueError(f"min_shape {min_shape} must have 3 entries")
    if entities_filter and layout != "bids":
        raise DataError(f"-bids_filter {bids_filter!r} applies to BIDS datasets, but {data_path!r} "
                        f"is not one (no dataset_description.json or sub-* folder)")

    if layout == "bids":
        listing = _bids_candidates(data_path, mask_name, entities_filter)
    elif layout == "csv":
        listing = _csv_candidates(data_path)
    else:
        listing = _folder_candidates(data_path, image_name, mask_name)
    if layout != "folders":
        ignored = [f"-image_name {image_name!r}"] if image_name != IMAGE_NAME else []
        if layout == "csv" and mask_name not in (None, MASK_NAME):
            ignored.append(f"-mask_name {mask_name!r}")
        if ignored:
            listing.notes.append(f"note: {' and '.join(ignored)} not used for a {listing.description}")

    subjects, problems, seen = [], [], set()
    for c in listing.candidates:
        problem, where = c.problem, c.where or c.image_path
        if problem is None and c.name in seen:
            problem = f"subject name {c.name!r} is used twice (a folder and a file?)"
        if problem is None:
            problem, shape = _header_problem(c.image_path, min_shape, max_voxels)
            if problem is not None and c.where:
                problem = f"{c.image_path}: {problem}"
            if problem is None and c.mask_path is not None:
                mask_problem, mask_shape = _header_problem(c.mask_path)
                if mask_problem is not None:
                    problem = f"mask: {mask_problem}"
                elif mask_shape != shape:
                    problem = (f"mask shape {_shape_str(mask_shape)} differs from the image's "
                               f"{_shape_str(shape)}")
                if problem is not None:
                    where = f"{c.where}: {c.mask_path}" if c.where else c.mask_path
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        seen.add(c.name)
        subjects.append(Subject(c.name, c.image_path, c.mask_path, split=c.split, entities=c.entities))
    subjects.sort(key=lambda s: s.name)

    with_mask = sum(s.mask_path is not None for s in subjects)
    log(f"data: {listing.description} {data_path} ({_plural(len(subjects), listing.unit)}, "
        f"{with_mask} with a brain mask)")
    for note in listing.notes:
        log(note)
    if problems:
        log(f"Skipping {len(problems)} bad subject(s) of {len(listing.candidates)} in {data_path}:\n  "
            + "\n  ".join(problems))
    if subjects and with_mask < len(subjects):
        log(f"{len(subjects) - with_mask} of {len(subjects)} subject(s) have no {listing.mask_source}; "
            f"their mask is image > 0")
    if not subjects:
        details = ("; problems: " + "; ".join(problems)) if problems else ""
        raise DataError(f"no usable subject in {data_path!r}: expected {listing.expected}{details}")
    return subjects, problems


def split_subjects(subjects, train_fraction=0.8):
    """Train/test split: the subjects' own ``split`` when they carry one, else deterministic by name.

    When every subject has a ``split`` (a CSV list with a split column), the
    train list is those marked ``"train"`` and the test list those marked
    ``"test"``, each in name order; ``train_fraction`` is then not used (but
    still validated).

    Otherwise the subjects are sorted by name and the rounding rule is
    ``n_train = floor(train_fraction * n + 0.5)`` (round half up), then, when
    ``n >= 2`` and ``train_fraction < 1``, clamped to ``[1, n - 1]`` so that
    neither list is empty. With one subject, it trains and the test list is
    empty. 589 subjects at 0.8 give 471 / 118.

    Args:
        subjects: sequence of :class:`Subject`.
        train_fraction: float in (0, 1].

    Returns:
        (train, test): two lists of :class:`Subject`, each in name order.

    Raises:
        ValueError: if ``train_fraction`` is not in (0, 1], some subjects carry
            a split and others not, or a split is neither train nor test.
    """
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float, np.floating, np.integer)) \
            or not 0 < float(train_fraction) <= 1:
        raise ValueError(f"train_fraction {train_fraction!r} must be a number in (0, 1]")
    ordered = sorted(subjects, key=lambda s: s.name)
    given = [s for s in ordered if s.split is not None]
    if given:
        if len(given) != len(ordered):
            missing = [s.name for s in ordered if s.split is None]
            raise ValueError(f"{len(given)} subject(s) carry a train/test split and {len(missing)} do not "
                             f"(e.g. {missing[0]!r}); give every subject a split or none")
        bad = [s for s in given if s.split not in SPLITS]
        if bad:
            raise ValueError(f"subject {bad[0].name!r} has split {bad[0].split!r}; expected one of {SPLITS}")
        return [s for s in ordered if s.split == "train"], [s for s in ordered if s.split == "test"]
    n = len(ordered)
    n_train = int(math.floor(float(train_fraction) * n + 0.5))
    if n >= 2 and train_fraction < 1:
        n_train = min(max(n_train, 1), n - 1)
    n_train = min(max(n_train, 1 if n else 0), n)
    return ordered[:n_train], ordered[n_train:]


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
                        f"got shape {_shape_str(shape)}")
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
        raise DataError(f"{path}: empty volume, shape {_shape_str(data.shape)}")
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
        subject: a :class:`Subject`.
        image: optional float (x, y, z) image of the subject, already read;
            used for ``image > 0`` and to check the mask's shape. Read from
            ``subject.image_path`` when needed and not given.
        log: callable taking one message string.

    Returns:
        bool (x, y, z) mask on the subject's own grid.

    Raises:
        DataError: if a file cannot be read, or the mask's shape differs from
            the image's (message names the mask path and both shapes).
    """
    if subject.mask_path is None:
        if image is None:
            image, _, _ = load_volume(subject.image_path, log=log)
        return np.asarray(image) > 0
    mask, _, _ = load_volume(subject.mask_path, log=log)
    if image is not None and tuple(mask.shape) != tuple(np.shape(image)[:3]):
        raise DataError(f"{subject.mask_path}: mask shape {_shape_str(mask.shape)} differs from "
                        f"the image's {_shape_str(np.shape(image)[:3])}")
    return mask > 0


# --------------------------------------------------------------------------- #
# Canonical volume (SPEC section 1: pad to 256x256x184, crop [16:240, 16:240, 16:168])
# --------------------------------------------------------------------------- #


def _check_shape(name, shape, minimum=1):
    """Returns ``shape`` as a tuple of 3 ints >= ``minimum``; ValueError naming ``name`` otherwise."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"{name} {shape!r} must be 3 integers") from None
    if len(shape) != 3 or min(shape) < minimum:
        raise ValueError(f"{name} {shape} must be 3 integers >= {minimum}")
    return shape


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
    source_shape = _check_shape("source_shape", source_shape)
    volume_shape = _check_shape("volume_shape", volume_shape)
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
        margin: int >= 0, voxels dropped at inner patch borders when stitching.

    Returns:
        list of (x, y, z) int tuples, x outermost, z innermost.

    Raises:
        ValueError: if the volume is smaller than a patch, or the margin leaves
            no step (``patch - 2 * margin < 1``) on some axis; the message has
            the numbers.
    """
    volume_shape = _check_shape("volume_shape", volume_shape)
    patch_shape = _check_shape("patch_shape", patch_shape)
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"margin {margin!r} must be an integer >= 0")
    margin = int(margin)
    if any(v < p for v, p in zip(volume_shape, patch_shape)):
        raise ValueError(f"volume_shape {volume_shape} is smaller than patch_shape {patch_shape} "
                         f"on some axis; every axis must hold one patch")
    if any(p - 2 * margin < 1 for p in patch_shape):
        raise ValueError(f"margin {margin} leaves no step for patch_shape {patch_shape}: "
                         f"patch - 2 * margin must be >= 1 on every axis")
    xs, ys, zs = (_axis_starts(v, p, margin) for v, p in zip(volume_shape, patch_shape))
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
        margin: int >= 0.

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
    patch_shape = _check_shape("patch_shape", patch_shape)
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
        margin: int >= 0, as used to cut them.
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
    if blend == "gaussian" and (isinstance(sigma_scale, bool) or not isinstance(sigma_scale, (int, float, np.number))
                                or not np.isfinite(sigma_scale) or sigma_scale <= 0):
        raise ValueError(f"sigma_scale {sigma_scale!r} must be a finite number > 0")
    patches = np.asarray(patches)
    if patches.ndim == 5 and patches.shape[4] == 1:
        patches = patches[..., 0]
    if patches.ndim != 4:
        raise ValueError(f"stitch_patches expects (n, px, py, pz, 1) patches, got shape {patches.shape}")
    volume_shape = _check_shape("volume_shape", volume_shape)
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
# Degradation (SPEC section 6, rows 4 and 5)
# --------------------------------------------------------------------------- #


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
    # factor: blur and x[::f] in one op, computing only the kept voxels.
    n = tf.shape(x)[axis]
    x = tf.gather(x, _reflect(tf.range(-radius, n + radius), n), axis=axis)
    kernel_shape = [1, 1, 1, 1, 1]
    kernel_shape[axis - 1] = len(weights)
    strides = [1, 1, 1, 1, 1]
    strides[axis] = factor
    return tf.nn.conv3d(x, tf.constant(weights.reshape(kernel_shape)), strides, "VALID")


def degrade(x, upsampling_factor, sigma=1.0):
    """The one degradation of training and evaluation: 3-D Gaussian blur, then ``x[::f]``.

    Each volume or patch is blurred on its own, in 3-D only (never across the
    batch or channel axes), with a separable Gaussian of ``sigma`` voxels
    truncated at 4 sigma and reflected borders, i.e.
    ``scipy.ndimage.gaussian_filter(x, sigma)[::f, ::f, ::f]``. Away from the
    borders, degrading a patch whose start is a multiple of ``f`` equals
    cutting the degraded volume. Pure TensorFlow: runs in ``tf.data`` and on a GPU.

    Args:
        x: array or tensor, (x, y, z) or channels-last (b, x, y, z, c), real values.
        upsampling_factor: int >= 1, the decimation step f.
        sigma: float >= 0, blur in voxels; 0 only decimates.

    Returns:
        float32 tensor (ceil(x/f), ceil(y/f), ceil(z/f)) or
        (b, ceil(x/f), ceil(y/f), ceil(z/f), c).

    Raises:
        ValueError: if ``upsampling_factor`` or ``sigma`` is invalid, or ``x`` is
            neither 3-D nor 5-D.
    """
    f = upsampling_factor
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1:
        raise ValueError(f"upsampling_factor {f!r} must be an integer >= 1")
    f = int(f)
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
    for axis in (1, 2, 3):
        y = _blur_decimate_axis(y, axis, weights, radius, f)
    if channels != 1:
        dyn = tf.shape(y)
        y = tf.reshape(y, tf.stack([tf.shape(x)[0], -1, dyn[1], dyn[2], dyn[3]]))
        y = tf.transpose(y, [0, 2, 3, 4, 1])
    return y[0, ..., 0] if rank == 3 else y


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
        DataError: if the file cannot be read, its header claims more than
            :func:`max_voxels_for` (``volume_shape``) voxels, or its maximum
            intensity is not positive (:func:`check_intensity`).
        PipelineError: if the file's folder has disappeared.
        MemoryError, OSError: failures that are not this file's propagate.
    """
    volume, _, _ = load_volume(path, log=log, max_voxels=max_voxels_for(volume_shape))
    check_intensity(volume, path)
    canonical, _ = to_canonical(volume, volume_shape)
    del volume
    patches = extract_patches(canonical, patch_shape, margin)
    factors = np.zeros(len(patches), np.float32)
    for i in range(len(patches)):
        patches[i], factors[i] = utils.normalize(patches[i])
    return (patches, factors) if with_norm_factor else patches


def make_train_dataset(subjects, upsampling_factor, *, batch_size=2, volume_shape=VOLUME_SHAPE,
                       patch_shape=PATCH_SHAPE, margin=MARGIN, seed=0, epoch=0, sigma=1.0,
                       with_norm_factor=False, log=print, on_skip=None, failures=None, shard=(0, 1)):
    """One epoch of ``(lr, hr)`` training batches, streamed from the NIfTI files.

    Subjects come in the order :func:`epoch_order` draws from ``(seed, epoch)``;
    each gives its patches in x-major order (as the original). NIfTI decoding
    runs in parallel (order kept), the degradation runs in TensorFlow inside
    the pipeline, and batches are prefetched. Only the volumes being decoded
    and the prefetch buffers are in memory, whatever the number of subjects.
    Batches span volumes when ``patches_per_volume`` is not a multiple of
    ``batch_size``; the last partial batch is kept.

    A subject whose own file is bad (a :class:`DataError`: unreadable,
    truncated, wrong shape or type, implausible header, maximum intensity
    <= 0) is reported via ``log`` and ``on_skip`` and contributes no patch;
    the epoch goes on. Any other failure (MemoryError, a disk or network
    error, the data folder disappearing: :class:`PipelineError`) stops the
    epoch: it is appended to ``failures`` and raised inside the pipeline,
    where ``tf.data`` turns it into a ``tf.errors.OpError`` (UnknownError,
    InvalidArgumentError, ResourceExhaustedError, ...) for the consumer;
    :func:`unwrap_pipeline_error` gets the original back.

    Args:
        subjects: sequence of :class:`Subject` (usually the train list).
        upsampling_factor: int >= 1 that divides every entry of ``patch_shape``.
        batch_size: int >= 1 (2: one default volume is 4 batches).
        volume_shape: (3,) ints, the canonical shape.
        patch_shape: (3,) ints, the HR patch shape.
        margin: int >= 0, patch overlap margin.
        seed: int >= 0, the run's seed.
        epoch: int >= 0, the epoch this dataset is for.
        sigma: float >= 0, blur of the degradation in voxels.
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
    volume_shape = _check_shape("volume_shape", volume_shape)
    patch_shape = _check_shape("patch_shape", patch_shape)
    patch_starts(volume_shape, patch_shape, margin)  # validates the geometry early
    f = upsampling_factor
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1:
        raise ValueError(f"upsampling_factor {f!r} must be an integer >= 1")
    f = int(f)
    if any(p % f for p in patch_shape):
        raise ValueError(f"upsampling_factor {f} must divide every entry of patch_shape {patch_shape} "
                         f"so that the network's output matches the HR patch")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r} must be an integer >= 1")
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma {sigma!r} must be a finite number >= 0")

    shard_index, shard_count = (int(n) for n in shard)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard} must be (index, count) with 0 <= index < count")
    subjects = list(subjects)
    order = epoch_order(len(subjects), seed, epoch)
    # Several workers: each reads every shard_count-th subject of the epoch's
    # order (whole subjects, so each worker decodes only its own volumes).
    order = order[shard_index::shard_count]
    paths = [os.fspath(subjects[i].image_path) for i in order]
    empty = (np.zeros((0, *patch_shape, 1), np.float32), np.zeros(0, np.float32))

    def load(path):
        path = path.decode() if isinstance(path, bytes) else str(path)
        try:
            try:
                return load_training_patches(path, volume_shape, patch_shape, margin, log=log,
                                             with_norm_factor=True)
            except PipelineError:
                raise
            except DataError as e:
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

    def load_tf(path):
        patches, factors = tf.numpy_function(load, [path], (tf.float32, tf.float32), stateful=False)
        patches.set_shape((None, *patch_shape, 1))
        factors.set_shape((None,))
        return patches, factors

    def add_lr(hr, nf):
        lr = degrade(hr, f, sigma)
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
        which becomes a :class:`PipelineError` carrying its message.
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
        return PipelineError(f"the training data pipeline failed ({type(error).__name__}): {text}")
    return error


# --------------------------------------------------------------------------- #
# Demo phantoms
# --------------------------------------------------------------------------- #


def _rotation(angles):
    """Returns the float64 (3, 3) rotation by ``angles`` (radians) about x, then y, then z."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _folding(rng, coords, frequencies):
    """Returns a smooth random float32 field on the open grid ``coords``, standard deviation about 1."""
    # Smooth 3-D field with unit standard deviation built from separable
    # sinusoids: cheap (1-D sines, broadcast products), and it makes gyri when
    # it bends an iso-surface.
    x, y, z = coords
    field = 0.0
    for k in frequencies:
        kx, ky, kz = k * rng.uniform(0.7, 1.3, 3)
        px, py, pz = rng.uniform(0, 2 * np.pi, 3)
        field = field + (np.sin(kx * x + px) * np.sin(ky * y + py) * np.sin(kz * z + pz))
    # A product of three unit sines has standard deviation 2**-1.5.
    return field * np.float32(2 ** 1.5 / np.sqrt(len(frequencies)))


def _phantom(shape, rng):
    """Returns (int16 image, uint8 0/1 mask), both (x, y, z) = ``shape``, of one brain-like phantom."""
    # Normalised coordinates in [-1, 1] per axis, broadcastable (open grid).
    coords = [np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
              for i, n in enumerate(shape)]
    x, y, z = coords
    semi = rng.uniform([0.70, 0.78, 0.72], [0.80, 0.88, 0.82]).astype(np.float32)
    centre = rng.uniform(-0.03, 0.03, 3).astype(np.float32)
    # Ellipsoidal radius: 1 on the brain surface.
    r = np.sqrt(((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
                + ((z - centre[2]) / semi[2]) ** 2)
    r = r + np.float32(0.015) * _folding(rng, coords, [2.0, 3.0])  # lumpy head shape
    gyri = _folding(rng, coords, [20.0, 26.0, 32.0])
    width = np.float32(1.5 / min(shape))  # partial-volume transition, about 1 voxel

    def inside(boundary):
        return 0.5 - 0.5 * np.tanh((r - boundary) / width)

    mask = r <= 1.0
    # Sulci (gyri < 0) pull the grey/white boundary in and fill with CSF.
    brain = inside(np.float32(0.95) + np.float32(0.06) * np.minimum(gyri, 0))
    white = inside(np.float32(0.76) + np.float32(0.06) * gyri)
    # Two lateral ventricles: CSF-filled ellipsoids beside the midline.
    ventricles = 0.0
    for side in (-1.0, 1.0):
        v = np.sqrt(((x - side * 0.12) / 0.08) ** 2 + ((y + 0.05) / 0.30) ** 2 + ((z - 0.1) / 0.14) ** 2)
        ventricles = ventricles + (0.5 - 0.5 * np.tanh((v - 1.0) / (3 * width)))
    ventricles = np.minimum(ventricles, 1.0)
    csf, grey, wm = rng.uniform([250, 550, 850], [350, 650, 950]).astype(np.float32)
    image = csf + brain * ((grey - csf) + white * (wm - grey))
    image = image + ventricles * (csf - image)
    image = image * (1 + np.float32(0.02) * _folding(rng, coords, [1.5]))  # bias field
    image = image + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.03 * wm)
    image = np.where(mask, np.clip(image, 1, None), 0)
    return np.rint(image).astype(np.int16), mask.astype(np.uint8)


def make_demo_data(path, subjects=6, shape=(64, 64, 48), seed=0):
    """Writes synthetic brain-like phantoms in the ADNI layout.

    Each subject folder holds a skull-stripped head-shaped T1-like image
    (``IMAGE_NAME``, int16: CSF darkest, then grey, then white matter, smooth
    cortical folding, ventricles, a mild bias field and Gaussian noise; 0
    outside the brain) and its mask (``MASK_NAME``, uint8 0/1). The affine is
    not the identity: voxel sizes (1.0, 1.1, 1.2) mm, a small rotation and an
    offset. Deterministic for a seed; about 0.1 s per 64x64x48 subject.

    Args:
        path: dataset root to create (or add to).
        subjects: int >= 1, number of subjects, named ``demo_000``, ``demo_001``, ...
        shape: (3,) ints >= 8, the (x, y, z) shape of every volume.
        seed: int >= 0.

    Returns:
        list of the subject folders written, sorted.

    Raises:
        ValueError: if ``subjects`` or ``shape`` is invalid.
    """
    if isinstance(subjects, bool) or not isinstance(subjects, (int, np.integer)) or subjects < 1:
        raise ValueError(f"subjects {subjects!r} must be an integer >= 1")
    shape = _check_shape("shape", shape, minimum=8)
    path = os.fspath(path)
    folders = []
    for i in range(int(subjects)):
        rng = np.random.default_rng([int(seed), i])
        image, mask = _phantom(shape, rng)
        affine = np.eye(4)
        affine[:3, :3] = _rotation(rng.uniform(-0.1, 0.1, 3)) @ np.diag([1.0, 1.1, 1.2])
        affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2.0) + rng.uniform(-5, 5, 3)
        folder = os.path.join(path, f"demo_{i:03d}")
        os.makedirs(folder, exist_ok=True)
        utils.save_nifti(os.path.join(folder, IMAGE_NAME), image, affine, dtype=np.int16)
        utils.save_nifti(os.path.join(folder, MASK_NAME), mask, affine, dtype=np.uint8)
        folders.append(folder)
    return folders
