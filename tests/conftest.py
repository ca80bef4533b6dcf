"""Shared test set-up: quiet TensorFlow, project root on sys.path, deterministic seeds, demo phantoms."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, so that tests can run MirroredStrategy on a machine
# without GPUs. Must happen before anything starts TensorFlow's runtime; ops
# without a strategy still run on the first device.
CPU_REPLICAS = 2
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration() for _ in range(CPU_REPLICAS)])


@pytest.fixture(autouse=True)
def _seed_everything():
    import keras

    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Five demo phantoms of 36x38x22 (seed 3) in the ADNI layout: the dataset's folder."""
    import phantoms

    root = tmp_path_factory.mktemp("demo")
    phantoms.make_demo_data(root, subjects=5, shape=(36, 38, 22), seed=3)
    return str(root)


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """One epoch trained on 5 tiny phantoms (4 train, 1 test) through the command line's
    configuration; shared, read-only, by the tests of training, evaluation and the CLI.

    Returns:
        dict: ``root``, ``data``, ``ckpt`` (pathlib.Path), ``argv`` (the training
        flags) and ``losses`` (the epoch's mean losses).
    """
    from helpers import TINY

    import model
    import phantoms

    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    phantoms.make_demo_data(str(data), subjects=5, shape=(34, 30, 26), seed=0)
    ckpt = root / "ckpt"
    argv = ["-data_path", str(data), "-checkpoint_dir", str(ckpt), "-epochs", "1",
            "-path_prediction", str(root / "pred")] + TINY
    result = model.run(model.parse_command(argv, log=lambda *_: None), log=lambda *_: None)
    return {"root": root, "data": data, "ckpt": ckpt, "argv": argv, "losses": result["losses"]}


