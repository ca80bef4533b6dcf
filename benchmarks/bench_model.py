"""Speed of the port on this machine (not a test).

    python benchmarks/bench_model.py                                  # one device, default geometry
    python benchmarks/bench_model.py --replicas 1,2 [--xla] [--mixed_precision float16]
    python benchmarks/bench_model.py --geometry small --replicas 1,2  # minutes on a CPU
    python benchmarks/bench_model.py --geometry demo --factor 2 --feature_size 16 --residual_blocks 2 \
        --replicas 1 --steps 2                                        # the demo's model

Part 1 (one device): one generator forward pass on an LR patch, one
full-volume patch-stitched evaluation of a ``volume_shape`` volume (8 patches
for the default geometry, metrics and three interpolation baselines) and one
validation pass over three phantom volumes (``validation.Validator``, what
``-validation_fraction`` costs at each validation).

Part 2 (per replica count, each in its own process): the real training loop
(:class:`training.TrainingStream` over synthetic phantoms written to a temporary
folder, :meth:`trainer.SRGANTrainer.train_step`, the strategy ``-gpus`` would
choose), timed after a warm-up. Printed: steps/s, patches/s, the scaling
efficiency against the smallest replica count (patches/s per replica), the
peak memory (each GPU's peak allocation, or the process's peak resident
memory on a CPU) and the fraction of the loop's time spent waiting for the
next batch. On a CPU, N replicas are N logical devices sharing the same cores:
the efficiency measures the overhead of the strategy, not a speed-up.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

GEOMETRIES = {  # volume_shape, patch_shape, patch_margin
    "default": ((224, 224, 152), (128, 128, 92), 16),
    "small": ((96, 96, 64), (48, 48, 32), 8),  # quality.py's crop96
    "demo": ((64, 64, 48), (36, 36, 28), 4),
}


def _argv(args, replicas, data):
    volume, patch, margin = GEOMETRIES[args.geometry]
    gpus = ",".join(map(str, range(replicas))) if args.gpus_visible else f"cpu:{replicas}"
    return ["-data_path", data, "-checkpoint_dir", os.path.join(data, os.pardir, "ckpt"),
            "-volume_shape", ",".join(map(str, volume)), "-patch_shape", ",".join(map(str, patch)),
            "-patch_margin", str(margin), "-upsampling_factor", str(args.factor),
            "-batch_size", str(args.batch_size), "-gpus", gpus, "-xla", str(args.xla),
            "-mixed_precision", args.mixed_precision,
            "-nn", str(args.mode == "nn"), "-subpixel_NN", str(args.mode == "subpixel_NN")]


def measure_loop(args, replicas):
    """Times the real training loop with ``replicas`` replicas; returns a dict."""
    import tensorflow as tf

    import layouts
    import model
    import phantoms
    import placement as placement_lib
    import trainer as trainer_lib
    import training

    work = tempfile.mkdtemp(prefix="srgan-bench-")
    data = os.path.join(work, "data")
    volume = GEOMETRIES[args.geometry][0]
    parsed = model.build_parser().parse_args(_argv(args, replicas, data))
    placement = placement_lib.choose_placement(parsed.gpus, multi_worker=False, log=lambda *_: None)
    subjects_needed = max(2, -(-(args.warmup + args.steps) * args.batch_size // 8))
    phantoms.make_demo_data(data, subjects=subjects_needed, shape=volume, seed=0)
    cfg = model.resolve_command(parsed, log=lambda *_: None).settings
    subjects, _ = layouts.find_subjects(data, log=lambda *_: None)
    generator, discriminator = trainer_lib.build_networks(cfg, placement)
    trainer = trainer_lib.SRGANTrainer(generator, discriminator, cfg.learning_rate, seed=cfg.seed,
                                     loss_scale=cfg.mixed_precision == "float16",
                                     strategy=placement.strategy, xla=cfg.xla)
    stream = training.TrainingStream(subjects, cfg, placement, log=lambda *_: None)
    batches = iter(stream(0))
    waited, start = 0.0, None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            float(trainer.step.numpy())  # drain the warm-up steps
            waited, start = 0.0, time.perf_counter()
        t = time.perf_counter()
        lr, hr = next(batches)[:2]
        waited += time.perf_counter() - t
        trainer.train_step(lr, hr)
    float(trainer.step.numpy())  # the device has finished every step
    seconds = time.perf_counter() - start
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        peak = max(tf.config.experimental.get_memory_info(d.name)["peak"] for d in gpus) / 2**30
        memory = f"{peak:.1f} GiB per GPU (peak allocation)"
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB resident (process peak)"
    return {"replicas": replicas, "strategy": placement.name, "steps_per_s": args.steps / seconds,
            "patches_per_s": args.steps * args.batch_size / seconds, "input_wait": waited / seconds,
            "memory": memory}


def measure_components(args):
    """Generator forward and a full-volume evaluation on one device; prints them."""
    import tensorflow as tf

    import degradation
    import inference
    import model  # noqa: F401 (TensorFlow imported quietly)
    import networks
    import utils

    volume, patch, margin = GEOMETRIES[args.geometry]
    f = args.factor
    g = networks.build_generator(f, upsampling_mode=args.mode, feature_size=args.feature_size,
                                 residual_blocks=args.residual_blocks)
    predict = inference.make_predictor(g)
    lr = tf.random.uniform((1,) + tuple(p // f for p in patch) + (1,), -1, 1)
    print(f"generator forward, LR {tuple(lr.shape[1:4])} -> {patch}: "
          f"{_timed(lambda: predict(lr).numpy(), 10) * 1e3:.1f} ms")
    hr = np.random.default_rng(0).uniform(0, 1000, volume).astype(np.float32)

    def evaluate_volume():
        hr_n, nf = utils.normalize(hr)
        lr_n = np.asarray(degradation.degrade(hr_n, f))
        sr = utils.denormalize(inference.super_resolve_volume(predict, lr_n, f, patch, margin, 2), nf)
        utils.compute_metrics(hr, sr, hr > 0)
        for order in (0, 1, 3):
            utils.compute_metrics(hr, utils.upsample_baseline(lr_n, f, order, hr.shape), hr > 0)

    print(f"full-volume evaluation {'x'.join(map(str, volume))} (patches + metrics + 3 baselines): "
          f"{_timed(evaluate_volume, 1):.2f} s")
    measure_validation(args, g)


def measure_validation(args, generator, subjects=3):
    """One validation pass (``validation.Validator.score``) over ``subjects`` phantoms; prints its time."""
    import config
    import layouts
    import phantoms
    import validation

    volume, patch, margin = GEOMETRIES[args.geometry]
    cfg = config.Settings(volume_shape=volume, patch_shape=patch, patch_margin=margin,
                          upsampling_factor=args.factor)
    with tempfile.TemporaryDirectory() as data:
        phantoms.make_demo_data(data, subjects=subjects, shape=volume, seed=0)
        found, _ = layouts.find_subjects(data, log=lambda m: None)
        validator = validation.Validator(found, cfg, log=print)
        seconds = _timed(lambda: validator.score(generator), 2)  # the warm-up pass computes tricubic
    print(f"validation pass over {subjects} volumes of {'x'.join(map(str, volume))} (read, degrade, "
          f"patches, fair PSNR/SSIM): {seconds:.2f} s ({seconds / subjects:.2f} s per volume)")


def _timed(fn, repeat):
    fn()  # warm-up: tracing, kernel selection
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    import networks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1", help="comma-separated replica counts, e.g. 1,2,4")
    parser.add_argument("--xla", action="store_true", help="jit_compile the train step (one replica)")
    parser.add_argument("--mixed_precision", default="none", choices=("none", "float16", "bfloat16"))
    parser.add_argument("--geometry", default="default", choices=sorted(GEOMETRIES))
    parser.add_argument("--mode", default="subpixel", choices=networks.UPSAMPLING_MODES)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--feature_size", type=int, default=32, help="generator filters (components only)")
    parser.add_argument("--residual_blocks", type=int, default=6, help="residual blocks (components only)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="global batch (default: 2 x the largest replica count)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per replica count")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip_components", action="store_true", help="only the training loop")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gpus_visible", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(c) for c in args.replicas.split(",")]
    if args.batch_size is None:
        args.batch_size = 2 * max(counts)

    if args.one is not None:  # a child: one replica count, one JSON line
        print("RESULT " + json.dumps(measure_loop(args, args.one)), flush=True)
        return 0

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    print(f"tensorflow {tf.__version__}; {len(gpus)} GPU(s); {os.cpu_count()} CPU cores; "
          f"geometry {args.geometry}, x{args.factor} {args.mode}, global batch {args.batch_size}, "
          f"xla {args.xla}, mixed precision {args.mixed_precision}", flush=True)
    if not args.skip_components:
        measure_components(args)
    rows = []
    for count in counts:
        command = [sys.executable, os.path.abspath(__file__), "--one", str(count)] + [
            a for a in sys.argv[1:]]
        command += ["--batch_size", str(args.batch_size)] + (["--gpus_visible"] if gpus else [])
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{count} replica(s) failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    base = rows[0]["patches_per_s"] / rows[0]["replicas"]
    print()
    print("| replicas | strategy | steps/s | patches/s | scaling efficiency | peak memory | input wait |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        efficiency = r["patches_per_s"] / (r["replicas"] * base)
        print(f"| {r['replicas']} | {r['strategy']} | {r['steps_per_s']:.3f} | {r['patches_per_s']:.2f} | "
              f"{efficiency:.0%} | {r['memory']} | {r['input_wait']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
