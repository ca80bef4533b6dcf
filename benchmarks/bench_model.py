"""Times of the default configuration on this machine (not a test).

    python benchmarks/bench_model.py [--steps 3] [--mode subpixel|nn|subpixel_NN]

Reports: one generator forward pass on a 32x32x23 LR patch (x4), one default
training step (batch 2 of 128x128x92, D then G update) and one full-volume
patch-stitched evaluation of a 224x224x152 volume (8 patches, metrics and the
three interpolation baselines), plus the peak resident memory.
"""

import argparse
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import model  # noqa: E402
import networks  # noqa: E402
import train_dataset as td  # noqa: E402
import utils  # noqa: E402


def timed(fn, repeat):
    fn()  # warm-up: tracing, oneDNN kernel selection
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", default="subpixel", choices=networks.UPSAMPLING_MODES)
    parser.add_argument("--factor", type=int, default=4)
    args = parser.parse_args()
    f = args.factor
    print(f"tensorflow {tf.__version__}, devices {[d.device_type for d in tf.config.list_physical_devices()]}")

    g = networks.build_generator(f, upsampling_mode=args.mode)
    predict = model.make_predictor(g)
    lr = tf.random.uniform((1, 128 // f, 128 // f, 92 // f, 1), -1, 1)
    t = timed(lambda: predict(lr).numpy(), 10)
    print(f"generator forward, LR {tuple(lr.shape[1:4])} -> {tuple(int(n) * f for n in lr.shape[1:4])}: {t * 1e3:.1f} ms")

    d = networks.build_discriminator()
    trainer = model.SRGANTrainer(g, d)
    hr = tf.random.uniform((2, 128, 128, 92, 1), -1, 1)
    lr2 = td.degrade(hr, f)
    t = timed(lambda: trainer.train_step(lr2, hr), args.steps)
    print(f"training step (batch 2 x 128x128x92, x{f}, {args.mode}): {t:.2f} s "
          f"-> {4 * t:.1f} s per volume")

    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 1000, (224, 224, 152)).astype(np.float32)

    def evaluate_volume():
        hr_n, nf = utils.normalize(volume)
        lr_n = np.asarray(td.degrade(hr_n, f))
        sr = utils.denormalize(model.super_resolve_volume(predict, lr_n, f, (128, 128, 92), 16, 2), nf)
        utils.compute_metrics(volume, sr, volume > 0)
        for order in (0, 1, 3):
            utils.compute_metrics(volume, utils.upsample_baseline(lr_n, f, order, volume.shape), volume > 0)

    t = timed(evaluate_volume, 1)
    print(f"full-volume evaluation 224x224x152 (8 patches + metrics + 3 baselines): {t:.2f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
