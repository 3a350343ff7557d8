"""The process-launch helpers the tests share: DeepSpeed JSON files, launcher-free environments, plan files for
tests/jobs/train_plan.py, and starting, waiting for and killing deepspeed/torchrun/python launches.

A plain module (tests/conftest.py keeps the fixtures and imports from here): `from launch import launch_plan`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# DeepSpeed's launcher as tools/demo.py finds it: its `deepspeed` script beside this Python (a venv), else the same
# runner as a module (wheels installed with `pip install --target`, as on the GPU machine, put scripts elsewhere).
DEEPSPEED = ([str(VENV_BIN / "deepspeed")] if (VENV_BIN / "deepspeed").is_file()
             else [sys.executable, "-m", "deepspeed.launcher.runner"])
TRAIN_PLAN = REPO / "tests" / "jobs" / "train_plan.py"
FULL_BATCH_SIZE = 16  # the global batch of the full-batch runs: tiny_shards' 16 images in every step (conftest)

# The names of the fixtures made with `slow_fixture`; tests/conftest.py marks every test that needs one `slow`.
SLOW_FIXTURES: set[str] = set()


def slow_fixture(*args, **kwargs):
    """`pytest.fixture` for a fixture that waits for real training processes, a pip install or a clone: a test
    needing it, directly or through another fixture, is marked `slow` (`make test-fast` skips it)."""
    def register(function):
        SLOW_FIXTURES.add(function.__name__)
        return pytest.fixture(*args, **kwargs)(function)
    return register


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_config(path: Path, stage: int, batch: int = FULL_BATCH_SIZE, **extra) -> Path:
    """A CPU DeepSpeed JSON: fp32 (unless `extra` sets bf16), torch's AdamW (no fused_adam build), activation
    checkpointing every 2 blocks."""
    config = {"train_batch_size": batch, "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"weight_decay": 0.05, "torch_adam": True}},
              "activation_checkpointing": {"blocks_per_checkpoint": 2}, "steps_per_print": 10**9, **extra}
    path.write_text(json.dumps(config))
    return path


# The variables by which launchers describe a process: a test's processes get only those it sets.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "CROSS_RANK", "TORCHELASTIC_RUN_ID")
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "MPI_LOCAL", "MV2_")


def python_path(*first: str | Path, without: Path | None = None) -> str:
    """`first`, then this process's PYTHONPATH (less the entries that are `without`): a child that must import
    something first keeps the packages a `--target` install put on the path."""
    inherited = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if e and not (without and Path(e).resolve() == without.resolve())]
    return os.pathsep.join([*map(str, first), *inherited])


def clean_env(extra: dict | None = None) -> dict:
    """This process's environment without any launcher's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and not k.startswith(LAUNCHER_PREFIXES)}
    return dict(env, PYTHONUNBUFFERED="1", **(extra or {}))


def write_plan(plan: list[dict], workdir: Path) -> Path:
    """A plan file for tests/jobs/train_plan.py, named after the plans already in `workdir`."""
    plan_file = workdir / f"plan-{len(list(workdir.glob('plan-*.json')))}.json"
    plan_file.write_text(json.dumps(plan))
    return plan_file


ONE_THREAD = {"OMP_NUM_THREADS": "1"}   # for processes that share the cores with another "node"


def torchrun_nodes(plan: Path) -> list[tuple[list, dict]]:
    """Two torchrun "nodes" of one process each on this machine, running `plan` (for start_processes)."""
    port = str(free_port())
    return [([VENV_BIN / "torchrun", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
              "--master_addr", "127.0.0.1", "--master_port", port, TRAIN_PLAN, plan], ONE_THREAD) for node in (0, 1)]


def start_processes(commands: list[tuple[list[str], dict]], workdir: Path, name: str) -> list[subprocess.Popen]:
    """Start each (command, extra environment) in its own session ("node"), logging to workdir/name-i.log."""
    procs = []
    for i, (cmd, env) in enumerate(commands):
        log = open(workdir / f"{name}-{i}.log", "w")
        procs.append(subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=clean_env(env), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    return procs


def wait_processes(procs: list[subprocess.Popen], workdir: Path, name: str, check: bool = True) -> list[str]:
    """Wait for every process started by start_processes; their logs (a failure shows them all)."""
    hung = not all([wait_or_kill(proc) for proc in procs])  # a list: every process waited for or killed
    logs = [(workdir / f"{name}-{i}.log").read_text() for i in range(len(procs))]
    if hung:
        pytest.fail(f"{name} hung: killed after {LAUNCH_TIMEOUT} s:\n" +
                    "\n".join(f"--- {i}:\n{log[-4000:]}" for i, log in enumerate(logs)))
    if check and any(p.returncode for p in procs):
        codes = [p.returncode for p in procs]
        pytest.fail(f"{name} failed (exits {codes}):\n" + "\n".join(f"--- {i}:\n{log[-4000:]}" for i, log in enumerate(logs)))
    return logs


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        found.append(queue.pop())
        queue += children.get(found[-1], [])
    return found


def signal_in_masks(pid: int, number: int, *masks: str) -> bool:
    """Whether signal `number` is set in any of the named masks of /proc/PID/status (SigCgt: a handler installed;
    SigPnd, ShdPnd: pending); False once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return any(int(line.split()[1], 16) >> (number - 1) & 1 for line in status.splitlines()
               if line.split(":")[0] in masks)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as losing their node would: torchrun starts its workers
    in sessions of their own, so killing the launcher's process group leaves them running."""
    for victim in descendants(pid):
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


LAUNCH_TIMEOUT = 600  # s; a launch takes under 90 s here: past this it hangs, and its log tail says where


def wait_or_kill(proc: subprocess.Popen) -> bool:
    """Wait for a launch; False if it hung. A hung or abandoned launch (pytest's own timeout, a failing fixture) is
    killed with all its processes, so that it neither burns the cores of the tests after it nor outlives the suite."""
    try:
        proc.wait(timeout=LAUNCH_TIMEOUT)
        return True
    except subprocess.TimeoutExpired:
        return False
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def launch_plan(plan: list[dict], world: int, workdir: Path, env: dict | None = None, check: bool = True,
                popen: bool = False, torchrun: bool = False, expect: int = 0):
    """Run a plan with `deepspeed --num_gpus world` (world > 1), `torchrun`, or plain python (world 1); with `check`,
    its exit status must be `expect` (a plan exits with its last run's status: a run expected to stop ends it
    non-zero)."""
    plan_file = write_plan(plan, workdir)
    if torchrun:
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(free_port()),
               str(TRAIN_PLAN), str(plan_file)]
    elif world == 1:
        cmd = [sys.executable, str(TRAIN_PLAN), str(plan_file)]
    else:
        cmd = [*DEEPSPEED, "--num_gpus", str(world), "--master_port", str(free_port()), str(TRAIN_PLAN),
               str(plan_file)]
    full_env = clean_env(env)
    log_file = open(workdir / f"{plan_file.stem}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    if popen:
        return proc
    hung = not wait_or_kill(proc)
    log_file.close()
    output = (workdir / f"{plan_file.stem}.log").read_text()
    if hung:
        pytest.fail(f"training plan hung: killed after {LAUNCH_TIMEOUT} s:\n{output[-6000:]}")
    if check and proc.returncode != expect:
        pytest.fail(f"training plan failed (exit {proc.returncode}, expected {expect}):\n{output[-6000:]}")
    return output
