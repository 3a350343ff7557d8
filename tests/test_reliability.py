"""What a multi-day run must survive: a diverged loss, a damaged newest checkpoint, a full disk, a frozen rank,
a dead rank.

One launch (plain python, one process) runs the first cases in a row through tests/jobs/train_plan.py, each
through pretrain.main so that its exit status and its message are what a user would get; a frozen and a killed
rank take a 2-process launch each (a full disk on one rank of two: test_train's resume launches).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from conftest import FULL_BATCH, TINY_MODEL
from launch import (LAUNCH_TIMEOUT, ONE_THREAD, TRAIN_PLAN, ds_config, free_port, kill_tree, launch_plan, slow_fixture,
                    start_processes, wait_or_kill, write_plan)
from test_train import scalars

DIVERGING_LR = "1e9"       # per 512 images: the weights blow up in the first step, the loss is NaN from step 2
FULL_DISK_MB = 30          # a checkpoint of the tiny model under ZeRO-2 on one process is 19 MB: one fits, two do not


def _mount_small_tmpfs(path: Path) -> bool:
    """A real full filesystem where the machine allows it (root, Linux); else the test injects ENOSPC."""
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FULL_DISK_MB}m", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@slow_fixture(scope="module")
def reliability_runs(zero_runs, tiny_shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("reliability")
    config = str(ds_config(work / "zero2.json", 2))
    common = ["--deepspeed_config", config, "--data", str(tiny_shards), *TINY_MODEL, *FULL_BATCH]

    # A copy of the 6-step ZeRO-2 one-process run whose newest checkpoint (step 6) lost the end of its
    # optimizer shard, continued to 7 epochs.
    damaged = Path(shutil.copytree(zero_runs[2, 1].output, work / "damaged"))
    shard = next((damaged / "checkpoints" / "step00000006").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    full_disk = work / "full-disk"
    mounted = _mount_small_tmpfs(full_disk)
    plan = [
        {"argv": [*common, "--output", str(work / "diverged"), "--lr", DIVERGING_LR, "--save-every", "1"],
         "status": str(work / "diverged.status")},
        # The losses are read back at log steps and before saves only: with 4 steps per epoch, the NaN of step 2
        # is found at step 3's save.
        {"argv": [*common, "--deepspeed_config", str(ds_config(work / "zero2-batch4.json", 2, batch=4)),
                  "--output", str(work / "diverged-late"), "--lr", DIVERGING_LR, "--save-every", "3", "--log-every", "4"],
         "status": str(work / "diverged-late.status")},
        {"argv": [*common, "--output", str(damaged), "--save-every", "4", "--epochs", "7"],
         "status": str(work / "damaged.status")},
        {"argv": [*common, "--output", str(full_disk / "run"), "--save-every", "1", "--no-eval"],
         "status": str(work / "full-disk.status")},
    ]
    env = {} if mounted else {"ANTISMOOTH_TEST_ENOSPC_DURING_SAVE": "step00000002"}
    log = launch_plan(plan, 1, work, env=env, expect=3)   # the plan exits with its last run's status: the full disk's
    status = {name: int((work / f"{name}.status").read_text())
              for name in ("diverged", "diverged-late", "damaged", "full-disk")}
    yield {"work": work, "log": log, "damaged": damaged, "full_disk": full_disk / "run", "status": status,
           "mounted": mounted}
    if mounted:
        subprocess.run(["umount", str(full_disk)], capture_output=True)


def _error_lines(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error: ") and text in line]


def _error_line(log: str, text: str) -> str:
    lines = _error_lines(log, text)
    assert len(lines) == 1, log[-4000:]
    return lines[0]


def _export_is_finite(run: Path, tmp_path: Path) -> str:
    """Export `run`'s newest checkpoint, check every weight is finite, and return the exported tag."""
    from antismooth.cli import export as export_tool
    from safetensors.torch import load_file

    from antismooth.export import read_export_meta

    out = tmp_path / "weights.safetensors"
    assert export_tool.main([str(run), "--out", str(out)]) == 0
    weights = load_file(out)
    assert all(torch.isfinite(t).all() for t in weights.values())
    return read_export_meta(out)["tag"]


def test_a_diverged_run_stops_with_one_sentence_and_keeps_its_good_checkpoints(reliability_runs, tmp_path):
    assert reliability_runs["status"]["diverged"] == 3
    line = _error_line(reliability_runs["log"], "holds finite weights")
    run = reliability_runs["work"] / "diverged"
    latest = (run / "checkpoints" / "latest").read_text()
    assert f"its newest checkpoint, {latest} in" in line and "--lr" in line and "--skip-nonfinite" in line
    assert all(v == v for v in scalars(run, "train/loss")[:-1])  # the logged losses before the stop are numbers
    assert _export_is_finite(run, tmp_path) == latest


def test_a_divergence_found_at_a_later_check_names_its_step_and_saves_nothing(reliability_runs):
    """No host sync per step: the loss of step 2 is read back with step 3's at the save of step 3, which the
    divergence check stops before it writes anything."""
    assert reliability_runs["status"]["diverged-late"] == 3
    line = _error_line(reliability_runs["log"], "no checkpoint yet")
    assert line.startswith("error: Step 2: the loss is not finite") and "--skip-nonfinite" in line
    checkpoints = reliability_runs["work"] / "diverged-late" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_goes_on_from_the_previous(reliability_runs):
    assert reliability_runs["status"]["damaged"] == 0
    log, run = reliability_runs["log"], reliability_runs["damaged"]
    assert "step00000006 cannot be read back" in log and "Resumed from step00000005" in log
    assert (run / "checkpoints" / "step00000006.damaged").is_dir()     # renamed, not deleted
    assert (run / "checkpoints" / "latest").read_text() == "step00000007"


def test_a_full_disk_before_or_during_a_save_leaves_the_previous_checkpoint_latest_and_intact(reliability_runs, tmp_path):
    assert reliability_runs["status"]["full-disk"] == 3
    line = _error_line(reliability_runs["log"], "step00000001 is still the newest checkpoint, intact")
    run = reliability_runs["full_disk"]
    if reliability_runs["mounted"]:   # the free-space check stops the save before it writes
        assert line.startswith("error: Checkpoint step00000002 was not written: ") and " MiB free, and a checkpoint " \
            "needs " in line and "(the size of step00000001)" in line, line
        assert not (run / "checkpoints" / "step00000002").exists()
    else:                             # the write meets the full disk
        assert "step00000002 could not be written" in line and "the disk is full" in line, line
    assert (run / "checkpoints" / "latest").read_text() == "step00000001"
    assert _export_is_finite(run, tmp_path) == "step00000001"


# --- a hang and a dead rank: two 2-process launches, each ended by its fault -----------------------------------

STEP_TIMEOUT = 10    # s: --step-timeout of these runs (a GPU run's default is 100)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie awaiting its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_fault_run(tiny_shards, work: Path, plain: bool) -> dict:
    """A 2-process run as a user starts it: under torchrun, or as two plain processes given RANK, WORLD_SIZE and the
    rendezvous (what a scheduler's own launch gives; no launcher to end the frozen rank, so its wait is not timed)."""
    run = work / "run"
    argv = ["--deepspeed_config", str(ds_config(work / "zero2.json", 2)), "--data", str(tiny_shards), *TINY_MODEL,
            *FULL_BATCH, "--output", str(run), "--epochs", "1000", "--spectral-every", "0", "--no-eval",
            "--dist-timeout", "60", "--step-timeout", str(STEP_TIMEOUT)]
    plan = [{"argv": argv, "status": str(work / "status"), "pid": str(work / "pid")}]
    if plain:
        plan_file, port = write_plan(plan, work), str(free_port())
        ranks = [([sys.executable, TRAIN_PLAN, plan_file],
                  {**ONE_THREAD, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in (0, 1)]
        procs = start_processes(ranks, work, "plain")
        logs = [work / "plain-0.log", work / "plain-1.log"]
    else:
        procs = [launch_plan(plan, 2, work, popen=True, torchrun=True, env=ONE_THREAD)]
        logs = [work / "plan-0.log"]
    return {"work": work, "run": run, "procs": procs, "logs": logs}


def _fault_when_saved(started: dict, fault: int, faulted: list[dict]) -> dict:
    """Give rank 1 `fault` (SIGSTOP: frozen; SIGKILL: dead) once a checkpoint exists; what the survivor said, its
    status (the launch's: torchrun's, or rank 0's under the plain launch) and the seconds from the fault to its end."""
    work, run, proc = started["work"], started["run"], started["procs"][0]
    pid_files = [work / f"pid-rank{r}" for r in (0, 1)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not ((run / "checkpoints" / "latest").is_file() and all(p.is_file() for p in pid_files)):
        assert proc.poll() is None and time.monotonic() < deadline, started["logs"][0].read_text()[-4000:]
        _note_ends(faulted)   # of the runs faulted before this one
        time.sleep(0.05)
    pids = [int(p.read_text()) for p in pid_files]
    kept_before = (run / "checkpoints" / "latest").read_text()
    os.kill(pids[1], fault)
    return {**started, "pids": pids, "kept_before": kept_before, "faulted": time.monotonic()}


def _wait_ends(faulted: list[dict]) -> None:
    """Until the launch (or rank 0) of each faulted run has ended, noting when (a hung one is killed at
    LAUNCH_TIMEOUT)."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while any("ended_at" not in run for run in faulted) and time.monotonic() < deadline:
        _note_ends(faulted)
        time.sleep(0.05)


def _note_ends(faulted: list[dict]) -> None:
    for run in faulted:
        if "ended_at" not in run and run["procs"][0].poll() is not None:
            run["ended_at"] = time.monotonic()


def _end_of(faulted: dict) -> dict:
    proc = faulted["procs"][0]
    ended = wait_or_kill(proc) and "ended_at" in faulted
    seconds = faulted.get("ended_at", time.monotonic()) - faulted["faulted"]
    left = [pid for pid in faulted["pids"] if _alive(pid)]
    woken = _wake(faulted["procs"][1:], left)
    for pid in left:   # the test's own clean-up, after the verdict was taken (the frozen rank of the plain launch)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for other in faulted["procs"][1:]:
        wait_or_kill(other)
    work = faulted["work"]
    status = (work / "status").read_text() if (work / "status").is_file() else None
    return {"log": "\n".join(log.read_text() for log in faulted["logs"]), "ended": ended, "seconds": seconds,
            "left": left, "status": status, "run": faulted["run"], "kept_before": faulted["kept_before"],
            "exit": proc.returncode, "woken_exit": woken}


def _wake(procs: list[subprocess.Popen], left: list[int]) -> Optional[int]:
    """SIGCONT to the frozen rank of the plain launch, as slurmd sends before it ends a step: its exit status once it
    has said what happened to it (None when nothing was frozen, or it did not end)."""
    frozen = [proc for proc in procs if proc.pid in left]
    for proc in frozen:
        os.kill(proc.pid, signal.SIGCONT)
    try:
        return frozen[0].wait(timeout=60) if frozen else None
    except subprocess.TimeoutExpired:
        return None


@slow_fixture(scope="module")
def faulted_runs(tiny_shards, tmp_path_factory):
    """Rank 1 frozen under a plain launch (rank 0's end is what is timed: a launcher's wait to kill the frozen rank
    is its own, 30 s under deepspeed and torchrun) and rank 1 killed under torchrun, both launches at once (the
    frozen one mostly waits). The seconds from the fault to the end are recorded in faults.json
    (docs/reliability.md's table)."""
    started = {"frozen": _start_fault_run(tiny_shards, tmp_path_factory.mktemp("frozen"), plain=True),
               "killed": _start_fault_run(tiny_shards, tmp_path_factory.mktemp("killed"), plain=False)}
    try:
        faulted = {"frozen": _fault_when_saved(started["frozen"], signal.SIGSTOP, [])}
        faulted["killed"] = _fault_when_saved(started["killed"], signal.SIGKILL, [faulted["frozen"]])
        _wait_ends(list(faulted.values()))
        runs = {name: _end_of(run) for name, run in faulted.items()}
    finally:   # whatever a failure left running
        for run in started.values():
            for proc in run["procs"]:
                if proc.poll() is None:
                    kill_tree(proc.pid)
                    proc.wait()
    record = {name: {k: run[k] for k in ("seconds", "exit", "status")} for name, run in runs.items()}
    (tmp_path_factory.getbasetemp() / "faults.json").write_text(json.dumps(record, indent=1))
    return runs


def _survivor_sentence(run: dict) -> str:
    lines = [line for line in run["log"].splitlines() if line.startswith("error: rank 1 on ")]
    assert len(lines) == 1, run["log"][-4000:]
    return lines[0]


def test_a_frozen_rank_ends_the_job_with_a_sentence_naming_it(faulted_runs):
    """Rank 0's heartbeat thread sees rank 1's counter stand still for --step-timeout and ends rank 0 with the
    sentence and exit status 4 (a launcher then ends the frozen rank: deepspeed and torchrun SIGTERM it and SIGKILL
    it 30 s later, srun at once: test_cluster's frozen job)."""
    run = faulted_runs["frozen"]
    assert run["ended"] and run["exit"] == 4, run["log"][-4000:]
    line = _survivor_sentence(run)
    assert line.startswith(f"error: rank 1 on {socket.gethostname()} stopped answering (its heartbeat stood still "
                           "for "), line
    kept = (run["run"] / "checkpoints" / "latest").read_text()
    assert line.endswith(f" s; --step-timeout {STEP_TIMEOUT} s), so every rank stopped; the newest checkpoint, {kept} "
                         f"in {run['run'] / 'checkpoints'}, is intact: check or replace that node, then run the same "
                         "command to resume."), line
    assert kept >= run["kept_before"]


def test_a_frozen_rank_woken_again_says_that_it_was_the_one_stopped(faulted_runs):
    """Woken after the others left (slurmd sends SIGCONT before it kills a step), the frozen rank finds its peers gone;
    it knows from its own heartbeat's clock that it was the one that did not run, and says so, not that rank 0
    stopped answering."""
    run = faulted_runs["frozen"]
    assert run["woken_exit"] == 4, run["log"][-4000:]
    lines = [line for line in run["log"].splitlines() if line.startswith("error: this process (rank 1 on ")]
    assert len(lines) == 1 and " was itself stopped for " in lines[0], run["log"][-4000:]


def test_a_killed_rank_ends_the_job_under_torchrun_with_nothing_left_running(faulted_runs):
    """The survivor's collective raises as soon as the dead peer's socket closes (or its heartbeat watcher sees the
    dead rank's counter stand still); torchrun, which sees the death too, stops the survivor with SIGTERM. Where the
    survivor spoke first, its sentence names the dead rank."""
    run = faulted_runs["killed"]
    assert run["ended"] and run["left"] == [] and run["exit"] != 0, run["log"][-4000:]
    lines = [line for line in run["log"].splitlines() if line.startswith("error: ")]
    assert all(line.startswith(f"error: rank 1 on {socket.gethostname()} stopped answering (") for line in lines), \
        run["log"][-4000:]
