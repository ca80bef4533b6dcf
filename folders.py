"""Every rule about the folders a run writes to: writable, not a file, never inside the input data.

Outputs inside a data folder would be read as new subjects by the next run;
a BIDS dataset only reads its ``sub-*`` folders, so its ``derivatives/`` (the
BIDS place for outputs) is allowed, and a CSV list reads only what it names.
"""

import contextlib
import os

import durable
import layouts
from errors import UserError
from version import PROGRAM_NAME


def check_writable(folder, flag):
    """Creates ``folder`` if needed and checks that a file can be written in it.

    Raises:
        UserError: naming the flag, the folder and the reason.
    """
    if os.path.isfile(folder):
        raise UserError(f"{flag} {folder!r} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise UserError(f"{flag} {folder!r} is not a writable folder: {err.strerror or err}")


def refuse_inside_data(folder, flag, root, layout):
    """Refuses an output ``folder`` that the next run would read as data of ``root``.

    Args:
        folder: the output folder (need not exist).
        flag: the flag that named it, for the message.
        root: the data folder, or None (single files: nothing to refuse).
        layout: one of ``layouts.LAYOUTS``, or None.

    Raises:
        UserError: naming the flag, both folders and where outputs belong.
    """
    if root is None or layout not in ("folders", "bids"):
        return
    relative = os.path.relpath(os.path.realpath(folder), os.path.realpath(root))
    if relative.startswith(os.pardir) or os.path.isabs(relative):
        return
    first = relative.split(os.sep)[0]
    if layout == "bids" and relative != os.curdir and not first.startswith("sub-"):
        return
    hint = (f"; BIDS outputs belong in e.g. {os.path.join(root, 'derivatives', PROGRAM_NAME)}"
            if layout == "bids" else "")
    raise UserError(f"{flag} {folder!r} is inside the data {root!r}: what is written there would be "
                    f"read as new subjects by the next run. Choose a folder outside it{hint}")


def check_outside_data(data_path, image_name, folders):
    """Refuses training output folders inside the data (their files would become subjects).

    Args:
        data_path: the -data_path.
        image_name: the -image_name (layout detection).
        folders: dict flag -> folder, e.g. ``{"-checkpoint_dir": "ckpt"}``.

    Raises:
        UserError: naming the flag and both folders.
    """
    if not os.path.isdir(data_path):
        return
    layout = layouts.detect_layout(data_path, image_name)
    for flag, folder in folders.items():
        refuse_inside_data(folder, flag, data_path, layout)


def check_output_folder(folder, sources, flag="-path_volumes"):
    """Refuses an output folder that is a file, lies under a file, or lies inside input data.

    Args:
        folder: the output folder (the -path_volumes).
        sources: iterable of (root, layout) of the inputs, layout one of
            ``layouts.LAYOUTS`` or None for single files (never refused).
        flag: the flag that named it.

    Raises:
        UserError: naming the folder and the reason.
    """
    probe = os.path.abspath(folder)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.isfile(probe):
        where = "" if probe == os.path.abspath(folder) else f": {probe!r}"
        raise UserError(f"{flag} {folder!r}{where} is a file, not a folder")
    for root, layout in set(sources):
        refuse_inside_data(folder, flag, root, layout)
    check_writable(folder, flag)


def remove_leftovers(folders, log):
    """Removes the temporaries a killed run left behind in ``folders`` (its own kind only)."""
    removed = []
    for folder in dict.fromkeys(folders):
        if os.path.isdir(folder):
            removed += durable.remove_stale_temporaries(folder)
    if removed:
        shown = ", ".join(os.path.basename(p) for p in removed[:4]) + (" ..." if len(removed) > 4 else "")
        log(f"removed {len(removed)} temporary file(s) of an interrupted run: {shown}")
    return removed


def overwrite_note(paths, log):
    """Says which of ``paths`` exist already and are about to be replaced."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing:
        shown = ", ".join(os.path.basename(p) for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        log(f"note: replacing {len(existing)} existing file(s) in {os.path.dirname(existing[0])}: {shown}")


def new_folders(folder):
    """The folder and those of its parents that do not exist yet, topmost first (what a run would create)."""
    missing = []
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.insert(0, path)
        path = os.path.dirname(path)
    return missing


@contextlib.contextmanager
def removed_unless_written(created, own_names=()):
    """Removes the folders a run created when the block fails before writing an output there.

    A run whose only input turns out unreadable would otherwise leave an
    empty output folder behind. Only a folder tree holding nothing but the
    run's lock file and ``own_names`` (what the run writes before its
    outputs, e.g. a BIDS ``dataset_description.json``) is removed; anything
    else keeps it all. Call inside the run's ``durable.RunLock``: the lock
    file goes while it is still held.

    Args:
        created: :func:`new_folders` of the output folder, taken before it was created.
        own_names: file names the run may have written there before any output.
    """
    try:
        yield
    except BaseException:
        if created:
            remove_own_tree(created[0], {durable.LOCK_NAME, *own_names})
        raise


def remove_own_tree(top, names):
    """Removes ``top`` when every file under it is named in ``names`` (else nothing); quietly."""
    found = []
    for folder, _, files in os.walk(top):
        if any(name not in names for name in files):
            return
        found += [os.path.join(folder, name) for name in files]
    try:
        for path in found:
            os.remove(path)
        for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
            os.rmdir(folder)
    except OSError:
        pass
