"""Data layouts: the subjects of a dataset (ADNI folders, BIDS, CSV lists).

Three input layouts are read (:func:`detect_layout`): the original ADNI
layout or a flat folder of NIfTI files, a BIDS dataset, and a CSV file list;
each has its own small reader, and all share one header check
(:func:`nifti_io.header_problem`) and one report. Subjects are sorted by name;
``splits.py`` splits them deterministically (``SPEC.md`` section 6, rows 1 and 2).

Bad data never crashes a run: :func:`find_subjects` checks every subject from
its header and reports the bad ones in one summary. Failures the user must fix
(a missing or empty data folder, a bad file) are :class:`nifti_io.DataError`;
wrong arguments are :class:`ValueError`.
"""

import csv
import dataclasses
import fnmatch
import os
import re

import nifti_io

IMAGE_NAME = "T1_brain_extractedBrainExtractionBrain.nii.gz"
MASK_NAME = "T1_brain_extractedBrainExtractionMask.nii.gz"
_NIFTI_SUFFIXES = (".nii.gz", ".nii")

LAYOUTS = ("folders", "bids", "csv")
BIDS_T1W_PATTERN = "sub-<label>/[ses-<label>/]anat/*_T1w.nii[.gz]"
BIDS_MASK_PATTERN = "*_desc-brain_mask.nii[.gz]"
CSV_COLUMNS = ("image", "mask", "subject", "split")
SPLITS = ("train", "validation", "test")
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
        split: ``"train"``, ``"validation"`` or ``"test"`` when the dataset
            fixes it (a CSV list with a ``split`` column), else None
            (``splits.split_subjects`` decides).
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


def strip_nifti_suffix(filename):
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


def is_file_list(path):
    """Whether ``path`` names a file list: it ends in ``.csv`` (or tab-separated ``.tsv``), in any case.

    Args:
        path: str or path-like; the file need not exist.

    Returns:
        bool.
    """
    return os.fspath(path).lower().endswith((".csv", ".tsv"))


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
        nifti_io.DataError: if ``data_path`` does not exist, or is a file that is not a
            ``.csv``/``.tsv`` list.
    """
    data_path = os.fspath(data_path)
    if not os.path.exists(data_path):
        raise nifti_io.DataError(f"data path {data_path!r} does not exist; expected a folder (one sub-folder "
                                 f"per subject, NIfTI files, or a BIDS dataset) or a .csv file list")
    if not os.path.isdir(data_path):
        if is_file_list(data_path):
            return "csv"
        raise nifti_io.DataError(f"data path {data_path!r} is a file, not a folder (or a .csv file list); "
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
            name = strip_nifti_suffix(entry)
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


def bids_entities(filename):
    """Returns (entities, suffix) of a BIDS file name: ordered ``(key, value)`` pairs and e.g. ``"T1w"``.

    Parts of the name that are not ``key-value`` are left out.
    """
    stem = strip_nifti_suffix(filename) or filename
    parts = stem.split("_")
    entities = tuple(m.groups() for m in map(_BIDS_ENTITY.fullmatch, parts[:-1]) if m is not None)
    return entities, parts[-1]


def _bids_filter_hint(files):
    """Returns a ``-bids_filter`` value that would pick one of ``files`` (empty when none would)."""
    names = [bids_entities(f)[0] for f in files]
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
        mask = {k: v for k, v in bids_entities(f)[0] if k != "desc"}
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


def _filter_text(bids_filter):
    """Returns parsed ``-bids_filter`` pairs as the text the user gives, e.g. ``"desc-brain,acq-mprage"``."""
    return ",".join(f"{k}-{v}" for k, v in bids_filter)


def _bids_session(anat, name, sub, ses, bids_filter, mask_pattern):
    """The candidate of one subject-session's anat folder, or None when it holds no T1w image.

    Args:
        anat: the anat folder.
        name: the subject-session's name, ``"sub-X_ses-Y"`` or ``"sub-X"``.
        sub, ses: its folder names, ``"sub-X"`` and ``"ses-Y"`` or None.
        bids_filter: parsed ``-bids_filter`` pairs.
        mask_pattern: the user's ``-mask_name`` glob, or None for the BIDS
            derivatives convention.
    """
    t1w = [f for f in _listdir(anat) if f.endswith(("_T1w.nii.gz", "_T1w.nii"))
           and os.path.isfile(os.path.join(anat, f))]
    if not t1w:
        return None
    filter_text = _filter_text(bids_filter)
    chosen = [f for f in t1w if set(bids_filter) <= set(bids_entities(f)[0])]
    if not chosen:
        return _Candidate(name, anat, problem=(
            f"none of its T1w files ({', '.join(t1w)}) has the entities of -bids_filter {filter_text}"))
    if len(chosen) > 1:
        hint = _bids_filter_hint(chosen)
        return _Candidate(name, anat, problem=(
            f"{len(chosen)} T1w files ({', '.join(chosen)}); choose one with -bids_filter"
            + (f" (e.g. -bids_filter {','.join(filter(None, [filter_text, hint]))})" if hint else "")))
    image_path = os.path.join(anat, chosen[0])
    file_entities = bids_entities(chosen[0])[0]
    labels = dict(file_entities)
    expected = {"sub": sub[4:], "ses": None if ses is None else ses[4:]}
    wrong = [f"{k}-{labels[k]}" for k in ("sub", "ses") if k in labels and labels[k] != expected[k]]
    if wrong:
        return _Candidate(name, image_path, problem=(
            f"its name's entities ({', '.join(wrong)}) do not match its folder {name}"))
    # sub and ses from the folders, first (BIDS order), whether or not the name repeats them.
    entities = tuple((k, v) for k, v in expected.items() if v is not None) + tuple(
        (k, v) for k, v in file_entities if k not in expected)
    if mask_pattern is None:
        mask_path, problem = _bids_convention_mask(anat, entities)
    else:
        mask_path, problem = _bids_pattern_mask(anat, chosen[0], mask_pattern, expected["sub"], expected["ses"])
    return _Candidate(name, image_path, mask_path, problem=problem, entities=entities)


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
    filter_text = _filter_text(bids_filter)
    candidates, without_t1w = [], []
    for sub in _listdir(data_path):
        sub_dir = os.path.join(data_path, sub)
        if not sub.startswith("sub-") or not os.path.isdir(sub_dir):
            continue
        sessions = [s for s in _listdir(sub_dir) if s.startswith("ses-") and os.path.isdir(os.path.join(sub_dir, s))]
        for ses in sessions or [None]:
            name = sub if ses is None else f"{sub}_{ses}"
            anat = os.path.join(sub_dir, "anat") if ses is None else os.path.join(sub_dir, ses, "anat")
            candidate = _bids_session(anat, name, sub, ses, bids_filter, None if convention else mask_name)
            if candidate is None:
                without_t1w.append(name)
            else:
                candidates.append(candidate)
    if not candidates:
        raise nifti_io.DataError(f"BIDS dataset {data_path!r} has no T1w image: looked for {BIDS_T1W_PATTERN} "
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


def _read_csv_list(csv_path):
    """Reads a CSV (``.tsv``: tab-separated) file list and checks its header row.

    Returns:
        (rows, index): the ``(line number, cells)`` of the rows after the
        header, and the column index of each :data:`CSV_COLUMNS` entry present.

    Raises:
        nifti_io.DataError: if the file cannot be read, is empty, has no
            ``image`` column, or has a column twice.
    """
    delimiter = "\t" if csv_path.lower().endswith(".tsv") else ","
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise nifti_io.DataError(f"{csv_path}: cannot read the file list ({type(e).__name__}: {e})") from e
    columns_text = "columns image (required), mask, subject, split"
    if not rows:
        raise nifti_io.DataError(f"{csv_path}: the file list is empty; expected a header row with {columns_text}")
    header = [h.strip().lower() for h in rows[0][1]]
    if "image" not in header:
        raise nifti_io.DataError(f"{csv_path}: no 'image' column in the header row {rows[0][1]}; expected "
                                 f"{columns_text}")
    for column in CSV_COLUMNS:
        if header.count(column) > 1:
            raise nifti_io.DataError(f"{csv_path}: the header row has {header.count(column)} {column!r} columns")
    return rows[1:], {c: header.index(c) for c in CSV_COLUMNS if c in header}


def _csv_row_candidate(csv_path, index, line, row):
    """The candidate of one row (number ``line``) of a CSV file list; its problem says why it is unusable."""

    def cell(column):
        i = index.get(column)
        return row[i].strip() if i is not None and i < len(row) else ""

    base = os.path.dirname(csv_path)
    where = f"{csv_path} row {line}"
    image, mask, name, split = cell("image"), cell("mask"), cell("subject"), cell("split").lower()
    image_path = os.path.normpath(os.path.join(base, os.path.expanduser(image))) if image else ""
    mask_path = os.path.normpath(os.path.join(base, os.path.expanduser(mask))) if mask else None
    if not name and image:
        base_name = os.path.basename(image_path)
        name = strip_nifti_suffix(base_name) or base_name
    problem = None
    if not image:
        problem = "empty image cell"
    elif not os.path.isfile(image_path):
        problem = f"image {image!r} not found (no file {image_path})"
    elif mask_path is not None and not os.path.isfile(mask_path):
        problem = f"mask {mask!r} not found (no file {mask_path})"
    elif "/" in name or os.sep in name or name in (".", ".."):
        problem = f"subject {name!r} cannot be used in file names (no '/' allowed)"
    elif "split" in index and not split:
        problem = "empty split cell (with a split column every row needs train, validation or test)"
    if "split" in index and split and split not in SPLITS:
        # A value this version does not know would silently change the split: the whole list is refused, not the row skipped.
        raise nifti_io.DataError(f"{where}: split {cell('split')!r} must be one of {', '.join(SPLITS)}; "
                                 "fix the list's split column (no subject was used)")
    return _Candidate(name, image_path, mask_path, problem=problem, where=where,
                      split=split if "split" in index else None)


def _refuse_duplicate_ids(entries):
    """Returns the candidates of ``(row number, candidate)`` entries, those sharing a subject ID refused.

    No row of a duplicate ID is used, and every one is named.
    """
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
    return candidates


def folder_suffix_names(image_paths):
    """Names files that share one file name by the shortest suffix of their folders that tells them apart.

    ``DATA/002_S_0295/T1.nii.gz`` and ``DATA/002_S_0413/T1.nii.gz`` give
    ``002_S_0295`` and ``002_S_0413``; when the last folders are the same too,
    more are joined with ``_`` (``siteA_002_S_0295``).

    Args:
        image_paths: distinct normalised absolute file paths.

    Returns:
        list of str names in the same order, or None when their folders are
        the same (two files of one folder).
    """
    folders = [os.path.dirname(p).strip(os.sep).split(os.sep) for p in image_paths]
    for k in range(1, max(len(f) for f in folders) + 1):
        names = ["_".join(f[-k:]) for f in folders]
        if len(set(names)) == len(names):
            return names
    return None


def _name_colliding_files(entries, named):
    """Renames the rows whose default subject IDs (their file names) collide by their folders.

    Only rows without a subject cell (``named`` holds the line numbers of
    those with one) are renamed, one group of equal IDs at a time (rows
    naming an earlier row's image already carry a problem).

    Returns:
        (entries, example): the ``(line, candidate)`` pairs, and one new name
        (None when nothing was renamed).
    """
    groups = {}
    for line, c in entries:
        if c.problem is None and line not in named:
            groups.setdefault(c.name, []).append(line)
    renamed, by_line = {}, dict(entries)
    for lines in groups.values():
        paths = [os.path.abspath(by_line[line].image_path) for line in lines]
        if len(lines) < 2 or len(set(paths)) < len(paths):
            continue
        names = folder_suffix_names(paths)
        if names is not None:
            renamed.update(zip(lines, names))
    entries = [(line, dataclasses.replace(c, name=renamed[line]) if line in renamed else c)
               for line, c in entries]
    return entries, next(iter(sorted(renamed.values())), None)


def _refuse_listed_twice(entries):
    """Marks a row naming the same image file as an earlier row as a problem (the same subject twice)."""
    first, out = {}, []
    for line, c in entries:
        key = os.path.abspath(c.image_path) if c.problem is None else None
        if key in first:
            c = dataclasses.replace(c, problem=f"the same image as row {first[key]} (a subject listed twice)")
        elif key is not None:
            first[key] = line
        out.append((line, c))
    return out


def _csv_candidates(csv_path):
    """Reads a CSV (``.tsv``: tab-separated) file list, one candidate per row.

    Columns (header names case-insensitive, others ignored): ``image``
    (required), ``mask``, ``subject``, ``split``. Paths are relative to the
    list's folder. Rows without a subject ID are named after their image file;
    when those names collide (an ADNI tree, every file called
    ``T1_brain_extractedBrainExtractionBrain.nii.gz``) after the shortest
    suffix of their folders that tells them apart, which the description
    (the first log line) says. Rows that name missing files, the image of an
    earlier row, an empty image or split cell, a split other than train/validation/test,
    or a subject ID another row has, are bad entries named by their row (the
    header is row 1).

    Raises:
        nifti_io.DataError: if the file cannot be read or has no ``image`` column.
    """
    rows, index = _read_csv_list(csv_path)
    rows = [(line, row) for line, row in rows if any(cell.strip() for cell in row)]
    column = index.get("subject")
    named = {line for line, row in rows if column is not None and column < len(row) and row[column].strip()}
    entries = _refuse_listed_twice([(line, _csv_row_candidate(csv_path, index, line, row)) for line, row in rows])
    entries, example = _name_colliding_files(entries, named)
    candidates = _refuse_duplicate_ids(entries)
    notes = []
    if "split" in index:
        notes.append(f"note: train/validation/test split from the split column of {csv_path} "
                     "(-train_fraction and -validation_fraction not used)")
    description = "CSV file list"
    if example is not None:
        description += (f" (subject IDs from the images' folders, e.g. {example}: their file names are the "
                        f"same)")
    return _Listing(description=description, unit="subject",
                    expected="rows naming existing NIfTI files in an image column",
                    mask_source="mask in the list", candidates=candidates, notes=notes)


def _listing(layout, data_path, image_name, mask_name, bids_filter):
    """Returns the :class:`_Listing` of ``layout``'s reader, noting the options it does not use."""
    if layout == "bids":
        listing = _bids_candidates(data_path, mask_name, bids_filter)
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
    return listing


def _header_checks(c, min_shape, max_voxels):
    """Checks a candidate's image and mask from their headers: returns (problem or None, where)."""
    where = c.where or c.image_path
    problem, shape = nifti_io.header_problem(c.image_path, min_shape, max_voxels)
    if problem is not None and c.where:
        problem = f"{c.image_path}: {problem}"
    if problem is None and c.mask_path is not None:
        mask_problem, mask_shape = nifti_io.header_problem(c.mask_path)
        if mask_problem is not None:
            problem = f"mask: {mask_problem}"
        elif mask_shape != shape:
            problem = (f"mask shape {nifti_io.shape_str(mask_shape)} differs from the image's "
                       f"{nifti_io.shape_str(shape)}")
        if problem is not None:
            where = f"{c.where}: {c.mask_path}" if c.where else c.mask_path
    return problem, where


def _check_candidates(candidates, min_shape, max_voxels):
    """Returns (usable subjects sorted by name, one ``"<where>: <reason>"`` per bad candidate)."""
    subjects, problems, seen = [], [], set()
    for c in candidates:
        problem, where = c.problem, c.where or c.image_path
        if problem is None and c.name in seen:
            problem = f"subject name {c.name!r} is used twice (a folder and a file?)"
        if problem is None:
            problem, where = _header_checks(c, min_shape, max_voxels)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        seen.add(c.name)
        subjects.append(Subject(c.name, c.image_path, c.mask_path, split=c.split, entities=c.entities))
    subjects.sort(key=lambda s: s.name)
    return subjects, problems


def _report(listing, data_path, subjects, problems, log):
    """Logs what :func:`find_subjects` found; DataError when no subject is usable."""
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
        raise nifti_io.DataError(f"no usable subject in {data_path!r}: expected {listing.expected}{details}")


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
        nifti_io.DataError: if ``data_path`` does not exist or is a non-list file, a
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
        raise nifti_io.DataError(f"-bids_filter {bids_filter!r} applies to BIDS datasets, but {data_path!r} "
                                 f"is not one (no dataset_description.json or sub-* folder)")
    listing = _listing(layout, data_path, image_name, mask_name, entities_filter)
    subjects, problems = _check_candidates(listing.candidates, min_shape, max_voxels)
    _report(listing, data_path, subjects, problems, log)
    return subjects, problems
