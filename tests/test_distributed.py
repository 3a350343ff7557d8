"""The distributed paths: every launcher's variables, collectives on the backend's device, and real
multi-"node" runs on one machine (each node its own launcher, one process each, one shared --output).

Two single-process nodes with two threads each on 2 cores made gloo 13x slower here, so every process of
these tests runs with OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from antismooth.distributed import (Launch, LaunchError, all_reduce, barrier, broadcast_object, check_shared_folder,
                                    collective_device, detect_launch, first_host, launch_variables, tasks_on_node)
from conftest import FULL_BATCH, TINY_MODEL, UNEVEN_VAL_IMAGES, resume_plan
from launch import (ONE_THREAD, REPO, TRAIN_PLAN, ds_config, free_port, kill_tree, start_processes, torchrun_nodes,
                    slow_fixture, wait_processes, write_plan)
from test_train import scalars



# --- what each launcher's variables say -----------------------------------------------------------------------

def test_torchrun_and_deepspeed_variables():
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                "MASTER_ADDR": "node0", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}
    assert detect_launch(torchrun) == Launch("torchrun", 5, 8, 1, 4, 1, "node0", 1234)
    deepspeed = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
                 "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}  # DeepSpeed's launcher: LOCAL_SIZE, CROSS_RANK
    assert detect_launch(deepspeed) == Launch("deepspeed", 5, 8, 1, 4, 1, "node0", 1234)


def test_srun_variables_give_rank_world_node_and_a_rendezvous_on_the_first_node():
    srun = {"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "12", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "4(x3)", "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_NTASKS": "12",
            "SLURM_JOB_ID": "4242"}
    launch = detect_launch(srun)
    assert launch == Launch("slurm", 6, 12, 2, 4, 1, "gpu07", 20000 + 4242)
    assert detect_launch(dict(srun, MASTER_ADDR="10.0.0.1", MASTER_PORT="29999")).master_addr == "10.0.0.1"


def test_a_batch_script_without_srun_is_one_process_and_says_so(caplog):
    batch_step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}  # no SLURM_STEP_NUM_TASKS
    assert detect_launch(batch_step).world_size == 1
    assert "not started by srun" in caplog.text


@pytest.mark.parametrize("variables,launcher", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, "openmpi"),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, "mpich"),
    ({"MV2_COMM_WORLD_RANK": "3", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "1",
      "MV2_COMM_WORLD_LOCAL_SIZE": "2"}, "mvapich"),
])
def test_mpi_variables(variables, launcher):
    across_nodes = detect_launch(variables)
    assert across_nodes == Launch(launcher, 3, 4, 1, 2, 1, None, 29500)  # no MASTER_ADDR: mpi4py or a sentence
    assert detect_launch(dict(variables, MASTER_ADDR="n0")).master_addr == "n0"


def test_one_node_mpi_launch_meets_on_localhost():
    assert detect_launch({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1",
                          "MPI_LOCALNRANKS": "2"}).master_addr == "127.0.0.1"


@pytest.mark.parametrize("variables,expected", [
    ({"WORLD_SIZE": "4"}, "WORLD_SIZE=4 is set but RANK is not"),
    ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
    ({"RANK": "1", "WORLD_SIZE": "4"}, "LOCAL_RANK is not"),
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "RANK=4 is not a rank of a world of 4"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
    ({"RANK": "one", "WORLD_SIZE": "4"}, "RANK='one' is not a number"),
    ({"PMI_RANK": "1"}, "PMI_RANK is set but PMI_SIZE is not"),
])
def test_variables_that_describe_no_usable_world_stop_with_one_sentence(variables, expected):
    with pytest.raises(LaunchError) as err:
        detect_launch(variables)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_nothing_set_is_a_world_of_one():
    assert detect_launch({}) == Launch("none", 0, 1, 0, 1, 0, "127.0.0.1", None)


def test_slurm_list_formats():
    assert first_host("gpu[07-09,12],login1") == "gpu07"
    assert first_host("node1,node2") == "node1"
    assert first_host("a[001]") == "a001"
    assert [tasks_on_node("4(x2),2", n) for n in range(3)] == [4, 4, 2]


# --- collectives on the backend's device ------------------------------------------------------------------------

def test_every_collective_goes_through_antismooth_distributed():
    """Collectives built elsewhere could put a CPU tensor into an NCCL group; only distributed.py may call them."""
    collectives = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
                   "reduce", "reduce_scatter", "gather", "scatter", "all_to_all", "all_gather_into_tensor"}
    sources = [REPO / "pretrain.py", *(REPO / "antismooth").rglob("*.py"), *(REPO / "tools").glob("*.py")]
    offenders = []
    for path in sources:
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in collectives
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("dist", "distributed")):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} dist.{node.func.attr}")
    assert not offenders, offenders


def _collectives_job(rank: int, world: int, init_file: str, folders: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {"device": str(collective_device()), "sum": all_reduce([rank + 1, 0.5]),
              "max": all_reduce([rank], op="max"), "object": broadcast_object({"from": rank})}
    barrier()
    check_shared_folder(folders[0])                         # the same folder on both ranks: passes
    try:
        check_shared_folder(folders[rank])                  # a folder of its own per rank: both stop
    except ValueError as err:
        result["error"] = str(err)
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_collective_helpers_in_a_real_two_process_group(tmp_path):
    folders = [str(tmp_path / "shared"), str(tmp_path / "elsewhere")]
    mp.start_processes(_collectives_job, args=(2, str(tmp_path / "init"), folders, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["device"] == "cpu"
        assert result["sum"] == [3.0, 1.0] and result["max"] == [1.0] and result["object"] == {"from": 0}
        assert "is not the same folder on every process (1 of 2 do not see" in result["error"]
    assert list((tmp_path / "shared").iterdir()) == []  # the marker file is removed


def _cuda_only_group_job(rank: int, init_file: str, out: str) -> None:
    """A group whose backend serves CUDA tensors only, as an NCCL group does (gloo behind it, no GPU needed)."""
    dist.init_process_group("cuda:gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dist.all_reduce(torch.ones(1))
        refused = ""
    except RuntimeError as err:
        refused = str(err)
    Path(out, f"{rank}.json").write_text(json.dumps({"device": str(collective_device()), "refused": refused}))
    dist.destroy_process_group()


def test_the_helpers_use_the_device_an_nccl_like_group_serves(tmp_path):
    """The GPU failure reproduced on CPU: a CPU tensor in a CUDA-only group is refused, and the helpers' device
    for such a group is CUDA, so they never build the CPU tensor."""
    mp.start_processes(_cuda_only_group_job, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert "No backend type associated with device type cpu" in result["refused"]
        assert result["device"].startswith("cuda")


# --- launches: two "nodes" on one machine, each its own launcher ----------------------------------------------------

def _latest(run: Path) -> str | None:
    latest = run / "checkpoints" / "latest"
    return latest.read_text() if latest.is_file() else None


@slow_fixture(scope="module")
def two_node_runs(sample_shards, resume_reference, tmp_path_factory):
    """torchrun on two nodes runs conftest's resume run, one node killed mid-run, then both started again. (DeepSpeed's
    hostfile launcher on two nodes is tests/test_elastic.py's launch C.)"""
    work = tmp_path_factory.mktemp("two-nodes")
    config, reference = resume_reference
    killed = work / "killed"
    plan = write_plan(resume_plan(config, sample_shards.parent, killed), work)
    nodes = start_processes(torchrun_nodes(plan), work, "torchrun-killed")
    deadline = time.time() + 600
    while _latest(killed) is None and nodes[1].poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(nodes[1].pid)                           # node 1 is lost: its launcher and its worker
    try:
        node0_after_kill = nodes[0].wait(timeout=120)  # node 0's worker sees its peer gone and fails
    except subprocess.TimeoutExpired:
        node0_after_kill = None
    kill_tree(nodes[0].pid)                           # what is left of the job is stopped before the restart
    after_kill = _latest(killed)
    restarted = wait_processes(start_processes(torchrun_nodes(plan), work, "torchrun-restarted"), work,
                               "torchrun-restarted")
    return {"killed": killed, "reference": reference, "after_kill": after_kill, "node0_after_kill": node0_after_kill,
            "restarted_logs": restarted}


def test_a_node_lost_mid_run_then_both_restarted_resumes_sample_exactly(two_node_runs):
    assert two_node_runs["after_kill"] in ("step00000004", "step00000006")  # killed mid-run, not at the end
    assert two_node_runs["node0_after_kill"] not in (0, None)  # node 0 failed by itself, did not hang
    assert "Resumed from " + two_node_runs["after_kill"] in two_node_runs["restarted_logs"][0]
    assert "torchrun launch" in two_node_runs["restarted_logs"][0]
    resumed = torch.load(two_node_runs["killed"] / "probe.pt")
    assert torch.equal(resumed, torch.load(two_node_runs["reference"] / "probe.pt"))


# --- launches by the scheduler's or MPI's variables alone ---------------------------------------------------------

def _python_ranks(plan: Path, variables: list[dict]) -> list[tuple[list, dict]]:
    return [([sys.executable, TRAIN_PLAN, plan], {**ONE_THREAD, **v}) for v in variables]


@slow_fixture(scope="module")
def scheduler_runs(tiny_shards, tmp_path_factory):
    """Plain `python` processes that know their rank only from srun's or Open MPI's variables."""
    work = tmp_path_factory.mktemp("scheduler")
    runs = {}
    port = free_port()
    srun = [{"SLURM_PROCID": str(r), "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": str(r),
             "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "2",
             "SLURM_JOB_ID": "77", "MASTER_PORT": str(port)} for r in (0, 1)]
    port = free_port()
    ompi = [{"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
             "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": str(port)} for r in (0, 1)]
    for name, variables, stage in (("srun", srun, 1), ("openmpi", ompi, 3)):
        out = work / name
        argv = ["--deepspeed_config", str(ds_config(work / f"zero{stage}.json", stage)), "--data", str(tiny_shards),
                "--output", str(out), *TINY_MODEL, *FULL_BATCH, "--max-steps", "2"]
        plan = write_plan([{"argv": argv, "probe": None}], work)
        runs[name] = (out, wait_processes(start_processes(_python_ranks(plan, variables), work, name), work, name))
    # MPICH's variables, each rank with an --output of its own: node-local storage
    port = free_port()
    pmi = [{"PMI_RANK": str(r), "PMI_SIZE": "2", "MPI_LOCALRANKID": str(r), "MPI_LOCALNRANKS": "2",
            "MASTER_PORT": str(port)} for r in (0, 1)]
    commands = []
    for rank, variables in enumerate(pmi):
        argv = ["--deepspeed_config", str(ds_config(work / "zero2.json", 2)), "--data", str(tiny_shards),
                "--output", str(work / f"node-local-{rank}"), *TINY_MODEL, *FULL_BATCH]
        commands.append(([sys.executable, REPO / "pretrain.py", *argv], {**ONE_THREAD, **variables}))
    procs = start_processes(commands, work, "node-local")
    runs["node-local"] = (procs, wait_processes(procs, work, "node-local", check=False))
    runs["work"] = work
    return runs


@pytest.mark.parametrize("name,stage", [("srun", 1), ("openmpi", 3)])
def test_scheduler_and_mpi_variables_make_one_world(scheduler_runs, zero_runs, name, stage):
    out, logs = scheduler_runs[name]
    assert f"2 processes on {2 if name == 'srun' else 1} node" in logs[0]
    derived = json.loads((out / "run.json").read_text())["derived"]
    assert derived["world_size"] == 2 and derived["global_batch"] == 16
    # the first two steps of the 2-process run of the same stage, whatever launched it
    assert scalars(out, "train/loss") == pytest.approx(scalars(zero_runs[stage, 2].output, "train/loss")[:2], rel=1e-4)


def test_node_local_output_stops_every_rank_with_one_sentence(scheduler_runs):
    procs, logs = scheduler_runs["node-local"]
    assert [p.returncode for p in procs] == [2, 2]
    for log in logs:
        error = [line for line in log.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and "is not the same folder on every process" in error[0], log[-3000:]
        assert "put --output on storage that every node shares" in error[0]
    assert not any((scheduler_runs["work"] / f"node-local-{rank}" / "checkpoints").exists() for rank in (0, 1))


# --- ZeRO-3 evaluation on uneven splits ---------------------------------------------------------------------------

def test_zero3_evaluation_on_uneven_splits_finishes_and_counts_every_image_once(zero_runs):
    """conftest's zero3-uneven-eval run: ZeRO-3 gathering its parameters in every forward, 2 ranks × 2 workers on
    3 readable validation images and a corrupt one: rank 0 has two batches, rank 1 one. Without equal forward
    counts, rank 0's second forward waits forever for rank 1's gather."""
    run = zero_runs["zero3-uneven-eval", 2].output
    assert scalars(run, "eval/top1")  # the evaluation finished
    log = (run / "log.txt").read_text()
    assert f"| {UNEVEN_VAL_IMAGES} images" in log


# --- what a CPU launch leaves behind --------------------------------------------------------------------------------

def test_a_cpu_launch_leaves_nothing_in_shared_memory(zero_runs):
    """DeepSpeed's CPU backend would map 69 MB of /dev/shm per rank for its shared-memory all-reduce and never unlink
    it (named after the rendezvous port): a day of test launches filled this machine's RAM until launches hung."""
    port = re.search(r"--master_port=(\d+)", zero_runs[1, 2].log).group(1)  # the DeepSpeed launcher's 2-process launch
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert "deepspeed_shm_comm" not in zero_runs[1, 2].log  # nor JIT-builds the op (~90 s on a new install)


def test_one_gpu_visible_per_process_is_cuda_0_for_deepspeed_whatever_the_local_rank():
    """`srun --gpus-per-task=1` (or CUDA_VISIBLE_DEVICES per rank): each process sees one GPU, cuda:0. DeepSpeed
    takes LOCAL_RANK for the GPU's index (its engine's set_device, its process group's device_id), so it must
    read 0 there, while the process keeps its place on the node."""
    srun = {"SLURM_PROCID": "7", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "3", "SLURM_NODEID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "7"}
    launch = detect_launch(srun)
    assert (launch.rank, launch.local_rank, launch.local_world_size) == (7, 3, 4)
    one_visible = launch_variables(launch, torch.device("cuda", 0))
    assert one_visible["LOCAL_RANK"] == "0"
    assert (one_visible["RANK"], one_visible["WORLD_SIZE"], one_visible["LOCAL_WORLD_SIZE"]) == ("7", "8", "4")
    assert one_visible["MASTER_ADDR"] == "gpu01" and one_visible["MASTER_PORT"] == str(20000 + 7)
    assert launch_variables(launch, torch.device("cuda", 3))["LOCAL_RANK"] == "3"   # all four visible: its own
    assert launch_variables(launch, torch.device("cpu"))["LOCAL_RANK"] == "3"
