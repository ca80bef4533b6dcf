"""Throughput and memory of the training data pipeline (not a test).

Writes ADNI-sized demo phantoms (240x240x170 int16 .nii.gz) once, then
measures, with the default geometry (224x224x152 canonical, 128x128x92
patches, margin 16, batch 2, x4):

- volumes decoded per second (``load_volume`` alone, one thread);
- batches per second of ``make_train_dataset`` over one epoch, and the CPU
  seconds each batch costs (what it takes from a training step sharing the cores);
- peak resident memory during the epoch, with the subject list repeated so
  that an epoch of 4x the subjects shows whether memory grows with it;
- optionally (``--train-step``) the time of one generator + discriminator
  gradient step on the same batch, built from networks.py.

Usage: python benchmarks/bench_pipeline.py [--data DIR] [--subjects 8] [--train-step]
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE = (240, 240, 170)


def _rss_mib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _RssSampler:
    """Samples the current RSS every 10 ms in a thread; keeps the maximum."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.01)

    def __enter__(self):
        self.peak = _rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _epoch(td, subjects, factor):
    ds = td.make_train_dataset(subjects, factor, log=lambda m: None)
    cpu0, t0 = time.process_time(), time.perf_counter()
    first = None
    n = 0
    with _RssSampler() as rss:
        for lr, hr in ds:
            n += 1
            if first is None:
                first = time.perf_counter() - t0
                t1 = time.perf_counter()
    total = time.perf_counter() - t0
    steady = (n - 1) / (time.perf_counter() - t1) if n > 1 else float("nan")
    return dict(batches=n, seconds=total, first_batch_s=first, batches_per_s=n / total,
                steady_batches_per_s=steady, cpu_s_per_batch=(time.process_time() - cpu0) / n,
                peak_rss_mib=rss.peak, lr_shape=tuple(lr.shape), hr_shape=tuple(hr.shape))


def _train_step_seconds(batch, factor, repeats=2):
    import keras
    import tensorflow as tf

    import networks

    lr, hr = batch
    g = networks.build_generator(upsampling_factor=factor)
    d = networks.build_discriminator(input_shape=tuple(hr.shape[1:]))
    g_opt, d_opt = keras.optimizers.Adam(1e-4), keras.optimizers.Adam(1e-4)

    @tf.function
    def step(lr, hr):
        with tf.GradientTape() as tape:
            sr = g(lr, training=True)
            d_loss = tf.reduce_mean((d(hr, training=True) - 1) ** 2) + tf.reduce_mean(d(sr, training=True) ** 2)
        d_opt.apply_gradients(zip(tape.gradient(d_loss, d.trainable_variables), d.trainable_variables))
        with tf.GradientTape() as tape:
            sr = g(lr, training=True)
            g_loss = tf.reduce_sum((sr - hr) ** 2) + 0.1 * tf.reduce_mean((d(sr, training=True) - 1) ** 2)
        g_opt.apply_gradients(zip(tape.gradient(g_loss, g.trainable_variables), g.trainable_variables))
        return g_loss

    step(lr, hr)  # trace and warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        step(lr, hr).numpy()
    return (time.perf_counter() - t0) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder of phantoms (written there if missing)")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--train-step", action="store_true", help="also time one G+D training step")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    data = args.data or os.path.join(tempfile.gettempdir(), "srgan3d_bench_phantoms")
    if args.generate_only:
        import phantoms

        phantoms.make_demo_data(data, subjects=args.subjects, shape=SHAPE, seed=0)
        return
    if not os.path.isdir(data) or len(os.listdir(data)) < args.subjects:
        # In a child process, so that its memory does not count in our peak RSS.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--data", data, "--subjects", str(args.subjects),
                        "--generate-only"], check=True)
        print(f"phantoms: {args.subjects} x {SHAPE} written to {data} in "
              f"{time.perf_counter() - t0:.1f} s")

    import tensorflow as tf

    import layouts
    import nifti_io
    import train_dataset as td

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; rss at start {_rss_mib():.0f} MiB")
    subjects, _ = layouts.find_subjects(data, log=lambda m: None)
    subjects = subjects[: args.subjects]

    t0 = time.perf_counter()
    for s in subjects:
        nifti_io.load_volume(s.image_path)
    decode = len(subjects) / (time.perf_counter() - t0)
    print(f"decode: {decode:.2f} volumes/s (load_volume, one thread, {SHAPE} int16 .nii.gz)")

    results = {}
    for repeat in (1, 4):
        r = _epoch(td, subjects * repeat, args.factor)
        results[repeat] = r
        print(f"epoch of {len(subjects) * repeat} volumes: {r['batches']} batches in {r['seconds']:.1f} s = "
              f"{r['batches_per_s']:.2f} batches/s (steady {r['steady_batches_per_s']:.2f}, first batch "
              f"{r['first_batch_s']:.2f} s), {r['cpu_s_per_batch']:.2f} CPU s/batch, peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB; lr {r['lr_shape']}, hr {r['hr_shape']}")
    print(f"process peak RSS (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    if args.train_step:
        batch = next(iter(td.make_train_dataset(subjects[:1], args.factor, log=lambda m: None)))
        seconds = _train_step_seconds(batch, args.factor)
        print(f"train step (G + D update, batch 2, x{args.factor}, CPU): {seconds:.2f} s = "
              f"{1 / seconds:.3f} batches/s")


if __name__ == "__main__":
    main()
