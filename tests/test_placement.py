"""placement: which strategy a run gets from the -gpus flag and the environment (no training here)."""

import json
import os

import pytest

import placement
from errors import UserError
from placement import choose_placement, parse_gpus, read_tf_config


@pytest.mark.parametrize("text, parsed", [("0", ("gpu", (0,))), ("0,2", ("gpu", (0, 2))), ("cpu", ("cpu", 1)),
                                          ("CPU:3", ("cpu", 3))])
def test_gpus_flag(text, parsed):
    assert parse_gpus(text) == parsed


@pytest.mark.parametrize("text", ["", "cpu:0", "cpu:x", "0,0", "-1", "gpu", "1;2"])
def test_bad_gpus_flag(text):
    with pytest.raises(Exception, match="expected GPU indices"):
        parse_gpus(text)


def test_placement_from_the_environment():
    assert choose_placement(None, environ={}).strategy is None  # no GPU here: one device
    placement = choose_placement(("cpu", 2), environ={})
    assert placement.replicas == 2 and placement.is_chief and "2 replicas" in placement.describe()
    workers, index = read_tf_config(json.dumps(
        {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "worker", "index": 1}}))
    assert (workers, index) == (3, 2)
    notes = []
    assert choose_placement(None, multi_worker=False, environ={"TF_CONFIG": "{}"},
                                  log=notes.append).strategy is None
    assert "TF_CONFIG is ignored" in notes[0]


def test_slurm_numbers_expand_as_slurm_writes_them():
    assert placement.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert placement.expand_numbers("08-10,12") == ["08", "09", "10", "12"]
    assert placement.slurm_hostnames("gpu-a,gpu-b") == ["gpu-a", "gpu-b"]  # no ranges: no scontrol


def _step(**variables):
    env = {"SLURM_JOB_ID": "9", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "a,b",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
    return dict(env, **variables)


def test_a_slurm_step_is_a_cluster_without_nvidia_smi():
    # Ranks node by node, TensorFlow's ports 8888 + local task, no GPU: the CPU.
    resolver, workers, index, gpus = placement.slurm_cluster(_step(), [])
    assert resolver.cluster_spec().as_dict() == {"worker": ["a:8888", "a:8889", "b:8888", "b:8889"]}
    assert (workers, index, gpus) == (4, 3, [])
    assert (resolver.task_type, resolver.task_id) == ("worker", 3) and resolver.num_accelerators() == {"GPU": 0}
    # Ports the step reserved (srun --resv-ports) replace TensorFlow's.
    resolver, *_ = placement.slurm_cluster(_step(SLURM_STEP_RESV_PORTS="12000-12001"), [])
    assert resolver.cluster_spec().as_dict()["worker"][1] == "a:12001"


def test_the_tasks_of_a_node_share_its_gpus():
    resolver, _, _, gpus = placement.slurm_cluster(_step(), ["g0", "g1", "g2", "g3", "g4"])
    assert gpus == ["g2", "g3"] and resolver.num_accelerators() == {"GPU": 2}  # local task 1 of 2
    with pytest.raises(UserError, match="runs 2 tasks on this node but it has 1 GPU"):
        placement.slurm_cluster(_step(), ["g0"])
    # srun --gpus-per-task=2: each task sees its own two GPUs and keeps both.
    assert placement.slurm_cluster(_step(SLURM_GPUS_PER_TASK="2"), ["g0", "g1"])[3] == ["g0", "g1"]
    with pytest.raises(UserError, match="cannot read the SLURM allocation.*SLURM_PROCID"):
        placement.slurm_cluster({"SLURM_STEP_NODELIST": "a"}, [])


def test_cpu_replicas_cannot_be_workers():
    cluster = json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                          "task": {"type": "worker", "index": 0}})
    with pytest.raises(UserError, match="-gpus cpu:2 with a TF_CONFIG cluster.*use -gpus cpu"):
        choose_placement(("cpu", 2), environ={"TF_CONFIG": cluster})
    # One SLURM task is no cluster.
    assert choose_placement(None, environ=_step(SLURM_STEP_NUM_TASKS="1")).strategy is None


def test_tf_config_and_slurm_steps_are_clusters_of_their_processes(monkeypatch):
    # What placement.find_cluster gives becomes the MultiWorkerMirroredStrategy (the two-worker
    # run of test_distribute.py takes its cluster from SLURM; TF_CONFIG's is read here).
    workers = ["127.0.0.1:5000", "127.0.0.1:5001"]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": workers},
                                                "task": {"type": "worker", "index": 1}}))
    found = placement.find_cluster(os.environ, [])
    assert (found.source, found.workers, found.index, found.gpus) == ("TF_CONFIG", 2, 1, [])
    assert found.resolver.cluster_spec().as_dict() == {"worker": workers}
    assert (found.resolver.task_type, found.resolver.task_id) == ("worker", 1)
    # TF_CONFIG, written on purpose, wins over the SLURM step it may run in.
    assert placement.find_cluster(dict(os.environ, **_step()), []).source == "TF_CONFIG"
    monkeypatch.delenv("TF_CONFIG")
    found = placement.find_cluster(_step(), ["g0", "g1", "g2", "g3"])
    assert (found.source, found.workers, found.index, found.gpus) == ("SLURM", 4, 3, ["g2", "g3"])
    # Evaluation trains nowhere else; one process is no cluster.
    assert placement.find_cluster(_step(), [], multi_worker=False) is None
    assert placement.find_cluster({}, []) is None
