"""Keeping TensorFlow's own start-up and log lines out of a person's terminal.

This module does not import TensorFlow at import time: ``model.py`` reads
-verbose and imports TensorFlow through :func:`import_tensorflow_quietly`
before any other module loads it.
"""

import contextlib
import logging
import os
import sys


def verbose_requested(argv):
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


def import_tensorflow_quietly(verbose):
    """Imports TensorFlow with its C++ start-up lines hidden unless ``verbose``."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_hidden(not verbose):
        import tensorflow as tf
        tf.config.list_physical_devices()
    if not verbose:
        tf.get_logger().setLevel(logging.ERROR)
    return tf


@contextlib.contextmanager
def quiet_tensorflow_logs():
    """TensorFlow's Python and absl loggers show errors only, for the duration."""
    import tensorflow as tf
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
