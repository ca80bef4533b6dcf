"""3D SRGAN for brain MRI: the command line (training, evaluation, super-resolution, demo).

    python model.py -demo True                                   # end to end on phantoms
    python model.py -data_path DATA -checkpoint_dir CKPT         # train
    python model.py -data_path DATA -checkpoint_dir CKPT -restore CKPT -epochs 20   # resume
    python model.py -evaluate True -checkpoint_dir_restore CKPT -path_volumes OUT  # test set
    python model.py -super_resolve scan.nii.gz -checkpoint_dir_restore CKPT        # a real scan

The single-dash flags of the original (Sánchez & Vilaplana, MIDL 2018) keep their
spelling and defaults; ``--flag`` works too. This module only turns flags into
a ``config.Command`` and hands it to the room that does the work; the flags
themselves are defined once, in ``config.Settings``.
"""

import argparse
import dataclasses
import sys

import config
import durable
import nifti_io
import placement as placement_lib
import quiet
import version
from errors import EXIT_ERROR, EXIT_INTERRUPTED, RunStopped, UserError

# The two boolean flags of the original that choose the upsampling mode; the
# rest of the program only knows the one setting "upsampling_mode".
MODE_FLAGS = ("subpixel_NN", "nn")


def argparse_type(parse):
    """Wraps a ``config`` parser (ValueError) as an argparse type (argparse names the flag)."""
    def convert(value):
        try:
            return parse(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


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


def build_parser():
    """The argparse parser: the original's single-dash flags plus the port's, from ``config.Settings``.

    Every default is ``None`` so that ``config.resolve`` can tell an explicit
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
    bool_type = argparse_type(config.parse_bool)
    for field in dataclasses.fields(config.Settings):
        meta = field.metadata
        if meta["help"] is None:
            continue
        shown = meta["shown"]
        if shown is None:
            default = field.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        kwargs = {"help": f"{meta['help']} (default: {shown})", "metavar": meta["metavar"]}
        if meta["boolean"]:
            kwargs.update(type=bool_type, nargs="?", const=True, metavar="BOOL")
        elif meta["parse"] is not None:
            kwargs["type"] = argparse_type(meta["parse"])
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
            del kwargs["metavar"]
        if meta["nargs"] is not None:
            kwargs["nargs"] = meta["nargs"]
        parser.add_argument(f"-{field.name}", f"--{field.name}", dest=field.name, default=None, **kwargs)
    parser.add_argument("-subpixel_NN", "--subpixel_NN", dest="subpixel_NN", default=None, type=bool_type,
                        nargs="?", const=True, metavar="BOOL",
                        help="checkerboard-free sub-pixel upsampling (wins over -nn) (default: False)")
    parser.add_argument("-nn", "--nn", dest="nn", default=None, type=bool_type, nargs="?", const=True,
                        metavar="BOOL", help="resize-convolution upsampling (nearest neighbour + conv) "
                                             "(default: False)")
    return parser


def given_settings(args):
    """The settings given explicitly on the command line, the mode flags translated.

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


def resolve_command(args, log=print):
    """Turns parsed flags into a checked ``config.Command``.

    Raises:
        UserError: for contradictory, missing or invalid settings.
    """
    if args.subpixel_NN and args.nn:
        log("note: both -subpixel_NN and -nn are set; subpixel_NN wins, as in the original")
    return config.resolve(given_settings(args), log)


def parse_command(argv, log=print):
    """``resolve_command`` of a list of command-line arguments (for Python callers and tests).

    Raises:
        SystemExit: argparse's, for a malformed flag.
        UserError: for contradictory, missing or invalid settings.
    """
    return resolve_command(build_parser().parse_args(argv), log)


def run(command, placement=None, log=print):
    """Does what ``command`` asks: the demo, -export, -super_resolve, -evaluate or training.

    The room of each action is imported here, when there is work: they load TensorFlow.
    """
    cfg = command.settings
    if cfg.demo:
        import demo
        return demo.run_demo(cfg, log, placement, command.explicit)
    if command.action == "export":
        import export
        return export.export_model(cfg, command.source_checkpoint, cfg.export, command.saved, log)
    if command.action == "super_resolve":
        import super_resolve
        return super_resolve.super_resolve_file(cfg, command.source_checkpoint, log, command.explicit)
    if command.action == "evaluate":
        import evaluation
        return evaluation.evaluate(cfg, command.source_checkpoint, log, command.explicit)
    import training
    return training.train(cfg, log, placement)


def main(argv=None):
    """Runs the command line; returns the process exit code.

    The flags are parsed before TensorFlow loads (-h, -version and a mistyped
    flag answer at once); TensorFlow then loads with its start-up lines
    hidden unless -verbose.
    """
    args = build_parser().parse_args(argv)
    if args.version:
        print(version.versions_line())
        return 0
    quiet.import_tensorflow_quietly(bool(args.verbose))
    try:
        # First: the strategy fixes which devices TensorFlow's runtime starts with.
        action = config.action_of(given_settings(args))
        placement = placement_lib.choose_placement(args.gpus, multi_worker=action == "train",
                                                   verbose=bool(args.verbose))
        run(resolve_command(args), placement)
    except RunStopped as err:
        word = "error" if err.exit_code == EXIT_ERROR else "stopped"
        print(f"{word}: {err}", file=sys.stderr)
        return err.exit_code
    except (UserError, nifti_io.DataError, durable.OutputError, durable.LockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
