"""Where a run computes: one device, the GPUs of a machine, or several machines (tf.distribute)."""

import dataclasses
import json
import os
import subprocess

import quiet
from errors import UserError

# The command line parses -gpus before TensorFlow loads.
tf = quiet.Deferred("tensorflow")


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
        source: where the cluster came from ("TF_CONFIG", "SLURM") or "".
    """

    strategy: object = None
    devices: tuple = ()
    workers: int = 1
    worker_index: int = 0
    source: str = ""

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
        workers = ""
        if self.workers > 1:
            on = "CPUs" if all("cpu" in d.lower() for d in self.devices) else "GPUs"
            workers = (f", worker {self.worker_index} of {self.workers} "
                       f"(workers on {on}, cluster from {self.source or 'the environment'})")
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


# The first port of TensorFlow's SlurmClusterResolver (port_base): task j of a
# node listens on SLURM_PORT_BASE + j unless the step reserved ports.
SLURM_PORT_BASE = 8888


def expand_numbers(text):
    """Expands SLURM's number lists: ``"3-5,7"`` -> [3, 4, 5, 7] (as strings, zero padding kept).

    Raises:
        ValueError: for anything else.
    """
    numbers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        numbers += [str(i).zfill(len(first)) for i in range(int(first), int(last or first) + 1)]
    return numbers


def expand_tasks_per_node(text):
    """Expands SLURM_STEP_TASKS_PER_NODE: ``"2(x3),1"`` -> [2, 2, 2, 1].

    Raises:
        ValueError: for anything else.
    """
    counts = []
    for part in text.split(","):
        count, _, times = part.partition("(x")
        counts += [int(count)] * (int(times.rstrip(")")) if times else 1)
    return counts


def slurm_hostnames(nodelist):
    """The nodes of a SLURM node list in order: ``scontrol show hostnames`` for ranges.

    Raises:
        OSError: scontrol is missing; subprocess.CalledProcessError: it failed.
    """
    if "[" not in nodelist:
        return nodelist.split(",")
    output = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                            capture_output=True, text=True).stdout
    return output.split()


def slurm_cluster(environ, gpus):
    """The cluster of a SLURM step, built from its variables alone (no nvidia-smi).

    Tasks are ranked node by node (SLURM's default block distribution); task
    j of a node listens on the j-th port the step reserved
    (``srun --resv-ports``, SLURM_STEP_RESV_PORTS) or on 8888 + j, the port of
    TensorFlow's ``SlurmClusterResolver``. With GPUs, the tasks of a node share
    them evenly (each sees only its own) unless SLURM bound them to the tasks
    already (``--gpus-per-task``); without, each task trains on its CPU.

    Args:
        environ: the environment of the SLURM task.
        gpus: the physical GPUs this task may use (after -gpus).

    Returns:
        (cluster resolver, workers, this task's index, its GPUs).

    Raises:
        UserError: a variable is missing or malformed, or a node has more tasks than GPUs.
    """
    try:
        hosts = slurm_hostnames(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])
        per_node = expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                                         or environ["SLURM_TASKS_PER_NODE"])
        rank, local = int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", 0))
        resv = environ.get("SLURM_STEP_RESV_PORTS")
        ports = [int(p) for p in expand_numbers(resv)] if resv else None
    except (KeyError, ValueError, OSError, subprocess.CalledProcessError) as err:
        raise UserError(f"cannot read the SLURM allocation for multi-worker training ({err!r}); "
                        "expected SLURM_PROCID, SLURM_STEP_NODELIST and SLURM_STEP_TASKS_PER_NODE "
                        "of an srun step")
    if len(per_node) != len(hosts) or (ports and len(ports) < max(per_node)):
        raise UserError(f"the SLURM step's {len(hosts)} node(s) {hosts} do not match its tasks per "
                        f"node {per_node} or reserved ports {resv!r}")
    addresses = [f"{host}:{ports[j] if ports else SLURM_PORT_BASE + j}"
                 for host, count in zip(hosts, per_node) for j in range(count)]
    mine = gpus
    if gpus and not environ.get("SLURM_GPUS_PER_TASK"):  # --gpus-per-task: SLURM bound them already
        here = per_node[_node_of(rank, per_node)]
        share = len(gpus) // here
        if share == 0:
            raise UserError(f"SLURM runs {here} tasks on this node but it has {len(gpus)} GPU(s): "
                            "ask for at most one task per GPU (--ntasks-per-node)")
        mine = gpus[local * share:(local + 1) * share]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": addresses}), task_type="worker", task_id=rank,
        num_accelerators={"GPU": len(mine)}, rpc_layer="grpc")
    return resolver, len(addresses), rank, mine


def _node_of(rank, per_node):
    """Index of the node running task ``rank`` under block distribution."""
    end = 0
    for node, count in enumerate(per_node):
        end += count
        if rank < end:
            return node
    raise UserError(f"SLURM_PROCID {rank} is not one of the step's {end} tasks")


def choose_placement(gpus=None, multi_worker=True, environ=None, log=print, verbose=False):
    """Chooses the strategy from the machine and the environment.

    One visible device: no strategy (the plain path). Several visible GPUs:
    ``MirroredStrategy`` over them (``gpus`` picks which). ``TF_CONFIG`` set,
    or a SLURM step of several tasks: ``MultiWorkerMirroredStrategy`` (only
    when ``multi_worker``: evaluation uses this machine alone), over each
    worker's GPUs, or its CPU when it has none or ``-gpus cpu`` says so. Must
    run before TensorFlow starts its runtime (device visibility is fixed then).

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


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The training processes an environment describes (before any strategy exists).

    Attributes:
        resolver: a ``tf.distribute.cluster_resolver.ClusterResolver``.
        workers: number of processes.
        index: this process's index among them (0: the chief).
        source: "TF_CONFIG" or "SLURM".
        gpus: the physical GPUs this process trains on.
    """

    resolver: object
    workers: int
    index: int
    source: str
    gpus: list


def find_cluster(environ, physical, multi_worker=True, log=print):
    """The multi-worker cluster of ``TF_CONFIG`` or of a SLURM step of several tasks, else None.

    Args:
        environ: the environment (a mapping; TensorFlow's TF_CONFIG resolver
            reads ``os.environ``, which is the environment of a real run).
        physical: the physical GPUs the -gpus flag left visible.
        multi_worker: bool, False for evaluation (TF_CONFIG is then noted and ignored).
        log: callable for notes.

    Returns:
        A :class:`Cluster` or None.

    Raises:
        UserError: a malformed TF_CONFIG or SLURM allocation.
    """
    source = _cluster_source(multi_worker, environ, log)
    if source == "TF_CONFIG":
        workers, index = read_tf_config(environ["TF_CONFIG"])
        return Cluster(tf.distribute.cluster_resolver.TFConfigClusterResolver(), workers, index, source,
                       physical)
    if source == "SLURM":
        resolver, workers, index, mine = slurm_cluster(environ, physical)
        return Cluster(resolver, workers, index, source, mine)
    return None


def _choose_placement(gpus, multi_worker, environ, log):
    cpu = gpus is not None and gpus[0] == "cpu"
    physical = _apply_gpus_flag(gpus)
    cluster = find_cluster(environ, physical, multi_worker, log)
    if cluster and cpu and gpus[1] > 1:
        raise UserError(f"-gpus cpu:{gpus[1]} with a {cluster.source} cluster: each worker of a multi-worker "
                        "run trains on one CPU device; use -gpus cpu")
    if cluster:
        if len(cluster.gpus) != len(physical):
            _set_visible_gpus(cluster.gpus, f"{cluster.source}'s share of this node's GPUs")
        return _multi_worker_placement(cluster.resolver, cluster.workers, cluster.index, cluster.source)
    if cpu:
        return _cpu_placement(gpus[1])
    if len(physical) > 1:
        devices = tuple(f"/gpu:{i}" for i in range(len(physical)))
        return Placement(_mirrored_strategy(devices), devices)
    return Placement()


def _set_visible_gpus(devices, what):
    try:
        tf.config.set_visible_devices(devices, "GPU")
    except RuntimeError as err:
        raise UserError(f"{what} must take effect before TensorFlow starts its runtime: {err}")


def _apply_gpus_flag(gpus):
    """Makes the GPUs -gpus names visible (none for ``cpu``); returns them (physical devices)."""
    physical = tf.config.list_physical_devices("GPU")
    if gpus is None:
        return physical
    if gpus[0] == "cpu":
        if physical:
            _set_visible_gpus([], "-gpus cpu")
        return []
    missing = [i for i in gpus[1] if i >= len(physical)]
    if missing:
        raise UserError(f"-gpus {','.join(map(str, gpus[1]))}: no GPU {missing[0]} on this "
                        f"machine (it has {len(physical)} GPU(s)"
                        f"{': ' + ','.join(map(str, range(len(physical)))) if physical else ''}; "
                        "-gpus cpu forces the CPU)")
    chosen = [physical[i] for i in gpus[1]]
    _set_visible_gpus(chosen, "-gpus")
    return chosen


def _cluster_source(multi_worker, environ, log):
    """"TF_CONFIG" or "SLURM" when the environment describes several training processes, else ""."""
    if environ.get("TF_CONFIG"):
        if not multi_worker:
            log("note: TF_CONFIG is ignored: evaluation and -super_resolve use this machine's GPUs only")
            return ""
        if read_tf_config(environ["TF_CONFIG"])[0] > 1:
            return "TF_CONFIG"
        log("note: TF_CONFIG describes one process; training on this machine alone")
        return ""
    if multi_worker and environ.get("SLURM_JOB_ID") and _slurm_tasks(environ) > 1:
        return "SLURM"
    return ""


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


def _multi_worker_placement(resolver, workers, index, source):
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"cannot start multi-worker training: {err}")
    devices = tuple(d.name for d in tf.config.list_logical_devices("GPU")) or ("/cpu:0",)
    return Placement(strategy, devices, workers, index, source)

