"""The program's name and version, as its outputs' provenance records them."""

__version__ = "1.0.0"
# The port's name in BIDS derivatives (GeneratedBy) and in metrics files.
PROGRAM_NAME = "srgan3d-tf2"


def program():
    """str, e.g. ``"srgan3d-tf2 1.0.0"``."""
    return f"{PROGRAM_NAME} {__version__}"
