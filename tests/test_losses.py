"""The losses (losses.py) against NumPy, and the label noise."""


import numpy as np
import pytest
import tensorflow as tf

from losses import discriminator_loss, draw_targets, generator_losses


def test_losses_match_numpy():
    rng = np.random.default_rng(0)
    hr = rng.uniform(-1, 1, (2, 6, 5, 4, 1)).astype(np.float32)
    sr = rng.uniform(-1, 1, (2, 6, 5, 4, 1)).astype(np.float32)
    d_fake = rng.normal(size=(2, 1)).astype(np.float32)
    t = rng.uniform(0.7, 1.2, (2, 1)).astype(np.float32)
    out = {k: float(v) for k, v in generator_losses(hr, sr, d_fake, t).items()}
    # float64 references; a float32 sum of n terms is within n * eps32 of them
    # (recursive summation's bound, whatever order a CPU's kernels choose).
    h, s = hr.astype(np.float64), sr.astype(np.float64)
    bound = lambda n: n * float(np.finfo(np.float32).eps)  # noqa: E731
    gdl = sum(np.sum((np.abs(np.diff(h, axis=a)) - np.abs(np.diff(s, axis=a))) ** 2) for a in (1, 2, 3))
    assert out["mse"] == pytest.approx(np.sum((s - h) ** 2), rel=bound(hr.size))
    assert out["gdl"] == pytest.approx(gdl, rel=bound(3 * hr.size))
    adv = 0.1 * np.mean((d_fake.astype(np.float64) - t) ** 2)
    assert out["adv"] == pytest.approx(adv, rel=bound(8))
    assert out["g_loss"] == pytest.approx(out["mse"] + out["gdl"] + out["adv"], rel=bound(3))
    d_real = rng.normal(size=(2, 1)).astype(np.float32)
    tr, tf_ = np.full((2, 1), 0.9, np.float32), np.full((2, 1), 0.1, np.float32)
    expected = np.mean((d_real.astype(np.float64) - tr) ** 2) + np.mean((d_fake.astype(np.float64) - tf_) ** 2)
    assert float(discriminator_loss(d_real, d_fake, tr, tf_)) == pytest.approx(expected, rel=bound(8))


def test_targets_are_smoothed_and_flipped_one_time_in_ten():
    # Traced once, as inside the training step (2000 eager draws take 4 s).
    draw = tf.function(lambda step: draw_targets(7, step, 2))
    flips, n = 0, 2000
    for step in range(n):
        t_real, t_fake, flipped, t_gen = draw(tf.constant(step, tf.int64))
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
