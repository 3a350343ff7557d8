"""Every recipe of cluster/ on a real cluster: the harness's nodes (tests/cluster/), real SLURM, ssh and pdsh.

Each recipe is submitted with `sbatch --nodes 2 --wait` as a user of a CPU cluster would submit it: its GPU
requests overridden on the command line (`--gpus-per-node=0`, one CPU per task, one process per node), its run
settings from the environment variables cluster/common.sh reads. Each trains a 4-step full-batch run (the tiny
model and flags of tests/conftest.py's zero_runs) with ZeRO-2 on two processes, one per node, and its export must
equal, bit for bit, the export of the same run started by `deepspeed --num_gpus 2` on one host.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.harness import DATA_INTERFACE, ISOLATED_INTERFACE
from conftest import FULL_BATCH, TINY_MODEL
from launch import ONE_THREAD, REPO, VENV_BIN, ds_config, free_port, slow_fixture, start_processes, wait_processes

sys.path.insert(0, str(REPO / "tools"))
import export as export_tool  # noqa: E402  (tools/export.py, in-process)

STAGE = 2
# The tiny model and full-batch flags of zero_runs, 4 steps, less what common.sh sets (--model and the paths).
MODEL = TINY_MODEL[TINY_MODEL.index("--model") + 1]
EXTRA_ARGS = [*(a for i, a in enumerate(TINY_MODEL) if "--model" not in TINY_MODEL[max(i - 1, 0):i + 1]),
              *FULL_BATCH, "--epochs", "4", "--save-every", "4"]
# A CPU cluster's user overrides the recipes' GPU requests on the command line; the rest is the recipe's own.
ON_CPU_NODES = ["--nodes", "2", "--gpus-per-node=0", "--cpus-per-task=1"]
SRUN_ON_CPU_NODES = ["--nodes", "2", "--ntasks-per-node=1", "--gpus-per-task=0", "--cpus-per-task=1"]
RECIPES = {"slurm_deepspeed": ON_CPU_NODES, "slurm_torchrun": ON_CPU_NODES, "slurm_srun": SRUN_ON_CPU_NODES}


def recipe_env(work: Path, shards: Path, run: str, **extra) -> dict:
    """What cluster/common.sh reads, for the tiny run; the venv's commands first on PATH (sbatch passes the
    submitter's environment on to the job)."""
    return {"DATA": shards, "RUN": work / run, "DS_CONFIG": ds_config(work / f"zero{STAGE}.json", STAGE),
            "MODEL": MODEL, "EXTRA_ARGS": " ".join(EXTRA_ARGS), "GPUS_PER_NODE": 1,
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", **extra}


PDSH_PORT = 29500   # inside the nodes' own network: no other service there (SLURM's jobs use 20000 + job id)


def pdsh_launch(cluster, work: Path, shards: Path, run: str, port: int) -> subprocess.Popen:
    """`deepspeed --hostfile H --master_addr n1 pretrain.py …` from n1: pdsh over ssh starts a launcher on each node
    (n1 included). GLOO_SOCKET_IFNAME and OMP_NUM_THREADS are set where the user launches, and written to the
    .deepspeed_env that DS_ENV_FILE names by cluster/deepspeed_env.sh, as the user would."""
    launch = [VENV_BIN / "deepspeed", "--hostfile", cluster.hostfile(slots=1), "--master_addr", "n1",
              "--master_port", port, "pretrain.py", *train_args(work, shards, run)]
    env = {"GLOO_SOCKET_IFNAME": DATA_INTERFACE, "OMP_NUM_THREADS": "1", "DS_ENV_FILE": work / "deepspeed_env"}
    cluster.run_on("n1", ["bash", "cluster/deepspeed_env.sh"], env=env)
    return cluster.popen_on("n1", launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def per_node_launch(cluster, work: Path, shards: Path, run: str, port: int, env_by_node: dict) -> list:
    """`deepspeed --hostfile H --no_ssh --node_rank K` on each node, each with its own extra environment."""
    return [cluster.popen_on(node, [VENV_BIN / "deepspeed", "--hostfile", cluster.hostfile(slots=1), "--no_ssh",
                                    "--node_rank", k, "--master_addr", "n1", "--master_port", port, "pretrain.py",
                                    *train_args(work, shards, run)],
                             env={"OMP_NUM_THREADS": "1", **env_by_node.get(node.name, {})}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for k, node in enumerate(cluster.nodes)]


@slow_fixture(scope="session")
def cluster_runs(cluster, tiny_shards, tmp_path_factory) -> dict:
    """Every launch of these tests, started together (their start-ups overlap; the nodes hold them all at once):
    {name: (exit status, output, run folder)} for each sbatch recipe of cluster/, DeepSpeed's ssh launcher, a launch
    whose nodes disagree, the srun recipe with the isolated interface named; and the one-host reference."""
    work = tmp_path_factory.mktemp("cluster-runs")
    reference = [VENV_BIN / "deepspeed", "--num_gpus", "2", "--master_port", free_port(), "pretrain.py",
                 *train_args(work, tiny_shards, "one-host")]
    one_host = start_processes([(reference, ONE_THREAD)], work, "one-host")
    # The srun recipe names the cluster network's interface, as docs/multi-node.md says to on nodes with two networks.
    right = {"slurm_srun": {"GLOO_SOCKET_IFNAME": DATA_INTERFACE}}
    submitted = {recipe: cluster.submit(f"cluster/{recipe}.sbatch", *options,
                                        env=recipe_env(work, tiny_shards, recipe, **right.get(recipe, {})))
                 for recipe, options in RECIPES.items()}
    wrong = dict(recipe_env(work, tiny_shards, "wrong-interface"), GLOO_SOCKET_IFNAME=ISOLATED_INTERFACE)
    submitted["wrong-interface"] = cluster.submit("cluster/slurm_srun.sbatch", *SRUN_ON_CPU_NODES, env=wrong)
    # Preemption and the time limit: the srun recipe signalled once its first step is logged, USR2 through the
    # batch shell as `--signal=B:USR2@LEAD` sends it, and SIGTERM alone to the step as a preemption sends it.
    for name in SIGNALLED:
        submitted[name] = cluster.submit("cluster/slurm_srun.sbatch", *SRUN_ON_CPU_NODES,
                                         env=recipe_env(work, tiny_shards, name, GLOO_SOCKET_IFNAME=DATA_INTERFACE))
    signalled_at = {name: signal_after_first_step(cluster, submitted[name], work / name, how)
                    for name, how in SIGNALLED.items()}
    launched = {"pdsh": [pdsh_launch(cluster, work, tiny_shards, "pdsh", PDSH_PORT)],
                # One node's environment differs: GLOO_SOCKET_IFNAME exported on n2 only.
                "disagreeing": per_node_launch(cluster, work, tiny_shards, "disagreeing", PDSH_PORT + 1,
                                               {"n2": {"GLOO_SOCKET_IFNAME": DATA_INTERFACE}})}
    runs = {name: (job.returncode, job.output, work / name)
            for name, job in ((name, submission.wait()) for name, submission in submitted.items()
                              if name not in SIGNALLED)}
    for name in SIGNALLED:   # through its requeue to its end
        runs[name] = (*until_gone(cluster, submitted[name], signalled_at[name], work / name), work / name)
    for name, procs in launched.items():
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
        runs[name] = (max(proc.returncode for proc in procs), "\n".join(outputs), work / name)
    wait_processes(one_host, work, "one-host")
    runs["one-host"] = (0, "", work / "one-host")
    return runs


SIGNALLED = {"signal-usr2": ["--batch", "--signal=USR2"], "signal-term": ["--signal=TERM"]}


def job_id(submission) -> str:
    """The id of a started job, from its output file's name (harness: NAME-%j.out), without waiting for sbatch."""
    return next(submission.jobs.glob(f"{submission.name}-*.out")).stem.rsplit("-", 1)[1]


def signal_after_first_step(cluster, submission, run: Path, how: list[str]) -> float:
    """`scancel HOW JOB` once rank 0 has logged the run's first step; when it was sent (time.time())."""
    log = run / "log.txt"
    deadline = time.monotonic() + 300
    while not (log.is_file() and "step 1/" in log.read_text()):
        assert time.monotonic() < deadline and submission.proc.poll() is None, f"{run.name}: no step 1 logged"
        time.sleep(0.05)
    submission.job_id = job_id(submission)
    cluster.run_on("n1", ["scancel", *how, submission.job_id])
    return time.time()


def until_gone(cluster, submission, signalled: float, run: Path, timeout: float = 300) -> tuple[int, str]:
    """Wait until the signalled job, requeued by its recipe, has left the queue: (0 if its last run printed
    "done:", else 1; its whole output, appended across runs, and a last line with the seconds from the signal to
    the stopping step's checkpoint, from rank 0's log)."""
    submission.proc.communicate(timeout=timeout)   # sbatch --wait may return at the requeue: the queue says
    deadline = time.monotonic() + timeout
    while cluster.run_on("n1", ["squeue", "-h", "-j", submission.job_id], check=False).stdout.strip():
        assert time.monotonic() < deadline, f"job {submission.job_id} still queued after {timeout} s"
        time.sleep(0.2)
    output = next(submission.jobs.glob(f"{submission.name}-*.out")).read_text()
    stopped = re.search(r"Stopped at step (\d+) ", output)
    saved = stopped and re.search(rf"^(\S+ \S+) INFO \S+: saved checkpoint step{int(stopped[1]):08d}",
                                  (run / "log.txt").read_text(), flags=re.M)
    seconds = (datetime.strptime(saved[1], "%Y-%m-%d %H:%M:%S").timestamp() - signalled) if saved else math.nan
    return (0 if "done: step 4" in output else 1), f"{output}\n[signal to the saved stop: {seconds:.0f} s]"


def exported(run: Path, out: Path) -> dict[str, torch.Tensor]:
    assert export_tool.main([str(run), "--out", str(out)]) == 0
    return load_file(out)


def train_args(work: Path, shards: Path, run: str) -> list[str]:
    """pretrain.py's flags as cluster/common.sh composes them from recipe_env."""
    env = recipe_env(work, shards, run)
    return ["--deepspeed_config", str(env["DS_CONFIG"]), "--model", MODEL, "--data", str(shards), "--output",
            str(env["RUN"]), *EXTRA_ARGS]


@slow_fixture(scope="session")
def reference_weights(cluster_runs, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The export of the same run by `deepspeed --num_gpus 2` on one host."""
    return exported(cluster_runs["one-host"][2], tmp_path_factory.mktemp("reference") / "weights.safetensors")


def assert_trained_as_on_one_host(name: str, returncode: int, output: str, run: Path, reference: dict, out: Path):
    assert returncode == 0, f"{name} failed:\n{output[-6000:]}"
    weights = exported(run, out)
    assert weights.keys() == reference.keys()
    different = [k for k in weights if not torch.equal(weights[k], reference[k])]
    assert not different, f"{name}: {len(different)} tensors differ from the one-host run, e.g. {different[:3]}"
    log = (run / "log.txt").read_text()
    assert "2 processes on 2 nodes" in log and "node 1 (n2)" in log and "2 nodes (n1, n2) agree" in log
    return log


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_across_two_nodes_as_on_one_host(cluster_runs, reference_weights, recipe, tmp_path):
    log = assert_trained_as_on_one_host(recipe, *cluster_runs[recipe], reference_weights, tmp_path / "w.safetensors")
    if recipe == "slurm_srun":  # trained through the interface it named (each node has two)
        assert "GLOO_SOCKET_IFNAME=eth0 on every node" in log


def test_deepspeed_ssh_launcher_trains_as_on_one_host_and_passes_variables_on(cluster_runs, reference_weights,
                                                                             tmp_path):
    """pdsh over ssh, not --no_ssh; GLOO_SOCKET_IFNAME set where the user launched reached n2 through the
    .deepspeed_env that cluster/deepspeed_env.sh wrote (rank 0 logs each compared variable as every node has it)."""
    log = assert_trained_as_on_one_host("pdsh", *cluster_runs["pdsh"], reference_weights, tmp_path / "w.safetensors")
    assert "deepspeed launch" in log and "GLOO_SOCKET_IFNAME=eth0 on every node" in log


def test_nodes_that_disagree_stop_before_any_step(cluster_runs):
    """GLOO_SOCKET_IFNAME set on n2 only: every rank stops at start-up with rank 0's sentence."""
    returncode, output, run = cluster_runs["disagreeing"]
    assert returncode != 0
    sentence = ("error: rank 1 on node n2 does not run what rank 0 on n1 runs: GLOO_SOCKET_IFNAME is 'eth0' there, "
                "unset here. Give every node the same software and environment;")
    assert output.count(sentence) == 2, output[-6000:]  # printed by both ranks, each on its own node
    assert "step 1/" not in output and not (run / "checkpoints").exists()


def test_an_interface_that_cannot_reach_the_master_stops_in_seconds(cluster_runs):
    """eth1 is each node's own network: gloo bound there would wait for its peers until the group's timeout."""
    returncode, output, run = cluster_runs["wrong-interface"]
    assert returncode != 0
    assert ("cannot reach MASTER_ADDR n1 through GLOO_SOCKET_IFNAME=eth1 within 5 s: set GLOO_SOCKET_IFNAME to the "
            "interface on which the nodes reach each other (this node has lo (127.0.0.1), eth0 (10.213.0.") in output
    assert "eth1 (10.214." in output and "step 1/" not in output


@pytest.mark.parametrize("name", list(SIGNALLED))
def test_a_signalled_job_saves_requeues_itself_and_ends_as_on_one_host(cluster_runs, reference_weights, name,
                                                                      tmp_path):
    """USR2 to the batch shell (the recipe's trap passes it on to the step) or SIGTERM to the step alone: every rank
    saves the same step, exits with 75, the recipe requeues the job, and the requeued job finishes the run with the
    weights of the uninterrupted one-host run."""
    returncode, output, run = cluster_runs[name]
    assert output.count("Stopped at step ") == 2, output[-6000:]   # both ranks, one on each node
    assert "run the same command to resume (exit code 75: saved, resubmit me)" in output
    assert "requeueing job" in output and "(restart 1 of at most MAX_REQUEUES=20)" in output
    if name == "signal-usr2":
        assert "USR2 received, passed on to the step" in output and "on SIGUSR2" in output
    else:
        assert "on SIGTERM" in output
    step = int(re.search(r"Stopped at step (\d+) ", output)[1])
    assert 1 < step < 4 and f"Resumed from step{step:08d}" in (run / "log.txt").read_text()   # no step redone
    assert_trained_as_on_one_host(name, returncode, output, run, reference_weights, tmp_path / "w.safetensors")
    print(f"\n{name}: {output.splitlines()[-1]}")
