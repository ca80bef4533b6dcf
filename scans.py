"""The scans an inference run reads: -super_resolve's files, folders and lists, and where each comes from."""

import dataclasses
import json
import os

import numpy as np

import layouts
import nifti_io


@dataclasses.dataclass(frozen=True)
class InputScan:
    """One scan to super-resolve (or evaluate) and where it comes from.

    Attributes:
        subject: the :class:`layouts.Subject` (name, image, mask,
            BIDS entities).
        root: absolute path of its dataset (the BIDS dataset root, the data
            folder, the list's folder), or None for a file given alone.
        bids: bool, the scan belongs to a BIDS dataset (``root`` is its root).
    """

    subject: layouts.Subject
    root: "str | None" = None
    bids: bool = False


def bids_filter_for(cfg, data_path, explicit, log):
    """The -bids_filter to read ``data_path`` with.

    A filter taken from the checkpoint (the training data were BIDS) is not
    applied to other data that are not BIDS; one given on the command line is
    (and ``find_subjects`` refuses it for such data).
    """
    bids_filter = cfg.bids_filter
    if bids_filter and "bids_filter" not in explicit \
            and layouts.detect_layout(data_path, cfg.image_name) != "bids":
        log(f"note: the training's -bids_filter {bids_filter} is not used for {data_path} (not BIDS)")
        return None
    return bids_filter


def data_root(data_path, layout):
    """The folder a layout's scans live in: the folder itself, or a list's folder."""
    path = os.path.abspath(data_path)
    return os.path.dirname(path) if layout == "csv" else path


def bids_file_scan(path):
    """An :class:`InputScan` for a T1w file inside a BIDS dataset, or None when it is not one.

    The file must be ``<root>/sub-X/[ses-Y/]anat/sub-X[_ses-Y]_..._T1w.nii[.gz]``.
    """
    path = os.path.abspath(path)
    anat = os.path.dirname(path)
    entities, suffix = layouts.bids_entities(os.path.basename(path))
    labels = dict(entities)
    if suffix != "T1w" or "sub" not in labels or os.path.basename(anat) != "anat":
        return None
    parent = os.path.dirname(anat)
    session = None
    if os.path.basename(parent).startswith("ses-"):
        session, parent = os.path.basename(parent)[4:], os.path.dirname(parent)
    if os.path.basename(parent) != f"sub-{labels['sub']}" or labels.get("ses") != session:
        return None
    name = f"sub-{labels['sub']}" + (f"_ses-{session}" if session else "")
    ordered = (("sub", labels["sub"]),) + ((("ses", session),) if session else ()) + tuple(
        (k, v) for k, v in entities if k not in ("sub", "ses"))
    return InputScan(layouts.Subject(name, path, entities=ordered), os.path.dirname(parent), True)


def super_resolve_inputs(cfg, explicit, log):
    """The scans of -super_resolve: files as they are, folders and lists through ``find_subjects``.

    Returns:
        (scans, unlisted): the :class:`InputScan` list, in the order given (a
        folder's in name order), and one ``"<path or list row>: <reason>"``
        per entry of a folder or list that was skipped (already reported).

    Raises:
        UserError, nifti_io.DataError: an unusable path or dataset.
    """
    scans, unlisted = [], []
    max_voxels = nifti_io.max_voxels_for(cfg.volume_shape)
    for path in cfg.super_resolve:
        if os.path.isfile(path) and not layouts.is_file_list(path):
            bids = bids_file_scan(path)
            name = layouts.strip_nifti_suffix(os.path.basename(path))
            scans.append(bids or InputScan(layouts.Subject(name, os.path.abspath(path))))
            continue
        layout = layouts.detect_layout(path, cfg.image_name)
        subjects, problems = layouts.find_subjects(path, cfg.image_name, cfg.mask_name, log=log,
                                                   bids_filter=bids_filter_for(cfg, path, explicit, log),
                                                   max_voxels=max_voxels)
        root = data_root(path, layout)
        scans += [InputScan(s, root, layout == "bids") for s in subjects]
        unlisted += problems
    return scans, unlisted


def _read_sidecar(path):
    """The dict of a JSON file, or {} when it cannot be read or is not an object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def source_sidecar(scan):
    """The JSON metadata of a scan's image: its own sidecar, for BIDS with the inherited ones.

    For a BIDS scan every ``*.json`` from the dataset root down to the
    image's folder whose suffix is the image's and whose entities are all the
    image's applies, the deeper and more specific ones winning (the BIDS
    inheritance principle); otherwise only ``<image without .nii[.gz]>.json``.

    Returns:
        dict ({} when there is none).
    """
    image = os.path.abspath(scan.subject.image_path)
    stem = layouts.strip_nifti_suffix(os.path.basename(image))
    root = None if scan.root is None else os.path.abspath(scan.root)
    if not scan.bids or root is None or not image.startswith(root + os.sep):
        return _read_sidecar(os.path.join(os.path.dirname(image), f"{stem}.json"))
    entities, suffix = layouts.bids_entities(stem)
    chain, folder = [], os.path.dirname(image)
    while True:
        chain.append(folder)
        if folder == root:
            break
        folder = os.path.dirname(folder)
    merged = {}
    for folder in reversed(chain):
        fitting = []
        for name in sorted(os.listdir(folder)):
            found, found_suffix = layouts.bids_entities(name[:-len(".json")]) if name.endswith(".json") else ((), None)
            if found_suffix == suffix and set(found) <= set(entities):
                fitting.append((len(found), name))
        for _, name in sorted(fitting):
            merged.update(_read_sidecar(os.path.join(folder, name)))
    return merged


def skull_stripped(scan):
    """Whether a scan's image is skull-stripped (BIDS ``SkullStripped``); its outputs inherit it.

    The rule, first that applies: the ``SkullStripped`` boolean of the
    image's JSON sidecar (:func:`source_sidecar`); True for the ADNI layout's
    brain-extracted image (named ``layouts.IMAGE_NAME``); True when the
    subject has a brain mask file and the image is zero everywhere outside
    it; otherwise False (not known to be stripped).

    Returns:
        bool.
    """
    given = source_sidecar(scan).get("SkullStripped")
    if isinstance(given, bool):
        return given
    subject = scan.subject
    if os.path.basename(subject.image_path) == layouts.IMAGE_NAME:
        return True
    if subject.mask_path is None:
        return False
    try:
        image, _, _ = nifti_io.load_volume(subject.image_path, log=lambda _: None)
        mask, _, _ = nifti_io.load_volume(subject.mask_path, log=lambda _: None)
    except nifti_io.PipelineError:
        raise
    except nifti_io.DataError:
        return False
    return image.shape == mask.shape and not np.any(image[mask <= 0])
