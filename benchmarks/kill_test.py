"""How much training a SIGKILL costs, and whether the resumed run is the same (not a test).

    python benchmarks/kill_test.py [--kills 10] [--checkpoint-steps 4] [--seed 0]

Trains a tiny model on synthetic phantoms in a subprocess, SIGKILLs it at a
random moment of its training (as the OOM killer or a pre-empting scheduler
does), resumes it with ``-restore``, and repeats until ``--kills`` kills have
landed; the last run finishes. For every kill it reads the step the run had
reached (its progress bar) and the step of the newest checkpoint left on disk:
the difference is the work lost. At the end the final weights are compared
with an uninterrupted run of the same seed (they must be bit-identical, the
save counter aside).

Two policies are measured by default: the original's (a checkpoint at the end
of every epoch only: ``-checkpoint_minutes 0``) and checkpoints every
``--checkpoint-steps`` steps, which is what ``-checkpoint_minutes 30`` gives a
real run in time rather than steps. A third run (``--no-state-loss`` leaves it
out) uses the in-epoch policy and, after every kill, simulates a kill that
landed between writing ``ckpt-N.index`` and updating the ``checkpoint`` state
file (an instant too short to hit with a real SIGKILL): the state file is
deleted after odd kills and made to list one checkpoint less after even ones.
The resume must still start from the newest complete checkpoint.
"""

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

# TensorFlow and the project's modules are imported where used: --help is instant.

GEOMETRY = ["-volume_shape", "32,32,24", "-patch_shape", "20,20,16", "-patch_margin", "2",
            "-feature_size", "8", "-residual_blocks", "2", "-upsampling_factor", "2"]
BAR = re.compile(r"epoch (\d+)/\d+:[^\r\n]*?\|\s*(\d+)/(\d+)")


def _argv(data, ckpt, epochs, seed, policy):
    return ([sys.executable, os.path.join(ROOT, "model.py"), "-data_path", data, "-checkpoint_dir", ckpt,
             "-epochs", str(epochs), "-train_fraction", "0.67", "-seed", str(seed)] + GEOMETRY + policy)


def _state(ckpt):
    import tensorflow as tf

    import checkpoints

    reader = tf.train.load_checkpoint(checkpoints.latest(ckpt))
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
            if not n.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


def _checkpoint_step(ckpt):
    """int, the step of the newest complete checkpoint in ``ckpt`` (0 when there is none)."""
    import checkpoints

    path = checkpoints.latest(ckpt) if os.path.isdir(ckpt) else None
    return int(_state(ckpt)["step/.ATTRIBUTES/VARIABLE_VALUE"]) if path else 0


def _reached(log_path):
    """(int, int): the global step the progress bar last showed and the batches per epoch."""
    with open(log_path, errors="replace") as fh:
        found = BAR.findall(fh.read())
    if not found:
        return None, None
    epoch, done, per_epoch = (int(v) for v in found[-1])
    return (epoch - 1) * per_epoch + done, per_epoch


def _timed_run(command, log_path, timeout=1200):
    """Runs ``command`` to its end; returns the seconds from its first finished step to its exit."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline, first = time.time() + timeout, None
        while proc.poll() is None:
            if first is None and _reached(log_path)[0]:
                first = time.time()
            if time.time() > deadline:
                raise RuntimeError(f"{' '.join(command)} did not finish in {timeout} s; see {log_path}")
            time.sleep(0.05)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}; see {log_path}")
        return time.time() - (first or time.time())
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def _run_until_killed(command, log_path, window, rng, timeout=600):
    """Starts ``command``; SIGKILLs it ``U(0, window)`` s after its first step of this start.

    Returns:
        bool, True if it was killed, False if it finished first.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.time() + timeout
        # From its first finished step: start-up and tracing are not training time.
        # A resumed run's bar starts at the resumed step.
        first = None
        while first is None or (_reached(log_path)[0] or 0) <= first:
            if first is None:
                first = _reached(log_path)[0]
            if proc.poll() is not None:
                return False
            if time.time() > deadline:
                raise RuntimeError(f"no training step after {timeout} s; see {log_path}")
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, window))
        if proc.poll() is not None:
            return False
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return True
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def lose_state_file(ckpt, kill):
    """Leaves ``ckpt`` as a kill between ``ckpt-N.index`` and the state file update would.

    Odd kills: the ``checkpoint`` state file is gone. Even kills: it lists the
    checkpoints but the newest. Returns a one-line description.
    """
    import checkpoints

    state = os.path.join(ckpt, checkpoints.STATE_FILE)
    complete = checkpoints.complete_checkpoints(ckpt)
    if kill % 2 == 1 or len(complete) < 2:
        if os.path.exists(state):
            os.remove(state)
        return "state file deleted"
    checkpoints.write_state(ckpt, complete[-2], complete[:-1])
    return f"state file lists {os.path.basename(complete[-2])}, not {os.path.basename(complete[-1])}"


def _resumed_step(log_path):
    """int, the step the run's ``resumed .../ckpt-N: ... step S`` line names (None if absent)."""
    with open(log_path, errors="replace") as fh:
        found = re.findall(r"resumed \S+: epoch \d+ done, step (\d+)", fh.read())
    return int(found[0]) if found else None


def measure(name, policy, data, work, args, reference, window, lose_state=False):
    """Kills and resumes one policy's run; returns a summary dict.

    Each start is killed ``U(0, window)`` seconds after its first step, until
    ``args.kills`` kills have landed or the run has finished.

    With ``lose_state``, every kill is followed by :func:`lose_state_file`,
    and every resume must start at the newest complete checkpoint.
    """
    rng = random.Random(args.seed)
    ckpt = os.path.join(work, name)
    lost, kills, runs, wrong_resumes = [], 0, 0, 0
    expected_resume = None
    start = time.perf_counter()
    while True:
        log_path = os.path.join(work, f"{name}-{runs}.log")
        command = _argv(data, ckpt, args.epochs, args.seed, policy)
        if _checkpoint_step(ckpt) > 0:
            command = [sys.executable, os.path.join(ROOT, "model.py"), "-restore", ckpt]
        runs += 1
        if kills < args.kills and _run_until_killed(command, log_path, window, rng):
            wrong_resumes += _wrong_resume(log_path, expected_resume)
            reached, _ = _reached(log_path)
            kept = _checkpoint_step(ckpt)
            lost.append(reached - kept)
            kills += 1
            note = f"; {lose_state_file(ckpt, kills)}" if lose_state and kept else ""
            expected_resume = kept or None
            print(f"{name}: kill {kills}: at step {reached}, newest checkpoint at step {kept}, "
                  f"{reached - kept} step(s) lost{note}", flush=True)
            continue
        if kills >= args.kills:
            with open(log_path, "w") as log:
                subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=True,
                               timeout=1200)
            wrong_resumes += _wrong_resume(log_path, expected_resume)
        if os.path.exists(os.path.join(ckpt, "config.json")) and _checkpoint_step(ckpt) >= reference["steps"]:
            break
    state = _state(ckpt)
    same = set(state) == set(reference["state"]) and all(
        np.array_equal(state[n], v) for n, v in reference["state"].items())
    # From the last run's bar: a run that finished before its kill landed set no per_epoch above.
    return {"name": name, "kills": kills, "runs": runs, "lost": lost, "identical": same and not wrong_resumes,
            "per_epoch": _reached(log_path)[1], "seconds": time.perf_counter() - start}


def _wrong_resume(log_path, expected):
    """1 when the run in ``log_path`` resumed elsewhere than at step ``expected`` (printed), else 0."""
    if expected is None:
        return 0
    resumed = _resumed_step(log_path)
    if resumed == expected:
        return 0
    print(f"  resumed at step {resumed}, not at the newest checkpoint's {expected}; see {log_path}", flush=True)
    return 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs per policy")
    parser.add_argument("--checkpoint-steps", type=int, default=4,
                        help="the in-epoch policy's interval, in steps")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--window", type=float, default=None,
                        help="each kill lands U(0, WINDOW) s after the run's first step (default: 2 x the "
                             "uninterrupted run's training time / (kills + 1), so that the kills land "
                             "before the run ends)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--no-state-loss", action="store_true",
                        help="leave out the run whose checkpoint state file is lost after every kill")
    args = parser.parse_args()

    import phantoms

    work = tempfile.mkdtemp(prefix="srgan-kill-")
    try:
        data = os.path.join(work, "data")
        phantoms.make_demo_data(data, subjects=args.subjects, shape=(32, 32, 24), seed=args.seed)
        reference_ckpt = os.path.join(work, "reference")
        training = _timed_run(_argv(data, reference_ckpt, args.epochs, args.seed, []),
                              os.path.join(work, "reference.log"))
        reference = {"state": _state(reference_ckpt), "steps": _checkpoint_step(reference_ckpt)}
        window = args.window or 2 * training / (args.kills + 1)
        print(f"uninterrupted run: {reference['steps']} steps, {training:.1f} s from its first step; "
              f"kills land U(0, {window:.1f}) s after each start's first step", flush=True)
        policies = {
            "epoch end only (the original)": ["-checkpoint_minutes", "0"],
            f"every {args.checkpoint_steps} steps": ["-checkpoint_minutes", "0",
                                                    "-checkpoint_steps", str(args.checkpoint_steps)],
        }
        lose = [False] * len(policies)
        if not args.no_state_loss:
            label = f"every {args.checkpoint_steps} steps, state file lost after each kill"
            policies[label] = policies[f"every {args.checkpoint_steps} steps"]
            lose.append(True)
        results = [measure(f"policy{i}", policy, data, work, args, reference, window, lose_state=lost_state)
                   for i, (policy, lost_state) in enumerate(zip(policies.values(), lose))]
        print()
        print("| checkpoints | kills | steps lost per kill: mean | max | batches per epoch | "
              "resumed run bit-identical |")
        print("|---|---|---|---|---|---|")
        for label, r in zip(policies, results):
            # Fewer kills than asked when a run finished before its kill landed (see --window).
            mean, most = (f"{np.mean(r['lost']):.1f}", max(r["lost"])) if r["lost"] else ("-", "-")
            print(f"| {label} | {r['kills']} | {mean} | {most} | "
                  f"{r['per_epoch']} | {'yes' if r['identical'] else 'NO'} |")
        return 0 if all(r["identical"] for r in results) else 1
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
