"""Durable file output: atomic writes, the resumable CSV, stale temporaries and the run lock.

Every file the project writes (JSON, CSV, NIfTI, PNG) goes through
:func:`atomic_write`, which either puts the complete new file in place or
leaves the previous one as it was and raises :class:`OutputError`;
:func:`append_csv_row` adds one durable line at a time to a results file that
a resumed run continues; :func:`remove_stale_temporaries` clears what a killed
run left behind; :class:`RunLock` keeps two runs out of one folder.
"""

import csv
import datetime
import errno
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading

import numpy as np

#: Prefix of every temporary file :func:`atomic_write` creates (``.tmp-<name>-<random><suffix>``).
TMP_PREFIX = ".tmp-"
# Temporary names keep at most this much of the destination's name, so they stay
# under the 255-byte limit of common filesystems.
_TMP_NAME_KEEP = 120


class OutputError(OSError):
    """A file could not be written; the previous file at ``path``, if any, is intact.

    ``str(err)`` is ``"cannot write {path}: {reason}"``. Raised by
    :func:`atomic_write` and every writer built on it, with the original
    exception as ``__cause__``.

    Attributes:
        path: the destination that was not written.
        reason: what went wrong, e.g. ``"No space left on device"``.
        errno: the OS error number when there was one (``errno.ENOSPC``), else None.
    """

    def __init__(self, path, reason, err_no=None):
        super().__init__(err_no, str(reason))
        self.path = os.fspath(path)
        self.reason = str(reason)
        self.filename = self.path

    def __str__(self):
        return f"cannot write {self.path}: {self.reason}"

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.errno)


def _output_error(path, err):
    """Returns the :class:`OutputError` for ``path`` that exception ``err`` means."""
    if isinstance(err, OutputError):
        return err
    err_no = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    elif err_no:
        reason = os.strerror(err_no)
    else:
        reason = f"{type(err).__name__}: {err}"
    return OutputError(path, reason, err_no)


_umask_guard = threading.Lock()
_umask_cache = None


def _file_mode():
    """Returns the permission bits a new file gets under this process's umask (0o644 for umask 022)."""
    global _umask_cache
    if _umask_cache is None:
        with _umask_guard:
            if _umask_cache is None:
                # The umask can only be read by setting it. It is read once and
                # cached; for the instant it is changed, a file another thread
                # creates gets the restrictive 0o077 rather than a world-writable 0.
                mask = os.umask(0o077)
                os.umask(mask)
                _umask_cache = mask
    return 0o666 & ~_umask_cache


def forget_umask():
    """Forgets the umask read by the first write; the next write reads it again.

    For a process that changes its umask on purpose after writing (and tests).
    """
    global _umask_cache
    with _umask_guard:
        _umask_cache = None


def _fsync_path(path):
    """fsyncs a file's data to the disk (opened read-only: enough for fsync on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# fsync on a folder is refused with these by some filesystems (and platforms without
# O_DIRECTORY); the rename is then as durable as that filesystem makes it.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR,
                          errno.EACCES, errno.EPERM, errno.EROFS}


def _fsync_folder(folder):
    """fsyncs a folder so that a rename inside it survives a power cut (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _remove_quietly(path):
    """Removes a file, ignoring every error (clean-up after a failure that is being reported)."""
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write(path, write_fn, suffix=""):
    """Writes a file durably: a complete new file at ``path``, or the previous one untouched.

    ``write_fn`` writes a temporary sibling ``.tmp-<name>-<random><suffix>`` by
    path; the temporary is then fsynced, given the permissions the umask
    allows (``0o666 & ~umask``, not ``mkstemp``'s 0o600), renamed over
    ``path`` and the folder fsynced. Every step, the close of the file
    included, runs inside the error handling, so an error a full disk reports
    late (at fsync or close) is seen before the rename. A temporary left by a
    killed process is removed by :func:`remove_stale_temporaries`.

    Args:
        path: destination file; its folder is created if missing.
        write_fn: callable taking the temporary path (str) and writing the
            whole file there (``nib.save``, ``skimage.io.imsave``, ...).
        suffix: extension the temporary keeps (libraries such as nibabel pick
            the format from it, e.g. ``".nii.gz"``).

    Raises:
        OutputError: naming ``path`` and the reason, for any exception of
            ``write_fn`` or of the file system (the cause is chained). The
            temporary is removed and a previous file at ``path`` is left as it
            was; the one exception is an I/O error of the folder fsync, after
            the new file is in place. KeyboardInterrupt and SystemExit remove
            the temporary and propagate unchanged.
    """
    _atomic_write(path, write_fn, suffix, sync_tmp=True)


def _atomic_write(path, write_fn, suffix, sync_tmp):
    """:func:`atomic_write`; ``sync_tmp=False`` when ``write_fn`` fsyncs the file itself."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)[:_TMP_NAME_KEEP]
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}-", suffix=suffix, dir=folder)
        os.close(fd)
        write_fn(tmp)
        if sync_tmp:
            _fsync_path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(folder)
    except BaseException as e:
        if tmp is not None:
            _remove_quietly(tmp)
        if not isinstance(e, Exception):
            raise
        raise _output_error(path, e) from e


def write_text(path, text):
    """Writes a UTF-8 text file durably (see :func:`atomic_write`).

    Args:
        path: destination file.
        text: str, written as it is (no newline translation).

    Raises:
        OutputError: the file could not be written; a previous one is intact.
    """
    write_bytes(path, str(text).encode("utf-8"))


def write_bytes(path, data):
    """Writes ``data`` (bytes, e.g. a PNG) to a file durably (see :func:`atomic_write`).

    Raises:
        OutputError: the file could not be written; a previous one is intact.
    """
    def write(tmp):
        # write, flush, fsync and close all inside atomic_write's error handling:
        # a full disk may report ENOSPC only at flush or close.
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_write(path, write, "", sync_tmp=False)


def write_json(path, data):
    """Writes ``data`` as JSON (indent 2, sorted keys, trailing newline) durably.

    Args:
        path: destination file.
        data: JSON-serialisable object.

    Raises:
        TypeError: if ``data`` is not JSON-serialisable (nothing is written).
        OutputError: the file could not be written; a previous one is intact.
    """
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_file(source, path):
    """Copies a file durably: a complete copy at ``path``, or the previous file there untouched.

    Args:
        source: the file to copy.
        path: destination file (see :func:`atomic_write`).

    Raises:
        OutputError: naming ``path`` and the reason (``source`` missing, a full disk...).
    """
    atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


# --------------------------------------------------------------------------- #
# Resumable CSV (one durable append per row)
# --------------------------------------------------------------------------- #


def _csv_value(value):
    """Formats one CSV cell: floats ``%.6f`` (``nan``, ``inf``), None empty, the rest ``str``."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return "nan" if math.isnan(value) else "%.6f" % value
    return str(value)


def _csv_line(cells):
    """Returns one CSV line (with its ``\\n``) of str cells."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


def _csv_header_of(fh):
    """Returns the header fields of a CSV file open in binary mode (None when it has no complete header line)."""
    fh.seek(0)
    for raw in fh:
        if not raw.endswith(b"\n"):
            return None
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("#"):
            continue
        return next(csv.reader([line]))
    return None


def _drop_partial_last_line(fh):
    """Truncates a binary file open for update after its last newline (a crash mid-append)."""
    size = fh.seek(0, os.SEEK_END)
    if size == 0:
        return
    fh.seek(size - 1)
    if fh.read(1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        fh.seek(start)
        at = fh.read(end - start).rfind(b"\n")
        if at >= 0:
            fh.truncate(start + at + 1)
            return
        end = start
    fh.truncate(0)


def append_csv_row(path, fieldnames, row, header_lines=()):
    """Appends one row to a CSV file durably, creating it (with its header) when missing.

    For results written one subject at a time and resumed after a crash: each
    call either adds one complete line or, on failure, leaves the file
    readable. A missing file (or one without a complete header line, e.g.
    emptied by a non-atomic writer) is written atomically with
    ``header_lines`` as leading ``# `` comments, the header and the row. An
    existing file must have the same columns; the row is appended, flushed and
    fsynced. A last line without its newline (a process killed mid-append) is
    cut off first, as :func:`read_csv_rows` ignores it anyway.

    Args:
        path: the CSV file.
        fieldnames: sequence of column names.
        row: dict column -> value; missing columns are written empty. Floats
            are written ``"%.6f"``, NaN as ``nan``.
        header_lines: strings written as ``# <line>`` before the header when the
            file is created (e.g. ``"upsampling_factor: 4"``); ignored afterwards.

    Raises:
        ValueError: if ``row`` has columns that are not in ``fieldnames``, a
            value or header line holds a newline, or the existing file's
            columns differ from ``fieldnames`` (message names the file and both).
        OutputError: the row could not be written.
    """
    path = os.fspath(path)
    fieldnames = [str(f) for f in fieldnames]
    extra = sorted(set(map(str, row)) - set(fieldnames))
    if extra:
        raise ValueError(f"row for {path} has columns {extra} that are not in the fieldnames {fieldnames}")
    cells = [_csv_value(row.get(f)) for f in fieldnames]
    comments = [str(line) for line in header_lines]
    if any("\n" in c or "\r" in c for c in cells + fieldnames + comments):
        raise ValueError(f"CSV values, column names and header lines for {path} must not contain newlines")
    line = _csv_line(cells)
    existing = None
    try:
        if os.path.exists(path):
            with open(path, "r+b") as fh:
                existing = _csv_header_of(fh)
                if existing == fieldnames:
                    _drop_partial_last_line(fh)
                    fh.seek(0, os.SEEK_END)
                    fh.write(line.encode("utf-8"))
                    fh.flush()
                    os.fsync(fh.fileno())
                    return
    except Exception as e:  # noqa: BLE001 - any failure is reported as this file's
        raise _output_error(path, e) from e
    if existing is not None:
        raise ValueError(f"{path} has the columns {existing}, expected {fieldnames}; move it away "
                         f"or write to another folder")
    text = "".join(f"# {c}\n" if not c.startswith("#") else f"{c}\n" for c in comments)
    write_text(path, text + _csv_line(fieldnames) + line)


def read_csv_rows(path):
    """Reads a CSV file written by :func:`append_csv_row`.

    Leading ``#`` comment lines are skipped; a last line without its newline
    (a crash mid-append) is ignored. Both ``\\n`` and ``\\r\\n`` line ends are read.

    Args:
        path: the CSV file.

    Returns:
        (fieldnames, rows): the header as a list of str and one dict column ->
        str value per row, in file order; ``(None, [])`` when the file does not
        exist or holds no complete header line.

    Raises:
        ValueError: if a row has a different number of fields than the header
            (message names the file and line number).
        OSError: if the file exists but cannot be read.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
    except FileNotFoundError:
        return None, []
    lines = text.split("\n")[:-1]  # the piece after the last newline is incomplete (or empty)
    fieldnames, rows = None, []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if fieldnames is None:
            if line.startswith("#"):
                continue
            fieldnames = next(csv.reader([line]))
            continue
        if not line:
            continue
        values = next(csv.reader([line]))
        if len(values) != len(fieldnames):
            raise ValueError(f"{path}, line {number}: {len(values)} fields, the header has {len(fieldnames)}")
        rows.append(dict(zip(fieldnames, values)))
    return fieldnames, rows


# --------------------------------------------------------------------------- #
# Stale temporaries and the run lock
# --------------------------------------------------------------------------- #

# What a killed process leaves behind, by name (checked against TF 2.21):
# - ".tmp-*" files: atomic_write's temporaries (this module).
# - "ckpt-<N>_temp/" folders: tf.train.CheckpointManager(..., checkpoint_name="ckpt")
#   saves checkpoint N through Checkpoint.write -> functional_saver, which writes
#   the shards to "<prefix>_temp/part-00000-of-00001.{index,data-...}.tempstate<random>"
#   and only then merges them into "ckpt-N.index" / renames "ckpt-N.data-*" (and
#   deletes the folder). SIGKILL during a 200 MB save left exactly "ckpt-21_temp/"
#   holding "part-00000-of-00001.data-00000-of-00001.tempstate<digits>".
# - "checkpoint.tmp<32 hex>" files: the "checkpoint" state file is written by
#   file_io.atomic_write_string_to_file through "<name>.tmp<uuid4 hex>" + rename.
# The merge itself writes "ckpt-N.index" in place; a kill there leaves files the
# "checkpoint" state file does not name (it is updated last), so they are never
# restored and are overwritten by the next save of N; they are not touched here.
_STALE_FILE_PATTERNS = (re.compile(re.escape(TMP_PREFIX) + r".+", re.S),
                        re.compile(r"checkpoint\.tmp[0-9a-f]{32}"))
_STALE_DIR_PATTERNS = (re.compile(r"ckpt-\d+_temp"),)


def remove_stale_temporaries(folder):
    """Removes the temporaries killed runs of this project left in a folder and its sub-folders.

    In ``folder`` and, recursively, its real sub-folders (a BIDS output's
    ``sub-X/anat/``), except a sub-folder holding its own :data:`LOCK_NAME`
    (another run's folder, cleaned by that run under its own lock): only
    regular files named ``.tmp-*`` (:func:`atomic_write`) or
    ``checkpoint.tmp<32 hex digits>`` (TensorFlow's checkpoint state file) and
    real folders named ``ckpt-<N>_temp`` (a TensorFlow checkpoint save in
    progress); symbolic links are never followed nor removed, everything else
    is left alone. Call it only while holding the folder's :class:`RunLock`:
    the temporaries of a live run look the same.

    Args:
        folder: the folder to clean; a missing folder has nothing to remove.

    Returns:
        list of the removed paths, each folder's sorted by name, the folder's own first.

    Raises:
        OutputError: naming ``folder`` when it cannot be listed or a leftover
            cannot be removed (a folder this process cannot change).
    """
    folder = os.fspath(folder)
    removed, subfolders = _remove_stale_here(folder)
    for sub in subfolders:
        if not os.path.exists(os.path.join(sub, LOCK_NAME)):
            removed += remove_stale_temporaries(sub)
    return removed


def _remove_stale_here(folder):
    """The stale temporaries removed from ``folder`` itself, and its other real sub-folders."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return [], []
    except OSError as e:
        raise _output_error(folder, e) from e
    removed, subfolders = [], []
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and any(p.fullmatch(entry.name) for p in _STALE_FILE_PATTERNS):
                os.remove(entry.path)
            elif entry.is_dir(follow_symlinks=False) and any(p.fullmatch(entry.name) for p in _STALE_DIR_PATTERNS):
                shutil.rmtree(entry.path)
            else:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(entry.path)
                continue
        except FileNotFoundError:
            continue
        except OSError as e:
            err = _output_error(folder, e)
            raise OutputError(folder, f"cannot remove the stale temporary {entry.name!r}: {err.reason}",
                              err.errno) from e
        removed.append(entry.path)
    return removed, subfolders


#: Name of the lock file :class:`RunLock` keeps in a run's folder.
LOCK_NAME = ".srgan.lock"


class LockedError(RuntimeError):
    """Another run (or this process) holds a folder's :class:`RunLock`; the message says who."""


# Lock files this process holds: realpath -> RunLock. flock() locks belong to an
# open file description, so a second open() of the same file in this process
# does conflict with the first (checked on Linux: LOCK_NB gives EWOULDBLOCK),
# but the holder recorded there would be this very process; the registry says so
# plainly, and catches it before any file is opened.
_held_locks = {}
_held_guard = threading.Lock()


def _close_locks_in_child():
    """After fork(): the child drops its copies of the lock fds, so the lock dies with the parent."""
    for lock in list(_held_locks.values()):
        try:
            os.close(lock._fd)
        except OSError:
            pass
        lock._fd = None
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


def _pid_alive(pid):
    """Whether a process with this PID exists on this machine."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class RunLock:
    """An exclusive lock on a run's folder, so that two runs never write there at once.

    The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<folder>/.srgan.lock``.
    The kernel releases it when the holder's process ends in any way (SIGKILL
    and the OOM killer included), so a killed run never blocks the next one:
    a lock file left behind is simply locked again. The holder writes JSON
    ``{pid, host, started, purpose, command}`` into the file, which a refused
    run quotes. The lock file is never deleted (deleting it would let a new
    run lock a fresh file while another still holds the old one). flock works
    on local filesystems; over NFS, Linux emulates it with byte-range locks.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`.

    Args:
        folder: the folder to lock (created if missing).
        purpose: short text saying what the holder does (``"training"``,
            ``"evaluation"``), shown to a refused run.
    """

    def __init__(self, folder, purpose):
        self.folder = os.fspath(folder)
        self.purpose = str(purpose)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._fd = None
        self._info = None

    @property
    def held(self):
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self):
        """Takes the lock without waiting.

        Returns:
            self.

        Raises:
            LockedError: if another process holds it (message: the folder, the
                holder's PID, host, start time, purpose and command, and what
                to do), or this process already holds it.
            OutputError: if the folder or lock file cannot be created or written.
        """
        import fcntl

        key = os.path.realpath(self.path)
        with _held_guard:
            other = _held_locks.get(key)
            if other is not None:
                raise LockedError(
                    f"{self.folder} is already locked by this process ({other.purpose}); "
                    f"one process cannot run two {self.purpose}/{other.purpose} jobs in one folder")
            try:
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as e:
                raise _output_error(self.path, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder(fd)
                os.close(fd)
                raise LockedError(self._refusal(holder)) from None
            except OSError as e:
                os.close(fd)
                raise OutputError(self.path, f"cannot lock it: {_output_error(self.path, e).reason}",
                                  e.errno) from e
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "purpose": self.purpose,
                "command": " ".join(sys.argv),
            }
            try:
                data = (json.dumps(info, sort_keys=True) + "\n").encode("utf-8")
                # Truncate only now that the lock is ours: the file holds the
                # previous holder's record until then.
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            except OSError as e:
                os.close(fd)  # releases the lock
                raise _output_error(self.path, e) from e
            self._fd, self._info = fd, info
            _held_locks[key] = self
        return self

    def release(self):
        """Releases the lock (nothing happens when it is not held). The lock file stays."""
        with _held_guard:
            if self._fd is None:
                return
            _held_locks.pop(os.path.realpath(self.path), None)
            fd, self._fd = self._fd, None
            try:
                # Emptied while still ours, so nobody quotes a holder that has left.
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, exc_type, exc, tb):
        self.release()
        return False

    @staticmethod
    def _read_holder(fd):
        """Returns the holder's record (dict) from an open lock file, or None when absent or unreadable."""
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict):
            return None
        # A record naming a process of this machine that no longer exists is a
        # dead holder's; the live holder has locked but not yet written its own.
        if info.get("host") == socket.gethostname() and "pid" in info and not _pid_alive(info["pid"]):
            return None
        return info

    def _refusal(self, holder):
        """The LockedError message for a lock held by ``holder`` (record dict or None)."""
        if holder is None:
            who = "another process (it has not recorded its PID yet)"
        else:
            who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                   f"{holder.get('started', '?')} ({holder.get('purpose', '?')}: "
                   f"{holder.get('command', '?')})")
        return (f"{self.folder} is in use by {who}; the {self.purpose} would write there too. Wait for "
                f"that run to finish or choose another folder. (The lock, {self.path}, is released "
                f"automatically when that process ends; do not delete it.)")
