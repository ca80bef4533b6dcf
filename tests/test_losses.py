"""The losses (losses.py) against NumPy, and the label noise."""


import numpy as np
import pytest

from losses import discriminator_loss, draw_targets, generator_losses


def test_losses_match_numpy():
    rng = np.random.default_rng(0)
    hr = rng.uniform(-1, 1, (2, 6, 5, 4, 1)).astype(np.float32)
    sr = rng.uniform(-1, 1, (2, 6, 5, 4, 1)).astype(np.float32)
    d_fake = rng.normal(size=(2, 1)).astype(np.float32)
    t = rng.uniform(0.7, 1.2, (2, 1)).astype(np.float32)
    out = {k: float(v) for k, v in generator_losses(hr, sr, d_fake, t).items()}
    gdl = sum(np.sum((np.abs(np.diff(hr, axis=a)) - np.abs(np.diff(sr, axis=a))) ** 2) for a in (1, 2, 3))
    assert out["mse"] == pytest.approx(np.sum((sr - hr) ** 2), rel=1e-5)
    assert out["gdl"] == pytest.approx(gdl, rel=1e-5)
    assert out["adv"] == pytest.approx(0.1 * np.mean((d_fake - t) ** 2), rel=1e-5)
    assert out["g_loss"] == pytest.approx(out["mse"] + out["gdl"] + out["adv"], rel=1e-6)
    d_real = rng.normal(size=(2, 1)).astype(np.float32)
    tr, tf_ = np.full((2, 1), 0.9, np.float32), np.full((2, 1), 0.1, np.float32)
    assert float(discriminator_loss(d_real, d_fake, tr, tf_)) == pytest.approx(
        np.mean((d_real - tr) ** 2) + np.mean((d_fake - tf_) ** 2), rel=1e-5)


def test_targets_are_smoothed_and_flipped_one_time_in_ten():
    flips, n = 0, 2000
    for step in range(n):
        t_real, t_fake, flipped, t_gen = draw_targets(7, step, 2)
        real, fake = t_real.numpy(), t_fake.numpy()
        assert real.shape == fake.shape == t_gen.shape == (2, 1)
        if bool(flipped):
            flips += 1
            real, fake = fake, real
        assert np.all((real >= 0.7) & (real < 1.2)) and np.all((fake >= 0) & (fake < 0.3))
        assert np.all((t_gen.numpy() >= 0.7) & (t_gen.numpy() < 1.2))
    assert 0.07 < flips / n < 0.13


def test_targets_are_a_function_of_seed_and_step_only():
    same = [np.concatenate([t.numpy().ravel() for t in draw_targets(3, 41, 4)]) for _ in range(2)]
    np.testing.assert_array_equal(same[0], same[1])
    other = np.concatenate([t.numpy().ravel() for t in draw_targets(3, 42, 4)])
    assert not np.array_equal(same[0], other)
