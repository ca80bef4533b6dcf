"""One replica's share of a training step: the original's GAN step and the content-only pre-training step.

Each function runs inside ``trainer.SRGANTrainer``'s compiled step, on every
replica of a ``tf.distribute`` strategy with its share of the global batch
(or once on one device), and returns that share's losses; the trainer sums
the shares, applies nothing else and records the step.
"""

import keras
import tensorflow as tf

from losses import (
    discriminator_loss,
    draw_targets,
    generator_losses,
    gradient_difference_loss,
    replica_rows,
)


def scaled(optimizer, loss):
    """The loss to differentiate: scaled when ``optimizer`` is a loss-scale optimizer (float16).

    ``LossScaleOptimizer.apply`` divides the gradients by the same scale.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.scale_loss(loss)
    return loss


def discriminator_update(trainer, hr, sr):
    """One discriminator update on this replica's real and super-resolved patches.

    Args:
        trainer: the ``trainer.SRGANTrainer``.
        hr: float32 (b, x, y, z, 1) in [-1, 1], the reference patches.
        sr: float32 (b, x, y, z, 1), the generator's output for them (no gradient to G).

    Returns:
        (d_loss, flipped, t_gen): float32 scalar, this replica's share of the
        discriminator loss; bool scalar, whether the labels were swapped; the
        generator's targets for the adversarial term.
    """
    d = trainer.discriminator
    local = tf.shape(hr)[0]
    batch, first = replica_rows(local)
    global_batch = batch if trainer.replicas > 1 else None
    t_real, t_fake, flipped, t_gen = [
        t if t.shape.rank == 0 else t[first:first + local]
        for t in draw_targets(trainer.data_seed, trainer.step, batch)]
    with tf.GradientTape() as tape:
        d_real = d(hr, training=True)
        d_fake = d(sr, training=True)
        d_loss = discriminator_loss(d_real, d_fake, t_real, t_fake, global_batch)
        d_scaled = scaled(trainer.d_apply, d_loss)
    grads = tape.gradient(d_scaled, d.trainable_variables)
    trainer.d_apply.apply(grads, d.trainable_variables)
    return d_loss, flipped, t_gen


def gan_step(trainer, lr, hr):
    """One discriminator update, then one generator update, on this replica's patches.

    Args:
        trainer: the ``trainer.SRGANTrainer`` (networks, optimisers, schedule,
            data seed and step counter).
        lr: float32 (b, x/fx, y/fy, z/fz, 1) in [-1, 1], this replica's degraded patches.
        hr: float32 (b, x, y, z, 1) in [-1, 1], its reference patches.

    Returns:
        dict of float32 scalars: d_loss, g_loss, mse, gdl, adv (this replica's
        shares), flipped (1.0 when the labels were swapped), learning_rate.
    """
    g, d = trainer.generator, trainer.discriminator
    global_batch = replica_rows(tf.shape(hr)[0])[0] if trainer.replicas > 1 else None
    learning_rate = tf.cast(trainer.g_schedule(trainer.g_optimizer.iterations), tf.float32)
    # After pre-training the generator runs as evaluation runs it (moving
    # batch-norm statistics, not updated): ``trainer.freeze_generator_statistics``.
    g_training = not trainer.freeze_generator_statistics
    d_loss, flipped, t_gen = discriminator_update(trainer, hr, g(lr, training=g_training))

    with tf.GradientTape() as tape:
        sr = g(lr, training=g_training)
        d_fake = d(sr, training=True)
        losses = generator_losses(hr, sr, d_fake, t_gen, global_batch)
        g_scaled = scaled(trainer.g_apply, losses["g_loss"])
    grads = tape.gradient(g_scaled, g.trainable_variables)
    trainer.g_apply.apply(grads, g.trainable_variables)
    return {"d_loss": d_loss, **losses, "flipped": tf.cast(flipped, tf.float32),
            "learning_rate": learning_rate}


def pretrain_step(trainer, lr, hr):
    """One discriminator update, then one generator update on the content loss alone.

    The generator's update has no adversarial term (sum of squared errors +
    GDL). The discriminator learns from the start, as in the GAN step, so that
    when the GAN phase begins its outputs are already near the least-squares
    targets: an untrained D's outputs gave an adversarial term as large as the
    content loss at the first GAN step (x2 crop96, lr 1e-3, seed 1: adv 5308
    against mse 6063) and a generator with frozen statistics diverged.

    Args and Returns: as :func:`gan_step`; adv is 0.
    """
    g = trainer.generator
    learning_rate = tf.cast(trainer.g_schedule(trainer.g_optimizer.iterations), tf.float32)
    # One forward pass of G (its moving statistics move once per step, as
    # before D learnt here); D sees it as the GAN step's D does, before G's update.
    with tf.GradientTape() as tape:
        sr = g(lr, training=True)
        mse = tf.reduce_sum(tf.square(sr - hr))
        gdl = gradient_difference_loss(hr, sr)
        g_scaled = scaled(trainer.g_apply, mse + gdl)
    grads = tape.gradient(g_scaled, g.trainable_variables)
    d_loss, flipped, _ = discriminator_update(trainer, hr, tf.stop_gradient(sr))
    trainer.g_apply.apply(grads, g.trainable_variables)
    zero = tf.zeros((), tf.float32)
    return {"d_loss": d_loss, "g_loss": mse + gdl, "mse": mse, "gdl": gdl, "adv": zero,
            "flipped": tf.cast(flipped, tf.float32), "learning_rate": learning_rate}
