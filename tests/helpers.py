"""Small helpers shared by the test modules (pytest puts tests/ on sys.path)."""

import gzip
import os

import nibabel as nib
import numpy as np
import tensorflow as tf

# The project's folder (model.py, the modules).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny geometry of most tests: 32x32x24 volumes, 20x20x16 patches, margin 2:
# 2 positions per axis, 8 patches per volume as the original; 4 filters, 1 block, x2.
TINY = ["-volume_shape", "32,32,24", "-patch_shape", "20,20,16", "-patch_margin", "2",
        "-feature_size", "4", "-residual_blocks", "1", "-upsampling_factor", "2"]


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


def checkpoint_state(folder):
    """The counters of the newest checkpoint in ``folder``: epoch, step and both optimisers' iterations."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(folder)))
    get = lambda key: int(reader.get_tensor(key))  # noqa: E731
    return {"epoch": get("epoch/.ATTRIBUTES/VARIABLE_VALUE"),
            "step": get("step/.ATTRIBUTES/VARIABLE_VALUE"),
            "g_iter": get("g_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"),
            "d_iter": get("d_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")}
