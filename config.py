"""The run configuration: every setting once, with its default, flag, check and persistence.

:class:`Settings` is the one typed table of settings. Each field carries its
flag's help text and parser (``model.py`` builds argparse from it) and how it
travels through a run's ``config.json`` (its ``persisted`` kind):

- ``ARCHITECTURE``: a resumed, evaluated or super-resolving run takes it from
  the checkpoint; an explicit flag that contradicts it is an error.
- ``RESUMED``: like ARCHITECTURE when training resumes (mixed precision: the
  loss-scale state lives in the checkpoint); free for evaluation.
- ``RUN``: taken from the checkpoint unless the flag is given.
- None: never written.

:func:`resolve` turns the explicit flags into a :class:`Command`: the settings
plus what to do and where they came from (bookkeeping, not settings).
Precedence: explicit flag > the checkpoint's config.json > the demo preset >
the built-in default.

The command line builds its parser from this module before TensorFlow
loads, so the modules that need TensorFlow are imported by the functions
that use them.
"""

import dataclasses
import json
import math
import os

import factors
import layouts
import model_file
import placement as placement_lib
import train_dataset as td
import utils
from errors import UserError

CONFIG_NAME = "config.json"
ARCHITECTURE, RESUMED, RUN = "architecture", "resumed", "run"
ACTIONS = ("train", "evaluate", "super_resolve", "export")

# -mixed_precision values and the Keras dtype policies they select.
PRECISION_POLICIES = {"none": None, "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
# -output_layout: auto means bids when every input is BIDS, plain otherwise.
OUTPUT_LAYOUTS = ("auto", "plain", "bids")
# -tta: none, or also super-resolve the left-right mirrored volume and average.
TTA_MODES = ("none", "flip")


# --------------------------------------------------------------------------- #
# Value parsers: str -> value, ValueError naming what was expected
# --------------------------------------------------------------------------- #


def parse_bool(value):
    """Parses True/False, 1/0, yes/no (any case) into a bool.

    Raises:
        ValueError: for anything else.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "t"):
        return True
    if text in ("false", "0", "no", "n", "f"):
        return False
    raise ValueError(f"expected a boolean (True/False, 1/0, yes/no), got {value!r}")


def parse_shape(value):
    """Parses ``"224,224,152"`` or ``"224x224x152"`` into a tuple of three positive ints.

    Raises:
        ValueError: for anything else.
    """
    parts = str(value).lower().replace("x", ",").replace(" ", "").split(",")
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected three positive integers such as 224,224,152, got {value!r}")
    return shape


def number_parser(kind, minimum, strict, maximum=None):
    """A parser for finite numbers of ``kind`` above ``minimum`` (and up to ``maximum``).

    Args:
        kind: int or float.
        minimum: the bound from below.
        strict: bool, ``> minimum`` (else ``>=``).
        maximum: optional bound from above (inclusive).

    Returns:
        callable str -> number, raising ValueError naming what was expected.
    """
    words = f"a {'positive' if strict else 'non-negative'} {'number' if kind is float else 'integer'}"
    if maximum is not None:
        words += f" up to {maximum}"

    def parse(value):
        try:
            number = kind(value)
        except (TypeError, ValueError):
            number = None
        ok = number is not None and math.isfinite(number) and (
            number > minimum if strict else number >= minimum) and (maximum is None or number <= maximum)
        if not ok:
            raise ValueError(f"expected {words}, got {value!r}")
        return number
    parse.__name__ = kind.__name__
    return parse


def parse_factor(value):
    """Parses -upsampling_factor: ``"3"`` (every axis) or ``"1,1,3"`` (one per axis, thick slices).

    Returns:
        factors.UpsamplingFactor (three equal factors are the isotropic one: the same networks).

    Raises:
        ValueError: naming the value and what was expected.
    """
    return factors.UpsamplingFactor.of(str(value), "")


positive_int = number_parser(int, 0, strict=True)
non_negative_int = number_parser(int, 0, strict=False)
positive_float = number_parser(float, 0, strict=True)
non_negative_float = number_parser(float, 0, strict=False)
fraction = number_parser(float, 0, strict=False, maximum=1)
share = number_parser(float, 0, strict=True, maximum=1)
# numpy's and TensorFlow's seeds are 32-bit.
parse_seed = number_parser(int, 0, strict=False, maximum=2 ** 32 - 1)


def setting(default, help=None, persisted=None, parse=None, shown=None, metavar=None, choices=None,
            boolean=False, nargs=None):
    """A :class:`Settings` field: its default plus what its flag and config.json need.

    Args:
        default: the built-in default (None: derived at resolution, see ``shown``).
        help: the flag's help text; None for a setting without a flag of its own.
        persisted: ARCHITECTURE, RESUMED, RUN or None.
        parse: callable str -> value raising ValueError (the flag's check).
        shown: the default as -h shows it, when it is not the value itself.
        metavar, choices, nargs: as argparse's.
        boolean: bool, a True/False flag (a bare flag means True).
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help, persisted=persisted, parse=parse, shown=shown, metavar=metavar, choices=choices,
        boolean=boolean, nargs=nargs))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of a run, typed; the built-in defaults are the original's (SPEC section 7)."""

    # Folders
    data_path: str = setting("data", "dataset: a folder (one sub-folder per subject, NIfTI files, or a "
                             "BIDS dataset) or a .csv file list", RUN, metavar="PATH")
    checkpoint_dir: str = setting("checkpoints", "folder for training checkpoints, config.json and "
                                  "split.json", metavar="DIR")
    checkpoint_dir_restore: "str | None" = setting(
        None, "checkpoint folder to evaluate, super-resolve or export with", metavar="DIR")
    model: "str | None" = setting(
        None, "a .keras model file written by -export: evaluate or super-resolve with it instead of "
        "-checkpoint_dir_restore", metavar="FILE")
    path_prediction: "str | None" = setting(
        None, "folder for the HR/LR/SR patches written during training",
        shown="<checkpoint_dir>/predictions", metavar="DIR")
    path_volumes: "str | None" = setting(
        None, "folder for evaluation and -super_resolve outputs",
        shown="<checkpoint_dir_restore>/volumes", metavar="DIR")
    log_dir: "str | None" = setting(None, "TensorBoard folder", shown="<checkpoint_dir>/logs", metavar="DIR")
    restore: "str | None" = setting(None, "resume training from the latest checkpoint in this folder",
                                    metavar="DIR")
    # Architecture
    residual_blocks: int = setting(6, "number of residual blocks", ARCHITECTURE, non_negative_int,
                                   metavar="N")
    upsampling_factor: factors.UpsamplingFactor = setting(
        factors.UpsamplingFactor.of(4), "upsampling factor: an integer >= 2 (every axis), or one per axis "
        "for thick slices such as 1,1,3 or 1,1,5", ARCHITECTURE, parse_factor, shown="4", metavar="F")
    feature_size: int = setting(32, "filters of the residual trunk", ARCHITECTURE, positive_int, metavar="N")
    # Chosen on the command line by the original's -subpixel_NN/-nn pair (model.py).
    upsampling_mode: str = setting("subpixel", persisted=ARCHITECTURE)
    volume_shape: tuple = setting(td.VOLUME_SHAPE, "canonical volume every scan is padded/cropped to",
                                  ARCHITECTURE, parse_shape, metavar="X,Y,Z")
    patch_shape: tuple = setting(td.PATCH_SHAPE, "HR training patch", ARCHITECTURE, parse_shape,
                                 metavar="X,Y,Z")
    patch_margin: int = setting(td.MARGIN, "patch margin; patches step by patch - 2*margin", ARCHITECTURE,
                                non_negative_int, metavar="N")
    sigma: float = setting(1.0, "Gaussian blur (voxels) of the degradation before decimation; "
                           "evaluation uses the training's value", ARCHITECTURE, non_negative_float,
                           metavar="S")
    slice_profile: str = setting("gaussian", "degradation along the upsampled axes: gaussian (blur of "
                                 "-sigma, then every f-th voxel: the original's) or box (each LR voxel "
                                 "the mean of its slab of f HR voxels: a 2-D acquisition's contiguous "
                                 "thick slices)", ARCHITECTURE, choices=factors.SLICE_PROFILES)
    mixed_precision: str = setting("none", "compute in float16 (with loss scaling) or bfloat16 on GPUs "
                                   "that support it; weights, losses and outputs stay float32", RESUMED,
                                   choices=tuple(PRECISION_POLICIES))
    # What to do
    evaluate: bool = setting(False, "evaluate -checkpoint_dir_restore on the test split", boolean=True)
    super_resolve: "tuple | None" = setting(
        None, "super-resolve these low-resolution NIfTI scans as they are (files, folders, BIDS "
        "datasets or .csv lists)", nargs="+", metavar="PATH")
    demo: bool = setting(False, "make phantoms in ./demo and run a small train + evaluate end to end",
                         boolean=True)
    export: "str | None" = setting(
        None, "write the generator of -checkpoint_dir_restore as one .keras file (architecture, "
        "weights, settings, provenance, model card) to FILE", metavar="FILE")
    # Data
    image_name: str = setting(layouts.IMAGE_NAME, "image file name inside each subject folder", RUN,
                              metavar="NAME")
    mask_name: str = setting(layouts.MASK_NAME, "brain mask file name inside each subject folder (absent: "
                             "image > 0); for BIDS a pattern in anat/ (default: the *_desc-brain_mask "
                             "convention)", RUN, metavar="NAME")
    bids_filter: "str | None" = setting(
        None, "BIDS data: keep the T1w files whose names carry all these entities, comma-separated, "
        "e.g. desc-brain or acq-mprage,run-01", RUN, shown="none", metavar="ENTITIES")
    train_fraction: float = setting(0.8, "fraction of the sorted subjects used for training", RUN,
                                    positive_float, metavar="P")
    validation_fraction: float = setting(
        0.0, "hold out this share of the training subjects (at least one; chosen by -seed) to validate "
        "on during training and keep the best checkpoint in <checkpoint_dir>/best; 0: no validation",
        RUN, fraction, metavar="P")
    validate_steps: int = setting(0, "validate every N steps (0: at each epoch end); with validation on",
                                  RUN, non_negative_int, metavar="N")
    seed: int = setting(0, "random seed (weights, data order, label noise), 0 to 2**32-1", RUN, parse_seed,
                        metavar="N")
    # Training
    epochs: int = setting(10, "total epochs to reach (a resumed run continues up to this)", RUN,
                          positive_int, metavar="N")
    batch_size: int = setting(2, "patches per batch (8 patches per volume: 4 batches)", RUN, positive_int,
                              metavar="N")
    learning_rate: float = setting(1e-4, "initial Adam learning rate, decayed as lr/(1+0.5*step/4920)",
                                   RUN, positive_float, metavar="LR")
    pretrain_steps: int = setting(0, "first N steps train the generator on the content loss alone (sum "
                                  "of squared errors + gradient difference, no adversarial term) while "
                                  "the discriminator warms up; the GAN steps after them keep the "
                                  "generator's batch-norm statistics frozen; 0 = the original recipe", RUN,
                                  non_negative_int, metavar="N")
    gan_lr_scale: float = setting(0.3, "the generator's learning rate in the GAN steps after "
                                  "-pretrain_steps, as a share of the schedule's (the discriminator keeps "
                                  "the full rate); in (0, 1]; unused without -pretrain_steps", RUN, share,
                                  metavar="S")
    checkpoint_minutes: float = setting(30.0, "also checkpoint inside an epoch every this many minutes "
                                        "of training (0: off); every epoch ends with one anyway", RUN,
                                        non_negative_float, metavar="MIN")
    checkpoint_steps: int = setting(0, "also checkpoint every this many steps (0: off)", RUN,
                                    non_negative_int, metavar="N")
    keep_checkpoints: int = setting(3, "checkpoints kept in -checkpoint_dir (the newest)", RUN,
                                    positive_int, metavar="N")
    run_eagerly: bool = setting(False, "run the training step eagerly (debugging; slow)", boolean=True)
    gpus: "tuple | None" = setting(
        None, "devices to use: GPU indices such as 0,1 (several: MirroredStrategy), cpu, or cpu:N (N "
        "CPU replicas, to try the distributed path without GPUs); TF_CONFIG or a SLURM step of "
        "several tasks trains on several machines", shown="every visible GPU",
        parse=placement_lib.parse_gpus, metavar="LIST")
    xla: bool = setting(False, "compile the training step with XLA (jit_compile; one device only)",
                        boolean=True)
    verbose: bool = setting(False, "show TensorFlow's own start-up and warning lines", boolean=True)
    version: bool = setting(False, "print the program, TensorFlow and Keras versions and exit", boolean=True)
    # Inference
    output_layout: str = setting("auto", "names of the evaluation and -super_resolve outputs: bids (a "
                                 "BIDS derivatives dataset), plain (<subject>_sr.nii.gz), auto (bids for "
                                 "BIDS input)", choices=OUTPUT_LAYOUTS)
    blend: str = setting("crop", "-evaluate/-super_resolve: merge overlapping patches by crop (the "
                         "original's) or gaussian weights", choices=td.BLEND_MODES)
    tta: str = setting("none", "-evaluate/-super_resolve test-time augmentation: flip also "
                       "super-resolves the left-right mirrored volume and averages", choices=TTA_MODES)

    def __post_init__(self):
        # Typed whichever way it came (a flag, config.json, a Python caller's int).
        object.__setattr__(self, "upsampling_factor", factors.UpsamplingFactor.of(self.upsampling_factor))

    def architecture(self):
        """The generator's architecture settings, as ``networks.build_generator`` keywords."""
        return {"upsampling_factor": self.upsampling_factor, "residual_blocks": self.residual_blocks,
                "feature_size": self.feature_size, "upsampling_mode": self.upsampling_mode}

    def replace(self, **changes):
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
# What a run whose config.json predates a setting trained with, where that is
# not today's default: a resumed run goes on as it started.
LEGACY_VALUES = {"gan_lr_scale": 0.1}
# The persisted settings and their kinds, in the table's order.
PERSISTED = {name: f.metadata["persisted"] for name, f in FIELDS.items() if f.metadata["persisted"]}

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
    "upsampling_factor": factors.UpsamplingFactor.of(2),
    "residual_blocks": 2,
    "feature_size": 16,
    # The demo's recipe, chosen by measurement (README, "The demo"): with the
    # original's 1e-4 and 320 GAN steps it ends below tricubic; 320 content-only
    # steps at 1e-3, then 320 GAN steps, beat tricubic on fair PSNR and SSIM.
    "epochs": 20,
    "learning_rate": 1e-3,
    "pretrain_steps": 320,
}


def defaults():
    """dict of every setting's built-in default."""
    return {name: f.default for name, f in FIELDS.items()}


@dataclasses.dataclass(frozen=True)
class Command:
    """What a command line asks for: the settings, and bookkeeping about them.

    Attributes:
        action: one of ``ACTIONS``.
        settings: the resolved :class:`Settings`.
        explicit: frozenset of the setting names given on the command line.
        saved: the config.json dict of the checkpoint read (None: none).
        source_checkpoint: the checkpoint folder restored, evaluated or
            super-resolved with (None for a fresh training run).
    """

    action: str
    settings: Settings
    explicit: frozenset = frozenset()
    saved: "dict | None" = None
    source_checkpoint: "str | None" = None


# --------------------------------------------------------------------------- #
# config.json
# --------------------------------------------------------------------------- #


def read_json(path):
    """The JSON in ``path``, None when the file does not exist.

    Raises:
        UserError: the file cannot be read or is not JSON.
    """
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}")


def to_json(value):
    """A setting as config.json holds it (a factor as an int or three ints, shapes as lists)."""
    if isinstance(value, factors.UpsamplingFactor):
        value = value.value
    return list(value) if isinstance(value, tuple) else value


def from_json(key, value):
    """A config.json value as the setting ``key`` holds it.

    Raises:
        UserError: a factor that is not one (a hand-edited config.json).
    """
    if key == "upsampling_factor":
        try:
            return factors.UpsamplingFactor.of(value)
        except ValueError as err:
            raise UserError(f"{CONFIG_NAME}: {err}")
    return tuple(value) if isinstance(value, list) else value


def config_record(cfg, strategy_name="none (one device)", replicas=1, workers=1):
    """The config.json of a run: every persisted setting, the strategy and the versions.

    Args:
        cfg: the run's :class:`Settings`.
        strategy_name, replicas, workers: where it trains (``placement.Placement``).

    Returns:
        dict, JSON-serialisable.
    """
    import keras
    import tensorflow as tf

    out = {k: to_json(getattr(cfg, k)) for k in PERSISTED}
    out["data_path"] = os.path.abspath(cfg.data_path)
    out.update(strategy=strategy_name, replicas=replicas, workers=workers,
               tensorflow=tf.__version__, keras=keras.__version__)
    return out


def checkpoint_config(folder, log):
    """The config.json of a checkpoint folder (None when it has none).

    Raises:
        UserError: the folder holds no checkpoint, or its config.json cannot be read.
    """
    import checkpoints

    if model_file.is_model_file(folder):
        return model_file.read_metadata(folder)["settings"]
    checkpoints.require(folder)
    saved = read_json(os.path.join(folder, CONFIG_NAME))
    if saved is None:
        log(f"note: {folder} has no {CONFIG_NAME}; using the architecture flags as given")
    return saved


def mode_flags_text(mode):
    """The original's flags that select upsampling ``mode``, e.g. ``-subpixel_NN False -nn True``."""
    return f"-subpixel_NN {mode == 'subpixel_NN'} -nn {mode == 'nn'}"


def flag_text(name, value):
    """How a message shows a setting: ``-name value``."""
    if name == "upsampling_mode":
        return f"upsampling mode {value!r} ({mode_flags_text(value)})"
    if isinstance(value, factors.UpsamplingFactor):
        value = value.flag_text
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"-{name} {value}"


def adopt_saved_settings(values, saved, given, action, source):
    """Fills ``values`` from a checkpoint's config.json by the ``PERSISTED`` table.

    A setting the config.json lacks (written before the setting existed) takes
    its ``LEGACY_VALUES`` value, if it has one, unless its flag is given.

    Args:
        values: dict of the settings so far (defaults, demo preset, given flags); updated.
        saved: the checkpoint's config.json dict.
        given: dict of the explicit settings.
        action: "train" (resume), "evaluate" or "super_resolve".
        source: the checkpoint folder (for the message).

    Raises:
        UserError: naming every explicit flag that contradicts the checkpoint.
    """
    mismatched = []
    for key, kind in PERSISTED.items():
        if key not in saved:
            if key in LEGACY_VALUES and key not in given:
                values[key] = LEGACY_VALUES[key]
            continue
        value = from_json(key, saved[key])
        binding = kind == ARCHITECTURE or (kind == RESUMED and action == "train")
        if not binding and kind != RUN:
            continue
        if key in given:
            if binding and given[key] != value:
                mismatched.append(f"{flag_text(key, given[key])}, the checkpoint uses {flag_text(key, value)}")
            if kind == RUN:
                continue
        values[key] = value
    if mismatched:
        raise UserError(
            f"the architecture flags do not match the checkpoint in {source!r} "
            f"(from its {CONFIG_NAME}): " + "; ".join(mismatched) +
            ". Pass the checkpoint's values or leave these flags out to use them.")


# --------------------------------------------------------------------------- #
# Resolution and checks
# --------------------------------------------------------------------------- #


def action_of(given):
    """The action the explicit settings ask for: "super_resolve", "evaluate" or "train".

    Raises:
        UserError: -demo with anything but a fresh training.
    """
    chosen = [a for a in ("super_resolve", "evaluate", "export") if given.get(a)]
    if len(chosen) > 1:
        raise UserError(f"-{chosen[0]} and -{chosen[1]} are two different commands; run them one at a time")
    action = chosen[0] if chosen else "train"
    if given.get("demo") and (action != "train" or given.get("restore")):
        raise UserError("-demo True runs its own training and evaluation from scratch; "
                        "drop -evaluate/-super_resolve/-export/-restore")
    return action


def checkpoint_source(given, action):
    """The checkpoint folder a command reads (None for a fresh training run)."""
    folder, file = given.get("checkpoint_dir_restore"), given.get("model")
    if file and action not in ("evaluate", "super_resolve"):
        raise UserError("-model is for -evaluate and -super_resolve; training resumes from a checkpoint "
                        "folder (-restore) and -export reads one (-checkpoint_dir_restore)")
    if folder and file:
        raise UserError("give -checkpoint_dir_restore or -model, not both")
    if action in ("evaluate", "super_resolve", "export"):
        if not (folder or file):
            flag = {"evaluate": "-evaluate True", "super_resolve": "-super_resolve",
                    "export": "-export"}[action]
            raise UserError(f"{flag} needs -checkpoint_dir_restore DIR, the folder of a trained checkpoint"
                            + ("" if action == "export" else ", or -model FILE, a model written by -export"))
        return folder or file
    return given.get("restore")


def derived_folders(values, source):
    """Fills the folders whose default follows from others (``shown`` in -h)."""
    if values["path_prediction"] is None:
        values["path_prediction"] = os.path.join(values["checkpoint_dir"], "predictions")
    if values["log_dir"] is None:
        values["log_dir"] = os.path.join(values["checkpoint_dir"], "logs")
    if values["path_volumes"] is None:
        if model_file.is_model_file(source):
            values["path_volumes"] = os.path.splitext(source)[0] + "_volumes"
        else:
            values["path_volumes"] = os.path.join(source or values["checkpoint_dir"], "volumes")


def resolve(given, log=print):
    """Turns the explicit settings into a checked :class:`Command`.

    Args:
        given: dict of the settings given on the command line (names of
            :class:`Settings`; ``upsampling_mode`` already translated).
        log: callable for notes.

    Returns:
        :class:`Command`.

    Raises:
        UserError: for contradictory, missing or invalid settings.
    """
    action = action_of(given)
    values = defaults()
    if given.get("demo"):
        values.update(DEMO)
    source = checkpoint_source(given, action)
    saved = checkpoint_config(source, log) if source is not None else None
    values.update(given)
    if saved is not None:
        adopt_saved_settings(values, saved, given, action, source)
    if action == "train" and given.get("restore") and "checkpoint_dir" not in given:
        values["checkpoint_dir"] = given["restore"]
    derived_folders(values, source)
    if values["super_resolve"] is not None:
        values["super_resolve"] = tuple(values["super_resolve"])
    try:
        cfg = Settings(**values)
    except ValueError as err:
        raise UserError(f"-upsampling_factor: {err}")
    check_config(cfg, action)
    if cfg.slice_profile == "box" and "sigma" in given:
        log(f"note: -sigma {cfg.sigma} is not used with -slice_profile box (each LR voxel is the mean of "
            "its slab of f HR voxels)")
    return Command(action, cfg, frozenset(given), saved, source)


def check_config(cfg, action):
    """Checks resolved settings before any work starts.

    Raises:
        UserError: naming the flag and the value.
    """
    import networks

    check_geometry(cfg.upsampling_factor, cfg.volume_shape, cfg.patch_shape, cfg.patch_margin)
    if cfg.upsampling_mode not in networks.UPSAMPLING_MODES:
        raise UserError(f"upsampling mode {cfg.upsampling_mode!r} must be one of "
                        f"{', '.join(networks.UPSAMPLING_MODES)}")
    if action == "train" and cfg.mixed_precision == "bfloat16" and not gpus_visible():
        # Measured with TF 2.21: oneDNN's bfloat16 conv3d gradients on CPU turn
        # NaN now and then (2-3 of 80 tiny runs; none with TF_ENABLE_ONEDNN_OPTS=0).
        raise UserError("-mixed_precision bfloat16 needs a GPU for training: on the CPU, "
                        "TensorFlow's bfloat16 3-D convolution gradients intermittently turn NaN "
                        "and would corrupt the run. Use -mixed_precision none (or float16) here.")
    if not 0 < cfg.train_fraction <= 1:
        raise UserError(f"-train_fraction {cfg.train_fraction} must be in (0, 1]")
    if not 0 <= cfg.validation_fraction < 1:
        raise UserError(f"-validation_fraction {cfg.validation_fraction} must be in [0, 1): the share of "
                        "the training subjects held out for validation")
    check_inference_options(cfg, action)
    if action == "export" and not model_file.is_model_file(cfg.export):
        raise UserError(f"-export {cfg.export!r} must name a {model_file.SUFFIX} file")
    if action == "train" and not cfg.demo and not os.path.exists(cfg.data_path):
        if cfg.restore:
            raise UserError(f"-data_path {cfg.data_path!r} (the data of the run in {cfg.restore}) does not "
                            f"exist; pass its new place: -restore {cfg.restore} -data_path NEW_PLACE")
        raise UserError(f"-data_path {cfg.data_path!r} does not exist; pass the folder that "
                        "holds one sub-folder per subject (or NIfTI files), or try -demo True")


def gpus_visible():
    """bool, whether TensorFlow sees a GPU."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def check_geometry(upsampling_factor, volume_shape, patch_shape, margin):
    """Checks that the canonical volume, the patches and the margin fit the factor and each other.

    Raises:
        UserError: naming the flag, the axis, the value and the nearest valid sizes.
    """
    f = factors.UpsamplingFactor.of(upsampling_factor)
    problem = (f.shape_problem("-volume_shape", volume_shape) or f.shape_problem("-patch_shape", patch_shape)
               or f.margin_problem("-patch_margin", margin))
    if problem:
        raise UserError(problem)
    if any(p > v for p, v in zip(patch_shape, volume_shape)):
        raise UserError(f"-patch_shape {patch_shape} is larger than -volume_shape {volume_shape}")
    if any(p - 2 * margin < 1 for p in patch_shape):
        raise UserError(f"-patch_margin {margin} leaves no step in -patch_shape {patch_shape} "
                        "(needs patch - 2*margin >= 1 on every axis)")


def check_inference_options(cfg, action):
    """Checks the data-layout and inference settings before any work starts.

    Raises:
        UserError: a malformed -bids_filter, or a -super_resolve path that
            does not exist or is neither a NIfTI file, a folder nor a list.
    """
    try:
        layouts.parse_bids_filter(cfg.bids_filter)
    except ValueError as err:
        raise UserError(str(err))
    if action != "super_resolve":
        return
    for path in cfg.super_resolve:
        if not os.path.exists(path):
            raise UserError(f"-super_resolve {path!r} does not exist")
        if os.path.isfile(path) and not (path.lower().endswith((".nii", ".nii.gz"))
                                         or layouts.is_file_list(path)):
            raise UserError(f"-super_resolve {path!r} is not a .nii/.nii.gz scan, a folder or a "
                            ".csv file list")
