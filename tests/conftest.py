"""Shared test set-up: quiet TensorFlow, project root on sys.path, deterministic seeds, demo phantoms."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

# Two logical CPU devices, so that tests can run MirroredStrategy on a machine
# without GPUs.
CPU_REPLICAS = 2


def pytest_configure(config):
    """Splits the CPU into CPU_REPLICAS logical devices in a process that runs tests.

    Before any test module starts TensorFlow's runtime; ops without a strategy
    still run on the first device. xdist's controller process runs no test and
    does not load TensorFlow (its 4 s of CPU would slow the workers' start).
    """
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import tensorflow as tf

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




# ----------------------------------------------------------------------------
# Scheduling on pytest-xdist's workers
# ----------------------------------------------------------------------------
# A session or module fixture that trains a model is built by every worker that
# runs a test using it. The tests that use one of these (directly or through
# another fixture of their file) are therefore sent to one worker together, as
# one unit of work; every other test is a unit of its own. (xdist's own
# `--dist loadgroup` cannot do this with pytest 9: it tags tests by rewriting
# item._nodeid, which pytest 9 no longer reads.)
SHARED_TRAINED_FIXTURES = ("run", "bids_run", "reference", "trained")
TESTS = os.path.dirname(os.path.abspath(__file__))


def _shared_fixture_users():
    """{"tests/test_x.py::test_name": fixture} for every test that needs one of SHARED_TRAINED_FIXTURES.

    Read from the test files' source (the controller process collects no tests):
    a test's arguments, and the arguments of its file's fixtures, transitively.
    """
    import ast

    users = {}
    for name in sorted(os.listdir(TESTS)):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        with open(os.path.join(TESTS, name), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        functions = {node.name: [a.arg for a in node.args.args] for node in tree.body
                     if isinstance(node, ast.FunctionDef)}
        for function in functions:
            if function.startswith("test_"):
                fixture = _needs(function, functions)
                if fixture:
                    users[f"tests/{name}::{function}"] = fixture
    return users


def _needs(function, functions, seen=()):
    """The shared trained fixture ``function`` needs (through its file's ``functions``), or None."""
    for arg in functions.get(function, ()):
        if arg in SHARED_TRAINED_FIXTURES:
            return arg
        if arg in functions and arg not in seen:  # a fixture of this file
            found = _needs(arg, functions, (*seen, function))
            if found:
                return found
    return None


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    users = _shared_fixture_users()

    class SharedFixtureScheduling(LoadScopeScheduling):
        """One unit per shared trained fixture (all its tests), one per other test.

        Units are handed out largest first (xdist's default for scopes), so the
        groups, which hold the longest work, start at once.
        """

        def _split_scope(self, nodeid):
            test = nodeid.split("[")[0]
            return f"fixture:{users[test]}" if test in users else nodeid

    return SharedFixtureScheduling(config, log)
