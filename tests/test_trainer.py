"""The trainer (trainer.py): one step, eager and compiled, mixed precision, pre-training, the step history."""


import numpy as np
import pytest
import tensorflow as tf

import config
import degradation
import networks
import train_dataset as td
from trainer import GAN_PHASE_LEARNING_RATE_SCALE, SRGANTrainer


def _tiny_trainer(run_eagerly=False):
    g = networks.build_generator(2, residual_blocks=1, feature_size=4)
    d = networks.build_discriminator((8, 8, 6, 1))
    return SRGANTrainer(g, d, learning_rate=1e-4, seed=1, run_eagerly=run_eagerly)


def test_train_step_returns_scalars_agrees_with_the_eager_step_keeps_its_history_and_decays_learning_rate():
    # One compiled trainer for what were three tests (one step's results and the eager
    # step's; the history of five): its trace is most of a test's time.
    hr = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 6, 1)).astype(np.float32)
    lr = np.asarray(degradation.degrade(hr, 2))
    tf.keras.utils.set_random_seed(5)
    eager = {k: float(v) for k, v in _tiny_trainer(run_eagerly=True).train_step(lr, hr).items()}
    tf.keras.utils.set_random_seed(5)
    trainer = _tiny_trainer()
    before = [w.numpy().copy() for w in trainer.generator.trainable_weights]
    out = trainer.train_step(lr, hr)
    assert set(out) >= {"d_loss", "g_loss", "mse", "gdl", "adv", "learning_rate", "flipped"}
    assert all(isinstance(v, tf.Tensor) and v.shape == () for v in out.values())  # no host sync
    out = {k: float(v) for k, v in out.items()}
    assert all(np.isfinite(v) for v in out.values())
    assert out["learning_rate"] == pytest.approx(1e-4)
    assert int(trainer.step) == 1 and int(trainer.g_optimizer.iterations) == 1
    assert int(trainer.d_optimizer.iterations) == 1
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, trainer.generator.trainable_weights))
    for key in ("d_loss", "g_loss", "mse"):
        assert eager[key] == pytest.approx(out[key], rel=1e-3)  # graph vs eager round-off
    # The step history holds what each step returned.
    rng = np.random.default_rng(2)
    returned = [out]
    for _ in range(4):
        hr = rng.uniform(-1, 1, (2, 8, 8, 6, 1)).astype(np.float32)
        returned.append({k: float(v) for k, v in trainer.train_step(np.asarray(degradation.degrade(hr, 2)), hr).items()})
    history = trainer.recent_scalars(2, 5)
    assert [s for s, _ in history] == [2, 3, 4, 5]
    for (_, values), expected in zip(history, returned[1:]):
        assert values == pytest.approx(expected, rel=1e-6)
    losses = trainer.epoch_losses()
    assert losses["mse"] == pytest.approx(np.mean([r["mse"] for r in returned]), rel=1e-5)
    trainer.end_epoch()
    assert int(trainer.epoch) == 1 and trainer.epoch_losses()["mse"] == 0.0
    # The learning rate decays with the generator optimiser's iterations.
    trainer.g_optimizer.iterations.assign(4920)
    assert trainer.learning_rate == pytest.approx(1e-4 / 1.5)


# A float16 train step (loss scaling, float32 weights, updates, the loss scale in the
# checkpoint): test_distribute.py::test_mixed_precision_works_on_one_device_and_under_a_strategy,
# whose one-device trainer is the same float16 trainer.


def test_the_trainer_and_the_command_line_default_to_the_same_gan_phase_rate():
    assert config.Settings().gan_lr_scale == GAN_PHASE_LEARNING_RATE_SCALE


def test_pretrain_steps_train_the_generator_on_content_alone_and_warm_up_d_then_the_gan():
    g = networks.build_generator(2, residual_blocks=1, feature_size=4)
    d = networks.build_discriminator((8, 8, 6, 1))
    trainer = SRGANTrainer(g, d, seed=1, pretrain_steps=2, gan_lr_scale=0.25)
    hr = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 6, 1)).astype(np.float32)
    lr = np.asarray(degradation.degrade(hr, 2))
    d_before = [w.numpy().copy() for w in d.trainable_weights]
    statistics = lambda model: [w.numpy().copy() for w in model.non_trainable_weights]  # noqa: E731
    g_stats = statistics(g)
    for _ in range(2):
        out = {k: float(v) for k, v in trainer.train_step(lr, hr).items()}
        # No adversarial term for G; D learns meanwhile, so the GAN starts with a calibrated D.
        assert out["adv"] == 0.0 and out["d_loss"] > 0
        assert out["g_loss"] == pytest.approx(out["mse"] + out["gdl"], rel=1e-6)
        assert out["learning_rate"] == pytest.approx(float(trainer.schedule(trainer.step - 1)))
    assert not all(np.array_equal(a, b.numpy()) for a, b in zip(d_before, d.trainable_weights))
    assert int(trainer.g_optimizer.iterations) == 2 and int(trainer.d_optimizer.iterations) == 2
    # Pre-training normalises with batch statistics and updates the moving averages.
    assert not all(np.array_equal(a, b) for a, b in zip(g_stats, statistics(g)))
    g_stats, d_stats = statistics(g), statistics(d)
    g_before = [w.numpy().copy() for w in g.trainable_weights]
    out = {k: float(v) for k, v in trainer.train_step(lr, hr).items()}
    assert out["d_loss"] > 0 and out["adv"] > 0  # the GAN from step 3 on
    # ... at gan_lr_scale of the generator's learning rate; D keeps the schedule's.
    assert out["learning_rate"] == pytest.approx(0.25 * float(trainer.schedule(2)), rel=1e-6)
    assert float(trainer.d_optimizer.learning_rate) == pytest.approx(float(trainer.schedule(3)), rel=1e-6)
    assert int(trainer.d_optimizer.iterations) == 3 and int(trainer.step) == 3
    # ... which trains the generator as evaluation runs it: its statistics frozen, its weights not.
    assert trainer.freeze_generator_statistics
    assert all(np.array_equal(a, b) for a, b in zip(g_stats, statistics(g)))
    assert not all(np.array_equal(a, b.numpy()) for a, b in zip(g_before, g.trainable_weights))
    assert not all(np.array_equal(a, b) for a, b in zip(d_stats, statistics(d)))
    sr = g(lr, training=False).numpy()
    assert out["mse"] > 0 and np.isfinite(sr).all()


def test_without_pretraining_the_gan_keeps_the_originals_batch_statistics():
    g = networks.build_generator(2, residual_blocks=1, feature_size=4)
    trainer = SRGANTrainer(g, networks.build_discriminator((8, 8, 6, 1)), seed=1, run_eagerly=True)
    hr = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 6, 1)).astype(np.float32)
    before = [w.numpy().copy() for w in g.non_trainable_weights]
    trainer.train_step(np.asarray(degradation.degrade(hr, 2)), hr)
    assert not trainer.freeze_generator_statistics
    assert trainer.learning_rate == pytest.approx(float(trainer.schedule(1)))  # the original's schedule
    assert not all(np.array_equal(a, b.numpy()) for a, b in zip(before, g.non_trainable_weights))
