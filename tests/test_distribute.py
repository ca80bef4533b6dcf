"""tf.distribute: the mathematics of a step does not change with the replica count.

The CPU is split into two logical devices (tests/conftest.py), so
MirroredStrategy runs here without GPUs; multi-worker training runs as two
processes on 127.0.0.1.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT

import checkpoints
import degradation
import durable
import model
import networks
import phantoms
import splits
import train_dataset as td
import training
from config import Settings
from placement import Placement, choose_placement
from trainer import SRGANTrainer, build_networks


def _mirrored():
    return choose_placement(("cpu", 2), environ={})


# HR patches of 32x32x24: on smaller ones the discriminator's deepest batch
# norms see one voxel per patch, normalise two nearly equal numbers (mean/std
# ~ 160) and amplify float32 round-off (oneDNN sums a batch of 1 and of 2 in
# different orders) into 1e-4 differences of its logits, with or without a
# strategy. From 32x32x24 on the logits of both paths agree to ~1e-7.
PATCH = (32, 32, 24)


def _trainer(placement, mode, weights=None, learning_rate=1e-3, pretrain_steps=0):
    cfg = Settings(upsampling_factor=2, residual_blocks=1, feature_size=4, upsampling_mode=mode,
                   patch_shape=PATCH, mixed_precision="none")
    g, d = build_networks(cfg, placement)
    if weights is not None:
        g.set_weights(weights[0])
        d.set_weights(weights[1])
    return SRGANTrainer(g, d, learning_rate=learning_rate, seed=5, strategy=placement.strategy,
                        pretrain_steps=pretrain_steps)


def _distributed_batches(placement, lr, hr):
    """Global batches of 2 split as TrainingStream splits them: one patch per replica."""
    ds = lambda ctx: tf.data.Dataset.from_tensor_slices((lr, hr)).batch(1)  # noqa: E731
    return list(placement.strategy.distribute_datasets_from_function(ds))


def _round_off_biases(net):
    """Names of the biases of convolutions that feed batch norm.

    Their gradient is 0 in exact arithmetic (batch norm subtracts any bias
    again), so their values are float32 round-off in both paths, not a result.
    """
    names = set()
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            source = layer._inbound_nodes[0].parent_nodes[0].operation
            if isinstance(source, keras.layers.Conv3D):
                names.add(source.bias.path)
    return names


def _relative(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


EPS32 = float(np.finfo(np.float32).eps)
EPS16 = float(np.finfo(np.float16).eps)


def _round_off(terms, eps=EPS32):
    """Relative round-off of a sum of ``terms`` terms, at four standard deviations.

    Each addition rounds with a relative error of at most ``eps`` and the
    errors of a long sum walk at random, so two orders of summation (one
    device, or two replicas whose partial sums an all-reduce adds; oneDNN picks
    its kernels and their order by CPU) differ by about ``eps * sqrt(terms)``
    relative to the magnitude of the sum; four times that is a bound no CPU
    should cross by chance. For a global batch of two 32x32x24 patches
    (49152 voxels, the widest reduction of a step: the losses' sums and the
    batch-norm statistics) it is 1.06e-4, a thousandth of what a real error
    makes (a mean over the replica's batch instead of the global one doubles a
    loss; batch-norm statistics without their all-reduce change it by ~10 %).
    """
    return 4 * eps * np.sqrt(terms)


def _depth(net):
    """Convolutions of a network: the reductions a gradient passes through, each adding its round-off."""
    return sum(isinstance(layer, keras.layers.Conv3D) for layer in net.layers)


@pytest.fixture
def sgd(monkeypatch):
    """Plain SGD in place of the trainer's Adam, for exact step comparisons.

    Adam's first update is lr * sign(g): it turns float32 noise in gradients
    that are mathematically zero (a convolution's bias before batch norm) into
    +-lr whatever the order of the sums, so no float32 implementation could
    compare weights after an Adam step to 1e-5. SGD keeps each update
    proportional to its gradient: equal weights then mean equal gradients.
    """
    import keras

    monkeypatch.setattr(keras.optimizers, "Adam",
                        lambda learning_rate, **_: keras.optimizers.SGD(learning_rate))


def _weights(trainer, net, skip, trainable=False):
    """The weights of a network (all, batch-norm statistics included, or the trainable ones) as one
    vector, less ``skip``."""
    net = getattr(trainer, net)
    return np.concatenate([w.numpy().ravel() for w in (net.trainable_weights if trainable else net.weights)
                           if w.path not in skip])


# What differs between the upsampling modes is the generator's upsampling stage, a
# per-patch computation; the distributed parts (global batch norm, the losses'
# global sums, the all-reduced gradients) are the same layers in every mode. The
# whole GAN step is compared in the default mode; the other two modes are
# compared on the pre-training step (-pretrain_steps: the discriminator's update
# and the generator's content-only update), whose graph is smaller.
@pytest.mark.parametrize("mode, pretrain_steps", [("subpixel", 0), ("nn", 10), ("subpixel_NN", 10)])
def test_two_replicas_take_the_single_device_step(mode, pretrain_steps, sgd):
    assert {"subpixel", "nn", "subpixel_NN"} == set(networks.UPSAMPLING_MODES)
    rng = np.random.default_rng(0)
    hr = rng.uniform(-1, 1, (6,) + PATCH + (1,)).astype(np.float32)
    lr = np.asarray(degradation.degrade(hr, 2))
    # The discriminator's gradients start near 1e4 and the generator's summed
    # loss near 1e5: at 1e-8 the updates move the trainable weights by ~1e-4
    # and keep both networks well conditioned.
    single = _trainer(Placement(), mode, learning_rate=1e-8, pretrain_steps=pretrain_steps)
    start = (single.generator.get_weights(), single.discriminator.get_weights())
    placement = _mirrored()
    mirrored = _trainer(placement, mode, start, learning_rate=1e-8, pretrain_steps=pretrain_steps)
    assert isinstance(mirrored.generator.get_layer("bn1"), networks.GlobalBatchNormalization)
    assert mirrored.replicas == 2
    trained = ("generator", "discriminator")
    skip = {net: _round_off_biases(getattr(single, net)) for net in trained}
    assert all(skip.values())  # e.g. conv1/bias before bn1
    untouched = [d.numpy().copy() for d in mirrored.discriminator.weights]
    batches = _distributed_batches(placement, lr, hr)
    # Losses, weights and batch-norm statistics: sums over the global batch's voxels.
    bound = _round_off(2 * np.prod(PATCH))
    # The gradients (SGD: the updates of the trainable weights) are not sums
    # whose round-off one can bound this way: batch norm's backward pass
    # subtracts nearly equal terms, which amplifies their round-off to ~1e-3
    # of the update on this CPU (9.9e-4 for subpixel_NN, 2.3e-4 for nn, 1.1e-5
    # for subpixel). A real error changes an update by a large fraction of
    # itself (one replica's gradient left out of the all-reduce: 51 %), so the
    # bound sits between the two, a factor ~20 from each: 2 %. An update is
    # also the difference of two float32 weights, resolved to eps32 * |w|.
    gradient_bound = 2e-2
    for step in range(2):  # global batches of 2, one patch per replica
        before = {net: [_weights(t, net, skip[net], trainable=True) for t in (single, mirrored)] for net in skip}
        a = {k: float(v) for k, v in single.train_step(lr[2 * step:2 * step + 2], hr[2 * step:2 * step + 2]).items()}
        b = {k: float(v) for k, v in mirrored.train_step(*batches[step]).items()}
        # Each step adds its round-off to that of the weights it starts from.
        assert b == pytest.approx(a, rel=(step + 1) * bound), (step, a, b)
        for net in skip:
            w_a, w_b = _weights(single, net, skip[net]), _weights(mirrored, net, skip[net])
            assert np.linalg.norm(w_b - w_a) / np.linalg.norm(w_a) <= (step + 1) * bound, (step, net)
            # The updates themselves (SGD: the gradients) agree, not just the weights
            # (whose change the batch-norm statistics dominate).
            update_a = _weights(single, net, skip[net], trainable=True) - before[net][0]
            update_b = _weights(mirrored, net, skip[net], trainable=True) - before[net][1]
            spacing = EPS32 * np.linalg.norm(before[net][0]) / np.linalg.norm(update_a)
            assert spacing < 0.5, (step, net)  # the step moved them beyond their float32 spacing
            assert np.linalg.norm(update_b - update_a) / np.linalg.norm(update_a) <= spacing + gradient_bound, \
                (step, net, spacing)
            for name in skip[net]:  # round-off in both paths, never a result
                value = getattr(mirrored, net).get_layer(name.split("/")[0]).bias.numpy()
                assert np.max(np.abs(value)) < 1e-6
    assert int(mirrored.step.numpy()) == 2
    # Both networks learnt in both kinds of step (pre-training warms D up).
    assert a["d_loss"] > 0 and not all(np.array_equal(w, v.numpy())
                                       for w, v in zip(untouched, mirrored.discriminator.weights))


def test_mixed_precision_works_on_one_device_and_under_a_strategy(tmp_path):
    # float16 compute with loss scaling on two replicas: the generator's losses
    # are those of one float16 device, and the weights stay float32. What this
    # compares is the generator's (its losses, its global batch norm in float16,
    # its loss-scale optimiser under the strategy), so both trainers start with
    # a pre-training step: the GAN step's first float16 trace on two CPU
    # replicas takes 14 s, the generator's 3 s. One device then goes on with
    # float16 GAN steps.
    patch = (16, 16, 12)
    rng = np.random.default_rng(2)
    hr = rng.uniform(-1, 1, (2,) + patch + (1,)).astype(np.float32)
    lr = np.asarray(degradation.degrade(hr, 2))
    cfg = Settings(upsampling_factor=2, residual_blocks=1, feature_size=4, upsampling_mode="subpixel",
                   patch_shape=patch, mixed_precision="float16")
    losses = []
    for placement in (Placement(), _mirrored()):
        keras.utils.set_random_seed(3)
        g, d = build_networks(cfg, placement)
        trainer = SRGANTrainer(g, d, seed=5, loss_scale=True, strategy=placement.strategy, pretrain_steps=1)
        batch = (lr, hr) if placement.strategy is None else _distributed_batches(placement, lr, hr)[0]
        before = [w.numpy().copy() for w in g.trainable_weights]
        losses.append({k: float(v) for k, v in trainer.train_step(*batch).items()})
        assert all(w.dtype == "float32" for w in g.weights + d.weights)
        assert all(np.isfinite(w.numpy()).all() for w in g.trainable_weights)
        assert all(np.isfinite(v) for v in losses[-1].values())
        if placement.strategy is None:
            # One device (what test_trainer's float16 step test checked): two float16 GAN
            # steps follow. Dynamic loss scaling may skip the first float16 update or two
            # while it finds its scale; three steps must update the generator, every step's
            # results finite, and both loss scales are part of the checkpoint.
            for _ in range(2):
                out = {k: float(v) for k, v in trainer.train_step(*batch).items()}
                assert all(np.isfinite(v) for v in out.values()) and out["d_loss"] > 0
            assert int(trainer.g_optimizer.iterations) >= 1
            assert all(w.dtype == "float32" for w in g.trainable_weights)
            assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, g.trainable_weights))
            names = {name for name, _ in tf.train.list_variables(trainer.checkpoint.save(str(tmp_path / "ckpt")))}
            assert any(n.startswith("g_loss_scale/") for n in names)
            assert any(n.startswith("d_loss_scale/") for n in names)
    # Each convolution of the generator rounds its output to float16 (eps16); a
    # sum over voxels averages these errors, so its relative error stays below
    # the number of roundings on a voxel's way: depth x eps16 (5.9e-3 here).
    bound = _depth(g) * EPS16
    for key in ("mse", "gdl"):
        assert losses[1][key] == pytest.approx(losses[0][key], rel=bound), key


# Four patches of 16x16x12 per volume, two training volumes: four steps of a
# global batch of 2 per epoch, enough to stop in the middle and go on.
SMALL = ["-volume_shape", "28,28,12", "-patch_shape", "16,16,12", "-patch_margin", "2",
         "-feature_size", "4", "-residual_blocks", "1", "-upsampling_factor", "2"]


def _run_cfg(data, ckpt, pred, *extra):
    argv = ["-data_path", str(data), "-checkpoint_dir", str(ckpt), "-epochs", "1",
            "-path_prediction", str(pred)] + SMALL + list(extra)
    return model.parse_command(argv, log=lambda *_: None).settings


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distdata")
    phantoms.make_demo_data(str(root), subjects=3, shape=(32, 32, 24), seed=4)
    return root


def test_a_two_replica_run_resumes_on_one_replica_with_the_same_data_order(data, tmp_path, monkeypatch):
    original = SRGANTrainer.train_step
    seen = []

    def spy(self, lr, hr):
        parts = self.strategy.experimental_local_results(hr) if self.strategy is not None else [hr]
        seen.append(np.round(np.concatenate([np.asarray(p) for p in parts]).sum(axis=(1, 2, 3, 4)), 3))
        if len(seen) == stop_at[0]:
            raise KeyboardInterrupt
        return original(self, lr, hr)

    monkeypatch.setattr(SRGANTrainer, "train_step", spy)
    quiet = lambda *_: None  # noqa: E731
    # The reference order: the epoch's batches on one device, as training.train streams them.
    one = _run_cfg(data, tmp_path / "one", tmp_path / "p1")
    stream = training.TrainingStream(splits.training_split(one, quiet).train, one, log=quiet)
    reference = [np.round(np.asarray(hr).sum(axis=(1, 2, 3, 4)), 3) for _, hr, _ in stream(0)]
    stop_at = [2]  # interrupted at the 2nd step of 4 (2 train volumes x 4 patches / 2)
    # The data order does not depend on the step: the pre-training step (a smaller
    # graph to trace than the GAN step; the GAN step under a strategy is compared
    # above and trained by the two-worker run below) for all 4 steps, resumed as it was.
    with pytest.raises(KeyboardInterrupt):
        training.train(_run_cfg(data, tmp_path / "two", tmp_path / "p2", "-pretrain_steps", "4"), log=quiet,
                       placement=_mirrored())
    assert json.loads((tmp_path / "two" / "config.json").read_text())["replicas"] == 2
    stop_at[0] = None
    cfg = _run_cfg(data, tmp_path / "two", tmp_path / "p2", "-restore", str(tmp_path / "two"))
    training.train(cfg, log=quiet)
    assert len(reference) == 4
    # The interrupted step is counted once; the resumed run continues at step 2 with batch 2.
    assert len(seen) == 5
    for expected, got in zip(reference, seen[:1] + seen[2:]):
        np.testing.assert_array_equal(got, expected)
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "two")))
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == 4
    assert int(reader.get_tensor("g_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 4
    # The discriminator warms up in the pre-training steps, one update per step.
    assert int(reader.get_tensor("d_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 4


def _free_port_pair():
    """Two consecutive free ports on 127.0.0.1 (SLURM reserves ranges: "12000-12001")."""
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port, port + 1
    raise RuntimeError("no two consecutive free ports")


# Two patches of 16x16x12 per volume, two training volumes: two steps of a
# global batch of 2 per epoch. Size does not matter here, the cluster does.
CLUSTER_FLAGS = ["-volume_shape", "28,16,12", "-patch_shape", "16,16,12", "-patch_margin", "2",
                 "-feature_size", "4", "-residual_blocks", "1", "-upsampling_factor", "2",
                 "-epochs", "1", "-train_fraction", "0.67"]
STEPS_PER_EPOCH = 2


def _slurm_environment(index, ports, bin_dir):
    """The environment of task ``index`` of ``srun -n 2 --resv-ports`` on one CPU node.

    A stand-in ``scontrol show hostnames`` turns the node's name into
    localhost; no nvidia-smi, no CUDA_VISIBLE_DEVICES.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "TF_CONFIG"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(SLURM_JOB_ID="77", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(index),
               SLURM_LOCALID=str(index), SLURM_STEP_NODELIST="cpunode[7]", SLURM_STEP_TASKS_PER_NODE="2",
               SLURM_STEP_RESV_PORTS=f"{ports[0]}-{ports[1]}", PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    return env


def _train_as_two_workers(data, tmp_path, *extra, checkpoint_steps):
    """Runs model.py as the two tasks of a SLURM step; returns (the chief's stdout, the checkpoint folder)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames cpunode[7]" ] && echo localhost\n')
    scontrol.chmod(0o755)
    ckpt, ports, procs = tmp_path / "ckpt", _free_port_pair(), []
    try:
        for index in range(2):
            cmd = [sys.executable, os.path.join(ROOT, "model.py"), "-data_path", str(data),
                   "-checkpoint_dir", str(ckpt)] + CLUSTER_FLAGS + list(extra)
            procs.append(subprocess.Popen(cmd, env=_slurm_environment(index, ports, bin_dir),
                                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        outputs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "cuda" not in err.lower() and "absl" not in err  # TensorFlow's start-up lines stay hidden
    chief_out, worker_out = outputs[0][0], outputs[1][0]
    assert ("MultiWorkerMirroredStrategy over /cpu:0, 2 replicas, worker 0 of 2 (workers on CPUs, "
            "cluster from SLURM)") in chief_out
    assert "epoch 1/1" in chief_out and worker_out.strip() == ""  # the chief alone reports
    # Exactly one checkpoint, the chief's, numbered by the step; nothing else of the workers.
    assert sorted(n for n in os.listdir(ckpt) if n.endswith(".index")) == [f"ckpt-{s}.index" for s in checkpoint_steps]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["strategy"] == "MultiWorkerMirroredStrategy" and config["workers"] == 2
    return chief_out, ckpt


def test_two_workers_of_a_slurm_step_train_together_the_chief_validates_and_one_process_resumes(data, tmp_path):
    """srun -n 2 on one node without GPUs (no nvidia-smi): the step is the cluster.

    -gpus cpu means "workers on CPUs", not "each worker alone". The list holds
    one subject out for validation, validated after every step: the workers
    checkpoint together at step 1 (inside the epoch) and 2, the chief alone
    validates and writes best/. A TF_CONFIG cluster differs only in where
    placement.find_cluster reads it (test_placement.py); the strategy, the
    steps and the files are these.
    """
    listing = tmp_path / "list.csv"
    listing.write_text("image,split\n" + "".join(
        f"{data / name / 'T1_brain_extractedBrainExtractionBrain.nii.gz'},{split}\n"
        for name, split in (("demo_000", "train"), ("demo_001", "train"), ("demo_002", "validation"))))
    chief_out, ckpt = _train_as_two_workers(listing, tmp_path, "-gpus", "cpu", "-validate_steps", "1",
                                            checkpoint_steps=(1, STEPS_PER_EPOCH))
    _, rows = durable.read_csv_rows(str(ckpt / "validation.csv"))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(r["subjects"] == "1" for r in rows)
    assert chief_out.count("validation at step") == 2 and "best checkpoint: step" in chief_out
    assert checkpoints.latest(str(ckpt / "best")) is not None
    # A single process continues the run (what any cluster leaves is one ordinary checkpoint).
    assert model.main(["-restore", str(ckpt), "-epochs", "2"]) == 0
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(ckpt)))
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == 2 * STEPS_PER_EPOCH
    _, rows = durable.read_csv_rows(str(ckpt / "validation.csv"))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


@pytest.mark.parametrize("argv, env, message", [
    (["-gpus", "cpu:2", "-batch_size", "3"], {}, "-batch_size 3 must be divisible by the 2 replicas"),
    ([], {"TF_CONFIG": "{not json"}, "TF_CONFIG is not valid JSON"),
    ([], {"TF_CONFIG": json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker",
                                                                                      "index": 3}})},
     "does not name one of its cluster's worker[0..0]"),
    ([], {"TF_CONFIG": json.dumps({"task": {"type": "worker", "index": 0}})}, "needs a \"cluster\""),
    (["-gpus", "3"], {}, "-gpus 3: no GPU 3 on this machine"),
    (["-gpus", "cpu:2", "-xla", "True"], {}, "-xla True runs on one device only"),
])
def test_placement_mistakes_are_clear_errors(argv, env, message, data, tmp_path, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cmd = ["-data_path", str(data), "-checkpoint_dir", str(tmp_path / "c"), "-epochs", "1"] + SMALL + argv
    assert model.main(cmd) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
