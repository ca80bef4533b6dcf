"""3D SRGAN for brain MRI: training, evaluation and super-resolution command line.

    python model.py -demo True                                   # end to end on phantoms
    python model.py -data_path DATA -checkpoint_dir CKPT         # train
    python model.py -data_path DATA -checkpoint_dir CKPT -restore CKPT -epochs 20   # resume
    python model.py -evaluate True -checkpoint_dir_restore CKPT -path_volumes OUT  # test set
    python model.py -super_resolve scan.nii.gz -checkpoint_dir_restore CKPT        # a real scan

The single-dash flags of the original (Sánchez & Vilaplana, MIDL 2018) keep their
spelling and defaults; ``--flag`` works too. Argument parsing stays here: the
functions below take plain arguments and read no global state.
"""

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import pathlib
import re
import os
import shutil
import signal
import sys
import tempfile
import threading
import time


def _verbose_requested(argv):
    """Whether the command line asks for -verbose (read before argparse runs:
    TensorFlow is imported, and prints, before the flags are parsed)."""
    for i, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        if name in ("-verbose", "--verbose"):
            if not sep:
                following = argv[i + 1] if i + 1 < len(argv) else ""
                value = "true" if not following or following.startswith("-") else following
            return value.strip().lower() in ("true", "1", "yes", "y", "t")
    return False


@contextlib.contextmanager
def native_stderr_hidden(hidden=True):
    """Hides what native code writes to file descriptor 2 inside the block.

    TensorFlow 2.21 prints absl lines (oneDNN notices, "could not find cuda
    drivers", "failed call to cuInit") straight to the descriptor while it
    loads, lists its devices or starts a runtime for a strategy, whatever
    TF_CPP_MIN_LOG_LEVEL says; only redirecting the descriptor silences them.
    Python's own sys.stderr is flushed first and works again afterwards.
    """
    if not hidden:
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _import_tensorflow_quietly(verbose):
    """Imports TensorFlow with its C++ start-up lines hidden unless ``verbose``."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_hidden(not verbose):
        import tensorflow as tf
        tf.config.list_physical_devices()
    if not verbose:
        tf.get_logger().setLevel(logging.ERROR)
    return tf


tf = _import_tensorflow_quietly(_verbose_requested(sys.argv[1:]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import durable  # noqa: E402
import layouts  # noqa: E402
import networks  # noqa: E402
import nifti_io  # noqa: E402
import phantoms  # noqa: E402
import train_dataset as td  # noqa: E402
import utils  # noqa: E402

CONFIG_NAME = "config.json"
SPLIT_NAME = "split.json"
# Inverse time decay of the original: lr = 1e-4 / (1 + 0.5 * step / 4920).
DECAY_STEPS = 4920
DECAY_RATE = 0.5

# -mixed_precision values and the Keras dtype policies they select.
PRECISION_POLICIES = {"none": None, "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}

# Every command-line flag and its built-in default (None: derived, see -h).
DEFAULTS = {
    "data_path": "data",
    "checkpoint_dir": "checkpoints",
    "checkpoint_dir_restore": None,
    "path_prediction": None,  # <checkpoint_dir>/predictions
    "path_volumes": None,  # <checkpoint_dir_restore>/volumes
    "log_dir": None,  # <checkpoint_dir>/logs
    "restore": None,
    "residual_blocks": 6,
    "upsampling_factor": 4,
    "feature_size": 32,
    "subpixel_NN": False,
    "nn": False,
    "evaluate": False,
    "epochs": 10,
    "batch_size": 2,
    "volume_shape": (224, 224, 152),
    "patch_shape": (128, 128, 92),
    "patch_margin": 16,
    "sigma": 1.0,
    "train_fraction": 0.8,
    "learning_rate": 1e-4,
    "pretrain_steps": 0,
    "checkpoint_minutes": 30.0,
    "checkpoint_steps": 0,
    "keep_checkpoints": 3,
    "seed": 0,
    "image_name": layouts.IMAGE_NAME,
    "mask_name": layouts.MASK_NAME,
    "super_resolve": None,
    "demo": False,
    "run_eagerly": False,
    "mixed_precision": "none",
    "gpus": None,
    "xla": False,
    "verbose": False,
    # Data layouts and inference options (evaluation and -super_resolve).
    "bids_filter": None,
    "output_layout": "auto",
    "blend": "crop",
    "tta": "none",
}

# The two boolean flags of the original that choose the upsampling mode; the
# rest of the program only knows the one setting "upsampling_mode".
MODE_FLAGS = ("subpixel_NN", "nn")

# How each setting travels through a run's config.json, the one table of what
# is persisted (a setting not listed here is not written):
#   ARCHITECTURE: a resumed, evaluated or super-resolving run takes it from the
#       checkpoint; an explicit flag that contradicts it is an error.
#   RESUMED: like ARCHITECTURE when training resumes (mixed precision: the
#       loss-scale state lives in the checkpoint); free for evaluation.
#   RUN: taken from the checkpoint unless the flag is given.
ARCHITECTURE, RESUMED, RUN = "architecture", "resumed", "run"
PERSISTED = {
    "upsampling_factor": ARCHITECTURE,
    "residual_blocks": ARCHITECTURE,
    "feature_size": ARCHITECTURE,
    "upsampling_mode": ARCHITECTURE,
    "volume_shape": ARCHITECTURE,
    "patch_shape": ARCHITECTURE,
    "patch_margin": ARCHITECTURE,
    "sigma": ARCHITECTURE,
    "mixed_precision": RESUMED,
    "data_path": RUN,
    "image_name": RUN,
    "mask_name": RUN,
    "bids_filter": RUN,
    "train_fraction": RUN,
    "seed": RUN,
    "batch_size": RUN,
    "learning_rate": RUN,
    "pretrain_steps": RUN,
    "checkpoint_minutes": RUN,
    "checkpoint_steps": RUN,
    "keep_checkpoints": RUN,
    "epochs": RUN,
}

# The demo's small configuration; explicit flags still win.
DEMO = {
    "data_path": os.path.join("demo", "data"),
    "checkpoint_dir": os.path.join("demo", "checkpoints"),
    "path_prediction": os.path.join("demo", "predictions"),
    "path_volumes": os.path.join("demo", "volumes"),
    "log_dir": os.path.join("demo", "logs"),
    "volume_shape": (64, 64, 48),
    "patch_shape": (36, 36, 28),  # 8 patches per volume, as the original geometry
    "patch_margin": 4,
    "upsampling_factor": 2,
    "residual_blocks": 2,
    "feature_size": 16,
    "epochs": 10,
}
DEMO_SUBJECTS = 10
DEMO_SHAPE = (72, 76, 56)


class UserError(Exception):
    """A mistake in the command line or the files it names; reported without a traceback."""


# Exit codes besides 0: 2 a user's mistake or a failed read/write (the message
# says what to fix), 3 training diverged, 128 + N a stop signal N (143 for
# SIGTERM, 138 for SIGUSR1), 130 Ctrl-C.
EXIT_ERROR = 2
EXIT_DIVERGED = 3


class RunStopped(Exception):
    """A run that stopped on purpose: a stop signal, divergence, a failed read or write.

    Its message is the paragraph a person reads: what happened, what was
    saved, how to continue. ``exit_code`` is the process's exit status.
    """

    def __init__(self, message, exit_code=EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def str2bool(value):
    """Parses True/False, 1/0, yes/no (any case) into a bool.

    Raises:
        argparse.ArgumentTypeError: for anything else (argparse names the flag).
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "t"):
        return True
    if text in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(
        f"expected a boolean (True/False, 1/0, yes/no), got {value!r}")


def parse_shape(value):
    """Parses ``"224,224,152"`` or ``"224x224x152"`` into a tuple of three positive ints."""
    parts = str(value).lower().replace("x", ",").replace(" ", "").split(",")
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected three positive integers such as 224,224,152, got {value!r}")
    return shape


def _number(kind, minimum, strict, maximum=None):
    """An argparse type for finite numbers of ``kind`` above ``minimum`` (and up to ``maximum``)."""
    words = f"a {'positive' if strict else 'non-negative'} {'number' if kind is float else 'integer'}"
    if maximum is not None:
        words += f" up to {maximum}"

    def parse(value):
        try:
            number = kind(value)
        except ValueError:
            number = None
        ok = number is not None and math.isfinite(number) and (
            number > minimum if strict else number >= minimum) and (maximum is None or number <= maximum)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {words}, got {value!r}")
        return number
    parse.__name__ = kind.__name__
    return parse


def _positive(kind):
    return _number(kind, 0, strict=True)


def _non_negative(kind):
    return _number(kind, 0, strict=False)


_non_negative_int = _non_negative(int)
# numpy's and TensorFlow's seeds are 32-bit.
_seed = _number(int, 0, strict=False, maximum=2 ** 32 - 1)


def upsampling_mode_from_flags(subpixel_NN=False, nn=False):
    """The upsampling mode the original's two boolean flags select.

    Args:
        subpixel_NN: bool, checkerboard-free sub-pixel (wins over ``nn``, as in
            the original).
        nn: bool, resize-convolution.

    Returns:
        One of ``networks.UPSAMPLING_MODES``.
    """
    if subpixel_NN:
        return "subpixel_NN"
    return "nn" if nn else "subpixel"


def _mode_flags_text(mode):
    return f"-subpixel_NN {mode == 'subpixel_NN'} -nn {mode == 'nn'}"


def build_parser():
    """The argparse parser: the original's single-dash flags plus the port's.

    Every default is ``None`` so that :func:`resolve_config` can tell an explicit
    flag from a default (a checkpoint's saved configuration fills the gaps).
    """
    parser = argparse.ArgumentParser(
        prog="model.py",
        description="3D SRGAN for brain MRI super-resolution (TensorFlow 2 port of "
                    "Sanchez & Vilaplana, MIDL 2018). Trains by default; -evaluate True "
                    "tests a checkpoint, -super_resolve FILE upsamples a scan, -demo True "
                    "runs everything on synthetic phantoms.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None)

    def add(name, help, shown=None, **kwargs):
        default = DEFAULTS[name]
        if shown is None:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(f"-{name}", f"--{name}", dest=name, default=None,
                            help=f"{help} (default: {shown})", **kwargs)

    def add_bool(name, help):
        add(name, help, type=str2bool, nargs="?", const=True, metavar="BOOL")

    add("path_prediction", "folder for the HR/LR/SR patches written during training",
        shown="<checkpoint_dir>/predictions", metavar="DIR")
    add("path_volumes", "folder for evaluation and -super_resolve outputs",
        shown="<checkpoint_dir_restore>/volumes", metavar="DIR")
    add("checkpoint_dir", "folder for training checkpoints, config.json and split.json", metavar="DIR")
    add("checkpoint_dir_restore", "checkpoint folder to evaluate or super-resolve with", metavar="DIR")
    add("restore", "resume training from the latest checkpoint in this folder", metavar="DIR")
    add("residual_blocks", "number of residual blocks", type=_non_negative_int, metavar="N")
    add("upsampling_factor", "upsampling factor, a power of two (2, 4, 8)", type=_positive(int), metavar="F")
    add("feature_size", "filters of the residual trunk", type=_positive(int), metavar="N")
    add_bool("subpixel_NN", "checkerboard-free sub-pixel upsampling (wins over -nn)")
    add_bool("nn", "resize-convolution upsampling (nearest neighbour + conv)")
    add_bool("evaluate", "evaluate -checkpoint_dir_restore on the test split")
    add("data_path", "dataset: a folder (one sub-folder per subject, NIfTI files, or a BIDS "
        "dataset) or a .csv file list", metavar="PATH")
    add("image_name", "image file name inside each subject folder", metavar="NAME")
    add("mask_name", "brain mask file name inside each subject folder (absent: image > 0); for "
        "BIDS a pattern in anat/ (default: the *_desc-brain_mask convention)", metavar="NAME")
    add("epochs", "total epochs to reach (a resumed run continues up to this)", type=_positive(int), metavar="N")
    add("batch_size", "patches per batch (8 patches per volume: 4 batches)", type=_positive(int), metavar="N")
    add("volume_shape", "canonical volume every scan is padded/cropped to", type=parse_shape, metavar="X,Y,Z")
    add("patch_shape", "HR training patch", type=parse_shape, metavar="X,Y,Z")
    add("patch_margin", "patch margin; patches step by patch - 2*margin", type=_non_negative_int, metavar="N")
    add("sigma", "Gaussian blur (voxels) of the degradation before decimation; evaluation uses "
        "the training's value", type=_non_negative(float), metavar="S")
    add("train_fraction", "fraction of the sorted subjects used for training", type=_positive(float), metavar="P")
    add("learning_rate", "initial Adam learning rate, decayed as lr/(1+0.5*step/4920)",
        type=_positive(float), metavar="LR")
    add("pretrain_steps", "first N steps train the generator alone on the content loss (sum of "
        "squared errors + gradient difference, no adversarial term, discriminator untouched); "
        "0 = the original recipe", type=_non_negative_int, metavar="N")
    add("checkpoint_minutes", "also checkpoint inside an epoch every this many minutes of training "
        "(0: off); every epoch ends with one anyway", type=_non_negative(float), metavar="MIN")
    add("checkpoint_steps", "also checkpoint every this many steps (0: off)", type=_non_negative_int,
        metavar="N")
    add("keep_checkpoints", "checkpoints kept in -checkpoint_dir (the newest)", type=_positive(int),
        metavar="N")
    add("seed", "random seed (weights, data order, label noise), 0 to 2**32-1", type=_seed, metavar="N")
    add("log_dir", "TensorBoard folder", shown="<checkpoint_dir>/logs", metavar="DIR")
    add("super_resolve", "super-resolve these low-resolution NIfTI scans as they are (files, "
        "folders, BIDS datasets or .csv lists)", nargs="+", metavar="PATH")
    add_bool("demo", "make phantoms in ./demo and run a small train + evaluate end to end")
    add_bool("run_eagerly", "run the training step eagerly (debugging; slow)")
    add("mixed_precision", "compute in float16 (with loss scaling) or bfloat16 on GPUs that "
        "support it; weights, losses and outputs stay float32", choices=tuple(PRECISION_POLICIES))
    add("gpus", "devices to use: GPU indices such as 0,1 (several: MirroredStrategy), cpu, or "
        "cpu:N (N CPU replicas, to try the distributed path without GPUs); TF_CONFIG or a "
        "SLURM step of several tasks trains on several machines",
        shown="every visible GPU", type=parse_gpus, metavar="LIST")
    add_bool("xla", "compile the training step with XLA (jit_compile; one device only)")
    add_bool("verbose", "show TensorFlow's own start-up and warning lines")
    add("bids_filter", "BIDS data: keep the T1w files whose names carry all these entities, "
        "comma-separated, e.g. desc-brain or acq-mprage,run-01", shown="none", metavar="ENTITIES")
    add("output_layout", "names of the evaluation and -super_resolve outputs: bids (a BIDS "
        "derivatives dataset), plain (<subject>_sr.nii.gz), auto (bids for BIDS input)",
        choices=OUTPUT_LAYOUTS)
    add("blend", "-evaluate/-super_resolve: merge overlapping patches by crop (the original's) "
        "or gaussian weights", choices=td.BLEND_MODES)
    add("tta", "-evaluate/-super_resolve test-time augmentation: flip also super-resolves the "
        "left-right mirrored volume and averages", choices=TTA_MODES)
    return parser


def _read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}")


def _write_json(path, data):
    durable.write_json(path, data)


def _flag(name, value):
    if name == "upsampling_mode":
        return f"upsampling mode {value!r} ({_mode_flags_text(value)})"
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"-{name} {value}"


def _to_json(value):
    return list(value) if isinstance(value, tuple) else value


def _from_json(value):
    return tuple(value) if isinstance(value, list) else value


def given_settings(args):
    """The settings given explicitly on the command line, booleans translated.

    The original's ``-subpixel_NN``/``-nn`` pair becomes the one setting
    ``upsampling_mode`` here, and nowhere else.

    Args:
        args: ``argparse.Namespace`` from :func:`build_parser` (None = not given).

    Returns:
        dict of the given settings.
    """
    given = {k: v for k, v in vars(args).items() if v is not None}
    if any(flag in given for flag in MODE_FLAGS):
        given["upsampling_mode"] = upsampling_mode_from_flags(
            given.get("subpixel_NN", False), given.get("nn", False))
    for flag in MODE_FLAGS:
        given.pop(flag, None)
    return given


def _action(given):
    action = ("super_resolve" if given.get("super_resolve") else
              "evaluate" if given.get("evaluate") else "train")
    if given.get("demo") and (action != "train" or given.get("restore")):
        raise UserError("-demo True runs its own training and evaluation from scratch; "
                        "drop -evaluate/-super_resolve/-restore")
    return action


def _checkpoint_source(given, action):
    """The checkpoint folder a command reads (None for a fresh training run)."""
    if action in ("evaluate", "super_resolve"):
        source = given.get("checkpoint_dir_restore")
        if not source:
            raise UserError(f"-{'evaluate True' if action == 'evaluate' else 'super_resolve'} needs "
                            "-checkpoint_dir_restore DIR, the folder of a trained checkpoint")
        return source
    return given.get("restore")


def _saved_settings(source, log):
    """The config.json of a checkpoint folder (None when it has none)."""
    if not os.path.exists(source):
        raise UserError(f"checkpoint folder {source!r} does not exist")
    if not os.path.isdir(source):
        raise UserError(f"checkpoint folder {source!r} is a file, not a folder")
    if tf.train.latest_checkpoint(source) is None:
        raise UserError(f"checkpoint folder {source!r} holds no checkpoint "
                        "(expected the files written by a training run: checkpoint, ckpt-N.index)")
    saved = _read_json(os.path.join(source, CONFIG_NAME))
    if saved is None:
        log(f"note: {source} has no {CONFIG_NAME}; using the architecture flags as given")
    return saved


def adopt_saved_settings(cfg, saved, given, action, source):
    """Fills ``cfg`` from a checkpoint's config.json by the ``PERSISTED`` table.

    Args:
        cfg: the settings so far (defaults, demo preset, given flags); updated.
        saved: the checkpoint's config.json dict.
        given: the explicit settings.
        action: "train" (resume), "evaluate" or "super_resolve".
        source: the checkpoint folder (for the message).

    Raises:
        UserError: naming every explicit flag that contradicts the checkpoint.
    """
    mismatched = []
    for key, kind in PERSISTED.items():
        if key not in saved:
            continue
        value = _from_json(saved[key])
        binding = kind == ARCHITECTURE or (kind == RESUMED and action == "train")
        if not binding and kind != RUN:
            continue
        if key in given:
            if binding and given[key] != value:
                mismatched.append(f"{_flag(key, given[key])}, the checkpoint uses {_flag(key, value)}")
            if kind == RUN:
                continue
        cfg[key] = value
    if mismatched:
        raise UserError(
            f"the architecture flags do not match the checkpoint in {source!r} "
            f"(from its {CONFIG_NAME}): " + "; ".join(mismatched) +
            ". Pass the checkpoint's values or leave these flags out to use them.")


def resolve_config(args, log=print):
    """Turns parsed flags into one plain configuration dict, checking it all.

    Precedence: explicit flag > the saved configuration of the checkpoint being
    restored or evaluated (by the ``PERSISTED`` table) > the demo preset > the
    built-in default.

    Args:
        args: ``argparse.Namespace`` from :func:`build_parser` (``None`` = not given).
        log: callable for notes.

    Returns:
        dict with every setting of ``DEFAULTS`` (the two mode flags replaced by
        ``upsampling_mode``) plus ``action``, ``explicit`` (the settings given),
        ``saved_config`` and ``source_checkpoint``.

    Raises:
        UserError: for contradictory, missing or invalid settings.
    """
    given = given_settings(args)
    action = _action(given)
    cfg = {k: v for k, v in DEFAULTS.items() if k not in MODE_FLAGS}
    cfg["upsampling_mode"] = upsampling_mode_from_flags()
    if given.get("demo"):
        cfg.update(DEMO)
    source = _checkpoint_source(given, action)
    saved = _saved_settings(source, log) if source is not None else None
    cfg.update(given)
    if saved is not None:
        adopt_saved_settings(cfg, saved, given, action, source)
    cfg.update({"action": action, "explicit": sorted(given), "saved_config": saved,
                "source_checkpoint": source})
    if action == "train" and given.get("restore") and "checkpoint_dir" not in given:
        cfg["checkpoint_dir"] = given["restore"]
    if cfg["path_prediction"] is None:
        cfg["path_prediction"] = os.path.join(cfg["checkpoint_dir"], "predictions")
    if cfg["log_dir"] is None:
        cfg["log_dir"] = os.path.join(cfg["checkpoint_dir"], "logs")
    if cfg["path_volumes"] is None:
        cfg["path_volumes"] = os.path.join(source or cfg["checkpoint_dir"], "volumes")
    if args.subpixel_NN and args.nn:
        log("note: both -subpixel_NN and -nn are set; subpixel_NN wins, as in the original")
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Checks a resolved configuration before any work starts.

    Raises:
        UserError: naming the flag and the value.
    """
    _check_geometry(cfg)
    action = cfg["action"]
    if (action == "train" and cfg["mixed_precision"] == "bfloat16"
            and not tf.config.list_physical_devices("GPU")):
        # Measured with TF 2.21: oneDNN's bfloat16 conv3d gradients on CPU turn
        # NaN now and then (2-3 of 80 tiny runs; none with TF_ENABLE_ONEDNN_OPTS=0).
        raise UserError("-mixed_precision bfloat16 needs a GPU for training: on the CPU, "
                        "TensorFlow's bfloat16 3-D convolution gradients intermittently turn NaN "
                        "and would corrupt the run. Use -mixed_precision none (or float16) here.")
    if not 0 < cfg["train_fraction"] <= 1:
        raise UserError(f"-train_fraction {cfg['train_fraction']} must be in (0, 1]")
    _check_inference_options(cfg)
    if action == "train" and not cfg["demo"]:
        if not os.path.exists(cfg["data_path"]):
            raise UserError(f"-data_path {cfg['data_path']!r} does not exist; pass the folder that "
                            "holds one sub-folder per subject (or NIfTI files), or try -demo True")


def _check_geometry(cfg):
    f = cfg["upsampling_factor"]
    try:
        networks.upsampling_stages(f)
    except ValueError as err:
        raise UserError(f"-upsampling_factor: {err}")
    volume, patch, margin = cfg["volume_shape"], cfg["patch_shape"], cfg["patch_margin"]
    for name, shape in (("volume_shape", volume), ("patch_shape", patch)):
        if any(n % f for n in shape):
            raise UserError(f"-{name} {','.join(map(str, shape))} must be divisible by "
                            f"-upsampling_factor {f} on every axis")
    if margin % f:
        raise UserError(f"-patch_margin {margin} must be divisible by -upsampling_factor {f}")
    if any(p > v for p, v in zip(patch, volume)):
        raise UserError(f"-patch_shape {patch} is larger than -volume_shape {volume}")
    if any(p - 2 * margin < 1 for p in patch):
        raise UserError(f"-patch_margin {margin} leaves no step in -patch_shape {patch} "
                        "(needs patch - 2*margin >= 1 on every axis)")


def _check_writable(folder, flag):
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


# --------------------------------------------------------------------------- #
# Devices and strategies (tf.distribute)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run computes: one device, the GPUs of this machine, or several machines.

    Attributes:
        strategy: None (one device: no strategy, the plain path) or a
            ``tf.distribute.MirroredStrategy`` / ``MultiWorkerMirroredStrategy``.
        devices: the local devices the strategy mirrors over.
        workers: number of machines (processes) training together.
        worker_index: this process's index among them; 0 is the chief, which
            alone writes checkpoints, logs and previews.
    """

    strategy: object = None
    devices: tuple = ()
    workers: int = 1
    worker_index: int = 0

    @property
    def replicas(self):
        """int, replicas in sync (devices over every worker)."""
        return self.strategy.num_replicas_in_sync if self.strategy is not None else 1

    @property
    def is_chief(self):
        return self.worker_index == 0

    @property
    def name(self):
        if self.strategy is None:
            return "none (one device)"
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return "MultiWorkerMirroredStrategy"  # its class is CollectiveAllReduceStrategy
        return type(self.strategy).__name__

    def describe(self):
        """One line for the start of a run."""
        if self.strategy is None:
            return "strategy: none (one device)"
        where = f" over {', '.join(self.devices)}" if self.devices else ""
        workers = f", worker {self.worker_index} of {self.workers}" if self.workers > 1 else ""
        return f"strategy: {self.name}{where}, {self.replicas} replicas{workers}"


def parse_gpus(value):
    """Parses -gpus: ``"0,1"`` (GPU indices), ``"cpu"`` or ``"cpu:N"`` (N CPU replicas).

    Returns:
        ("gpu", tuple of indices) or ("cpu", replicas).

    Raises:
        argparse.ArgumentTypeError: for anything else.
    """
    text = str(value).strip().lower()
    try:
        if text.startswith("cpu"):
            count = int(text[4:]) if text.startswith("cpu:") else 1
            if text not in ("cpu", f"cpu:{count}") or count < 1:
                raise ValueError
            return "cpu", count
        indices = tuple(int(p) for p in text.split(","))
        if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
            raise ValueError
        return "gpu", indices
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected GPU indices such as 0,1, or cpu, or cpu:N, got {value!r}") from None


def read_tf_config(text):
    """Checks a TF_CONFIG value (the multi-worker cluster description).

    Returns:
        (workers, task_index): the number of training processes and this one's
        index, the chief first.

    Raises:
        UserError: naming what is wrong with it.
    """
    try:
        config = json.loads(text)
    except ValueError as err:
        raise UserError(f"TF_CONFIG is not valid JSON ({err}); expected e.g. "
                        '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                        '"task": {"type": "worker", "index": 0}}')
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UserError("TF_CONFIG needs a \"cluster\" object and a \"task\" object, got "
                        f"{text[:200]!r}")
    jobs = {name: hosts for name, hosts in cluster.items() if name in ("chief", "worker")}
    if not jobs or any(not isinstance(h, list) or not h for h in jobs.values()):
        raise UserError(f"TF_CONFIG's cluster needs a non-empty \"worker\" (and optionally "
                        f"\"chief\") list of host:port, got {cluster!r}")
    kind, index = task.get("type"), task.get("index")
    if kind not in jobs or not isinstance(index, int) or not 0 <= index < len(jobs[kind]):
        raise UserError(f"TF_CONFIG's task {task!r} does not name one of its cluster's "
                        f"{', '.join(f'{k}[0..{len(v) - 1}]' for k, v in jobs.items())}")
    chiefs = len(jobs.get("chief", []))
    workers = chiefs + len(jobs.get("worker", []))
    return workers, (index if kind == "chief" else chiefs + index)


def _slurm_tasks(environ):
    try:
        return int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    except ValueError:
        return 1


def choose_placement(gpus=None, multi_worker=True, environ=None, log=print, verbose=False):
    """Chooses the strategy from the machine and the environment.

    One visible device: no strategy (the plain path). Several visible GPUs:
    ``MirroredStrategy`` over them (``gpus`` picks which). ``TF_CONFIG`` set,
    or a SLURM step of several tasks: ``MultiWorkerMirroredStrategy`` (only
    when ``multi_worker``: evaluation uses this machine alone). Must run before
    TensorFlow starts its runtime (device visibility is fixed then).

    Args:
        gpus: None (all visible GPUs) or a :func:`parse_gpus` result.
        multi_worker: bool, allow a multi-worker strategy.
        environ: the environment (default ``os.environ``).
        log: callable for notes.
        verbose: bool, let TensorFlow's start-up lines through.

    Returns:
        A :class:`Placement`.

    Raises:
        UserError: a missing GPU, a malformed TF_CONFIG, a runtime already started.
    """
    with native_stderr_hidden(not verbose):
        return _choose_placement(gpus, multi_worker, os.environ if environ is None else environ, log)


def _choose_placement(gpus, multi_worker, environ, log):
    physical = tf.config.list_physical_devices("GPU")
    try:
        if gpus is not None and gpus[0] == "cpu":
            if physical:
                tf.config.set_visible_devices([], "GPU")
            return _cpu_placement(gpus[1])
        if gpus is not None:
            missing = [i for i in gpus[1] if i >= len(physical)]
            if missing:
                raise UserError(f"-gpus {','.join(map(str, gpus[1]))}: no GPU {missing[0]} on this "
                                f"machine (it has {len(physical)} GPU(s)"
                                f"{': ' + ','.join(map(str, range(len(physical)))) if physical else ''}; "
                                "-gpus cpu forces the CPU)")
            tf.config.set_visible_devices([physical[i] for i in gpus[1]], "GPU")
            physical = [physical[i] for i in gpus[1]]
    except RuntimeError as err:
        raise UserError(f"-gpus must take effect before TensorFlow starts its runtime: {err}")
    if multi_worker and environ.get("TF_CONFIG"):
        workers, index = read_tf_config(environ["TF_CONFIG"])
        if workers > 1:
            return _multi_worker_placement(
                tf.distribute.cluster_resolver.TFConfigClusterResolver(), workers, index)
        log("note: TF_CONFIG describes one process; training on this machine alone")
    elif multi_worker and environ.get("SLURM_JOB_ID") and _slurm_tasks(environ) > 1:
        try:
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
            index = int(environ.get("SLURM_PROCID", 0))
        except (RuntimeError, ValueError, KeyError, OSError) as err:
            raise UserError(f"cannot read the SLURM allocation for multi-worker training: {err}")
        return _multi_worker_placement(resolver, _slurm_tasks(environ), index)
    elif environ.get("TF_CONFIG") and not multi_worker:
        log("note: TF_CONFIG is ignored: evaluation and -super_resolve use this machine's GPUs only")
    if len(physical) > 1:
        devices = tuple(f"/gpu:{i}" for i in range(len(physical)))
        return Placement(_mirrored_strategy(devices), devices)
    return Placement()


# One MirroredStrategy per set of devices and process: two strategies over the
# same devices in one process draw colliding collective keys (TF 2.21 aborts
# with "Shape mismatch in the collective instance"), which happens to a Python
# session or a test suite that trains twice.
_MIRRORED = {}


def _mirrored_strategy(devices):
    if devices not in _MIRRORED:
        _MIRRORED[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _MIRRORED[devices]


def _cpu_placement(replicas):
    """No strategy for one CPU replica; a MirroredStrategy over logical CPUs for more.

    Several CPU replicas exercise the distributed code on a machine without
    GPUs (slower than one; for testing and debugging).
    """
    if replicas == 1:
        return Placement()
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu) or []
    if len(current) != replicas:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
        except RuntimeError as err:
            raise UserError(f"-gpus cpu:{replicas} must take effect before TensorFlow starts its "
                            f"runtime (it runs with {max(len(current), 1)} CPU device(s)): {err}")
    devices = tuple(f"/cpu:{i}" for i in range(replicas))
    return Placement(_mirrored_strategy(devices), devices)


def _multi_worker_placement(resolver, workers, index):
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"cannot start multi-worker training: {err}")
    devices = tuple(d.name for d in tf.config.list_logical_devices("GPU")) or ("/cpu:0",)
    return Placement(strategy, devices, workers, index)


# --------------------------------------------------------------------------- #
# Checkpoint schedule and stop requests
# --------------------------------------------------------------------------- #


class CheckpointPolicy:
    """When to checkpoint inside an epoch: every ``minutes`` of training and/or every ``steps`` steps.

    The end of every epoch is a checkpoint anyway; this adds the ones inside
    long epochs, so a killed run loses minutes, not an epoch.

    Args:
        minutes: float >= 0; 0 turns the timer off.
        steps: int >= 0; 0 turns the step interval off.
        clock: callable returning seconds (monotonic), for tests.
    """

    def __init__(self, minutes=30.0, steps=0, clock=time.monotonic):
        self.seconds = float(minutes) * 60.0
        self.steps = int(steps)
        self.clock = clock
        self.last = clock()

    def due(self, step):
        """bool, whether a checkpoint is due after ``step`` (1-based)."""
        by_steps = self.steps > 0 and step % self.steps == 0
        by_time = self.seconds > 0 and self.clock() - self.last >= self.seconds
        return by_steps or by_time

    def saved(self):
        """Restarts the timer (a checkpoint was just written)."""
        self.last = self.clock()


class StopSignals:
    """SIGTERM and SIGUSR1 as a request to checkpoint and stop, inside a ``with`` block.

    SLURM and Kubernetes send SIGTERM before they kill a pre-empted job;
    ``sbatch --signal=USR1@120`` sends SIGUSR1 ahead of the time limit. The
    handler only records the signal: the training loop checkpoints at the next
    step boundary and stops. Handlers are installed in the main thread only
    and the previous ones restored on exit.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False


# --------------------------------------------------------------------------- #
# Losses (SPEC section 3)
# --------------------------------------------------------------------------- #


def draw_targets(seed, step, batch_size):
    """Least-squares GAN targets with label smoothing and 10 % label flips, for one step.

    A stateless draw from ``(seed, step)``: every replica of a distributed step
    computes the same targets for the global batch and takes its own rows, and
    a resumed run draws exactly what the uninterrupted run would have.

    Args:
        seed: int scalar, the run's seed.
        step: int scalar, the number of steps taken before this one.
        batch_size: int scalar, the global batch size b.

    Returns:
        (t_real, t_fake, flipped, t_gen): float32 (b, 1) targets drawn from
        U(0.7, 1.2) and U(0, 0.3), swapped when ``flipped`` (a bool scalar, true
        with probability 0.1); t_gen float32 (b, 1) from U(0.7, 1.2), the
        generator's adversarial target.
    """
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    keys = tf.random.experimental.stateless_split(key, 4)
    shape = tf.stack([tf.cast(batch_size, tf.int32), 1])
    t_real = tf.random.stateless_uniform(shape, keys[0], 0.7, 1.2)
    t_fake = tf.random.stateless_uniform(shape, keys[1], 0.0, 0.3)
    flipped = tf.random.stateless_uniform((), keys[2]) < 0.1
    t_gen = tf.random.stateless_uniform(shape, keys[3], 0.7, 1.2)
    t_real, t_fake = tf.where(flipped, t_fake, t_real), tf.where(flipped, t_real, t_fake)
    return t_real, t_fake, flipped, t_gen


def _mean(squares, global_batch):
    # One replica's share of a mean over the global batch: the replicas' shares
    # (and their gradients, which tf.distribute sums) add up to the mean.
    if global_batch is None:
        return tf.reduce_mean(squares)
    return tf.reduce_sum(squares) / tf.cast(global_batch, squares.dtype)


def discriminator_loss(d_real, d_fake, t_real, t_fake, global_batch=None):
    """``mean((D(HR) - t_real)^2) + mean((D(G) - t_fake)^2)`` on logits (b, 1).

    Args:
        d_real, d_fake, t_real, t_fake: float32 (b, 1).
        global_batch: None on one device; under a strategy, the global batch
            size, so that this replica's loss is its share of the mean.

    Returns:
        float32 scalar.
    """
    return (_mean(tf.square(d_real - t_real), global_batch)
            + _mean(tf.square(d_fake - t_fake), global_batch))


def gradient_difference_loss(hr, sr):
    """Sum over the three spatial axes of ``sum((|Δ hr| - |Δ sr|)^2)``, Δ the forward difference.

    Args:
        hr, sr: float32 (b, x, y, z, 1).

    Returns:
        float32 scalar, summed over batch and voxels.
    """
    total = 0.0
    for axis in (1, 2, 3):
        n = tf.shape(hr)[axis]
        d_hr = tf.gather(hr, tf.range(1, n), axis=axis) - tf.gather(hr, tf.range(0, n - 1), axis=axis)
        d_sr = tf.gather(sr, tf.range(1, n), axis=axis) - tf.gather(sr, tf.range(0, n - 1), axis=axis)
        total += tf.reduce_sum(tf.square(tf.abs(d_hr) - tf.abs(d_sr)))
    return total


def generator_losses(hr, sr, d_fake, t, global_batch=None):
    """Generator loss of the original: ``sum((G - HR)^2) + gdl + 0.1 * mean((D(G) - t)^2)``.

    The two sums need no scaling under a strategy (the replicas' sums add up
    to the global sum); the mean divides by ``global_batch``.

    Args:
        hr, sr: float32 (b, x, y, z, 1) in [-1, 1].
        d_fake: float32 (b, 1), discriminator logits of ``sr``.
        t: float32 (b, 1), targets drawn from U(0.7, 1.2).
        global_batch: None on one device, else the global batch size.

    Returns:
        dict of float32 scalars: ``g_loss``, ``mse`` (the sum, as the original),
        ``gdl`` and ``adv`` (already weighted by 0.1).
    """
    mse = tf.reduce_sum(tf.square(sr - hr))
    gdl = gradient_difference_loss(hr, sr)
    adv = 0.1 * _mean(tf.square(d_fake - t), global_batch)
    return {"g_loss": mse + gdl + adv, "mse": mse, "gdl": gdl, "adv": adv}


def replica_rows(local_batch):
    """Where this replica's patches sit in the step's global batch.

    Args:
        local_batch: int32 scalar, the patches this replica got (0 is possible
            at the end of an uneven epoch).

    Returns:
        (global_batch, first_row): int32 scalars; (local_batch, 0) on one device.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return local_batch, 0
    sizes = ctx.all_gather(tf.reshape(local_batch, [1]), axis=0)
    return tf.reduce_sum(sizes), tf.reduce_sum(sizes[:ctx.replica_id_in_sync_group])


def _int(variable):
    """The value of an integer variable, also a mirrored one (which int() refuses)."""
    return int(variable.numpy())


# --------------------------------------------------------------------------- #
# Trainer
# --------------------------------------------------------------------------- #


class SRGANTrainer:
    """Owns both networks, both Adam optimisers, the loss trackers and the checkpoint.

    The checkpoint holds everything a bit-identical resume needs: both networks,
    both optimisers (moments, iteration counts; loss-scale state under
    float16), the epoch, the batches done in the current epoch, the step, the
    data seed (data order and label noise are functions of it, the epoch and
    the step) and the current epoch's loss sums. It does not depend on the
    number of replicas: a run started on N replicas resumes on M.

    Under a ``tf.distribute`` strategy each step runs on every replica with its
    share of the global batch; sums need no scaling and means divide by the
    global batch, so the summed gradients are those of the whole batch on one
    device (batch norm must then be synchronised: ``synchronized_bn=True``).

    Args:
        generator: ``keras.Model`` from :func:`networks.build_generator`, built
            under ``strategy.scope()`` when a strategy is given.
        discriminator: ``keras.Model`` from :func:`networks.build_discriminator`.
        learning_rate: initial learning rate of both optimisers.
        seed: int, seeds the label noise and the data order.
        run_eagerly: bool, run :meth:`train_step` without ``tf.function``.
        loss_scale: bool, wrap both optimisers in dynamic loss scaling (needed
            when the networks compute in float16, ``mixed_precision="float16"``).
        checkpoint_dir: folder the checkpoints are written to (None: the
            trainer cannot :meth:`save`).
        max_to_keep: checkpoints kept in ``checkpoint_dir``.
        pretrain_steps: int, the first steps update the generator alone on the
            content loss (``mse + gdl``, the original's generator loss without
            its adversarial term); the discriminator is not updated. 0 (the
            original's recipe) trains the GAN from the first step.
        strategy: None (one device) or a ``tf.distribute.Strategy``.
        is_chief: bool; a non-chief worker of a multi-worker run writes its
            checkpoints to a temporary folder that is removed at once.
        xla: bool, compile the step with XLA (``jit_compile``; one device only).
        workers: int, processes training together (they agree on checkpoints
            and stop requests every ``CHECK_EVERY`` steps).
    """

    LOSS_NAMES = ("d_loss", "g_loss", "mse", "gdl", "adv")
    # What train_step returns and the step history records, in this order.
    SCALAR_NAMES = LOSS_NAMES + ("flipped", "learning_rate")
    # Steps of scalars kept on the device between two reads by the host.
    HISTORY = 256

    def __init__(self, generator, discriminator, learning_rate=1e-4, seed=0, run_eagerly=False,
                 loss_scale=False, checkpoint_dir=None, max_to_keep=3, pretrain_steps=0,
                 strategy=None, is_chief=True, xla=False, workers=1):
        self.generator = generator
        self.discriminator = discriminator
        self.strategy = strategy
        self.replicas = strategy.num_replicas_in_sync if strategy is not None else 1
        self.is_chief = is_chief
        self.workers = int(workers)
        if xla and self.replicas > 1:
            raise ValueError("xla=True is supported on one device only")
        with self._scope():
            self._build_state(learning_rate, seed, loss_scale)
        self.manager = None
        self.checkpoint_dir = checkpoint_dir
        if checkpoint_dir is not None and is_chief:
            self.manager = tf.train.CheckpointManager(self.checkpoint, checkpoint_dir,
                                                      max_to_keep=max_to_keep, checkpoint_name="ckpt")
        self.run_eagerly = run_eagerly
        self.pretrain_steps = int(pretrain_steps)
        self._host_step = None
        if run_eagerly:
            compile_ = lambda fn: fn  # noqa: E731
        else:
            compile_ = lambda fn: tf.function(fn, jit_compile=bool(xla))  # noqa: E731
        self._compiled = compile_(lambda lr, hr: self._step(self._gan_replica_step, lr, hr))
        self._compiled_pretrain = compile_(lambda lr, hr: self._step(self._pretrain_replica_step, lr, hr))
        self._end_epoch = tf.function(self._end_epoch_fn)

    def _scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def _build_state(self, learning_rate, seed, loss_scale):
        generator, discriminator = self.generator, self.discriminator
        self.schedule = keras.optimizers.schedules.InverseTimeDecay(
            learning_rate, decay_steps=DECAY_STEPS, decay_rate=DECAY_RATE, staircase=False)
        adam = dict(beta_1=0.9, beta_2=0.999, epsilon=1e-8)
        self.g_optimizer = keras.optimizers.Adam(self.schedule, **adam)
        self.d_optimizer = keras.optimizers.Adam(self.schedule, **adam)
        # The optimisers that apply the updates: the Adams themselves, or
        # dynamic loss scaling around them (float16 gradients underflow).
        self._g_apply, self._d_apply = self.g_optimizer, self.d_optimizer
        extra = {}
        if loss_scale:
            # The generator loss is a sum over every voxel (~1e3-1e5): its
            # gradients need no up-scaling, and the usual 2**15 would overflow
            # float16 for the first dozen steps. The discriminator's is a mean.
            self._g_apply = keras.optimizers.LossScaleOptimizer(self.g_optimizer, initial_scale=1.0)
            self._d_apply = keras.optimizers.LossScaleOptimizer(self.d_optimizer)
            extra = {"g_loss_scale": self._g_apply, "d_loss_scale": self._d_apply}
        # Built now so that a restore finds every slot variable to fill.
        self._g_apply.build(generator.trainable_variables)
        self._d_apply.build(discriminator.trainable_variables)
        counter = dict(dtype=tf.int64, trainable=False)
        self.epoch = tf.Variable(0, name="epoch", **counter)
        self.epoch_batches = tf.Variable(0, name="epoch_batches", **counter)
        self.step = tf.Variable(0, name="step", **counter)
        self.data_seed = tf.Variable(seed, name="data_seed", **counter)
        # The current epoch's loss sums and batch count: in the checkpoint, so
        # the epoch's summary after a mid-epoch resume covers the whole epoch.
        self.loss_sums = tf.Variable(tf.zeros(len(self.LOSS_NAMES)), trainable=False, name="loss_sums")
        self.loss_count = tf.Variable(0.0, trainable=False, name="loss_count")
        # The scalars of the last HISTORY steps, row ``step % HISTORY``: the
        # host reads them every few steps instead of waiting on every step.
        self.history = tf.Variable(tf.zeros((self.HISTORY, len(self.SCALAR_NAMES))),
                                   trainable=False, name="history")
        self.checkpoint = tf.train.Checkpoint(
            generator=generator, discriminator=discriminator, g_optimizer=self.g_optimizer,
            d_optimizer=self.d_optimizer, epoch=self.epoch, epoch_batches=self.epoch_batches,
            step=self.step, data_seed=self.data_seed, loss_sums=self.loss_sums,
            loss_count=self.loss_count, **extra)

    # ------------------------------------------------------------------ state

    @property
    def learning_rate(self):
        """float, the learning rate the next step uses."""
        return float(self.schedule(self.g_optimizer.iterations))

    def restore(self, checkpoint_dir):
        """Restores the whole training state from the latest checkpoint of a folder.

        Args:
            checkpoint_dir: a folder written by :meth:`save`.

        Returns:
            str, the checkpoint path restored.

        Raises:
            UserError: if the folder holds no checkpoint or it does not fit.
        """
        path = tf.train.latest_checkpoint(checkpoint_dir)
        if path is None:
            raise UserError(f"checkpoint folder {checkpoint_dir!r} holds no checkpoint")
        try:
            status = self.checkpoint.restore(path)
            # Checkpoints of earlier versions also hold a label-noise generator
            # that the stateless draws no longer need.
            status.expect_partial()
            status.assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as err:
            raise UserError(f"cannot resume from {path}: {str(err).splitlines()[0]}")
        self._host_step = None
        return path

    def save(self):
        """Writes a checkpoint numbered by the step (numbers are never reused).

        Every worker of a multi-worker run must call it (the variables are read
        collectively); only the chief's copy is kept.

        Returns:
            str, the checkpoint path (the chief's).
        """
        if self.checkpoint_dir is None:
            raise ValueError("this trainer was built without a checkpoint_dir")
        step = _int(self.step)
        try:
            if self.is_chief:
                return self.manager.save(checkpoint_number=step)
            scratch = tempfile.mkdtemp(prefix="srgan-worker-")
            try:
                self.checkpoint.write(os.path.join(scratch, "ckpt"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return os.path.join(self.checkpoint_dir, f"ckpt-{step}")
        except (tf.errors.OpError, OSError) as err:
            reason = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err)
            latest = tf.train.latest_checkpoint(self.checkpoint_dir)
            kept = (f"The last complete checkpoint is {latest}" if latest else
                    "No checkpoint of this run was completed")
            raise RunStopped(
                f"cannot write the checkpoint of step {step} to {self.checkpoint_dir}: "
                f"{str(reason).splitlines()[0]}. {kept}; make room (or fix the folder) and "
                f"resume with -restore {self.checkpoint_dir}.") from err

    def epoch_losses(self):
        """dict of the mean of each loss over the current epoch's batches so far."""
        count = float(self.loss_count.numpy())
        sums = self.loss_sums.numpy()
        return {name: float(sums[i]) / max(count, 1.0) for i, name in enumerate(self.LOSS_NAMES)}

    def recent_scalars(self, first_step, last_step):
        """The scalars of steps ``first_step..last_step`` (1-based, at most HISTORY back).

        Returns:
            list of (step, dict of the ``SCALAR_NAMES`` floats); one read of the device.
        """
        first_step = max(first_step, last_step - self.HISTORY + 1, 1)
        rows = self.history.numpy()
        return [(s, dict(zip(self.SCALAR_NAMES, map(float, rows[s % self.HISTORY]))))
                for s in range(first_step, last_step + 1)]

    def end_epoch(self):
        """Counts an epoch as done (epoch + 1, batches in epoch 0, loss sums 0) in one call.

        The counters change inside one graph call so that a Ctrl-C can never
        leave a checkpoint with one updated and not the other.
        """
        self._end_epoch()

    def _end_epoch_fn(self):
        self.epoch.assign_add(1)
        self.epoch_batches.assign(0)
        self.loss_sums.assign(tf.zeros_like(self.loss_sums))
        self.loss_count.assign(0.0)

    # ------------------------------------------------------------------ step

    def train_step(self, lr, hr):
        """One discriminator update, then one generator update.

        Args:
            lr: float32 (b, x/f, y/f, z/f, 1) in [-1, 1], the degraded patches
                (under a strategy: a distributed value, each replica's share).
            hr: float32 (b, x, y, z, 1) in [-1, 1], the reference patches.

        Returns:
            dict of float32 scalar tensors (no host synchronisation): d_loss,
            g_loss, mse, gdl, adv (this step's, over the global batch), flipped
            (1.0 when the labels were swapped) and learning_rate (the one this
            step used). During pre-training d_loss, adv and flipped are 0.
        """
        # A host-side mirror of the step counter: reading self.step would make
        # the host wait for the device at every step.
        if self._host_step is None:
            self._host_step = _int(self.step)
        pretraining = self._host_step < self.pretrain_steps
        out = (self._compiled_pretrain if pretraining else self._compiled)(lr, hr)
        self._host_step += 1
        return out

    def _step(self, replica_step, lr, hr):
        """Runs ``replica_step`` on every replica, sums the shares, records the step."""
        if self.strategy is None:
            out = replica_step(lr, hr)
        else:
            shares = self.strategy.run(replica_step, args=(lr, hr))
            out = {name: self.strategy.reduce(
                tf.distribute.ReduceOp.SUM if name in self.LOSS_NAMES else tf.distribute.ReduceOp.MEAN,
                value, axis=None) for name, value in shares.items()}
        self._record(out)
        return out

    def _gan_replica_step(self, lr, hr):
        g, d = self.generator, self.discriminator
        local = tf.shape(hr)[0]
        batch, first = replica_rows(local)
        global_batch = batch if self.replicas > 1 else None
        t_real, t_fake, flipped, t_gen = [
            t if t.shape.rank == 0 else t[first:first + local]
            for t in draw_targets(self.data_seed, self.step, batch)]
        learning_rate = tf.cast(self.schedule(self.g_optimizer.iterations), tf.float32)
        sr = g(lr, training=True)
        with tf.GradientTape() as tape:
            d_real = d(hr, training=True)
            d_fake = d(sr, training=True)
            d_loss = discriminator_loss(d_real, d_fake, t_real, t_fake, global_batch)
            scaled = self._scale(self._d_apply, d_loss)
        grads = tape.gradient(scaled, d.trainable_variables)
        self._d_apply.apply(grads, d.trainable_variables)

        with tf.GradientTape() as tape:
            sr = g(lr, training=True)
            d_fake = d(sr, training=True)
            losses = generator_losses(hr, sr, d_fake, t_gen, global_batch)
            scaled = self._scale(self._g_apply, losses["g_loss"])
        grads = tape.gradient(scaled, g.trainable_variables)
        self._g_apply.apply(grads, g.trainable_variables)
        return {"d_loss": d_loss, **losses, "flipped": tf.cast(flipped, tf.float32),
                "learning_rate": learning_rate}

    def _pretrain_replica_step(self, lr, hr):
        g = self.generator
        learning_rate = tf.cast(self.schedule(self.g_optimizer.iterations), tf.float32)
        with tf.GradientTape() as tape:
            sr = g(lr, training=True)
            mse = tf.reduce_sum(tf.square(sr - hr))
            gdl = gradient_difference_loss(hr, sr)
            scaled = self._scale(self._g_apply, mse + gdl)
        grads = tape.gradient(scaled, g.trainable_variables)
        self._g_apply.apply(grads, g.trainable_variables)
        zero = tf.zeros((), tf.float32)
        return {"d_loss": zero, "g_loss": mse + gdl, "mse": mse, "gdl": gdl, "adv": zero,
                "flipped": zero, "learning_rate": learning_rate}

    def _record(self, out):
        # The counters, trackers and history move in the same graph call as the
        # weights, so a Ctrl-C between two Python statements cannot split them.
        self.step.assign_add(1)
        self.epoch_batches.assign_add(1)
        self.loss_sums.assign_add(tf.stack([out[name] for name in self.LOSS_NAMES]))
        self.loss_count.assign_add(1.0)
        row = tf.cast(self.step % self.HISTORY, tf.int32)
        self.history[row].assign(tf.stack([out[name] for name in self.SCALAR_NAMES]))

    @staticmethod
    def _scale(optimizer, loss):
        # LossScaleOptimizer.apply divides the gradients by the same scale.
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return optimizer.scale_loss(loss)
        return loss

    def local_batch(self, batch):
        """The first replica's part of a (possibly distributed) batch, for previews."""
        if self.strategy is None:
            return batch
        return tuple(self.strategy.experimental_local_results(t)[0] for t in batch)

    # ------------------------------------------------------------------ loop

    # Steps between two looks at the device: the finiteness guard, and on
    # several workers the agreement on checkpoints and stop requests.
    CHECK_EVERY = 10

    def fit(self, epoch_data, epochs, reporter=None, log=print, policy=None):
        """Trains up to ``epochs`` epochs, checkpointing by ``policy`` and after each epoch.

        SIGTERM/SIGUSR1 and Ctrl-C checkpoint and stop; losses that turn
        non-finite stop the run without saving.

        Args:
            epoch_data: callable ``(epoch, skip) -> iterable of (lr, hr, nf)``
                batches of that epoch, its first ``skip`` batches left out.
            epochs: total epochs to reach.
            reporter: a :class:`TrainingReporter` (or None for silence).
            log: callable for messages.
            policy: a :class:`CheckpointPolicy` for checkpoints inside epochs
                (None: only at epoch ends).

        Returns:
            dict, the last epoch's mean losses ({} when nothing was trained).

        Raises:
            KeyboardInterrupt: after saving a checkpoint.
            RunStopped: on a stop signal (after saving), on divergence (without
                saving) or when a checkpoint cannot be written.
        """
        reporter = reporter or NullReporter()
        policy = policy or CheckpointPolicy(minutes=0, steps=0)
        losses = {}
        self._checked_step = _int(self.step)
        with StopSignals() as signals:
            try:
                while _int(self.epoch) < epochs:
                    epoch, skip = _int(self.epoch), _int(self.epoch_batches)
                    self.train_epoch(epoch_data(epoch, skip), epoch, skip, reporter, policy, signals)
                    self._guard_finite(_int(self.step))
                    losses = self.epoch_losses()
                    self.end_epoch()
                    path = self.save()
                    policy.saved()
                    reporter.end_epoch(epoch, losses, path)
                    self._stop_if_requested(signals, path)
            except KeyboardInterrupt:
                self._guard_finite(_int(self.step))
                path = self.save()
                log(f"\ninterrupted: saved {path} (epoch {_int(self.epoch) + 1}, "
                    f"{_int(self.epoch_batches)} batches in); resume with -restore {self.checkpoint_dir}")
                raise
            finally:
                reporter.close()
        return losses

    def train_epoch(self, batches, epoch, skip, reporter, policy=None, signals=None):
        """Runs the steps of one epoch (from batch ``skip`` on).

        Returns:
            int, the number of steps run.
        """
        step = _int(self.step)
        reporter.start_epoch(epoch, skip)
        done, pending = 0, None
        for batch in batches:
            # Checks for the previous step once the next batch is there: after
            # an epoch's last step the epoch's own checkpoint follows anyway.
            if pending is not None:
                self._between_steps(pending, policy, signals, reporter)
            lr, hr = batch[0], batch[1]
            self.train_step(lr, hr)
            step += 1
            done += 1
            reporter.after_step(self, step, self.local_batch(batch))
            pending = step if policy is not None else None
        reporter.flush(self, step)
        return done

    def _between_steps(self, step, policy, signals, reporter):
        """Checkpoints when due and stops on request, every worker at the same step."""
        several_workers = self.workers > 1
        at_check = step % self.CHECK_EVERY == 0
        requested = signals is not None and signals.received is not None
        if several_workers:
            if not at_check:
                return  # workers decide together, at steps every one of them knows
        elif not (at_check or requested or policy.due(step)):
            return
        self._guard_finite(step)
        save, stop = policy.due(step), requested
        if several_workers:
            save, stop = self._agree(save, stop)
        if not (save or stop):
            return
        path = self.save()
        policy.saved()
        reporter.checkpointed(step, path)
        if stop:
            self._stopped(signals, path)

    def _stop_if_requested(self, signals, path):
        """After a checkpoint at ``path``: stops if a signal asked for it (on any worker)."""
        stop = signals is not None and signals.received is not None
        if self.workers > 1:
            (stop,) = self._agree(stop)
        if stop:
            self._stopped(signals, path)

    def _stopped(self, signals, path):
        signum = (signals.received if signals is not None else None) or signal.SIGTERM
        name = signal.Signals(signum).name
        raise RunStopped(
            f"received {name} at step {_int(self.step)} (epoch {_int(self.epoch) + 1}, "
            f"{_int(self.epoch_batches)} batches in): saved {path}. Resume with "
            f"-restore {self.checkpoint_dir}", exit_code=128 + int(signum))

    def _agree(self, *flags):
        """Each flag true on any worker becomes true on all (a tiny all-reduce)."""
        local = tf.constant([float(bool(f)) for f in flags])
        shares = self.strategy.run(lambda: tf.identity(local))
        # tf.distribute reduces by SUM or MEAN only: a sum above 0 is "any".
        agreed = self.strategy.reduce(tf.distribute.ReduceOp.SUM, shares, axis=None).numpy()
        return tuple(bool(v > 0) for v in agreed)

    def _guard_finite(self, step):
        """Stops the run, saving nothing, if a loss since the last look is NaN or infinite.

        Raises:
            RunStopped: naming the first non-finite step and the last good checkpoint.
        """
        first = getattr(self, "_checked_step", step) + 1
        for s, values in self.recent_scalars(first, step):
            bad = {k: v for k, v in values.items() if not np.isfinite(v)}
            if bad:
                latest = (tf.train.latest_checkpoint(self.checkpoint_dir)
                          if self.checkpoint_dir else None)
                where = (f"the last good checkpoint is {latest}; resume from it with a lower "
                         f"-learning_rate (-restore {self.checkpoint_dir} -learning_rate ...)"
                         if latest else "no checkpoint had been written yet")
                shown = ", ".join(f"{k} {v}" for k, v in bad.items())
                raise RunStopped(
                    f"training diverged: the losses turned non-finite at step {s} ({shown}). "
                    f"The non-finite weights were not saved; {where}.", exit_code=EXIT_DIVERGED)
        self._checked_step = max(step, getattr(self, "_checked_step", 0))


def build_networks(cfg, placement=None):
    """The generator and discriminator a configuration describes.

    Args:
        cfg: the run's configuration.
        placement: a :class:`Placement`; under a strategy the networks are
            built in its scope, with batch norm over the global batch.

    Returns:
        (generator, discriminator) ``keras.Model`` pair.
    """
    placement = placement or Placement()
    policy = PRECISION_POLICIES[cfg["mixed_precision"]]
    synchronized = placement.replicas > 1
    scope = placement.strategy.scope() if placement.strategy is not None else contextlib.nullcontext()
    with scope:
        generator = networks.build_generator(**_architecture(cfg), dtype_policy=policy,
                                             synchronized_bn=synchronized)
        discriminator = networks.build_discriminator(tuple(cfg["patch_shape"]) + (1,),
                                                     dtype_policy=policy, synchronized_bn=synchronized)
    return generator, discriminator


def restore_generator(generator, checkpoint_dir):
    """Loads only the generator's weights from the latest checkpoint in a folder.

    Raises:
        UserError: if the folder holds no checkpoint or its generator does not fit.
    """
    path = tf.train.latest_checkpoint(checkpoint_dir)
    if path is None:
        raise UserError(f"checkpoint folder {checkpoint_dir!r} holds no checkpoint")
    problem = _generator_restore_problem(keras.models.clone_model(generator), path)
    if problem is not None:
        raise UserError(f"the generator in {path} does not fit the architecture flags: {problem}")
    status = tf.train.Checkpoint(generator=generator).restore(path)
    status.expect_partial()
    return path


def _generator_restore_problem(probe, path):
    """Tries a generator restore on a throwaway copy; returns the first error line or None.

    A restore that fails half-way leaves TensorFlow's bookkeeping attached to
    the model, which logs one warning per checkpoint value (~170 lines) when
    the model is finally deleted, after the error message. The copy is deleted
    here, with TensorFlow's loggers quiet, so a mismatch prints one line.
    """
    checkpoint = tf.train.Checkpoint(generator=probe)
    problem = None
    with _quiet_tensorflow_logs():
        try:
            status = checkpoint.restore(path)
            status.expect_partial()
            status.assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as err:
            problem = str(err).splitlines()[0]
        del probe, checkpoint
        gc.collect()
    return problem


@contextlib.contextmanager
def _quiet_tensorflow_logs():
    """TensorFlow's Python and absl loggers show errors only, for the duration."""
    from absl import logging as absl_logging

    tf_logger = tf.get_logger()
    level, verbosity = tf_logger.level, absl_logging.get_verbosity()
    tf_logger.setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        tf_logger.setLevel(level)
        absl_logging.set_verbosity(verbosity)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def _architecture(cfg):
    """The generator's architecture settings, as ``build_generator`` keywords."""
    return {k: cfg[k] for k in ("upsampling_factor", "residual_blocks", "feature_size",
                                "upsampling_mode")}


def saved_settings(cfg, placement=None):
    """The config.json of a run: every ``PERSISTED`` setting, the strategy and the versions."""
    placement = placement or Placement()
    out = {k: _to_json(cfg[k]) for k in PERSISTED}
    out["data_path"] = os.path.abspath(cfg["data_path"])
    out["strategy"] = placement.name
    out["replicas"] = placement.replicas
    out["workers"] = placement.workers
    out["tensorflow"] = tf.__version__
    out["keras"] = keras.__version__
    return out


def _subjects_named(names, subjects, role, log):
    """The usable subjects of a split.json list, in its order; missing ones are reported."""
    by_name = {s.name: s for s in subjects}
    missing = [n for n in names if n not in by_name]
    if missing:
        log(f"note: {len(missing)} {role} subject(s) of {SPLIT_NAME} are not usable now and are "
            "left out: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return [by_name[n] for n in names if n in by_name]


def _saved_split(folder, subjects, cfg, log):
    """The train/test lists of a run being resumed, from its split.json.

    A resumed run must train on the subjects it started with, whatever has been
    added to or removed from the data folder since.
    """
    split = _read_json(os.path.join(folder, SPLIT_NAME))
    if split is None:
        log(f"note: {folder} has no {SPLIT_NAME}; splitting the sorted subjects again")
        return layouts.split_subjects(subjects, cfg["train_fraction"])
    lists = [_subjects_named(split[key], subjects, key, log) for key in ("train", "test")]
    new = len(subjects) - sum(len(x) for x in lists)
    if new:
        log(f"note: {new} subject(s) in {cfg['data_path']} are not in the run's {SPLIT_NAME} "
            "and are not used")
    return lists[0], lists[1]


def training_split(cfg, log):
    """The (train, test) subjects of a new or resumed run.

    Raises:
        UserError: when no subject is left for training.
    """
    subjects, _ = layouts.find_subjects(cfg["data_path"], cfg["image_name"], cfg["mask_name"], log=log,
                                        bids_filter=cfg.get("bids_filter"))
    if cfg.get("restore"):
        train_subjects, test_subjects = _saved_split(cfg["restore"], subjects, cfg, log)
    else:
        train_subjects, test_subjects = layouts.split_subjects(subjects, cfg["train_fraction"])
    if not train_subjects:
        raise UserError(f"no training subject in {cfg['data_path']!r} with -train_fraction "
                        f"{cfg['train_fraction']}")
    log(f"{len(train_subjects)} train and {len(test_subjects)} test subjects")
    return train_subjects, test_subjects


class TrainingStream:
    """The training batches of one epoch at a time, resumable at any batch.

    On one device, one stream of global batches. Under a strategy, each worker
    streams its own shard of the epoch's subjects (whole subjects) in batches
    of ``batch_size / replicas`` patches, one per local replica and step; with
    one worker the global batches are exactly those of one device. Several
    workers cycle their shards so that every worker runs the epoch's number of
    steps. A resumed epoch skips the batches already trained, whatever the
    replica count was.

    A subject whose file is bad is reported and skipped; anything else that
    stops the stream (memory, a vanished data folder, an I/O error) stops the
    run with a message, and so does an epoch that trained fewer batches than
    its usable subjects give.

    Args:
        subjects: the training :class:`layouts.Subject` list.
        cfg: the run's configuration (geometry, factor, sigma, batch size, seed).
        placement: a :class:`Placement` (None: one device).
        log: callable for the dataset's reports.
    """

    def __init__(self, subjects, cfg, placement=None, log=print):
        self.subjects = list(subjects)
        self.cfg = cfg
        self.placement = placement or Placement()
        self.log = log
        self.batches_per_epoch = td.batches_per_epoch(
            len(self.subjects), cfg["batch_size"], cfg["volume_shape"], cfg["patch_shape"],
            cfg["patch_margin"])
        self.skipped = []  # (path, reason) of the subjects skipped this epoch
        self._failures = []

    def __call__(self, epoch, skip=0):
        """The batches of ``epoch`` after its first ``skip`` global batches.

        Returns:
            an iterator of ``(lr, hr, nf)`` batches (see
            :func:`train_dataset.make_train_dataset`; distributed values under
            a strategy).

        Raises (while iterated):
            RunStopped or nifti_io.DataError: the stream failed, or the
                epoch ended short.
        """
        self.skipped, self._failures = [], []
        return self._checked(self._batches(epoch, skip), epoch, skip)

    def _batches(self, epoch, skip):
        strategy = self.placement.strategy
        if strategy is None:
            dataset = self._dataset(epoch, self.cfg["batch_size"])
            return dataset.skip(skip) if skip else dataset
        return strategy.distribute_datasets_from_function(
            lambda context: self._worker_dataset(context, epoch, skip))

    def _dataset(self, epoch, batch_size, shard=(0, 1)):
        cfg = self.cfg
        return td.make_train_dataset(
            self.subjects, cfg["upsampling_factor"], batch_size=batch_size,
            volume_shape=cfg["volume_shape"], patch_shape=cfg["patch_shape"],
            margin=cfg["patch_margin"], seed=cfg["seed"], epoch=epoch, sigma=cfg["sigma"],
            with_norm_factor=True, log=self.log, shard=shard,
            on_skip=lambda path, reason: self.skipped.append((path, reason)),
            failures=self._failures)

    def _worker_dataset(self, context, epoch, skip):
        workers = context.num_input_pipelines
        local_replicas = context.num_replicas_in_sync // workers
        per_replica = context.get_per_replica_batch_size(self.cfg["batch_size"])
        dataset = self._dataset(epoch, per_replica, (context.input_pipeline_id, workers))
        if workers > 1:
            # Collective steps need every worker to run the same number of them.
            dataset = dataset.repeat().take(self.batches_per_epoch * local_replicas)
        return dataset.skip(skip * local_replicas) if skip else dataset

    def _checked(self, dataset, epoch, skip):
        iterator = iter(dataset)
        done = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except tf.errors.OpError as err:
                raise self._failure(err, epoch) from None
            done += 1
            yield batch
        self._account(epoch, skip, done)

    def _failure(self, error, epoch):
        """The exception that explains a failed stream (the original one where known)."""
        original = td.unwrap_pipeline_error(error, self._failures)
        where = f"while reading the training data of epoch {epoch + 1}"
        if isinstance(original, nifti_io.DataError):
            return original
        if isinstance(original, MemoryError):
            return RunStopped(f"out of memory {where} ({original}). A -volume_shape of "
                              f"{'x'.join(map(str, self.cfg['volume_shape']))} and the scans' own "
                              "size set the memory each volume needs; free memory or use smaller "
                              "volumes, then resume with -restore (the last checkpoint is kept)")
        return RunStopped(f"the training data failed {where}: {type(original).__name__}: {original}. "
                          "Fix the cause, then resume with -restore (the last checkpoint is kept)")

    def _account(self, epoch, skip, done):
        """Stops the run when an epoch trained less than its usable subjects give."""
        cfg = self.cfg
        if self.placement.workers > 1:
            expected = self.batches_per_epoch - skip  # shards cycle to the full count
        else:
            usable = len(self.subjects) - len(self.skipped)
            patches = usable * td.patches_per_volume(cfg["volume_shape"], cfg["patch_shape"],
                                                     cfg["patch_margin"])
            expected = -(-patches // cfg["batch_size"]) - skip
        planned = self.batches_per_epoch - skip
        if planned > 0 and done == 0:
            raise RunStopped(f"epoch {epoch + 1} trained nothing: none of its "
                             f"{len(self.subjects)} training subjects could be read "
                             f"({len(self.skipped)} reported above). Nothing was saved for it; fix "
                             "the data, then resume with -restore")
        if done < expected:
            raise RunStopped(f"epoch {epoch + 1} ended after {done} of its {expected} batches: the "
                             "data stream stopped early without a reason. Nothing was saved for this "
                             "epoch; resume with -restore to run it again")


class NullReporter:
    """Says nothing: the reporter of a trainer used from Python, and of non-chief workers."""

    def start_epoch(self, epoch, skip):
        pass

    def after_step(self, trainer, step, batch):
        pass

    def flush(self, trainer, step):
        pass

    def checkpointed(self, step, path):
        pass

    def end_epoch(self, epoch, losses, path):
        pass

    def close(self):
        pass


class TrainingReporter(NullReporter):
    """What a person sees of a training run.

    A progress bar per epoch (running losses, volumes per second, time left),
    TensorBoard scalars for every step (read from the trainer's on-device
    history every ``log_every`` steps, so the loop does not wait on each step),
    an LR|SR|HR image every ``image_every`` steps, and every 20 volumes (the
    original's interval) the HR/LR/SR of a patch as NIfTI with its PSNR/SSIM.

    Args:
        cfg: the run's configuration.
        batches_per_epoch: int, steps of a full epoch.
        log: callable for the epoch lines.
        log_every: steps between two reads of the trainer's scalars.
        image_every: steps between two TensorBoard images.
    """

    def __init__(self, cfg, batches_per_epoch, log=print, log_every=10, image_every=200):
        self.cfg = cfg
        self.log = log
        self.batches_per_epoch = batches_per_epoch
        self.log_every = min(log_every, SRGANTrainer.HISTORY)
        self.image_every = image_every
        self.patches_per_volume = td.patches_per_volume(cfg["volume_shape"], cfg["patch_shape"],
                                                        cfg["patch_margin"])
        # Previews every 20 volumes, as the original.
        self.preview_every = max(1, (20 * self.patches_per_volume) // cfg["batch_size"])
        self.writer = tf.summary.create_file_writer(cfg["log_dir"])
        self.bar = None
        self.logged_step = None

    def start_epoch(self, epoch, skip):
        self.epoch, self.batch_index = epoch, skip
        self.started, self.done = time.time(), 0
        self.bar = tqdm(total=self.batches_per_epoch, initial=skip,
                        desc=f"epoch {epoch + 1}/{self.cfg['epochs']}", unit="batch",
                        dynamic_ncols=True, file=sys.stderr)

    def after_step(self, trainer, step, batch):
        if self.logged_step is None:
            self.logged_step = step - 1
        lr, hr = batch[0], batch[1]
        f = self.cfg["upsampling_factor"]
        if step % self.image_every == 1 or self.image_every == 1:
            sr = trainer.generator(lr[:1], training=False).numpy()
            with self.writer.as_default(step=step):
                tf.summary.image("lr_sr_hr_axial", _display_slices(
                    np.asarray(lr)[:1], sr, np.asarray(hr)[:1], f))
        if self.batch_index % self.preview_every == 0 and len(batch) > 2:
            self._preview(trainer, step, batch)
        self.batch_index += 1
        self.done += 1
        self.bar.update(1)
        if step % self.log_every == 0:
            self.flush(trainer, step)

    def _preview(self, trainer, step, batch):
        lr, hr = batch[0], batch[1]
        f = self.cfg["upsampling_factor"]
        tag = f"e{self.epoch + 1}_s{step}"
        try:
            psnr, ssim = _write_preview(trainer, np.asarray(lr), np.asarray(hr), np.asarray(batch[2]),
                                        self.cfg["path_prediction"], tag, f)
        except durable.OutputError as err:
            # Previews are for looking at; a full disk stops the run at the
            # next checkpoint, with the message that matters.
            self.bar.write(f"warning: preview not written: {err}")
            return
        with self.writer.as_default(step=step):
            tf.summary.scalar("preview/psnr", psnr)
            tf.summary.scalar("preview/ssim", ssim)
        self.bar.write(f"epoch {self.epoch + 1} step {step}: preview patch PSNR {psnr:.2f} dB, "
                       f"SSIM {ssim:.4f} -> {self.cfg['path_prediction']}")

    def checkpointed(self, step, path):
        self.bar.write(f"step {step}: saved {path}")

    def flush(self, trainer, step):
        if self.logged_step is None or step <= self.logged_step:
            return
        with self.writer.as_default():
            for s, values in trainer.recent_scalars(self.logged_step + 1, step):
                for name in SRGANTrainer.LOSS_NAMES:
                    tf.summary.scalar(f"loss/{name}", values[name], step=s)
                tf.summary.scalar("learning_rate", values["learning_rate"], step=s)
        self.logged_step = step
        running = trainer.epoch_losses()
        elapsed = max(time.time() - self.started, 1e-9)
        self.bar.set_postfix(d=f"{running['d_loss']:.3g}", g=f"{running['g_loss']:.4g}",
                             mse=f"{running['mse']:.4g}", gdl=f"{running['gdl']:.4g}",
                             adv=f"{running['adv']:.3g}",
                             vol_s=f"{self.done * self.cfg['batch_size'] / self.patches_per_volume / elapsed:.2f}")

    def end_epoch(self, epoch, losses, path):
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()
        self.log(f"epoch {epoch + 1}/{self.cfg['epochs']}: " +
                 " ".join(f"{k} {v:.5g}" for k, v in losses.items()) + f"; saved {path}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


def _write_preview(trainer, lr, hr, nf, folder, tag, f):
    """HR, LR and SR of the first patch of a batch, de-normalised, plus its PSNR/SSIM."""
    sr = trainer.generator(lr[:1], training=False).numpy()[0, ..., 0]
    nf = float(nf[0])
    hr_p = utils.denormalize(hr[0, ..., 0], nf)
    lr_p = utils.denormalize(lr[0, ..., 0], nf)
    sr_p = utils.denormalize(sr, nf)
    eye = np.eye(4)
    utils.save_nifti(os.path.join(folder, f"{tag}_hr.nii.gz"), hr_p, eye)
    utils.save_nifti(os.path.join(folder, f"{tag}_lr.nii.gz"), lr_p, np.diag([f, f, f, 1.0]))
    utils.save_nifti(os.path.join(folder, f"{tag}_sr.nii.gz"), sr_p, eye)
    return utils.compute_metrics(hr_p, sr_p)


def _display_slices(lr, sr, hr, f):
    """One TensorBoard image: axial mid-slices of LR (nearest-upsampled), SR, HR."""
    z = hr.shape[3] // 2
    lr_up = np.repeat(np.repeat(lr[0, :, :, z // f, 0], f, axis=0), f, axis=1)
    row = np.concatenate([lr_up, sr[0, :, :, z, 0], hr[0, :, :, z, 0]], axis=1)
    return np.clip((row[None, ..., None] + 1) / 2, 0, 1)


def _prepare_run_folder(cfg, write=True):
    """Refuses to train into another run's folder; checks the output folders.

    Args:
        cfg: the run's configuration.
        write: bool, whether this process writes there (the chief); other
            workers only check.

    Returns:
        bool, whether the run resumes into the folder it was restored from.
    """
    ckpt_dir = cfg["checkpoint_dir"]
    restoring = bool(cfg.get("restore"))
    same_folder = restoring and os.path.realpath(ckpt_dir) == os.path.realpath(cfg["restore"])
    if not same_folder and os.path.isdir(ckpt_dir) and tf.train.latest_checkpoint(ckpt_dir) is not None:
        raise UserError(f"-checkpoint_dir {ckpt_dir!r} already holds a training run; resume it with "
                        f"-restore {ckpt_dir}, or choose an empty folder (nothing was overwritten)")
    if write:
        _check_writable(ckpt_dir, "-checkpoint_dir")
        _check_writable(cfg["path_prediction"], "-path_prediction")
        _check_writable(cfg["log_dir"], "-log_dir")
    return same_folder


def _resume(trainer, cfg, log):
    """Restores a run's whole state; returns cfg with the seed the run really uses."""
    path = trainer.restore(cfg["restore"])
    log(f"resumed {path}: epoch {_int(trainer.epoch)} done, step {_int(trainer.step)}, "
        f"learning rate {trainer.learning_rate:.3g}")
    if _int(trainer.data_seed) != cfg["seed"]:
        log(f"note: the data order and label noise keep the checkpoint's seed {_int(trainer.data_seed)}")
        cfg = dict(cfg, seed=_int(trainer.data_seed))
    return cfg


def _write_run_files(cfg, train_subjects, test_subjects, keep_split, placement=None):
    folder = cfg["checkpoint_dir"]
    _write_json(os.path.join(folder, CONFIG_NAME), saved_settings(cfg, placement))
    if not keep_split:  # a resumed run keeps the split.json it was trained with
        _write_json(os.path.join(folder, SPLIT_NAME), {
            "data_path": os.path.abspath(cfg["data_path"]), "train_fraction": cfg["train_fraction"],
            "train": [s.name for s in train_subjects], "test": [s.name for s in test_subjects]})


def check_placement(cfg, placement):
    """Checks that a configuration can run on a placement.

    Raises:
        UserError: naming the flag and the numbers.
    """
    if cfg["batch_size"] % placement.replicas:
        raise UserError(f"-batch_size {cfg['batch_size']} must be divisible by the {placement.replicas} "
                        f"replicas ({placement.describe()}): -batch_size is the global number of "
                        "patches per step, and each replica takes an equal share")
    if cfg.get("xla") and placement.replicas > 1:
        raise UserError(f"-xla True runs on one device only; this run has {placement.replicas} replicas "
                        "(XLA-compiled replica steps cannot reach the mirrored variables). "
                        "Drop -xla, or choose one device with -gpus 0")


def train(cfg, log=print, placement=None):
    """Trains the GAN as the original, checkpointing every epoch.

    Wires the pieces together: the run folder, the subjects, the networks and
    their :class:`SRGANTrainer` (which restores, loops and saves), the
    :class:`TrainingStream` and the :class:`TrainingReporter`. Under a
    multi-worker strategy only the chief writes files and reports.

    Args:
        cfg: configuration from :func:`resolve_config`.
        log: callable for messages.
        placement: a :class:`Placement` (None: one device).

    Returns:
        dict with the last epoch's mean losses and the checkpoint path.

    Raises:
        UserError: bad data path, non-writable output folders, a checkpoint
            folder that already holds a run without ``-restore``, a batch size
            the replicas cannot share.
    """
    placement = placement or Placement()
    check_placement(cfg, placement)
    check_outside_data(cfg, ("checkpoint_dir", "path_prediction", "log_dir"))
    chief = placement.is_chief
    say = log if chief else (lambda *_: None)
    same_folder = _prepare_run_folder(cfg, write=chief)
    # The chief alone writes the folder, and holds it while the run lives.
    lock = durable.RunLock(cfg["checkpoint_dir"], "training") if chief else contextlib.nullcontext()
    with lock:
        if chief:
            _remove_leftovers(cfg, say)
        return _train_locked(cfg, placement, same_folder, say, log)


def _train_locked(cfg, placement, same_folder, say, log):
    chief = placement.is_chief
    train_subjects, test_subjects = training_split(cfg, say)
    say(placement.describe())
    keras.utils.set_random_seed(cfg["seed"])
    generator, discriminator = build_networks(cfg, placement)
    trainer = SRGANTrainer(generator, discriminator, cfg["learning_rate"], seed=cfg["seed"],
                           run_eagerly=cfg["run_eagerly"],
                           loss_scale=cfg["mixed_precision"] == "float16",
                           checkpoint_dir=cfg["checkpoint_dir"], max_to_keep=cfg["keep_checkpoints"],
                           pretrain_steps=cfg["pretrain_steps"], strategy=placement.strategy,
                           is_chief=chief, xla=cfg.get("xla", False), workers=placement.workers)
    if cfg.get("restore"):
        cfg = _resume(trainer, cfg, say)
    if _int(trainer.epoch) >= cfg["epochs"]:
        say(f"the checkpoint already has {_int(trainer.epoch)} epochs (-epochs {cfg['epochs']}); "
            "nothing to train")
        return {"checkpoint": tf.train.latest_checkpoint(cfg["restore"]), "losses": {}}
    if chief:
        _write_run_files(cfg, train_subjects, test_subjects, keep_split=same_folder, placement=placement)
    stream = TrainingStream(train_subjects, cfg, placement, say)
    reporter = TrainingReporter(cfg, stream.batches_per_epoch, log) if chief else NullReporter()
    policy = CheckpointPolicy(cfg["checkpoint_minutes"], cfg["checkpoint_steps"])
    losses = trainer.fit(stream, cfg["epochs"], reporter, say, policy)
    return {"checkpoint": tf.train.latest_checkpoint(cfg["checkpoint_dir"]), "losses": losses}


def check_outside_data(cfg, keys):
    """Refuses training output folders inside the data (their files would become subjects).

    Raises:
        UserError: naming the flag and both folders.
    """
    data = cfg["data_path"]
    if not os.path.isdir(data):
        return
    layout = layouts.detect_layout(data, cfg["image_name"])
    for key in keys:
        _refuse_inside_data(cfg[key], f"-{key}", data, layout)


def _remove_leftovers(cfg, log):
    """Removes the temporaries a killed run left behind (its own kind only)."""
    removed = []
    for folder in {cfg["checkpoint_dir"], cfg["path_prediction"]}:
        if os.path.isdir(folder):
            removed += durable.remove_stale_temporaries(folder)
    if removed:
        shown = ", ".join(os.path.basename(p) for p in removed[:4]) + (" ..." if len(removed) > 4 else "")
        log(f"removed {len(removed)} temporary file(s) of an interrupted run: {shown}")


# --------------------------------------------------------------------------- #
# Inference
# --------------------------------------------------------------------------- #

__version__ = "1.0.0"
# The port's name in BIDS derivatives (GeneratedBy) and in metrics.csv.
PROGRAM_NAME = "srgan3d-tf2"
BIDS_VERSION = "1.9.0"
METRICS_NAME = "metrics.csv"
DESCRIPTION_NAME = "dataset_description.json"
# -output_layout: auto means bids when every input is BIDS, plain otherwise.
OUTPUT_LAYOUTS = ("auto", "plain", "bids")
TTA_MODES = ("none", "flip")


def make_predictor(generator):
    """A compiled inference function, traced once for any patch size."""
    return tf.function(lambda x: generator(x, training=False),
                       input_signature=[tf.TensorSpec((None, None, None, None, 1), tf.float32)])


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of super-resolving a volume: a patch blending and whether to flip.

    Attributes:
        blend: one of ``td.BLEND_MODES`` ("crop": the original's; "gaussian").
        flip: bool, average with the pass on the left-right mirrored volume.
    """

    blend: str = "crop"
    flip: bool = False

    @property
    def label(self):
        """str, e.g. ``"crop"`` or ``"gaussian+flip"`` (reports, mosaic titles)."""
        return self.blend + ("+flip" if self.flip else "")

    @property
    def key(self):
        """str, the metrics.csv column stem, e.g. ``"sr_gaussian_flip"``."""
        return "sr_" + self.label.replace("+", "_")


def inference_variants(blend="crop", tta="none"):
    """The variants an evaluation computes so that each option's effect shows in one run.

    Always the original's (crop, no flip) first; then the -blend alone when it
    is not crop; then the -blend with the flip when -tta is flip. The last one
    has every option and is the one written as ``_sr``.

    Args:
        blend: one of ``td.BLEND_MODES``.
        tta: one of ``TTA_MODES``.

    Returns:
        tuple of :class:`Variant`, 1 to 3 of them.

    Raises:
        ValueError: for an unknown blend or tta.
    """
    if blend not in td.BLEND_MODES:
        raise ValueError(f"-blend {blend!r} must be one of {', '.join(td.BLEND_MODES)}")
    if tta not in TTA_MODES:
        raise ValueError(f"-tta {tta!r} must be one of {', '.join(TTA_MODES)}")
    variants = [Variant("crop", False)]
    if blend != "crop":
        variants.append(Variant(blend, False))
    if tta == "flip":
        variants.append(Variant(blend, True))
    return tuple(variants)


def _predict_patches(predict, lr, upsampling_factor, patch_shape, margin, batch_size):
    """Runs the generator over the LR patches of a volume.

    Returns:
        (sr_patches float32 (n, f·px', f·py', f·pz', 1), hr_margin int,
        hr_shape (3,) ints) for :func:`td.stitch_patches`.
    """
    f = upsampling_factor
    lr_patch = tuple(min(p // f, n) for p, n in zip(patch_shape, lr.shape))
    lr_margin = min(margin // f, (min(lr_patch) - 1) // 2)
    patches = td.extract_patches(lr, lr_patch, lr_margin)
    outputs = [np.asarray(predict(tf.constant(patches[i:i + batch_size])))
               for i in range(0, len(patches), batch_size)]
    return np.concatenate(outputs, axis=0), lr_margin * f, tuple(n * f for n in lr.shape)


def super_resolve_variants(predict, lr, upsampling_factor, patch_shape, margin, batch_size=2,
                           variants=(Variant(),), flip_axis=None):
    """Super-resolves a volume patch by patch, once per variant, sharing the network passes.

    The low-resolution patches use the training geometry divided by the factor
    (``patch_shape / f``, ``margin / f``); an axis shorter than a patch is
    processed whole. The network runs at most twice (the volume, and its
    mirror along ``flip_axis`` when a variant flips); each blending stitches
    those outputs. A flip variant is the mean of the plain result and the
    mirrored volume's result mirrored back and put back on the grid
    (:func:`_align_mirrored_pass`).

    Args:
        predict: callable float32 (n, x, y, z, 1) -> (n, f·x, f·y, f·z, 1).
        lr: float32 (x, y, z) in [-1, 1].
        upsampling_factor: int f.
        patch_shape: HR patch (px, py, pz), divisible by f.
        margin: HR margin, divisible by f.
        batch_size: patches per generator call.
        variants: sequence of :class:`Variant`.
        flip_axis: int in {0, 1, 2}, the voxel axis that is left-right
            (``utils.left_right_axis`` of the volume's affine); needed when a
            variant flips.

    Returns:
        dict :class:`Variant` -> float32 (f·x, f·y, f·z).

    Raises:
        ValueError: if a variant flips and ``flip_axis`` is not 0, 1 or 2.
    """
    lr = np.asarray(lr, dtype=np.float32)
    if any(v.flip for v in variants) and flip_axis not in (0, 1, 2):
        raise ValueError(f"flip_axis {flip_axis!r} must be 0, 1 or 2 for a flip variant")
    passes = {}

    def network_pass(flipped):
        if flipped not in passes:
            source = np.ascontiguousarray(np.flip(lr, flip_axis)) if flipped else lr
            passes[flipped] = _predict_patches(predict, source, upsampling_factor, patch_shape,
                                               margin, batch_size)
        return passes[flipped]

    stitched = {}

    def stitch(blend, flipped):
        if (blend, flipped) not in stitched:
            patches, hr_margin, hr_shape = network_pass(flipped)
            volume = td.stitch_patches(patches, hr_shape, hr_margin, blend=blend)
            stitched[blend, flipped] = np.flip(volume, flip_axis) if flipped else volume
        return stitched[blend, flipped]

    out = {}
    for variant in variants:
        plain = stitch(variant.blend, False)
        if variant.flip:
            mirrored = _align_mirrored_pass(stitch(variant.blend, True), plain, flip_axis,
                                            upsampling_factor)
            out[variant] = (0.5 * (plain + mirrored)).astype(np.float32)
        else:
            out[variant] = plain
    return out


def _align_mirrored_pass(mirrored, plain, axis, upsampling_factor):
    """Puts the mirrored pass back on the plain pass's grid.

    The degradation keeps the first voxel of every block of f (``x[::f]``),
    and the network learnt that an LR voxel sits on the first of its f HR
    voxels. Mirrored, an LR voxel stands for the last voxel of its block, so
    the mirrored pass, mirrored back, estimates the volume f - 1 voxels
    further along ``axis``: shifted back here. Its last f - 1 slices have no
    mirrored estimate and keep the plain pass's.

    Args:
        mirrored: float32 (X, Y, Z), the mirrored volume's result mirrored back.
        plain: float32 (X, Y, Z), the plain result.
        axis: int, the mirrored axis.
        upsampling_factor: int f.

    Returns:
        float32 (X, Y, Z).
    """
    shift = int(upsampling_factor) - 1
    if shift == 0:
        return mirrored
    aligned = plain.copy()
    head = [slice(None)] * 3
    tail = [slice(None)] * 3
    head[axis], tail[axis] = slice(0, plain.shape[axis] - shift), slice(shift, None)
    aligned[tuple(head)] = mirrored[tuple(tail)]
    return aligned


def super_resolve_volume(predict, lr, upsampling_factor, patch_shape, margin, batch_size=2,
                         blend="crop", flip_axis=None):
    """Super-resolves a whole volume patch by patch and stitches the result.

    With the defaults, the original's way: each patch keeps the half of every
    overlap nearest its centre, as the training patches.

    Args:
        predict: callable float32 (n, x, y, z, 1) -> (n, f·x, f·y, f·z, 1).
        lr: float32 (x, y, z) in [-1, 1].
        upsampling_factor: int f.
        patch_shape: HR patch (px, py, pz), divisible by f.
        margin: HR margin, divisible by f.
        batch_size: patches per generator call.
        blend: "crop" or "gaussian" (``td.stitch_patches``).
        flip_axis: None, or the left-right voxel axis: then also the mirrored
            volume is super-resolved, mirrored back and averaged in (TTA).

    Returns:
        float32 (f·x, f·y, f·z).
    """
    variant = Variant(blend, flip_axis is not None)
    return super_resolve_variants(predict, lr, upsampling_factor, patch_shape, margin, batch_size,
                                  (variant,), flip_axis)[variant]


def _restored_predictor(cfg, log):
    """Builds the generator, restores it from ``cfg["source_checkpoint"]`` and returns its predict callable.

    Every inference pass goes through the returned callable, float32
    (n, x, y, z, 1) -> (n, f·x, f·y, f·z, 1), so it may be swapped for one
    that spreads each batch over several devices.
    """
    generator = networks.build_generator(
        **_architecture(cfg), dtype_policy=PRECISION_POLICIES[cfg["mixed_precision"]])
    path = restore_generator(generator, cfg["source_checkpoint"])
    log(f"restored generator from {path}")
    return make_predictor(generator)


def checkpoint_identity(checkpoint_dir):
    """What identifies the checkpoint an inference run uses.

    Args:
        checkpoint_dir: a folder holding a training run's checkpoints.

    Returns:
        dict: ``path`` (real path of the latest ``ckpt-N`` prefix), ``step``
        (int, the training step; None when unknown) and ``sha256`` (16 hex
        digits of its ``.index`` file, which holds a checksum of every tensor:
        it tells apart two checkpoints saved under the same name).

    Raises:
        UserError: if the folder holds no checkpoint.
    """
    path = tf.train.latest_checkpoint(checkpoint_dir)
    if path is None:
        raise UserError(f"checkpoint folder {checkpoint_dir!r} holds no checkpoint")
    try:
        with open(path + ".index", "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    except OSError as err:
        raise UserError(f"cannot read the checkpoint {path}: {err.strerror or err}")
    step = None
    try:
        step = int(tf.train.load_checkpoint(path).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    except (ValueError, KeyError, tf.errors.OpError):
        match = re.search(r"-(\d+)$", path)
        step = int(match.group(1)) if match else None
    return {"path": os.path.realpath(path), "step": step, "sha256": digest}


def _overwrite_note(paths, log):
    existing = [p for p in paths if os.path.exists(p)]
    if existing:
        shown = ", ".join(os.path.basename(p) for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        log(f"note: replacing {len(existing)} existing file(s) in {os.path.dirname(existing[0])}: {shown}")


# --------------------------------------------------------------------------- #
# Inference: inputs and the output folder
# --------------------------------------------------------------------------- #


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


def _check_inference_options(cfg):
    """Checks the data-layout and inference settings before any work starts.

    Raises:
        UserError: a malformed -bids_filter, or a -super_resolve path that
            does not exist or is neither a NIfTI file, a folder nor a list.
    """
    try:
        layouts.parse_bids_filter(cfg.get("bids_filter"))
    except ValueError as err:
        raise UserError(str(err))
    if cfg["action"] != "super_resolve":
        return
    for path in cfg["super_resolve"]:
        if not os.path.exists(path):
            raise UserError(f"-super_resolve {path!r} does not exist")
        if os.path.isfile(path) and not (path.lower().endswith((".nii", ".nii.gz")) or layouts.is_file_list(path)):
            raise UserError(f"-super_resolve {path!r} is not a .nii/.nii.gz scan, a folder or a "
                            ".csv file list")


def _bids_filter_for(cfg, data_path, log):
    """The -bids_filter to read ``data_path`` with.

    A filter taken from the checkpoint (the training data were BIDS) is not
    applied to other data that are not BIDS; one given on the command line is
    (and ``find_subjects`` refuses it for such data).
    """
    bids_filter = cfg.get("bids_filter")
    if bids_filter and "bids_filter" not in cfg.get("explicit", ()) \
            and layouts.detect_layout(data_path, cfg["image_name"]) != "bids":
        log(f"note: the training's -bids_filter {bids_filter} is not used for {data_path} (not BIDS)")
        return None
    return bids_filter


def _data_root(data_path, layout):
    """The folder a layout's scans live in: the folder itself, or a list's folder."""
    path = os.path.abspath(data_path)
    return os.path.dirname(path) if layout == "csv" else path


def _bids_file_scan(path):
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


def _super_resolve_inputs(cfg, log):
    """The scans of -super_resolve: files as they are, folders and lists through ``find_subjects``.

    Returns:
        list of :class:`InputScan`, in the order given (a folder's in name order).

    Raises:
        UserError, nifti_io.DataError: an unusable path or dataset.
    """
    scans = []
    max_voxels = nifti_io.max_voxels_for(cfg["volume_shape"])
    for path in cfg["super_resolve"]:
        if os.path.isfile(path) and not layouts.is_file_list(path):
            bids = _bids_file_scan(path)
            name = layouts.strip_nifti_suffix(os.path.basename(path))
            scans.append(bids or InputScan(layouts.Subject(name, os.path.abspath(path))))
            continue
        layout = layouts.detect_layout(path, cfg["image_name"])
        subjects, _ = layouts.find_subjects(path, cfg["image_name"], cfg["mask_name"], log=log,
                                            bids_filter=_bids_filter_for(cfg, path, log),
                                            max_voxels=max_voxels)
        root = _data_root(path, layout)
        scans += [InputScan(s, root, layout == "bids") for s in subjects]
    return scans


def _output_scheme(cfg, scans):
    """"bids" or "plain": -output_layout, where auto means bids when every scan is BIDS."""
    if cfg["output_layout"] != "auto":
        return cfg["output_layout"]
    return "bids" if scans and all(s.bids for s in scans) else "plain"


def _refuse_inside_data(folder, flag, root, layout):
    """Refuses an output ``folder`` that the next run would read as data of ``root``.

    A BIDS dataset only reads its ``sub-*`` folders, so its ``derivatives/``
    (the BIDS place for outputs) is allowed; a CSV list reads only what it names.

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


def _check_output_folder(folder, sources):
    """Refuses an output folder that is a file, lies under a file, or lies inside input data.

    Outputs inside a data folder would be read as new subjects by the next
    run. A BIDS dataset only reads its ``sub-*`` folders, so its
    ``derivatives/`` (the BIDS place for outputs) is allowed.

    Args:
        folder: the -path_volumes.
        sources: iterable of (root, layout) of the inputs, layout one of
            ``layouts.LAYOUTS`` or None for single files (never refused).

    Raises:
        UserError: naming the folder and the reason.
    """
    probe = os.path.abspath(folder)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.isfile(probe):
        where = "" if probe == os.path.abspath(folder) else f": {probe!r}"
        raise UserError(f"-path_volumes {folder!r}{where} is a file, not a folder")
    for root, layout in set(sources):
        _refuse_inside_data(folder, "-path_volumes", root, layout)
    _check_writable(folder, "-path_volumes")


# --------------------------------------------------------------------------- #
# Inference: output names (plain and BIDS derivatives)
# --------------------------------------------------------------------------- #

# BIDS entity order (specification 1.9, appendix "Entity table"): file names
# list their entities in this order; unknown keys go just before desc.
BIDS_ENTITY_ORDER = ("sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc",
                     "stain", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc",
                     "hemi", "space", "split", "recording", "chunk", "seg", "res", "den", "label", "desc")
_BIDS_RANK = {key: rank for rank, key in enumerate(BIDS_ENTITY_ORDER)}


def bids_stem(entities, **changes):
    """A BIDS file name stem (no suffix) from entities, some replaced or added.

    Args:
        entities: ordered ``(key, value)`` pairs, e.g. ``(("sub", "01"), ("desc", "brain"))``.
        **changes: entities to set, e.g. ``rec="SRx2"``.

    Returns:
        str, e.g. ``"sub-01_rec-SRx2_desc-brain"``, entities in BIDS order.
    """
    merged = dict(entities)
    merged.update(changes)
    ordered = sorted(merged.items(), key=lambda kv: _BIDS_RANK.get(kv[0], _BIDS_RANK["desc"] - 0.5))
    return "_".join(f"{k}-{v}" for k, v in ordered)


def _sidecar_path(nifti_path):
    return nifti_path[: -len(utils.nifti_suffix(nifti_path))] + ".json"


class PlainOutputs:
    """The original's output names, all in one folder.

    ``<subject>_sr.nii.gz`` (with a ``<subject>_sr.json`` sidecar: factor,
    mode, checkpoint, options, metrics), ``<subject>_hr.nii.gz``,
    ``<subject>_lr.nii.gz`` and ``<subject>_slices.png``.

    Args:
        folder: the -path_volumes.
        upsampling_factor: int f.
    """

    scheme = "plain"
    # The volumes that get a JSON sidecar.
    SIDECAR_KINDS = ("sr",)

    def __init__(self, folder, upsampling_factor):
        self.folder = folder
        self.factor = int(upsampling_factor)

    def path(self, subject, kind):
        """str, the NIfTI path of a subject's ``kind`` ("sr", "lr" or "hr") volume."""
        return os.path.join(self.folder, f"{subject.name}_{kind}.nii.gz")

    def slices_path(self, subject):
        """str, the PNG path of a subject's slice mosaic."""
        return os.path.join(self.folder, f"{subject.name}_slices.png")

    def source(self, scan):
        """str, how a sidecar names the input file (its absolute path)."""
        return os.path.abspath(scan.subject.image_path)

    def start(self, generated_by, scans):
        """Prepares the folder before the first output (nothing to do for plain names)."""

    def check_unique(self, scans):
        """Refuses inputs that would write the same file.

        Raises:
            UserError: naming both inputs and the file.
        """
        seen = {}
        for scan in scans:
            path = self.path(scan.subject, "sr")
            if path in seen:
                raise UserError(f"{seen[path]} and {scan.subject.image_path} would both be written to "
                                f"{path}; super-resolve them into different -path_volumes")
            seen[path] = scan.subject.image_path

    def write_volume(self, subject, kind, data, affine, header=None, zooms=None, sidecar=None):
        """Writes one volume (and its sidecar when this scheme gives ``kind`` one).

        Args:
            subject: a :class:`layouts.Subject`.
            kind: "sr", "lr" or "hr".
            data: float32 (x, y, z).
            affine: (4, 4) voxel-to-world matrix.
            header: optional nibabel header to copy metadata from.
            zooms: optional (3,) voxel sizes.
            sidecar: optional JSON-serialisable dict.

        Returns:
            str, the NIfTI path.

        Raises:
            durable.OutputError: a file could not be written.
        """
        path = self.path(subject, kind)
        utils.save_nifti(path, data, affine, header, zooms=zooms)
        if sidecar is not None and kind in self.SIDECAR_KINDS:
            durable.write_json(_sidecar_path(path), sidecar)
        return path

    def write_slices(self, subject, image):
        """Writes a subject's slice mosaic (uint8 (h, w)); returns its path."""
        path = self.slices_path(subject)
        utils.save_png(path, image)
        return path


class BidsOutputs(PlainOutputs):
    """A BIDS derivatives dataset.

    ``sub-X/[ses-Y/]anat/sub-X[_ses-Y]_rec-SRx<f>_T1w.nii.gz`` (super-resolved),
    ``..._rec-LRx<f>_T1w.nii.gz`` (the degraded input) and
    ``..._desc-reference_T1w.nii.gz`` (the reference), each with a JSON
    sidecar; the other entities of the source file (acq, run, desc...) are
    kept. The mosaic goes to ``sub-X/[ses-Y/]figures/..._rec-SRx<f>_slices.png``;
    ``dataset_description.json`` and ``.bidsignore`` (metrics.csv, figures)
    at the top. A subject that is not from a BIDS dataset becomes
    ``sub-<its name without non-alphanumerics>``.
    """

    scheme = "bids"
    SIDECAR_KINDS = ("sr", "lr", "hr")

    def __init__(self, folder, upsampling_factor):
        super().__init__(folder, upsampling_factor)
        self.links = {}

    def _entities(self, subject):
        if subject.entities:
            return subject.entities
        label = re.sub(r"[^A-Za-z0-9]", "", subject.name)
        if not label:
            raise UserError(f"subject {subject.name!r} has no letter or digit to name a BIDS "
                            f"subject with; use -output_layout plain")
        return (("sub", label),)

    def _changes(self, kind):
        return {"sr": {"rec": f"SRx{self.factor}"}, "lr": {"rec": f"LRx{self.factor}"},
                "hr": {"desc": "reference"}}[kind]

    def _subject_folder(self, subject, datatype):
        labels = dict(self._entities(subject))
        parts = [f"sub-{labels['sub']}"] + ([f"ses-{labels['ses']}"] if labels.get("ses") else [])
        return os.path.join(self.folder, *parts, datatype)

    def path(self, subject, kind):
        stem = bids_stem(self._entities(subject), **self._changes(kind))
        return os.path.join(self._subject_folder(subject, "anat"), f"{stem}_T1w.nii.gz")

    def slices_path(self, subject):
        stem = bids_stem(self._entities(subject), **self._changes("sr"))
        return os.path.join(self._subject_folder(subject, "figures"), f"{stem}_slices.png")

    def source(self, scan):
        """str, a BIDS URI ``bids:<link>:<path in the dataset>`` for BIDS inputs, else a file URI."""
        path = os.path.abspath(scan.subject.image_path)
        if not scan.bids:
            return pathlib.Path(path).as_uri()
        key = self._link_key(scan.root)
        return f"bids:{key}:{pathlib.Path(os.path.relpath(path, scan.root)).as_posix()}"

    def _link_key(self, root):
        uri = pathlib.Path(os.path.abspath(root)).as_uri()
        for key, value in self.links.items():
            if value == uri:
                return key
        n = len(self.links) + 1
        key = "raw" if n == 1 else f"raw{n}"
        while key in self.links:
            n += 1
            key = f"raw{n}"
        self.links[key] = uri
        return key

    def start(self, generated_by, scans):
        """Writes (or extends) ``dataset_description.json`` and ``.bidsignore``.

        Args:
            generated_by: the ``GeneratedBy`` list of this run.
            scans: the :class:`InputScan` list (their datasets become
                ``SourceDatasets`` and ``DatasetLinks``).

        Raises:
            UserError: the folder already describes another dataset (another
                checkpoint or program, or not a derivative).
            durable.OutputError: a file could not be written.
        """
        path = os.path.join(self.folder, DESCRIPTION_NAME)
        existing = _read_json(path)
        if existing is not None:
            if not isinstance(existing, dict) or existing.get("DatasetType") != "derivative" \
                    or existing.get("GeneratedBy") != generated_by:
                before = existing.get("GeneratedBy") if isinstance(existing, dict) else existing
                raise UserError(f"{path} describes another dataset (GeneratedBy {before}); this run "
                                f"({generated_by[0]['Description']}) would mix its outputs with it. "
                                "Choose another -path_volumes")
            self.links = dict(existing.get("DatasetLinks", {}))
        for scan in scans:
            self.source(scan)
        sources = list(existing.get("SourceDatasets", [])) if existing else []
        for root in dict.fromkeys(s.root for s in scans if s.root is not None):
            entry = {"URL": pathlib.Path(root).as_uri()}
            if entry not in sources:
                sources.append(entry)
        description = {
            "Name": f"{PROGRAM_NAME} super-resolution x{self.factor}",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": generated_by,
            "SourceDatasets": sources,
        }
        if self.links:
            description["DatasetLinks"] = self.links
        if description != existing:
            durable.write_json(path, description)
        ignore = os.path.join(self.folder, ".bidsignore")
        if not os.path.exists(ignore):
            durable.write_text(ignore, f"{METRICS_NAME}\n**/figures/\n")


# --------------------------------------------------------------------------- #
# Inference: metrics
# --------------------------------------------------------------------------- #

# The super-resolved volume and the interpolation baselines it is compared with.
METHODS = ("sr", "nearest", "trilinear", "tricubic")
# Per subject: the original's metrics (data range of each pair: max - min of
# both volumes), then the same with one data range for every method, the
# reference's max - min ("fair": an estimate that overshoots no longer
# enlarges its own range and so its PSNR).
METRIC_COLUMNS = (("subject", "psnr", "ssim", "psnr_nearest", "ssim_nearest", "psnr_trilinear",
                   "ssim_trilinear", "psnr_tricubic", "ssim_tricubic")
                  + tuple(f"{m}{'' if s == 'sr' else '_' + s}_fair"
                          for s in METHODS for m in ("psnr", "ssim")))
# metrics.csv header lines that only inform; the others must match to resume.
_INFORMATIONAL_SETTINGS = ("program", "checkpoint")


def metric_columns(variants=(Variant(),)):
    """The metrics.csv columns of an evaluation computing ``variants``.

    ``psnr``/``ssim`` (and their ``_fair`` pair) are the last variant's, the
    one written as ``_sr``; every other variant adds ``psnr_<key>``,
    ``ssim_<key>``, ``psnr_<key>_fair``, ``ssim_<key>_fair`` (key e.g.
    ``sr_crop``). With the default options: exactly ``METRIC_COLUMNS``.

    Returns:
        tuple of str.
    """
    return METRIC_COLUMNS + tuple(f"{m}_{v.key}{t}" for v in variants[:-1]
                                  for t in ("", "_fair") for m in ("psnr", "ssim"))


def subject_metrics(hr, estimates, mask):
    """Every metric of one subject: the original's and the fair ones.

    Args:
        hr: float32 (x, y, z), the reference in source intensities.
        estimates: dict method -> float32 (x, y, z) estimate: the ``METHODS``,
            and variant keys such as ``"sr_crop"``.
        mask: bool (x, y, z) brain mask.

    Returns:
        dict with the ``metric_columns`` keys but ``subject`` (NaN for an
        empty mask).
    """
    reference_range = float(hr.max() - hr.min()) or 1.0
    row = {}
    for method, estimate in estimates.items():
        suffix = "" if method == "sr" else f"_{method}"
        row[f"psnr{suffix}"], row[f"ssim{suffix}"] = utils.compute_metrics(hr, estimate, mask)
        row[f"psnr{suffix}_fair"], row[f"ssim{suffix}_fair"] = utils.compute_metrics(
            hr, estimate, mask, data_range=reference_range)
    return row


def _read_header_lines(path):
    """The ``# key: value`` lines at the top of a CSV file, as a dict ({} when there are none)."""
    settings = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.startswith("#"):
                    break
                key, sep, value = line[1:].strip().partition(": ")
                if sep:
                    settings[key] = value
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}")
    return settings


class MetricsFile:
    """metrics.csv: one row per subject, appended and flushed as each subject ends.

    Its ``# key: value`` header lines record what the rows depend on (the
    checkpoint, the data, sigma, the options); a later evaluation into the
    same folder with the same settings resumes (skips the subjects it holds),
    one with other settings is refused.

    Args:
        path: the CSV file.
        columns: its columns (:func:`metric_columns`).
        settings: dict of str -> str, its header lines.
    """

    def __init__(self, path, columns, settings):
        self.path = path
        self.columns = tuple(columns)
        self.settings = dict(settings)

    def done(self):
        """The subjects already in the file.

        Returns:
            set of subject names (empty for a new file).

        Raises:
            UserError: the file holds rows of an evaluation with other
                settings or columns (it is left untouched).
        """
        if not os.path.exists(self.path):
            return set()
        old = _read_header_lines(self.path)
        different = [f"{key}: {old.get(key, '(none)')} here, {value} now"
                     for key, value in self.settings.items()
                     if key not in _INFORMATIONAL_SETTINGS and old.get(key) != value]
        try:
            fieldnames, rows = durable.read_csv_rows(self.path)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {self.path}: {err}")
        if not different and fieldnames is not None and tuple(fieldnames) != self.columns:
            different.append(f"columns {','.join(fieldnames)} here")
        if different:
            raise UserError(f"{self.path} holds the results of another evaluation ("
                            + "; ".join(different) + "); its rows cannot be mixed with this run's. "
                            "Choose another -path_volumes, or move that metrics.csv away to start afresh")
        return {row["subject"] for row in rows}

    def append(self, row):
        """Appends one subject's row durably (creating the file with its header lines).

        Raises:
            durable.OutputError: the row could not be written.
        """
        lines = [f"{key}: {value}" for key, value in self.settings.items()]
        durable.append_csv_row(self.path, self.columns, row, header_lines=lines)

    def rows(self):
        """Every row in the file, numbers as floats (NaN kept)."""
        _, rows = durable.read_csv_rows(self.path)
        return [{k: (v if k == "subject" else float(v)) for k, v in row.items()} for row in rows]


def _stats_line(label, values):
    return (f"{label}: mean {values.mean():.4f}  variance {values.var():.4f}  "
            f"max {values.max():.4f}  min {values.min():.4f}  median {np.median(values):.4f}")


def _summary_lines(rows, variants=(Variant(),)):
    """The evaluation's closing report.

    Subjects whose metrics are not finite (an empty brain mask: NaN) are
    named and left out of every statistic.

    Args:
        rows: list of per-subject dicts (floats), as :meth:`MetricsFile.rows`.
        variants: the evaluation's variants; with more than one, a line each.

    Returns:
        list of str.
    """
    finite = [bool(np.isfinite(r["psnr"]) and np.isfinite(r["ssim"])) for r in rows]
    usable = [r for r, ok in zip(rows, finite) if ok]
    left_out = [r["subject"] for r, ok in zip(rows, finite) if not ok]
    lines = []
    if left_out:
        lines.append(f"left out of the summary, metrics not finite (empty brain mask): "
                     f"{len(left_out)} subject(s): " + ", ".join(left_out[:10])
                     + (" ..." if len(left_out) > 10 else ""))
    if not usable:
        lines.append("no subject with finite metrics to summarise")
        return lines

    def mean(key):
        return float(np.mean([r[key] for r in usable]))

    lines.append(f"{len(usable)} subject(s):")
    for key, label in (("psnr", "PSNR"), ("ssim", "SSIM")):
        lines.append(_stats_line(label, np.array([r[key] for r in usable], dtype=np.float64)))
    for method in ("nearest", "trilinear", "tricubic"):
        lines.append(f"baseline {method:<9}: mean PSNR {mean(f'psnr_{method}'):.4f}  "
                     f"mean SSIM {mean(f'ssim_{method}'):.4f}")
    lines.append("with one data range for every method (the reference's max - min):")
    for method in METHODS:
        suffix = "" if method == "sr" else f"_{method}"
        lines.append(f"  {'SR' if method == 'sr' else method:<9}: mean PSNR {mean(f'psnr{suffix}_fair'):.4f}"
                     f"  mean SSIM {mean(f'ssim{suffix}_fair'):.4f}")
    if len(variants) > 1:
        lines.append("inference options (mean PSNR / SSIM; the original's rule | one data range):")
        for v in variants:
            suffix = "" if v == variants[-1] else f"_{v.key}"
            lines.append(f"  SR {v.label:<14}: {mean(f'psnr{suffix}'):.4f} / {mean(f'ssim{suffix}'):.4f}"
                         f"  | {mean(f'psnr{suffix}_fair'):.4f} / {mean(f'ssim{suffix}_fair'):.4f}"
                         + ("  (written as _sr)" if v == variants[-1] else ""))
    return lines


# --------------------------------------------------------------------------- #
# Inference: evaluation
# --------------------------------------------------------------------------- #


def _evaluation_subjects(cfg, log):
    """The test subjects: split.json's for the training data, else the data's own test split or all."""
    bids_filter = _bids_filter_for(cfg, cfg["data_path"], log)
    subjects, _ = layouts.find_subjects(cfg["data_path"], cfg["image_name"], cfg["mask_name"], log=log,
                                        bids_filter=bids_filter,
                                        max_voxels=nifti_io.max_voxels_for(cfg["volume_shape"]))
    split = _read_json(os.path.join(cfg["source_checkpoint"], SPLIT_NAME))
    if split is not None and os.path.abspath(cfg["data_path"]) == split.get("data_path"):
        return _subjects_named(split["test"], subjects, "test", log)
    if all(s.split is not None for s in subjects):
        log(f"note: using the test rows of the split column of {cfg['data_path']}")
        return layouts.split_subjects(subjects)[1]
    if split is not None:
        log(f"note: {cfg['data_path']} is not the training data; evaluating all its subjects")
        return subjects
    _, test = layouts.split_subjects(subjects, cfg["train_fraction"])
    log(f"note: no {SPLIT_NAME} next to the checkpoint; using the last "
        f"{1 - cfg['train_fraction']:.0%} of the sorted subjects")
    return test


def evaluation_settings(cfg, checkpoint, variants):
    """What an evaluation's rows depend on: metrics.csv's header lines.

    Returns:
        dict str -> str; ``program`` and ``checkpoint`` (its path) inform,
        the others must match for a later run to resume the file.
    """
    return {
        "program": f"{PROGRAM_NAME} {__version__}",
        "checkpoint": f"{checkpoint['path']} (step {checkpoint['step']})",
        "checkpoint_sha256": checkpoint["sha256"],
        "data_path": os.path.abspath(cfg["data_path"]),
        "bids_filter": cfg.get("bids_filter") or "none",
        "upsampling_factor": str(cfg["upsampling_factor"]),
        "sigma": str(float(cfg["sigma"])),
        "volume_shape": ",".join(map(str, cfg["volume_shape"])),
        "blend": cfg["blend"],
        "tta": cfg["tta"],
        "sr": variants[-1].label,
    }


def _provenance(cfg, checkpoint):
    """The sidecar entries every output of a run shares."""
    return {
        "UpsamplingFactor": cfg["upsampling_factor"],
        "UpsamplingMode": cfg["upsampling_mode"],
        "Checkpoint": checkpoint["path"],
        "CheckpointStep": checkpoint["step"],
        "CheckpointSHA256": checkpoint["sha256"],
        "Blend": cfg["blend"],
        "TTA": cfg["tta"],
        "SoftwareName": PROGRAM_NAME,
        "SoftwareVersion": __version__,
    }


def _generated_by(cfg, checkpoint):
    """The BIDS ``GeneratedBy`` list of a run: the port, its version and the checkpoint."""
    return [{
        "Name": PROGRAM_NAME,
        "Version": __version__,
        "Description": (f"3D SRGAN generator x{cfg['upsampling_factor']} ({cfg['upsampling_mode']}), "
                        f"checkpoint {checkpoint['path']} (step {checkpoint['step']}, "
                        f"sha256 {checkpoint['sha256']})"),
    }]


def _make_outputs(scheme, cfg):
    return (BidsOutputs if scheme == "bids" else PlainOutputs)(cfg["path_volumes"], cfg["upsampling_factor"])


def _mosaic(subject, row, lr_nearest, tricubic, srs, hr):
    """The subject's slice mosaic: LR, tricubic, each SR variant, HR; titled, PSNR/SSIM on top."""
    if len(srs) == 1:
        titles = ["SR"]
    else:
        titles = [f"SR {v.label}" for v in srs]
    quality = (f"PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.4f}" if np.isfinite(row["psnr"])
               else "empty brain mask: no PSNR/SSIM")
    return utils.slices_mosaic([lr_nearest, tricubic, *srs.values(), hr],
                               titles=["LR", "tricubic", *titles, "HR"],
                               header=f"{subject.name}  {quality}")


def _evaluate_subject(scan, cfg, predict, variants, outputs, provenance, log):
    """Evaluates one subject and writes its outputs; returns its metrics row (None: skipped).

    The volumes, mosaic and sidecars are written before the row is returned,
    so a subject with a row in metrics.csv has all its outputs.

    Raises:
        nifti_io.PipelineError: the data folder has disappeared.
        durable.OutputError: an output could not be written.
    """
    subject, f = scan.subject, cfg["upsampling_factor"]
    try:
        image, affine, header = nifti_io.load_volume(subject.image_path, log=log,
                                                     max_voxels=nifti_io.max_voxels_for(cfg["volume_shape"]))
        nifti_io.check_intensity(image, subject.image_path)
        mask = nifti_io.load_mask(subject, image, log=log)
    except nifti_io.PipelineError:
        raise
    except nifti_io.DataError as err:
        log(f"skipping {subject.name}: {err}")
        return None
    hr, grid = td.to_canonical(image, cfg["volume_shape"])
    mask_c, _ = td.to_canonical(mask.astype(np.float32), cfg["volume_shape"])
    hr_n, nf = utils.normalize(hr)
    lr_n = np.asarray(td.degrade(hr_n, f, cfg["sigma"]))
    # to_canonical pads/crops without reordering axes: the source's left-right axis.
    flip_axis = utils.left_right_axis(affine) if any(v.flip for v in variants) else None
    estimates = super_resolve_variants(predict, lr_n, f, cfg["patch_shape"], cfg["patch_margin"],
                                       cfg["batch_size"], variants, flip_axis)
    srs = {v: utils.denormalize(estimates[v], nf) for v in variants}
    sr = srs[variants[-1]]
    lr = utils.denormalize(lr_n, nf)
    baselines = {method: utils.upsample_baseline(lr, f, order, hr.shape)
                 for method, order in (("nearest", 0), ("trilinear", 1), ("tricubic", 3))}
    others = {v.key: srs[v] for v in variants[:-1]}
    row = {"subject": subject.name, **subject_metrics(hr, {"sr": sr, **baselines, **others}, mask_c)}
    if not mask_c.any():
        log(f"{subject.name}: its brain mask is empty inside the canonical volume: metrics NaN, "
            "left out of the summary")

    source = outputs.source(scan)
    sr_sidecar = {"Description": f"super-resolved x{f} from the _lr volume ({variants[-1].label})",
                  "Sources": [source], **provenance, "Sigma": float(cfg["sigma"]),
                  "Metrics": {k: v for k, v in row.items() if k != "subject"}}
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    outputs.write_volume(subject, "sr", td.from_canonical(sr, grid), affine, header, sidecar=sr_sidecar)
    outputs.write_volume(subject, "hr", td.from_canonical(hr, grid), affine, header, sidecar={
        "Description": "the reference: the source image on its own grid, zero outside the canonical "
                       f"{'x'.join(map(str, cfg['volume_shape']))} region", "Sources": [source]})
    lr_affine = td.canonical_affine(affine, grid) @ np.diag([f, f, f, 1.0])
    outputs.write_volume(subject, "lr", lr, lr_affine, header, zooms=zooms * f, sidecar={
        "Description": f"the network's input: the canonical reference blurred (sigma {cfg['sigma']} "
                       f"voxels) and decimated by {f}", "Sources": [source],
        "UpsamplingFactor": f, "Sigma": float(cfg["sigma"])})
    outputs.write_slices(subject, _mosaic(subject, row, baselines["nearest"], baselines["tricubic"], srs, hr))
    return row


def evaluate(cfg, log=print):
    """Evaluates a checkpoint on the test subjects (SPEC section 4, patch-stitched).

    Writes to ``cfg["path_volumes"]`` per subject the SR, reference and LR
    volumes and a slice mosaic (plain or BIDS-derivatives names, see
    :class:`PlainOutputs`, :class:`BidsOutputs`), and ``metrics.csv``, one row
    appended as each subject ends. A folder whose metrics.csv was written with
    the same settings is resumed: the subjects it holds are skipped. With
    -blend/-tta, every variant of :func:`inference_variants` is measured and
    the last is written.

    Returns:
        list of per-subject dicts (every row of metrics.csv, numbers as floats).

    Raises:
        UserError: unusable checkpoint, data or output folder; metrics.csv of
            an evaluation with other settings; no subject could be evaluated.
        durable.LockedError: another run writes into the folder.
        durable.OutputError: an output could not be written.
    """
    out_dir = cfg["path_volumes"]
    layout = layouts.detect_layout(cfg["data_path"], cfg["image_name"])
    root = _data_root(cfg["data_path"], layout)
    subjects = _evaluation_subjects(cfg, log)
    if not subjects:
        raise UserError(f"no test subject to evaluate in {cfg['data_path']!r}")
    scans = [InputScan(s, root, layout == "bids") for s in subjects]
    _check_output_folder(out_dir, [(root, layout)])
    with durable.RunLock(out_dir, "evaluation"):
        durable.remove_stale_temporaries(out_dir)
        return _evaluate_locked(cfg, scans, log)


def _evaluate_locked(cfg, scans, log):
    """:func:`evaluate` once the output folder is locked."""
    variants = inference_variants(cfg["blend"], cfg["tta"])
    checkpoint = checkpoint_identity(cfg["source_checkpoint"])
    outputs = _make_outputs(_output_scheme(cfg, scans), cfg)
    metrics = MetricsFile(os.path.join(outputs.folder, METRICS_NAME), metric_columns(variants),
                          evaluation_settings(cfg, checkpoint, variants))
    outputs.check_unique(scans)
    done = metrics.done()
    todo = [s for s in scans if s.subject.name not in done]
    log(f"evaluation: {len(scans)} subject(s), {outputs.scheme} outputs in {outputs.folder}; "
        f"SR variants: {', '.join(v.label for v in variants)} (written: {variants[-1].label})")
    if len(todo) < len(scans):
        log(f"resuming: {len(scans) - len(todo)} of {len(scans)} subject(s) already in "
            f"{metrics.path} are skipped")
    if todo:
        if not done:
            _overwrite_note([outputs.path(s.subject, "sr") for s in todo], log)
        predict = _restored_predictor(cfg, log)
        outputs.start(_generated_by(cfg, checkpoint), scans)
        provenance = _provenance(cfg, checkpoint)
        for scan in tqdm(todo, desc="evaluate", unit="volume", file=sys.stderr, dynamic_ncols=True):
            start = time.time()
            row = _evaluate_subject(scan, cfg, predict, variants, outputs, provenance, log)
            if row is None:
                continue
            metrics.append(row)
            tqdm.write(f"{row['subject']}: PSNR {row['psnr']:.4f} SSIM {row['ssim']:.4f} "
                       f"(tricubic {row['psnr_tricubic']:.4f} / {row['ssim_tricubic']:.4f}) "
                       f"{time.time() - start:.1f} s", file=sys.stderr)
    rows = metrics.rows() if os.path.exists(metrics.path) else []
    if not rows:
        raise UserError("no test subject could be evaluated; see the messages above")
    for line in _summary_lines(rows, variants):
        log(line)
    log(f"volumes, slices PNGs and {METRICS_NAME} written to {outputs.folder}")
    return rows


# --------------------------------------------------------------------------- #
# Inference: -super_resolve
# --------------------------------------------------------------------------- #


def _super_resolve_scan(scan, cfg, predict, outputs, provenance, log):
    """Super-resolves one scan as it is and writes it with its sidecar; returns the path.

    Raises:
        nifti_io.DataError: the scan cannot be read or its maximum is <= 0.
        durable.OutputError: the output could not be written.
    """
    f = cfg["upsampling_factor"]
    path = scan.subject.image_path
    image, affine, header = nifti_io.load_volume(path, log=log, max_voxels=nifti_io.max_voxels_for(cfg["volume_shape"]))
    nifti_io.check_intensity(image, path)
    lr_n, nf = utils.normalize(image)
    variant = inference_variants(cfg["blend"], cfg["tta"])[-1]
    flip_axis = utils.left_right_axis(affine) if variant.flip else None
    sr = utils.denormalize(super_resolve_variants(
        predict, lr_n, f, cfg["patch_shape"], cfg["patch_margin"], cfg["batch_size"], (variant,),
        flip_axis)[variant], nf)
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64) / f
    sidecar = {"Description": f"super-resolved x{f} from the source as it is ({variant.label})",
               "Sources": [outputs.source(scan)], **provenance}
    out = outputs.write_volume(scan.subject, "sr", sr, affine @ np.diag([1.0 / f, 1.0 / f, 1.0 / f, 1.0]),
                               header, zooms=zooms, sidecar=sidecar)
    tqdm.write(f"{path} {image.shape} -> {out} {sr.shape}", file=sys.stderr)
    return out


def super_resolve_file(cfg, log=print):
    """-super_resolve: super-resolves low-resolution scans as they are (no degradation).

    ``cfg["super_resolve"]`` lists NIfTI files, folders (any layout
    ``find_subjects`` reads, BIDS included) and .csv lists. Each scan gives an
    SR volume of f × its shape with affine ``input_affine @ diag(1/f, 1/f,
    1/f, 1)`` so it overlays the input, and a JSON sidecar (factor, mode,
    checkpoint, options); plain names (``<name>_sr.nii.gz``) or BIDS
    derivatives (``..._rec-SRx<f>_T1w.nii.gz``) as :func:`_output_scheme`
    says. A progress bar runs over the scans. With several scans an
    unreadable one (or one whose maximum is <= 0) is reported and skipped.

    Returns:
        list of the SR paths written.

    Raises:
        UserError: unusable checkpoint, output folder or inputs; the only scan
            is unusable; no scan could be read.
        nifti_io.DataError: a single scan that cannot be read or has a maximum <= 0.
        durable.LockedError: another run writes into the folder.
        durable.OutputError: an output could not be written.
    """
    scans = _super_resolve_inputs(cfg, log)
    outputs = _make_outputs(_output_scheme(cfg, scans), cfg)
    outputs.check_unique(scans)
    sources = [(s.root, "bids" if s.bids else None) for s in scans if s.root is not None]
    sources += [(os.path.abspath(p), layouts.detect_layout(p, cfg["image_name"]))
                for p in cfg["super_resolve"] if os.path.isdir(p)]
    _check_output_folder(outputs.folder, sources)
    with durable.RunLock(outputs.folder, "super-resolution"):
        durable.remove_stale_temporaries(outputs.folder)
        checkpoint = checkpoint_identity(cfg["source_checkpoint"])
        _overwrite_note([outputs.path(s.subject, "sr") for s in scans], log)
        predict = _restored_predictor(cfg, log)
        outputs.start(_generated_by(cfg, checkpoint), scans)
        provenance = _provenance(cfg, checkpoint)
        written, skipped = [], []
        for scan in tqdm(scans, desc="super-resolve", unit="scan", file=sys.stderr, dynamic_ncols=True,
                         disable=len(scans) == 1):
            try:
                written.append(_super_resolve_scan(scan, cfg, predict, outputs, provenance, log))
            except nifti_io.PipelineError:
                raise
            except nifti_io.DataError as err:
                if len(scans) == 1:
                    raise
                log(f"skipping: {err}")
                skipped.append(scan)
    if not written:
        raise UserError("no scan could be super-resolved; see the messages above")
    log(f"{len(written)} super-resolved scan(s) written to {outputs.folder} ({outputs.scheme} names)"
        + (f"; {len(skipped)} skipped" if skipped else ""))
    return written


# --------------------------------------------------------------------------- #
# Demo
# --------------------------------------------------------------------------- #


def run_demo(cfg, log=print, placement=None):
    """Phantoms (made once), a small training run and its evaluation, end to end."""
    data = cfg["data_path"]
    if not (os.path.isdir(data) and os.listdir(data)):
        log(f"writing {DEMO_SUBJECTS} demo phantoms {DEMO_SHAPE} to {data}")
        phantoms.make_demo_data(data, subjects=DEMO_SUBJECTS, shape=DEMO_SHAPE, seed=cfg["seed"])
    ckpt = cfg["checkpoint_dir"]
    if tf.train.latest_checkpoint(ckpt) is not None and "checkpoint_dir" not in cfg["explicit"]:
        log(f"note: replacing the previous demo run in {ckpt}")
        shutil.rmtree(ckpt)
    volumes = cfg["path_volumes"]
    if os.path.isdir(volumes) and "path_volumes" not in cfg["explicit"]:
        # Its metrics.csv belongs to the previous demo checkpoint: not to be resumed.
        log(f"note: replacing the previous demo outputs in {volumes}")
        shutil.rmtree(volumes)
    started = time.time()
    result = train(cfg, log=log, placement=placement)
    eval_cfg = dict(cfg, action="evaluate", source_checkpoint=ckpt)
    rows = evaluate(eval_cfg, log=log)
    log("")
    log(f"demo finished in {time.time() - started:.0f} s")
    log(f"  checkpoints : {ckpt} (latest {result['checkpoint']})")
    log(f"  predictions : {cfg['path_prediction']}")
    log(f"  TensorBoard : tensorboard --logdir {cfg['log_dir']}")
    log(f"  volumes     : {cfg['path_volumes']} (*_sr/_hr/_lr.nii.gz, *_slices.png)")
    log(f"  metrics     : {os.path.join(cfg['path_volumes'], 'metrics.csv')}")
    return rows


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #


def main(argv=None):
    """Runs the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        # First: the strategy fixes which devices TensorFlow's runtime starts with.
        placement = choose_placement(args.gpus, multi_worker=_action(given_settings(args)) == "train",
                                     verbose=bool(args.verbose))
        cfg = resolve_config(args)
        if cfg["demo"]:
            run_demo(cfg, placement=placement)
        elif cfg["action"] == "super_resolve":
            super_resolve_file(cfg)
        elif cfg["action"] == "evaluate":
            evaluate(cfg)
        else:
            train(cfg, placement=placement)
    except RunStopped as err:
        word = "error" if err.exit_code == EXIT_ERROR else "stopped"
        print(f"{word}: {err}", file=sys.stderr)
        return err.exit_code
    except (UserError, nifti_io.DataError, durable.OutputError, durable.LockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
