"""The program's name and version, as its outputs' provenance records them."""

from importlib import metadata

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
    and Keras's are config.json's ``tensorflow`` and ``keras``. Read from the
    installed packages' metadata, which is what their ``__version__`` says,
    so that ``-version`` does not load TensorFlow (~9 s on two cores); a
    package found without metadata is imported.
    """
    return (f"{program()} (TensorFlow {installed_version('tensorflow', TENSORFLOW_DISTRIBUTIONS)}, "
            f"Keras {installed_version('keras', ('keras',))})")


# The pip packages that install the ``tensorflow`` module.
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos",
                            "tensorflow-intel", "tf-nightly", "tf-nightly-cpu")


def installed_version(module, distributions):
    """str, the version of the first of ``distributions`` installed, else ``module.__version__``.

    Args:
        module: the importable name (``"tensorflow"``), imported only when
            no distribution's metadata is found.
        distributions: the pip package names that install it, most likely first.
    """
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    import importlib

    return importlib.import_module(module).__version__
