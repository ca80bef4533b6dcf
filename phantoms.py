"""Demo data: synthetic brain-like phantoms in the ADNI layout (``-demo``, tests, benchmarks).

:func:`make_demo_data` writes skull-stripped T1-like volumes with their brain
masks; :func:`rotation` is the rotation matrix their affines are made with.
"""

import os

import numpy as np

import layouts
import nifti_io
import utils


def rotation(angles):
    """Returns the float64 (3, 3) rotation by ``angles`` (radians) about x, then y, then z."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _folding(rng, coords, frequencies):
    """Returns a smooth random float32 field on the open grid ``coords``, standard deviation about 1."""
    # Smooth 3-D field with unit standard deviation built from separable
    # sinusoids: cheap (1-D sines, broadcast products), and it makes gyri when
    # it bends an iso-surface.
    x, y, z = coords
    field = 0.0
    for k in frequencies:
        kx, ky, kz = k * rng.uniform(0.7, 1.3, 3)
        px, py, pz = rng.uniform(0, 2 * np.pi, 3)
        field = field + (np.sin(kx * x + px) * np.sin(ky * y + py) * np.sin(kz * z + pz))
    # A product of three unit sines has standard deviation 2**-1.5.
    return field * np.float32(2 ** 1.5 / np.sqrt(len(frequencies)))


def _phantom(shape, rng):
    """Returns (int16 image, uint8 0/1 mask), both (x, y, z) = ``shape``, of one brain-like phantom."""
    # Normalised coordinates in [-1, 1] per axis, broadcastable (open grid).
    coords = [np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
              for i, n in enumerate(shape)]
    x, y, z = coords
    semi = rng.uniform([0.70, 0.78, 0.72], [0.80, 0.88, 0.82]).astype(np.float32)
    centre = rng.uniform(-0.03, 0.03, 3).astype(np.float32)
    # Ellipsoidal radius: 1 on the brain surface.
    r = np.sqrt(((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
                + ((z - centre[2]) / semi[2]) ** 2)
    r = r + np.float32(0.015) * _folding(rng, coords, [2.0, 3.0])  # lumpy head shape
    gyri = _folding(rng, coords, [20.0, 26.0, 32.0])
    width = np.float32(1.5 / min(shape))  # partial-volume transition, about 1 voxel

    def inside(boundary):
        return 0.5 - 0.5 * np.tanh((r - boundary) / width)

    mask = r <= 1.0
    # Sulci (gyri < 0) pull the grey/white boundary in and fill with CSF.
    brain = inside(np.float32(0.95) + np.float32(0.06) * np.minimum(gyri, 0))
    white = inside(np.float32(0.76) + np.float32(0.06) * gyri)
    # Two lateral ventricles: CSF-filled ellipsoids beside the midline.
    ventricles = 0.0
    for side in (-1.0, 1.0):
        v = np.sqrt(((x - side * 0.12) / 0.08) ** 2 + ((y + 0.05) / 0.30) ** 2 + ((z - 0.1) / 0.14) ** 2)
        ventricles = ventricles + (0.5 - 0.5 * np.tanh((v - 1.0) / (3 * width)))
    ventricles = np.minimum(ventricles, 1.0)
    csf, grey, wm = rng.uniform([250, 550, 850], [350, 650, 950]).astype(np.float32)
    image = csf + brain * ((grey - csf) + white * (wm - grey))
    image = image + ventricles * (csf - image)
    image = image * (1 + np.float32(0.02) * _folding(rng, coords, [1.5]))  # bias field
    image = image + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.03 * wm)
    image = np.where(mask, np.clip(image, 1, None), 0)
    return np.rint(image).astype(np.int16), mask.astype(np.uint8)


def make_demo_data(path, subjects=6, shape=(64, 64, 48), seed=0):
    """Writes synthetic brain-like phantoms in the ADNI layout.

    Each subject folder holds a skull-stripped head-shaped T1-like image
    (``layouts.IMAGE_NAME``, int16: CSF darkest, then grey, then white matter, smooth
    cortical folding, ventricles, a mild bias field and Gaussian noise; 0
    outside the brain) and its mask (``layouts.MASK_NAME``, uint8 0/1). The affine is
    not the identity: voxel sizes (1.0, 1.1, 1.2) mm, a small rotation and an
    offset. Deterministic for a seed; about 0.1 s per 64x64x48 subject.

    Args:
        path: dataset root to create (or add to).
        subjects: int >= 1, number of subjects, named ``demo_000``, ``demo_001``, ...
        shape: (3,) ints >= 8, the (x, y, z) shape of every volume.
        seed: int >= 0.

    Returns:
        list of the subject folders written, sorted.

    Raises:
        ValueError: if ``subjects`` or ``shape`` is invalid.
    """
    utils.check_int("subjects", subjects, 1)
    shape = nifti_io.check_shape("shape", shape, minimum=8)
    path = os.fspath(path)
    folders = []
    for i in range(int(subjects)):
        rng = np.random.default_rng([int(seed), i])
        image, mask = _phantom(shape, rng)
        affine = np.eye(4)
        affine[:3, :3] = rotation(rng.uniform(-0.1, 0.1, 3)) @ np.diag([1.0, 1.1, 1.2])
        affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2.0) + rng.uniform(-5, 5, 3)
        folder = os.path.join(path, f"demo_{i:03d}")
        os.makedirs(folder, exist_ok=True)
        utils.save_nifti(os.path.join(folder, layouts.IMAGE_NAME), image, affine, dtype=np.int16)
        utils.save_nifti(os.path.join(folder, layouts.MASK_NAME), mask, affine, dtype=np.uint8)
        folders.append(folder)
    return folders
