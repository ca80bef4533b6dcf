"""Tests of the demo phantoms (phantoms.py)."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from helpers import Log

import layouts
import phantoms


def test_demo_data_layout_types_and_determinism(tmp_path):
    a = phantoms.make_demo_data(tmp_path / "a", subjects=2, shape=(32, 30, 20), seed=5)
    b = phantoms.make_demo_data(tmp_path / "b", subjects=2, shape=(32, 30, 20), seed=5)
    c = phantoms.make_demo_data(tmp_path / "c", subjects=1, shape=(32, 30, 20), seed=6)
    assert [os.path.basename(p) for p in a] == ["demo_000", "demo_001"]
    img = nib.load(os.path.join(a[0], layouts.IMAGE_NAME))
    mask = nib.load(os.path.join(a[0], layouts.MASK_NAME))
    assert img.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
    assert img.shape == mask.shape == (32, 30, 20)
    assert not np.allclose(img.affine, np.eye(4))
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.1, 1.2), rtol=1e-6)
    np.testing.assert_allclose(img.affine, mask.affine)
    data, m = np.asarray(img.dataobj), np.asarray(mask.dataobj)
    assert set(np.unique(m)) == {0, 1}
    assert (data[m == 0] == 0).all() and (data[m == 1] > 0).all()  # skull-stripped
    assert 0.2 < m.mean() < 0.7
    # Three tissue classes: CSF darkest, then grey, then white matter.
    brain = data[m == 1]
    assert np.percentile(brain, 90) > 1.5 * np.percentile(brain, 10)
    for pa, pb in zip(a, b):
        for name in (layouts.IMAGE_NAME, layouts.MASK_NAME):
            np.testing.assert_array_equal(np.asarray(nib.load(os.path.join(pa, name)).dataobj),
                                          np.asarray(nib.load(os.path.join(pb, name)).dataobj))
    assert not np.array_equal(data, np.asarray(nib.load(os.path.join(c[0], layouts.IMAGE_NAME)).dataobj))
    assert not np.array_equal(data, np.asarray(nib.load(os.path.join(a[1], layouts.IMAGE_NAME)).dataobj))
    subjects, problems = layouts.find_subjects(tmp_path / "a", log=Log())
    assert len(subjects) == 2 and problems == []
    with pytest.raises(ValueError, match="subjects 0"):
        phantoms.make_demo_data(tmp_path / "d", subjects=0)
    # No temporary files are left behind by the atomic writes.
    assert sorted(os.listdir(a[0])) == sorted([layouts.IMAGE_NAME, layouts.MASK_NAME])


def test_gzip_files_are_real_gzip(demo):
    subjects, _ = layouts.find_subjects(demo, log=Log())
    with gzip.open(subjects[0].image_path) as fh:
        assert len(fh.read(348)) == 348


def test_rotation_is_a_proper_rotation_about_x_then_y_then_z():
    np.testing.assert_array_equal(phantoms.rotation((0.0, 0.0, 0.0)), np.eye(3))
    r = phantoms.rotation((0.3, -0.2, 0.1))
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    # A quarter turn about z takes x to y. The x turn comes first: y -> z, which the z turn keeps
    # (z first would give -x).
    np.testing.assert_allclose(phantoms.rotation((0, 0, np.pi / 2)) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(phantoms.rotation((np.pi / 2, 0, np.pi / 2)) @ [0, 1, 0], [0, 0, 1], atol=1e-12)
