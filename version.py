"""The program's name and version, as its outputs' provenance records them."""

__version__ = "1.0.0"
# The port's name in BIDS derivatives (GeneratedBy) and in metrics files.
PROGRAM_NAME = "srgan3d-tf2"


def program():
    """str, e.g. ``"srgan3d-tf2 1.0.0"``."""
    return f"{PROGRAM_NAME} {__version__}"


def versions_line():
    """str, the program's and its frameworks' versions, e.g. ``"srgan3d-tf2 1.0.0 (TensorFlow 2.20.0, Keras 3.11.3)"``.

    The same strings the outputs record: ``program()`` is metrics.json's
    ``program`` (the sidecars' SoftwareName and SoftwareVersion), TensorFlow's
    and Keras's are config.json's ``tensorflow`` and ``keras``. Imports TensorFlow.
    """
    import keras
    import tensorflow as tf

    return f"{program()} (TensorFlow {tf.__version__}, Keras {keras.__version__})"
