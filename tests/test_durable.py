"""Tests of the durable output helpers (durable.py): atomic writes on a full disk,
permissions, the resumable CSV, stale temporaries and the run lock."""

import errno
import io
import json
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import ROOT

import durable
import utils


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FailingFile(io.FileIO):
    """A real file whose write or close reports a full disk, as NFS and quotas do."""

    fail_on = "write"

    def write(self, data):
        if self.fail_on == "write":
            _enospc()
        return super().write(data)

    def close(self):
        if self.closed:
            return
        super().close()
        if self.fail_on == "close":
            _enospc()


def _failing_open(fail_on):
    def fake_open(path, mode="r", *args, **kwargs):
        assert mode == "wb", mode
        fh = _FailingFile(path, "w")
        fh.fail_on = fail_on
        return fh
    return fake_open


def _write_nifti(path):
    utils.save_nifti(path, np.ones((4, 4, 4)), np.eye(4))


def _write_png(path):
    utils.save_png(path, np.zeros((8, 8), np.uint8))


# (name, writer, what fails): every writer, and each place a full disk can show up.
FULL_DISK_CASES = [
    ("config.json", lambda p: durable.write_json(p, {"a": 1}), "fsync"),
    ("notes.txt", lambda p: durable.write_text(p, "new"), "write"),
    ("notes.txt", lambda p: durable.write_text(p, "new"), "close"),  # finding 1: ENOSPC at close
    ("metrics.csv", lambda p: durable.append_csv_row(p, ["a"], {"a": 1}), "fsync"),
    ("out.nii.gz", _write_nifti, "fsync"),
    ("slices.png", _write_png, "fsync"),
    ("raw.bin", lambda p: durable.atomic_write(p, lambda tmp: _enospc()), "write_fn"),
]


@pytest.mark.parametrize("name, writer, fails", FULL_DISK_CASES)
def test_full_disk_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch, name, writer, fails):
    path = tmp_path / name
    path.write_bytes(b"previous")
    if fails == "fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
    elif fails in ("write", "close"):
        monkeypatch.setattr(durable, "open", _failing_open(fails), raising=False)
    with pytest.raises(durable.OutputError) as info:
        writer(path)
    err = info.value
    assert err.path == str(path) and err.errno == errno.ENOSPC
    assert str(err) == f"cannot write {path}: No space left on device"
    assert isinstance(err, OSError) and isinstance(err.__cause__, OSError)
    assert path.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == [name]


def test_output_error_keeps_path_errno_and_pickles(tmp_path):
    err = durable.OutputError("/x/y.json", "No space left on device", errno.ENOSPC)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.errno, str(back)) == ("/x/y.json", errno.ENOSPC,
                                                  "cannot write /x/y.json: No space left on device")
    # A non-OS exception of the writer is named with its type; the folder is created.
    path = tmp_path / "new" / "r.txt"
    with pytest.raises(durable.OutputError, match=r"cannot write .*r.txt: ValueError: bad data") as info:
        durable.atomic_write(path, lambda tmp: (_ for _ in ()).throw(ValueError("bad data")))
    assert info.value.errno is None and os.listdir(tmp_path / "new") == []


def test_interrupt_removes_the_temporary_and_propagates_unchanged(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("previous")

    def interrupted(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        durable.atomic_write(path, interrupted, suffix=".json")
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["a.json"]


def test_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "result.txt"
    path.write_text("previous")

    def broken(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        durable.atomic_write(path, broken, suffix=".txt")
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["result.txt"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, monkeypatch, umask, mode):
    durable.forget_umask()  # read once per process otherwise
    old = os.umask(umask)
    try:
        durable.write_json(tmp_path / "c.json", {"b": [1, 2], "a": 1.5})
        utils.save_nifti(tmp_path / "v.nii.gz", np.zeros((2, 2, 2)), np.eye(4))
        durable.append_csv_row(tmp_path / "m.csv", ["a"], {"a": 1})
        assert os.umask(umask) == umask  # the helper put the umask back
    finally:
        os.umask(old)
        durable.forget_umask()
    for name in ("c.json", "v.nii.gz", "m.csv"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name
    assert (tmp_path / "c.json").read_text() == '{\n  "a": 1.5,\n  "b": [\n    1,\n    2\n  ]\n}\n'


def test_write_json_refuses_unserialisable_data_before_touching_the_file(tmp_path):
    path = tmp_path / "c.json"
    durable.write_json(path, {"k": "v"})
    with pytest.raises(TypeError):
        durable.write_json(path, {"k": object()})
    assert json.loads(path.read_text()) == {"k": "v"} and os.listdir(tmp_path) == ["c.json"]


# --------------------------------------------------------------------------- #
# Resumable CSV
# --------------------------------------------------------------------------- #


def test_csv_append_round_trip_with_comments_nan_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.csv"
    assert durable.read_csv_rows(path) == (None, [])
    fields = ["subject", "psnr", "ssim", "n"]
    durable.append_csv_row(path, fields, {"subject": "s1", "psnr": 30.1234567, "ssim": np.float32(0.5), "n": 3},
                           header_lines=["upsampling_factor: 4", "checkpoint: ckpt-7"])
    durable.append_csv_row(path, fields, {"subject": "s,2", "psnr": float("nan"), "ssim": float("inf")},
                           header_lines=["ignored once the file exists"])
    text = path.read_text()
    assert text.splitlines()[:3] == ["# upsampling_factor: 4", "# checkpoint: ckpt-7", "subject,psnr,ssim,n"]
    assert "ignored" not in text
    got_fields, rows = durable.read_csv_rows(path)
    assert got_fields == fields
    assert rows == [{"subject": "s1", "psnr": "30.123457", "ssim": "0.500000", "n": "3"},
                    {"subject": "s,2", "psnr": "nan", "ssim": "inf", "n": ""}]
    # A process killed mid-append leaves a line without its newline: readers ignore it ...
    with open(path, "a") as fh:
        fh.write("s3,29.0")
    assert durable.read_csv_rows(path) == (fields, rows)
    # ... and the next append replaces it instead of gluing onto it.
    durable.append_csv_row(path, fields, {"subject": "s3", "psnr": 29.0, "ssim": 0.9, "n": 1})
    _, rows = durable.read_csv_rows(path)
    assert [r["subject"] for r in rows] == ["s1", "s,2", "s3"] and rows[2]["psnr"] == "29.000000"
    assert path.read_text().endswith("s3,29.000000,0.900000,1\n")


def test_csv_argument_and_format_checks(tmp_path):
    path = tmp_path / "m.csv"
    durable.append_csv_row(path, ["a", "b"], {"a": 1})
    with pytest.raises(ValueError, match=r"m.csv has the columns \['a', 'b'\], expected \['a', 'c'\]"):
        durable.append_csv_row(path, ["a", "c"], {"a": 1})
    with pytest.raises(ValueError, match=r"columns \['z'\]"):
        durable.append_csv_row(path, ["a", "b"], {"a": 1, "z": 2})
    with pytest.raises(ValueError, match="newlines"):
        durable.append_csv_row(path, ["a", "b"], {"a": "x\ny"})
    assert durable.read_csv_rows(path) == (["a", "b"], [{"a": "1", "b": ""}])
    # An empty file (emptied by an old non-atomic writer) is started afresh.
    path.write_text("")
    durable.append_csv_row(path, ["a"], {"a": 2})
    assert durable.read_csv_rows(path) == (["a"], [{"a": "2"}])
    # Windows line ends (csv.DictWriter's default) read too; a short row is an error naming the line.
    (tmp_path / "w.csv").write_bytes(b"a,b\r\n1,2\r\n3\r\n")
    with pytest.raises(ValueError, match=r"w.csv, line 3: 1 fields, the header has 2"):
        durable.read_csv_rows(tmp_path / "w.csv")


# --------------------------------------------------------------------------- #
# Stale temporaries
# --------------------------------------------------------------------------- #


def test_remove_stale_temporaries_removes_only_the_projects_leftovers(tmp_path):
    stale_files = [".tmp-config.json-k2j3h4", ".tmp-x_sr.nii.gz-abc.nii.gz", "checkpoint.tmp" + "0f" * 16]
    keep_files = ["checkpoint", "ckpt-3.index", "ckpt-3.data-00000-of-00001", ".srgan.lock", "metrics.csv",
                  "checkpoint.tmpXYZ", "my.tmp-file", "tmp-x"]
    for name in stale_files + keep_files:
        (tmp_path / name).write_text("x")
    (tmp_path / "ckpt-12_temp").mkdir()
    (tmp_path / "ckpt-12_temp" / "part-00000-of-00001.data-00000-of-00001.tempstate123").write_text("x")
    for name in ("ckpt-best_temp", "my_ckpt-1_temp", ".tmp-folder", "sub"):
        (tmp_path / name).mkdir()
    (tmp_path / "sub" / ".tmp-nested").write_text("x")  # recursive: removed too
    (tmp_path / "sub" / "anat").mkdir()
    (tmp_path / "sub" / "anat" / ".tmp-x_sr.nii.gz-k2.nii.gz").write_text("x")
    (tmp_path / "other_run").mkdir()  # another run's locked folder: its own cleaning
    (tmp_path / "other_run" / durable.LOCK_NAME).write_text("")
    (tmp_path / "other_run" / ".tmp-live").write_text("x")
    outside = tmp_path / "sub" / "target"
    outside.write_text("keep me")
    os.symlink(outside, tmp_path / ".tmp-link")  # a link is never followed nor removed
    os.symlink(tmp_path / "sub", tmp_path / "ckpt-4_temp")

    removed = durable.remove_stale_temporaries(tmp_path)
    expected = sorted(stale_files + ["ckpt-12_temp"])
    assert removed == [str(tmp_path / n) for n in expected] + [
        str(tmp_path / "sub" / ".tmp-nested"), str(tmp_path / "sub" / "anat" / ".tmp-x_sr.nii.gz-k2.nii.gz")]
    left = sorted(os.listdir(tmp_path))
    assert left == sorted(keep_files + ["ckpt-best_temp", "my_ckpt-1_temp", ".tmp-folder", "sub",
                                        ".tmp-link", "ckpt-4_temp", "other_run"])
    assert sorted(os.listdir(tmp_path / "sub")) == ["anat", "target"] and outside.read_text() == "keep me"
    assert (tmp_path / "other_run" / ".tmp-live").exists()
    assert durable.remove_stale_temporaries(tmp_path) == []
    assert durable.remove_stale_temporaries(tmp_path / "missing") == []


# --------------------------------------------------------------------------- #
# Run lock
# --------------------------------------------------------------------------- #

# durable imports no TensorFlow: the child process starts well under a second.
_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import durable
    durable.RunLock(sys.argv[2], "training").acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def _read_line(proc, timeout):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else None


def test_run_lock_refuses_a_second_run_until_the_holder_is_killed(tmp_path):
    folder = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, ROOT, folder, "--fake-flag"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert _read_line(proc, 30) == "locked"
        with pytest.raises(durable.LockedError) as info:
            durable.RunLock(folder, "evaluation").acquire()
        msg = str(info.value)
        for part in (folder, f"process {proc.pid}", socket.gethostname(), "training", "--fake-flag",
                     "Wait for that run to finish or choose another folder"):
            assert part in msg, (part, msg)
        record = json.loads(open(os.path.join(folder, durable.LOCK_NAME)).read())
        assert record["pid"] == proc.pid and record["started"][:2] == "20" and "T" in record["started"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    # The kernel released the dead holder's lock: no clean-up is needed.
    with durable.RunLock(folder, "resume") as lock:
        assert lock.held
        record = json.loads(open(lock.path).read())
        assert record["pid"] == os.getpid() and record["purpose"] == "resume"
    assert not lock.held and os.path.exists(lock.path)  # released, but the file stays


def test_run_lock_within_one_process(tmp_path):
    first = durable.RunLock(tmp_path, "training").acquire()
    try:
        with pytest.raises(durable.LockedError, match="already locked by this process"):
            durable.RunLock(str(tmp_path) + "/", "evaluation").acquire()
        with pytest.raises(durable.LockedError, match="already locked by this process"):
            first.acquire()
    finally:
        first.release()
    first.release()  # releasing twice is harmless
    with durable.RunLock(tmp_path, "evaluation"):
        pass


def test_run_lock_ignores_a_dead_holders_record(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    path = tmp_path / durable.LOCK_NAME
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00",
                                "purpose": "training", "command": "model.py"}))
    # Nobody holds the flock: the stale file is simply locked again.
    with durable.RunLock(tmp_path, "training"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    # A holder that has locked but not yet written its record is not confused with the dead one.
    import fcntl
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(durable.LockedError, match="has not recorded its PID yet") as info:
            durable.RunLock(tmp_path, "training").acquire()
        assert f"process {dead.pid}" not in str(info.value)
    finally:
        os.close(fd)
