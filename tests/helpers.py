"""Small helpers shared by the test modules (pytest puts tests/ on sys.path)."""

import gzip
import os

import nibabel as nib
import numpy as np


class Log:
    """Collects log messages: a ``log`` callable whose lines can be read back."""

    def __init__(self):
        self.lines = []

    def __call__(self, msg):
        self.lines.append(str(msg))

    @property
    def text(self):
        return "\n".join(self.lines)


def write_nifti(path, data, affine=None, dtype=np.float32):
    """Writes ``data`` as a NIfTI file (identity affine by default), creating its folder; returns ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.eye(4) if affine is None else affine)
    nib.save(img, path)
    return path


def huge_claim(path, shape=(1000, 1000, 1000)):
    """Writes a tiny NIfTI whose header claims ``shape`` (float32) but holds almost no data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    payload = hdr.binaryblock + b"\0" * 4 + b"\0" * 64
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(payload)
    return str(path)
