"""Every recipe of cluster/ on a real cluster: the harness's nodes (tests/cluster/), real SLURM, ssh and pdsh.

Each recipe is submitted with `sbatch --nodes 2 --wait` as a user of a CPU cluster would submit it: its GPU
requests overridden on the command line (`--gpus-per-node=0`, one CPU per task, one process per node), its run
settings from the environment variables cluster/common.sh reads. Each trains a 4-step full-batch run (the tiny
model and flags of tests/conftest.py's zero_runs) with ZeRO-2 on two processes, one per node, and its export must
equal, bit for bit, the export of the same run started by `deepspeed --num_gpus 2` on one host.
"""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.harness import DATA_INTERFACE, ISOLATED_INTERFACE, Submission
from conftest import FULL_BATCH, TINY_MODEL
from launch import (ONE_THREAD, REPO, VENV_BIN, ds_config, free_port, signal_in_masks, slow_fixture, start_processes,
                    wait_processes)

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
    config = work / f"zero{STAGE}.json"   # written once: launches started from other threads read it meanwhile
    return {"DATA": shards, "RUN": work / run, "DS_CONFIG": config if config.exists() else ds_config(config, STAGE),
            "MODEL": MODEL, "EXTRA_ARGS": " ".join(EXTRA_ARGS), "GPUS_PER_NODE": 1,
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", **extra}


PDSH_PORT = 29500   # inside the nodes' own network: no other service there (SLURM's jobs use 20000 + job id)


def pdsh_launch(cluster, work: Path, shards: Path, run: str, port: int,
                extra_args: list[str] = EXTRA_ARGS) -> subprocess.Popen:
    """`deepspeed --hostfile H --master_addr n1 pretrain.py …` from n1: pdsh over ssh starts a launcher on each node
    (n1 included). GLOO_SOCKET_IFNAME and OMP_NUM_THREADS are set where the user launches, and written to the
    .deepspeed_env that DS_ENV_FILE names by cluster/deepspeed_env.sh, as the user would."""
    launch = [VENV_BIN / "deepspeed", "--hostfile", cluster.hostfile(slots=1), "--master_addr", "n1",
              "--master_port", port, "pretrain.py", *train_args(work, shards, run, extra_args)]
    env = {"GLOO_SOCKET_IFNAME": DATA_INTERFACE, "OMP_NUM_THREADS": "1", "DS_ENV_FILE": work / "deepspeed_env"}
    cluster.run_on("n1", ["bash", "cluster/deepspeed_env.sh"], env=env)
    return cluster.popen_on("n1", launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def per_node_launch(cluster, work: Path, shards: Path, run: str, port: int, env_by_node: dict,
                    extra_args: list[str] = EXTRA_ARGS) -> list:
    """`deepspeed --hostfile H --no_ssh --node_rank K` on each node, each with its own extra environment."""
    return [cluster.popen_on(node, [VENV_BIN / "deepspeed", "--hostfile", cluster.hostfile(slots=1), "--no_ssh",
                                    "--node_rank", k, "--master_addr", "n1", "--master_port", port, "pretrain.py",
                                    *train_args(work, shards, run, extra_args)],
                             env={"OMP_NUM_THREADS": "1", **env_by_node.get(node.name, {})}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for k, node in enumerate(cluster.nodes)]


@slow_fixture(scope="session")
def cluster_runs(cluster, tiny_shards, tmp_path_factory) -> dict:
    """Every launch of these tests, started together (their start-ups overlap; the nodes hold them all at once;
    each scenario waits in a thread of its own): {name: (exit status, output, run folder)} for each sbatch recipe of
    cluster/ (each interrupted mid-run, INTERRUPTIONS, and requeued by itself), a launch whose nodes disagree, the srun recipe with the
    isolated interface named; {name: figures} for the faulted runs of FAULTS (DeepSpeed's ssh launcher among them),
    each then resumed; and the one-host reference."""
    work = tmp_path_factory.mktemp("cluster-runs")
    reference = [VENV_BIN / "deepspeed", "--num_gpus", "2", "--master_port", free_port(), "pretrain.py",
                 *train_args(work, tiny_shards, "one-host")]
    one_host = start_processes([(reference, ONE_THREAD)], work, "one-host")
    with ThreadPoolExecutor(max_workers=16) as pool:
        # Every recipe job is interrupted once its first step is logged (INTERRUPTIONS) and requeues itself.
        pending = {recipe: pool.submit(interrupted_job, cluster, work, tiny_shards, recipe) for recipe in RECIPES}
        wrong = dict(recipe_env(work, tiny_shards, "wrong-interface"), GLOO_SOCKET_IFNAME=ISOLATED_INTERFACE)
        pending["wrong-interface"] = pool.submit(plain_job, cluster, work / "wrong-interface",
                                                 "cluster/slurm_srun.sbatch", *SRUN_ON_CPU_NODES, env=wrong)
        # One node's environment differs: GLOO_SOCKET_IFNAME exported on n2 only.
        pending["disagreeing"] = pool.submit(ended, per_node_launch(cluster, work, tiny_shards, "disagreeing",
                                                                    PDSH_PORT + 1,
                                                                    {"n2": {"GLOO_SOCKET_IFNAME": DATA_INTERFACE}}),
                                             work / "disagreeing")
        faults = [pool.submit(scenario, cluster, work, tiny_shards, name) for name, scenario in FAULTS.items()]
        runs = {name: future.result() for name, future in pending.items()}
        for future in faults:
            runs.update(future.result())
    wait_processes(one_host, work, "one-host")
    runs["one-host"] = (0, "", work / "one-host")
    return runs


def plain_job(cluster, run: Path, script: str, *options, env: dict) -> tuple[int, str, Path]:
    job = cluster.submit(script, *options, env=env).wait()
    return job.returncode, job.output, run


def ended(procs: list, run: Path) -> tuple[int, str, Path]:
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    return max(proc.returncode for proc in procs), "\n".join(outputs), run


def interrupted_job(cluster, work: Path, shards: Path, recipe: str) -> tuple[int, str, Path]:
    """The recipe's job, interrupted by INTERRUPTIONS[recipe] once its first step is logged, until it has left the
    queue (requeued by itself, finished)."""
    run = work / recipe
    interrupt, extra_args = INTERRUPTIONS[recipe]
    env = recipe_env(work, shards, recipe, **RECIPE_ENV.get(recipe, {}), EXTRA_ARGS=" ".join([*EXTRA_ARGS, *extra_args]))
    submission = cluster.submit(f"cluster/{recipe}.sbatch", *RECIPES[recipe], env=env)
    wait_for_line(run / "log.txt", "step 1/", submission.proc)
    submission.job_id = job_id(submission)
    interrupted, note = interrupt(cluster, submission, run)
    returncode, output = until_gone(cluster, submission, interrupted, run)
    return returncode, f"{output}{note}", run


def preempt(cluster, submission, run: Path) -> tuple[float, str]:
    """SIGTERM alone to every process of the step, as a preemption sends it (the launchers, torchrun's or
    DeepSpeed's, pass it on to their workers, which save, and exit non-zero: the recipe requeues on rank 0's
    `resubmit` file). When (time.time()), and a note on it for the test's output."""
    cluster.run_on("n1", ["scancel", "--signal=TERM", submission.job_id])
    return time.time(), ""


def run_out_of_time(cluster, submission, run: Path) -> tuple[float, str]:
    """SLURM's own signal ahead of the time limit, as the recipe asks for it (`#SBATCH --signal=B:USR2@LEAD`): the
    ranks are held (SIGSTOP: a run longer than its limit, without minutes of CPU), the job's limit is lowered to
    LEAD s away or less, and SLURM's next limit check (every 30 s) sends USR2 to the batch shell, whose trap passes it
    on. Once it is pending in every rank, the job gets the recipe's whole --time back (as a requeued job does; the
    lowered limit would signal it again at its start) and the ranks run on. When the signal arrived (time.time()),
    and a note on the limit."""
    held = hold_ranks(cluster, run)
    lead = recipe_lead(submission.script)
    runtime = job_runtime(cluster, submission.job_id)
    limit_minutes = (runtime + lead) // 60   # the limit is now LEAD s away or less
    cluster.run_on("n1", ["scontrol", "update", f"JobId={submission.job_id}", f"TimeLimit={limit_minutes}"])
    lowered = time.time()
    output = next(submission.jobs.glob(f"{submission.name}-*.out"))
    wait_for_line(output, "USR2 received, passed on to the step", submission.proc, timeout=120)
    signalled = time.time()
    wait_until_pending(held, signal.SIGUSR2)
    cluster.run_on("n1", ["scontrol", "update", f"JobId={submission.job_id}", f"TimeLimit={recipe_time(submission.script)}"])
    release(held)
    return signalled, (f"\n[time limit lowered to {limit_minutes} min at {runtime} s of the job, "
                       f"{60 * limit_minutes - runtime} s away: SLURM's USR2 {signalled - lowered:.0f} s later]")


EXIT_AFTER_MINUTES = 1.5   # each process's own deadline: the requeued job finishes the run well within it


def pass_the_exit_after_deadline(cluster, submission, run: Path) -> tuple[float, str]:
    """--exit-after: the ranks are held (SIGSTOP) until the deadline rank 0 logged has passed, then run on and stop at
    the next step boundaries by themselves. When they were released (time.time()), and a note."""
    held = hold_ranks(cluster, run)
    logged = re.search(r"--exit-after: .* after (\S+ \S+)", (run / "log.txt").read_text())[1]
    deadline = datetime.strptime(logged, "%Y-%m-%d %H:%M:%S").timestamp()
    held_from = time.time()
    while time.time() <= deadline + 1:
        time.sleep(0.2)
    release(held)
    return time.time(), f"\n[held {time.time() - held_from:.0f} s, until the deadline {logged} had passed]"


# How each recipe job is interrupted once its first step is logged, and the flags it runs with beside EXTRA_ARGS.
# SLURM's signal before the time limit goes through the torchrun recipe, whose launchers ignore USR2 (its trap);
# the DeepSpeed recipe is preempted, the srun recipe runs with --exit-after (docs/reliability.md: the rotation).
INTERRUPTIONS = {"slurm_deepspeed": (preempt, []),
                 "slurm_torchrun": (run_out_of_time, []),
                 "slurm_srun": (pass_the_exit_after_deadline, ["--exit-after", str(EXIT_AFTER_MINUTES)])}
# The srun recipe names the cluster network's interface, as docs/multi-node.md says to on nodes with two networks.
RECIPE_ENV = {"slurm_srun": {"GLOO_SOCKET_IFNAME": DATA_INTERFACE}}


def hold_ranks(cluster, run: Path) -> list[int]:
    """SIGSTOP to both ranks of `run` (one on each node); their pids."""
    held = [pid for node in cluster.nodes for pid in rank_processes(cluster, node.name, run)]
    assert len(held) == 2, f"{run.name}: ranks {held}"
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    return held


def release(held: list[int]) -> None:
    for pid in held:
        os.kill(pid, signal.SIGCONT)


def wait_until_pending(pids: list[int], number: int, timeout: float = 60) -> None:
    """Until signal `number` is pending in each (stopped) process: delivered, its handler runs once it continues."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while not signal_in_masks(pid, number, "SigPnd", "ShdPnd"):
            assert time.monotonic() < deadline, f"signal {number} never reached process {pid}"
            time.sleep(0.05)


def recipe_lead(script: str | Path) -> int:
    """LEAD of the recipe's `#SBATCH --signal=B:USR2@LEAD`, in seconds."""
    return int(re.search(r"^#SBATCH --signal=B:USR2@(\d+)$", (REPO / script).read_text(), flags=re.M)[1])


def recipe_time(script: str | Path) -> str:
    return re.search(r"^#SBATCH --time=(\S+)$", (REPO / script).read_text(), flags=re.M)[1]


def job_runtime(cluster, job: str) -> int:
    """Seconds the job has run, as SLURM counts them (RunTime=[D-]HH:MM:SS)."""
    runtime = re.search(r"RunTime=(?:(\d+)-)?(\d+):(\d+):(\d+)",
                        cluster.run_on("n1", ["scontrol", "show", "job", job]).stdout)
    days, hours, minutes, seconds = (int(part or 0) for part in runtime.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def job_id(submission) -> str:
    """The id of a started job, from its output file's name (harness: NAME-%j.out), without waiting for sbatch."""
    return next(submission.jobs.glob(f"{submission.name}-*.out")).stem.rsplit("-", 1)[1]


def wait_for_line(path: Path, text: str, proc, timeout: float = 300) -> None:
    """Until `text` is in the file at `path` (a run's log), while `proc` (what started the run) lives."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, f"{path}: no {text!r} (exit {proc.poll()})"
        time.sleep(0.05)


def until_gone(cluster, submission, interrupted: float, run: Path, timeout: float = 300) -> tuple[int, str]:
    """Wait until the interrupted job, requeued by its recipe, has left the queue: (0 if its last run printed
    "done:", else 1; its whole output, appended across runs, and a last line with the seconds from the
    interruption (`interrupted`) to the stopping step's checkpoint, from rank 0's log, and to the requeued job's
    end)."""
    submission.proc.communicate(timeout=timeout)   # sbatch --wait may return at the requeue: the queue says
    deadline = time.monotonic() + timeout
    while cluster.run_on("n1", ["squeue", "-h", "-j", submission.job_id], check=False).stdout.strip():
        assert time.monotonic() < deadline, f"job {submission.job_id} still queued after {timeout} s"
        time.sleep(0.2)
    gone = time.time() - interrupted
    output = next(submission.jobs.glob(f"{submission.name}-*.out")).read_text()
    stopped = re.search(r"Stopped at step (\d+) ", output)
    saved = stopped and re.search(rf"^(\S+ \S+) INFO \S+: saved checkpoint step{int(stopped[1]):08d}",
                                  (run / "log.txt").read_text(), flags=re.M)
    seconds = (datetime.strptime(saved[1], "%Y-%m-%d %H:%M:%S").timestamp() - interrupted) if saved else math.nan
    return ((0 if "done: step 4" in output else 1),
            f"{output}\n[interruption to the saved stop: {seconds:.0f} s; to the requeued job's end: {gone:.0f} s]")


def exported(run: Path, out: Path) -> dict[str, torch.Tensor]:
    assert export_tool.main([str(run), "--out", str(out)]) == 0
    return load_file(out)


def train_args(work: Path, shards: Path, run: str, extra_args: list[str] = EXTRA_ARGS) -> list[str]:
    """pretrain.py's flags as cluster/common.sh composes them from recipe_env."""
    env = recipe_env(work, shards, run)
    return ["--deepspeed_config", str(env["DS_CONFIG"]), "--model", MODEL, "--data", str(shards), "--output",
            str(env["RUN"]), *extra_args]


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
    """Through its signal and requeue (below): the requeued job ends the run with the one-host run's weights."""
    log = assert_trained_as_on_one_host(recipe, *cluster_runs[recipe], reference_weights, tmp_path / "w.safetensors")
    if recipe == "slurm_srun":  # trained through the interface it named (each node has two)
        assert "GLOO_SOCKET_IFNAME=eth0 on every node" in log


def test_deepspeed_ssh_launcher_trains_as_on_one_host_and_passes_variables_on(cluster_runs):
    """pdsh over ssh, not --no_ssh; GLOO_SOCKET_IFNAME set where the user launched reached n2 through the
    .deepspeed_env that cluster/deepspeed_env.sh wrote (rank 0 logs each compared variable as every node has it).
    Its run is the pdsh-killed one: the weights after its resume are checked there."""
    log = (cluster_runs["pdsh-killed"]["run"] / "log.txt").read_text()
    assert "2 processes on 2 nodes (deepspeed launch" in log and "GLOO_SOCKET_IFNAME=eth0 on every node" in log
    assert "step 1/" in log.split("(slurm launch")[0]   # trained under DeepSpeed's launcher before the kill


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
    assert "requeueing" not in output   # a setting to fix: whatever status srun returns, no resubmit file, no requeue


# What each recipe's job says when it stops (on every rank, the same step) and the recipe's own line about it.
STOPPED_ON = {"slurm_deepspeed": ("on SIGTERM", None),   # to the step's processes alone, not the batch shell
              "slurm_torchrun": ("on SIGUSR2", "USR2 received, passed on to the step"),
              "slurm_srun": ("on the --exit-after deadline", None),
              "srun-signalled": ("on SIGUSR2", "USR2 received, passed on to the step")}


@pytest.mark.parametrize("recipe", list(STOPPED_ON))
def test_an_interrupted_recipe_job_saves_requeues_itself_and_ends_as_on_one_host(cluster_runs, reference_weights,
                                                                                recipe, tmp_path):
    """SLURM's USR2 ahead of the time limit or scancel's (through the batch shell, whose trap passes it on), SIGTERM
    to the step alone (a preemption), or the --exit-after deadline: every rank saves the same step and exits with
    75, the recipe requeues the job, and the requeued job finishes the run with the weights of the uninterrupted
    one-host run (test_recipe_trains_across_two_nodes_as_on_one_host; srun-signalled: test_a_rank_killed_under_torchrun_…,
    whose resume it is)."""
    returncode, output, run = cluster_runs[recipe]
    reason, forwarded = STOPPED_ON[recipe]
    assert output.count("Stopped at step ") == 2 and output.count(f" {reason}, after saving") >= 1, output[-6000:]
    assert "run the same command to resume (exit code 75: saved, resubmit me)" in output
    assert "requeueing job" in output and "(restart 1 of at most MAX_REQUEUES=20)" in output, output[-6000:]
    if forwarded:
        assert forwarded in output, output[-6000:]
    else:   # no signal went through the batch shell
        assert "passed on to the step" not in output, output[-6000:]
    assert "DUE TO TIME LIMIT" not in output   # the run saved and left before any limit
    step = int(re.search(r"Stopped at step (\d+) ", output)[1])
    assert 1 < step < 4 and f"Resumed from step{step:08d}" in (run / "log.txt").read_text()   # no step redone
    print(f"\n{recipe}: {' '.join(output.splitlines()[-2:])}")


# --- faults on the cluster: a rank killed or frozen, one node's disk full; each run then resumed ------------------

FAULT_STEP_TIMEOUT = 15   # s: --step-timeout of the faulted runs (a GPU run's default is 100; the loaded nodes here
                          # can hold a healthy rank's heartbeat still for several seconds)
# The runs of EXTRA_ARGS, saved at every step (so that a checkpoint exists before the fault, mid-run), with the
# timeouts of a hang; the one-host run's weights are the same.
FAULT_ARGS = [*EXTRA_ARGS[:EXTRA_ARGS.index("--save-every")], "--save-every", "1",
              "--step-timeout", str(FAULT_STEP_TIMEOUT), "--dist-timeout", "120"]


def rank_processes(cluster, node: str, run: Path) -> list[int]:
    """The training processes (`python [-u] pretrain.py …`) of `run` living in `node`'s namespaces."""
    netns = os.readlink(f"/proc/{cluster.node(node).anchor}/ns/net")
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.readlink(entry / "ns" / "net") != netns:
                continue
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "pretrain.py" in argv[1:3] and f"--output\0{run}\0" in "\0".join(argv) + "\0" and state != "Z":
            found.append(int(entry.name))
    return found


def left_running(cluster, run: Path) -> dict[str, list[int]]:
    """Every process of `run` still in some node's namespaces (killed here, after being counted)."""
    left = {node.name: [pid for pid in leftover_processes(cluster, node.name, run)] for node in cluster.nodes}
    for pids in left.values():
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    return {node: pids for node, pids in left.items() if pids}


def leftover_processes(cluster, node: str, run: Path) -> list[int]:
    """Any process of `run` in `node`'s namespaces: a rank, a launcher, srun (its command line names the run)."""
    netns = os.readlink(f"/proc/{cluster.node(node).anchor}/ns/net")
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "ns" / "net") == netns and \
                    str(run).encode() in (entry / "cmdline").read_bytes() and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def fault_rank1(cluster, run: Path, proc, fault: int, after: str = "step00000001") -> float:
    """`fault` to rank 1 (on n2) once checkpoint `after` is committed; when (time.time())."""
    wait_for_line(run / "log.txt", f"saved checkpoint {after}", proc)
    deadline = time.monotonic() + 60
    while not (pids := rank_processes(cluster, "n2", run)):
        assert time.monotonic() < deadline, f"no rank of {run.name} on n2"
        time.sleep(0.05)
    os.kill(pids[0], fault)
    return time.time()


def srun_fault_job(cluster, work: Path, shards: Path, name: str) -> Submission:
    env = recipe_env(work, shards, name, GLOO_SOCKET_IFNAME=DATA_INTERFACE, EXTRA_ARGS=" ".join(FAULT_ARGS))
    return cluster.submit("cluster/slurm_srun.sbatch", *SRUN_ON_CPU_NODES, env=env)


def latest_of(run: Path) -> str | None:
    latest = run / "checkpoints" / "latest"
    return latest.read_text() if latest.is_file() else None


def srun_killed_then_frozen(cluster, work: Path, shards: Path, name: str) -> dict:
    """The srun recipe's job with rank 1 killed (SIGKILL) after checkpoint step 1; the same job submitted again, its
    rank 1 frozen (SIGSTOP) after step 2; then submitted once more, to the end (one run folder: the second job is
    the first one's resume, which saves a launch)."""
    run = work / name
    results = {}
    for fault, after, scenario in ((signal.SIGKILL, "step00000001", "srun-killed"),
                                   (signal.SIGSTOP, "step00000002", "srun-frozen")):
        job = srun_fault_job(cluster, work, shards, name)
        faulted = fault_rank1(cluster, run, job.proc, fault, after)
        stopped = job.wait()
        results[scenario] = {"run": run, "stopped": stopped.returncode, "output": stopped.output,
                             "seconds": time.time() - faulted, "left": left_running(cluster, run),
                             "latest": latest_of(run)}
    resumed = srun_fault_job(cluster, work, shards, name).wait()
    return {scenario: dict(result, resumed=resumed.returncode, resumed_output=resumed.output)
            for scenario, result in results.items()}


FULL_TAG = "step00000003"   # the save that meets n2's full disk


def pdsh_killed_then_disk_full(cluster, work: Path, shards: Path, name: str) -> dict:
    """DeepSpeed's ssh launcher from n1 (pdsh starts a launcher on each node), rank 1's process (on n2) killed after
    checkpoint step 1. Its resume by the srun recipe then meets a full disk on n2 alone: a 1 MiB tmpfs over n2's view
    of the folder of checkpoint step 3 (in n2's own mount namespace: n1 sees the shared disk), mounted once the resume
    has begun; rank 1's write of step 3 fails. Space freed (the tmpfs goes with the abandoned folder), the same job
    submitted once more runs to the end. (srun resumes: DeepSpeed's launcher, three interpreters per node, starts a
    minute slower than srun on this loaded machine.)"""
    run = work / name
    launcher = pdsh_launch(cluster, work, shards, name, PDSH_PORT, FAULT_ARGS)
    faulted = fault_rank1(cluster, run, launcher, signal.SIGKILL)
    output = launcher.communicate(timeout=600)[0]
    killed = {"run": run, "stopped": launcher.returncode, "output": output, "seconds": time.time() - faulted,
              "left": left_running(cluster, run), "latest": latest_of(run)}
    (work / f"{name}.out").write_text(output)
    job = srun_fault_job(cluster, work, shards, name)
    wait_for_line(run / "log.txt", f"Resumed from {killed['latest']}", job.proc)   # folders newer were removed
    folder = run / "checkpoints" / FULL_TAG
    folder.mkdir()   # FileExistsError: step 3 was saved before the disk could be filled
    cluster.run_on("n2", ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", folder])
    stopped = job.wait()
    full = {"run": run, "stopped": stopped.returncode, "output": stopped.output, "latest": latest_of(run)}
    cluster.run_on("n2", ["umount", folder], check=False)   # gone already where rank 0 removed the folder
    full["left"] = left_running(cluster, run)
    resumed = srun_fault_job(cluster, work, shards, name).wait()
    return {scenario: dict(result, resumed=resumed.returncode, resumed_output=resumed.output)
            for scenario, result in (("pdsh-killed", killed), ("n2-disk-full", full))}


def torchrun_killed_then_signalled(cluster, work: Path, shards: Path, name: str) -> dict:
    """The torchrun recipe's job, rank 1's worker (on n2) killed after checkpoint step 1: torchrun on n2 sees it die
    and fails, srun --kill-on-bad-exit=1 ends n1's task. The srun recipe then resumes the run and, once resumed, gets
    `scancel --batch --signal=USR2` (what `--signal=B:USR2@LEAD` sends; the recipe's trap passes it on), saves,
    requeues itself and finishes."""
    run = work / name
    job = cluster.submit("cluster/slurm_torchrun.sbatch", *ON_CPU_NODES,
                         env=recipe_env(work, shards, name, EXTRA_ARGS=" ".join(FAULT_ARGS)))
    faulted = fault_rank1(cluster, run, job.proc, signal.SIGKILL)
    stopped = job.wait()
    killed = {"run": run, "stopped": stopped.returncode, "output": stopped.output, "seconds": time.time() - faulted,
              "left": left_running(cluster, run), "latest": latest_of(run)}
    job = srun_fault_job(cluster, work, shards, name)
    wait_for_line(run / "log.txt", f"Resumed from {killed['latest']}", job.proc)
    job.job_id = job_id(job)
    cluster.run_on("n1", ["scancel", "--batch", "--signal=USR2", job.job_id])
    finished, output = until_gone(cluster, job, time.time(), run)
    return {"torchrun-killed": dict(killed, resumed=finished, resumed_output=output),
            "srun-signalled": (finished, output, run)}


# name: scenario(cluster, work, shards, name) -> {test's name: figures}
FAULTS = {"srun-faults": srun_killed_then_frozen, "pdsh-faults": pdsh_killed_then_disk_full,
          "torchrun-faults": torchrun_killed_then_signalled}


def assert_resumed_as_on_one_host(name: str, result: dict, reference: dict, out: Path, tag: str) -> None:
    assert result["left"] == {}, f"{name}: left running {result['left']}"
    assert result["resumed"] == 0, f"{name}'s resume failed:\n{result['resumed_output'][-6000:]}"
    assert f"Resumed from {tag}" in (result["run"] / "log.txt").read_text()
    assert_trained_as_on_one_host(name, 0, result["resumed_output"], result["run"], reference, out)


def test_a_rank_killed_under_srun_ends_the_job_on_every_node_and_the_resubmitted_job_finishes(
        cluster_runs, reference_weights, tmp_path):
    """srun --kill-on-bad-exit=1 ends the other task when rank 1 dies; nothing of the run is left on either node."""
    result = cluster_runs["srun-killed"]
    assert result["stopped"] != 0 and "requeueing" not in result["output"], result["output"][-6000:]
    # resumed by the next job of the chain (srun_killed_then_frozen), which the frozen test follows to the end
    assert_resumed_as_on_one_host("srun-killed", result, reference_weights, tmp_path / "w.safetensors",
                                  result["latest"])
    print(f"\nsrun, rank 1 killed: the job ended {result['seconds']:.0f} s after the kill; resumed from "
          f"{result['latest']}")


def test_a_rank_killed_under_deepspeed_pdsh_ends_every_node_and_the_run_resumes(cluster_runs, reference_weights,
                                                                               tmp_path):
    """DeepSpeed's ssh launcher: n2's launcher sees its worker die and exits; n1's rank learns it from gloo (or the
    heartbeat) and stops with the sentence naming rank 1; pdsh then returns. Nothing of the run is left anywhere."""
    result = cluster_runs["pdsh-killed"]
    assert result["stopped"] != 0, result["output"][-6000:]
    said = [line.split(": ", 1)[1] for line in result["output"].splitlines() if ": " in line]   # pdsh's "n1: " off
    errors = [line for line in said if line.startswith("error: ")]
    assert errors and all(line.startswith("error: rank 1 on n2 stopped answering (") for line in errors), \
        result["output"][-6000:]
    assert_resumed_as_on_one_host("pdsh-killed", result, reference_weights, tmp_path / "w.safetensors",
                                  result["latest"])
    print(f"\ndeepspeed over pdsh, rank 1 killed: the launch ended {result['seconds']:.0f} s after the kill (exit "
          f"{result['stopped']}); resumed from {result['latest']}")


def test_a_rank_killed_under_torchrun_ends_the_job_on_every_node_and_the_resubmitted_job_finishes(
        cluster_runs, reference_weights, tmp_path):
    """torchrun on n2 sees its worker die and fails (no restarts: the recipe's static rendezvous); srun
    --kill-on-bad-exit=1 then ends n1's task. Nothing of the run is left on either node."""
    result = cluster_runs["torchrun-killed"]
    assert result["stopped"] != 0 and "requeueing" not in result["output"], result["output"][-6000:]
    assert "Signal 9 (SIGKILL) received by PID" in result["output"], result["output"][-6000:]   # torchrun's report
    assert_resumed_as_on_one_host("torchrun-killed", result, reference_weights, tmp_path / "w.safetensors",
                                  result["latest"])
    print(f"\ntorchrun, rank 1 killed: the job ended {result['seconds']:.0f} s after the kill; resumed from "
          f"{result['latest']}")


def test_a_frozen_node_ends_the_job_with_the_sentence_naming_it_and_the_resubmitted_job_finishes(
        cluster_runs, reference_weights, tmp_path):
    """Rank 1 stopped (SIGSTOP): rank 0 exits 4 with the sentence naming it after --step-timeout, and srun
    --kill-on-bad-exit=1 ends the frozen task (SIGKILL KillWait, 30 s, after its SIGTERM, which a stopped process
    holds)."""
    result = cluster_runs["srun-frozen"]
    output = result["output"]
    lines = [line for line in output.splitlines() if line.startswith("error: rank 1 on n2 stopped answering (")]
    assert result["stopped"] != 0 and len(lines) == 1, output[-6000:]
    # Its heartbeat watcher or its collective's timeout (both --step-timeout) speaks first: "(its heartbeat stood
    # still for 15 s; …" or "(the collective failed with: … Timed out …; …".
    assert f"; --step-timeout {FAULT_STEP_TIMEOUT} s), so every rank stopped; the newest checkpoint, " \
           f"{result['latest']} in {result['run'] / 'checkpoints'}, is intact: check or replace that node, then run " \
           "the same command to resume." in lines[0], lines[0]
    assert_resumed_as_on_one_host("srun-frozen", result, reference_weights, tmp_path / "w.safetensors",
                                  result["latest"])
    print(f"\nsrun, rank 1 frozen: the job ended {result['seconds']:.0f} s after the SIGSTOP; resumed from "
          f"{result['latest']}")


def test_a_full_disk_on_one_node_stops_every_rank_and_the_job_resumes_once_space_is_free(
        cluster_runs, reference_weights, tmp_path):
    result = cluster_runs["n2-disk-full"]
    checkpoints = result["run"] / "checkpoints"
    sentence = (f"error: Checkpoint {FULL_TAG} could not be written to {checkpoints} on node n2 (rank 1: the disk is "
                f"full), and a checkpoint needs ")
    assert result["stopped"] != 0 and result["output"].count(sentence) == 2, result["output"][-6000:]
    assert "step00000002 is still the newest checkpoint, intact: free space there (or lower --keep) and run the " \
           "same command to resume from it." in result["output"]
    assert result["latest"] == "step00000002"
    assert_resumed_as_on_one_host("n2-disk-full", result, reference_weights, tmp_path / "w.safetensors",
                                  "step00000002")
