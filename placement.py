"""Where a run computes: one device, the GPUs of a machine, or several machines (tf.distribute)."""

import dataclasses
import json
import os

import tensorflow as tf

import quiet
from errors import UserError


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run computes: one device, the GPUs of this machine, or several machines.

    Attributes:
        strategy: None (one device: no strategy, the plain path) or a
            ``tf.distribute.MirroredStrategy`` / ``MultiWorkerMirroredStrategy``.
        devices: the local devices the strategy mirrors over.
        workers: number of machines (processes) training together.
        worker_index: this process's index among them; 0 is the chief, which
            alone writes checkpoints, logs and previews.
    """

    strategy: object = None
    devices: tuple = ()
    workers: int = 1
    worker_index: int = 0

    @property
    def replicas(self):
        """int, replicas in sync (devices over every worker)."""
        return self.strategy.num_replicas_in_sync if self.strategy is not None else 1

    @property
    def is_chief(self):
        return self.worker_index == 0

    @property
    def name(self):
        if self.strategy is None:
            return "none (one device)"
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return "MultiWorkerMirroredStrategy"  # its class is CollectiveAllReduceStrategy
        return type(self.strategy).__name__

    def describe(self):
        """One line for the start of a run."""
        if self.strategy is None:
            return "strategy: none (one device)"
        where = f" over {', '.join(self.devices)}" if self.devices else ""
        workers = f", worker {self.worker_index} of {self.workers}" if self.workers > 1 else ""
        return f"strategy: {self.name}{where}, {self.replicas} replicas{workers}"


def parse_gpus(value):
    """Parses -gpus: ``"0,1"`` (GPU indices), ``"cpu"`` or ``"cpu:N"`` (N CPU replicas).

    Returns:
        ("gpu", tuple of indices) or ("cpu", replicas).

    Raises:
        ValueError: for anything else.
    """
    text = str(value).strip().lower()
    try:
        if text.startswith("cpu"):
            count = int(text[4:]) if text.startswith("cpu:") else 1
            if text not in ("cpu", f"cpu:{count}") or count < 1:
                raise ValueError
            return "cpu", count
        indices = tuple(int(p) for p in text.split(","))
        if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
            raise ValueError
        return "gpu", indices
    except ValueError:
        raise ValueError(f"expected GPU indices such as 0,1, or cpu, or cpu:N, got {value!r}") from None


def read_tf_config(text):
    """Checks a TF_CONFIG value (the multi-worker cluster description).

    Returns:
        (workers, task_index): the number of training processes and this one's
        index, the chief first.

    Raises:
        UserError: naming what is wrong with it.
    """
    try:
        config = json.loads(text)
    except ValueError as err:
        raise UserError(f"TF_CONFIG is not valid JSON ({err}); expected e.g. "
                        '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                        '"task": {"type": "worker", "index": 0}}')
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UserError("TF_CONFIG needs a \"cluster\" object and a \"task\" object, got "
                        f"{text[:200]!r}")
    jobs = {name: hosts for name, hosts in cluster.items() if name in ("chief", "worker")}
    if not jobs or any(not isinstance(h, list) or not h for h in jobs.values()):
        raise UserError(f"TF_CONFIG's cluster needs a non-empty \"worker\" (and optionally "
                        f"\"chief\") list of host:port, got {cluster!r}")
    kind, index = task.get("type"), task.get("index")
    if kind not in jobs or not isinstance(index, int) or not 0 <= index < len(jobs[kind]):
        raise UserError(f"TF_CONFIG's task {task!r} does not name one of its cluster's "
                        f"{', '.join(f'{k}[0..{len(v) - 1}]' for k, v in jobs.items())}")
    chiefs = len(jobs.get("chief", []))
    workers = chiefs + len(jobs.get("worker", []))
    return workers, (index if kind == "chief" else chiefs + index)


def _slurm_tasks(environ):
    try:
        return int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    except ValueError:
        return 1


def choose_placement(gpus=None, multi_worker=True, environ=None, log=print, verbose=False):
    """Chooses the strategy from the machine and the environment.

    One visible device: no strategy (the plain path). Several visible GPUs:
    ``MirroredStrategy`` over them (``gpus`` picks which). ``TF_CONFIG`` set,
    or a SLURM step of several tasks: ``MultiWorkerMirroredStrategy`` (only
    when ``multi_worker``: evaluation uses this machine alone). Must run before
    TensorFlow starts its runtime (device visibility is fixed then).

    Args:
        gpus: None (all visible GPUs) or a :func:`parse_gpus` result.
        multi_worker: bool, allow a multi-worker strategy.
        environ: the environment (default ``os.environ``).
        log: callable for notes.
        verbose: bool, let TensorFlow's start-up lines through.

    Returns:
        A :class:`Placement`.

    Raises:
        UserError: a missing GPU, a malformed TF_CONFIG, a runtime already started.
    """
    with quiet.native_stderr_hidden(not verbose):
        return _choose_placement(gpus, multi_worker, os.environ if environ is None else environ, log)


def _choose_placement(gpus, multi_worker, environ, log):
    physical = tf.config.list_physical_devices("GPU")
    try:
        if gpus is not None and gpus[0] == "cpu":
            if physical:
                tf.config.set_visible_devices([], "GPU")
            return _cpu_placement(gpus[1])
        if gpus is not None:
            missing = [i for i in gpus[1] if i >= len(physical)]
            if missing:
                raise UserError(f"-gpus {','.join(map(str, gpus[1]))}: no GPU {missing[0]} on this "
                                f"machine (it has {len(physical)} GPU(s)"
                                f"{': ' + ','.join(map(str, range(len(physical)))) if physical else ''}; "
                                "-gpus cpu forces the CPU)")
            tf.config.set_visible_devices([physical[i] for i in gpus[1]], "GPU")
            physical = [physical[i] for i in gpus[1]]
    except RuntimeError as err:
        raise UserError(f"-gpus must take effect before TensorFlow starts its runtime: {err}")
    if multi_worker and environ.get("TF_CONFIG"):
        workers, index = read_tf_config(environ["TF_CONFIG"])
        if workers > 1:
            return _multi_worker_placement(
                tf.distribute.cluster_resolver.TFConfigClusterResolver(), workers, index)
        log("note: TF_CONFIG describes one process; training on this machine alone")
    elif multi_worker and environ.get("SLURM_JOB_ID") and _slurm_tasks(environ) > 1:
        try:
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
            index = int(environ.get("SLURM_PROCID", 0))
        except (RuntimeError, ValueError, KeyError, OSError) as err:
            raise UserError(f"cannot read the SLURM allocation for multi-worker training: {err}")
        return _multi_worker_placement(resolver, _slurm_tasks(environ), index)
    elif environ.get("TF_CONFIG") and not multi_worker:
        log("note: TF_CONFIG is ignored: evaluation and -super_resolve use this machine's GPUs only")
    if len(physical) > 1:
        devices = tuple(f"/gpu:{i}" for i in range(len(physical)))
        return Placement(_mirrored_strategy(devices), devices)
    return Placement()


# One MirroredStrategy per set of devices and process: two strategies over the
# same devices in one process draw colliding collective keys (TF 2.21 aborts
# with "Shape mismatch in the collective instance"), which happens to a Python
# session or a test suite that trains twice.
_MIRRORED = {}


def _mirrored_strategy(devices):
    if devices not in _MIRRORED:
        _MIRRORED[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _MIRRORED[devices]


def _cpu_placement(replicas):
    """No strategy for one CPU replica; a MirroredStrategy over logical CPUs for more.

    Several CPU replicas exercise the distributed code on a machine without
    GPUs (slower than one; for testing and debugging).
    """
    if replicas == 1:
        return Placement()
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu) or []
    if len(current) != replicas:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
        except RuntimeError as err:
            raise UserError(f"-gpus cpu:{replicas} must take effect before TensorFlow starts its "
                            f"runtime (it runs with {max(len(current), 1)} CPU device(s)): {err}")
    devices = tuple(f"/cpu:{i}" for i in range(replicas))
    return Placement(_mirrored_strategy(devices), devices)


def _multi_worker_placement(resolver, workers, index):
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"cannot start multi-worker training: {err}")
    devices = tuple(d.name for d in tf.config.list_logical_devices("GPU")) or ("/cpu:0",)
    return Placement(strategy, devices, workers, index)

