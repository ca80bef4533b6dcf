"""A trained generator as one self-describing file: a Keras ``.keras`` archive plus our metadata.

The archive is what ``keras.Model.save`` writes (the architecture, the
weights; the custom layers of ``networks`` are registered as serialisable),
with one more member, ``srgan3d.json``: the settings inference needs to give
the checkpoint's results (upsampling factor and mode, degradation sigma, patch
shape and margin, canonical volume shape), the identity of the checkpoint it
came from, what it was trained on, how it scored and a model card. Keras
ignores the extra member: ``keras.saving.load_model(path)`` after
``import networks`` returns the generator.
"""

import json
import os
import zipfile

import durable
import factors
from errors import UserError
from version import PROGRAM_NAME, __version__

SUFFIX = ".keras"
METADATA_NAME = "srgan3d.json"
# The metadata layout; a file of a newer layout is refused with its version.
FORMAT = 1
# How the generator's inputs and outputs are scaled (utils.normalize).
NORMALISATION = ("each volume divided by its maximum, then mapped to [-1, 1] (x / max * 2 - 1); "
                 "outputs mapped back with the same maximum")


def is_model_file(path):
    """bool, whether ``path`` names a model file (by its ``.keras`` suffix)."""
    return path is not None and str(path).lower().endswith(SUFFIX)


def write(path, generator, metadata):
    """Writes the generator and ``metadata`` to ``path`` atomically.

    Args:
        path: the file, ending in ``.keras``.
        generator: ``keras.Model`` from ``networks.build_generator`` with its weights.
        metadata: JSON-serialisable dict (``format`` and ``program`` are added).

    Raises:
        durable.OutputError: the file could not be written.
    """
    record = {"format": FORMAT, "program": PROGRAM_NAME, "version": __version__, **metadata}

    def write_archive(tmp):
        generator.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(METADATA_NAME, json.dumps(record, indent=2, sort_keys=True))

    durable.atomic_write(str(path), write_archive, suffix=SUFFIX)


def read_metadata(path):
    """The ``srgan3d.json`` of a model file.

    Raises:
        UserError: the file is missing, is not a model file written by
            -export (corrupt, truncated, another archive) or was written by a
            newer version of the program.
    """
    if not os.path.isfile(path):
        raise UserError(f"-model {path!r} does not exist (expected a {SUFFIX} file written by -export)")
    try:
        with zipfile.ZipFile(path) as archive:
            record = json.loads(archive.read(METADATA_NAME))
    except KeyError:
        raise UserError(f"-model {path!r} is a Keras archive without {METADATA_NAME}: not a model "
                        "written by -export") from None
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"-model {path!r} cannot be read ({err}): the file is corrupt or truncated; "
                        "export it again") from None
    if not isinstance(record, dict) or not isinstance(record.get("format"), int):
        raise UserError(f"-model {path!r}: its {METADATA_NAME} has no format number")
    if record["format"] > FORMAT:
        raise UserError(f"-model {path!r} was written by {record.get('program')} {record.get('version')} "
                        f"(model file format {record['format']}); this is {PROGRAM_NAME} {__version__}, "
                        f"which reads format {FORMAT} at most: upgrade to use it")
    return record


def load_generator(path):
    """The generator stored in a model file.

    Raises:
        UserError: the file cannot be read (see :func:`read_metadata`).
    """
    read_metadata(path)
    # Here, not at the top: reading a file's metadata (the command line's
    # checks) does not load TensorFlow. networks registers the custom layers.
    import keras

    import networks  # noqa: F401
    try:
        return keras.saving.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise UserError(f"-model {path!r}: Keras cannot load its generator ({err}); "
                        "the file is corrupt or truncated: export it again") from None


def identity(path, metadata):
    """What identifies the generator of a model file, as ``checkpoints.checkpoint_identity`` does.

    The checkpoint's step and hash are kept, so outputs (and a metrics file
    that guards resumption by that hash) agree with the checkpoint's.
    """
    checkpoint = metadata.get("checkpoint", {})
    return {"path": os.path.realpath(path), "step": checkpoint.get("step"), "sha256": checkpoint.get("sha256")}


def degradation_text(settings, f):
    """How the model card says the degradation a model learnt to undo (earlier files: gaussian)."""
    if settings.get("slice_profile", "gaussian") == "box":
        return (f"averaged over slabs of {f} HR voxels (box slice profile: thick slices whose thickness "
                "is their spacing; each LR voxel at its slab's centre)")
    return f"blurred with a Gaussian of sigma {settings['sigma']} HR voxels and decimated by {f} (x[::{f}])"


def progress_text(trained):
    """How far the checkpoint's run had trained: ``epoch 3 of 5, 19 batches in (step 59)``.

    Args:
        trained: the metadata's ``training`` dict: ``steps``, ``epochs`` (the
            run's total), ``epochs_done`` and ``epoch_batches`` (the
            checkpoint's own; absent in files of earlier versions).
    """
    done, batches = trained.get("epochs_done"), trained.get("epoch_batches")
    total, step = trained.get("epochs"), trained.get("steps")
    if done is None:
        return f"step {step} of a run of {total} epochs"
    if batches:
        return f"epoch {done + 1} of {total}, {batches} batches in (step {step})"
    return f"{done} of {total} epochs (step {step})"


def model_card(metadata):
    """A short human-readable summary of a model file: what it does, what it learnt from, how it scored.

    Args:
        metadata: the dict :func:`read_metadata` returns (or :func:`write` stores).

    Returns:
        str, several lines.
    """
    s = metadata["settings"]
    f = factors.UpsamplingFactor.of(s["upsampling_factor"]).text
    trained = metadata.get("training", {})
    lines = [
        f"3D SRGAN generator, x{f} super-resolution ({s['upsampling_mode']} upsampling, "
        f"{s['residual_blocks']} residual blocks, {s['feature_size']} filters)",
        f"input: a low-resolution T1 volume; trained on HR volumes {degradation_text(s, f)}; patches "
        f"{'x'.join(map(str, s['patch_shape']))} (HR), margin {s['patch_margin']}",
        f"intensities: {NORMALISATION}",
        f"trained: {progress_text(trained)}, {trained.get('train_subjects')} training subjects from "
        f"{trained.get('data')}",
        f"checkpoint: {metadata['checkpoint'].get('path')} (step {metadata['checkpoint'].get('step')}, "
        f"sha256 {metadata['checkpoint'].get('sha256')})",
    ]
    scores = metadata.get("evaluation")
    if scores:
        lines.append(f"last evaluation ({scores['subjects']} test subjects, one data range for every "
                     f"method): SR PSNR {scores['psnr_fair']:.2f} dB SSIM {scores['ssim_fair']:.4f}; "
                     f"tricubic PSNR {scores['psnr_tricubic_fair']:.2f} dB SSIM "
                     f"{scores['ssim_tricubic_fair']:.4f}")
    else:
        lines.append("last evaluation: none found for this checkpoint (-evaluate it, then export again)")
    lines.append(f"written by {metadata.get('program', PROGRAM_NAME)} {metadata.get('version', __version__)}, "
                 f"TensorFlow {s.get('tensorflow')}, Keras {s.get('keras')}")
    return "\n".join(lines)
