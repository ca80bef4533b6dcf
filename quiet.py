"""Keeping TensorFlow out of a person's way: its start-up lines out of the terminal, its import until there is work.

This module does not import TensorFlow at import time: ``model.py`` parses
and checks the flags first (``-h``, ``-version`` and a mistyped flag answer
in a fraction of a second instead of the ~9 s TensorFlow takes to load on
two cores), then imports TensorFlow through :func:`import_tensorflow_quietly`
before any other module loads it. Modules the command line needs before
that (``config`` and what its settings table reads) hold TensorFlow as a
:class:`Deferred` module.
"""

import contextlib
import importlib
import logging
import os
import sys


class Deferred:
    """A module imported at its first attribute access: ``tf = quiet.Deferred("tensorflow")``.

    For modules whose functions use TensorFlow but whose constants and
    parsers the command line needs before any work: importing them costs
    nothing until a function runs.

    Args:
        name: the module's name, e.g. ``"tensorflow"``.
    """

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self):
        return f"<deferred module {self._name!r}>"


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


class FirstCallQuiet:
    """A callable whose first call runs with native stderr hidden (unless ``hidden`` is False).

    TensorFlow optimises a compiled function's graph (grappler) when it
    first runs it, and its remapper logs ``E0000 ... meta_optimizer.cc]
    remapper failed: INVALID_ARGUMENT: Mutation::Apply error: fanout
    'gradient_tape/.../LeakyRelu/LeakyReluGrad' exist for missing node
    '.../BiasAdd'`` for a training step: it tries to fuse a convolution's (or
    dense layer's) BiasAdd with the LeakyReLU after it, finds that the
    LeakyReLU's gradient still reads the BiasAdd output, and leaves that
    graph unfused. The step computes the same numbers either way; the line
    only reads as a failure. Later calls print as usual.

    Args:
        fn: the callable (a ``tf.function``).
        hidden: bool, hide the first call's native stderr.
    """

    def __init__(self, fn, hidden=True):
        self.fn = fn
        self.hidden = hidden
        self.called = False

    def __call__(self, *args, **kwargs):
        if self.called:
            return self.fn(*args, **kwargs)
        self.called = True
        with native_stderr_hidden(self.hidden):
            return self.fn(*args, **kwargs)


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
