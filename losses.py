"""The losses of the original (SPEC section 3): least-squares GAN with label noise, content and gradient difference.

Every loss here is written for one replica's share of a step: under a
``tf.distribute`` strategy, sums need no scaling (the replicas' sums add up)
and means divide by the global batch (``global_batch``).
"""

import tensorflow as tf


# The weight of the adversarial term in the generator's loss (the original's).
ADV_WEIGHT = 0.1
# A loss beyond this, per voxel of the batch (the content losses) or per patch
# (the adversarial ones), has exploded: errors a thousand times the [-1, 1]
# intensities the networks work in. Such a step's state is finite but ruined:
# resumed at any learning rate it overflows within steps (measured).
EXPLODED = 1e6


# The losses of a step computed from the state before its updates (the
# generator's output and the discriminator's first look); adv follows the
# step's own discriminator update.
STATE_LOSSES = ("d_loss", "mse", "gdl")


def exploded(values, batch_voxels, limit=EXPLODED):
    """The losses of one step that have exploded, each per voxel or per patch.

    Args:
        values: dict with the step's ``d_loss``, ``mse``, ``gdl`` and ``adv``
            (sums over the global batch's voxels for ``mse`` and ``gdl``, means
            over its patches for the others, ``adv`` weighted by ``ADV_WEIGHT``).
        batch_voxels: int, voxels of the global batch of HR patches.
        limit: float, the per-voxel or per-patch bound.

    Returns:
        dict name -> its per-voxel (``mse``, ``gdl``) or per-patch (``d_loss``,
        ``adv``, unweighted) value, for those beyond ``limit``; empty when none.
    """
    scaled = {"mse": values["mse"] / batch_voxels, "gdl": values["gdl"] / batch_voxels,
              "d_loss": values["d_loss"], "adv": values["adv"] / ADV_WEIGHT}
    return {name: value for name, value in scaled.items() if abs(value) > limit}


def draw_targets(seed, step, batch_size):
    """Least-squares GAN targets with label smoothing and 10 % label flips, for one step.

    A stateless draw from ``(seed, step)``: every replica of a distributed step
    computes the same targets for the global batch and takes its own rows, and
    a resumed run draws exactly what the uninterrupted run would have.

    Args:
        seed: int scalar, the run's seed.
        step: int scalar, the number of steps taken before this one.
        batch_size: int scalar, the global batch size b.

    Returns:
        (t_real, t_fake, flipped, t_gen): float32 (b, 1) targets drawn from
        U(0.7, 1.2) and U(0, 0.3), swapped when ``flipped`` (a bool scalar, true
        with probability 0.1); t_gen float32 (b, 1) from U(0.7, 1.2), the
        generator's adversarial target.
    """
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    keys = tf.random.experimental.stateless_split(key, 4)
    shape = tf.stack([tf.cast(batch_size, tf.int32), 1])
    t_real = tf.random.stateless_uniform(shape, keys[0], 0.7, 1.2)
    t_fake = tf.random.stateless_uniform(shape, keys[1], 0.0, 0.3)
    flipped = tf.random.stateless_uniform((), keys[2]) < 0.1
    t_gen = tf.random.stateless_uniform(shape, keys[3], 0.7, 1.2)
    t_real, t_fake = tf.where(flipped, t_fake, t_real), tf.where(flipped, t_real, t_fake)
    return t_real, t_fake, flipped, t_gen


def _mean(squares, global_batch):
    # One replica's share of a mean over the global batch: the replicas' shares
    # (and their gradients, which tf.distribute sums) add up to the mean.
    if global_batch is None:
        return tf.reduce_mean(squares)
    return tf.reduce_sum(squares) / tf.cast(global_batch, squares.dtype)


def discriminator_loss(d_real, d_fake, t_real, t_fake, global_batch=None):
    """``mean((D(HR) - t_real)^2) + mean((D(G) - t_fake)^2)`` on logits (b, 1).

    Args:
        d_real, d_fake, t_real, t_fake: float32 (b, 1).
        global_batch: None on one device; under a strategy, the global batch
            size, so that this replica's loss is its share of the mean.

    Returns:
        float32 scalar.
    """
    return (_mean(tf.square(d_real - t_real), global_batch)
            + _mean(tf.square(d_fake - t_fake), global_batch))


def gradient_difference_loss(hr, sr):
    """Sum over the three spatial axes of ``sum((|Δ hr| - |Δ sr|)^2)``, Δ the forward difference.

    Args:
        hr, sr: float32 (b, x, y, z, 1).

    Returns:
        float32 scalar, summed over batch and voxels.
    """
    total = 0.0
    for axis in (1, 2, 3):
        n = tf.shape(hr)[axis]
        d_hr = tf.gather(hr, tf.range(1, n), axis=axis) - tf.gather(hr, tf.range(0, n - 1), axis=axis)
        d_sr = tf.gather(sr, tf.range(1, n), axis=axis) - tf.gather(sr, tf.range(0, n - 1), axis=axis)
        total += tf.reduce_sum(tf.square(tf.abs(d_hr) - tf.abs(d_sr)))
    return total


def generator_losses(hr, sr, d_fake, t, global_batch=None):
    """Generator loss of the original: ``sum((G - HR)^2) + gdl + 0.1 * mean((D(G) - t)^2)``.

    The two sums need no scaling under a strategy (the replicas' sums add up
    to the global sum); the mean divides by ``global_batch``.

    Args:
        hr, sr: float32 (b, x, y, z, 1) in [-1, 1].
        d_fake: float32 (b, 1), discriminator logits of ``sr``.
        t: float32 (b, 1), targets drawn from U(0.7, 1.2).
        global_batch: None on one device, else the global batch size.

    Returns:
        dict of float32 scalars: ``g_loss``, ``mse`` (the sum, as the original),
        ``gdl`` and ``adv`` (already weighted by 0.1).
    """
    mse = tf.reduce_sum(tf.square(sr - hr))
    gdl = gradient_difference_loss(hr, sr)
    adv = ADV_WEIGHT * _mean(tf.square(d_fake - t), global_batch)
    return {"g_loss": mse + gdl + adv, "mse": mse, "gdl": gdl, "adv": adv}


def replica_rows(local_batch):
    """Where this replica's patches sit in the step's global batch.

    Args:
        local_batch: int32 scalar, the patches this replica got (0 is possible
            at the end of an uneven epoch).

    Returns:
        (global_batch, first_row): int32 scalars; (local_batch, 0) on one device.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return local_batch, 0
    sizes = ctx.all_gather(tf.reshape(local_batch, [1]), axis=0)
    return tf.reduce_sum(sizes), tf.reduce_sum(sizes[:ctx.replica_id_in_sync_group])
