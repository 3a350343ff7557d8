"""A signal to one rank mid-run: every rank saves the same step, the run exits with 75 ("saved, resubmit me"), and
the same command resumes it to the weights of the uninterrupted run (antismooth.interrupt).

The 12-step resume run of conftest.resume_reference on 2 processes (`deepspeed --num_gpus 2`, two loader workers
per rank). SIGUSR2 goes to rank 1 and every process below it (its loader workers and their forkserver), as SLURM
signals every process of a step; rank 0 hears nothing and must learn it through the combined flag.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from antismooth.interrupt import EXIT_SAVED_RESUBMIT, signal_number
from conftest import FULL_BATCH, TINY_MODEL, resume_plan
from launch import (DEEPSPEED, LAUNCH_TIMEOUT, REPO, TRAIN_PLAN, clean_env, descendants, ds_config, free_port,
                    signal_in_masks, slow_fixture, wait_or_kill, write_plan)

def rank_process(launcher: int, rank: int) -> int | None:
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"train_plan.py" in cmdline and b"forkserver" not in cmdline:
            return pid
    return None


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (found := predicate()):
            return found
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen (launch exit {proc.poll()})")


def launch(plan: list[dict], work: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    """`deepspeed --num_gpus 2 train_plan.py`, the launcher ignoring SIGUSR2 as cluster/*.sbatch make it
    (`trap "" USR2`): only the training processes act on it."""
    cmd = [*DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN_PLAN),
           str(write_plan(plan, work))]
    log = open(work / f"{name}.log", "w")
    try:
        return subprocess.Popen(cmd, cwd=REPO, env=clean_env(env), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
    finally:
        log.close()


@slow_fixture(scope="module")
def signal_runs(sample_shards, resume_reference, tmp_path_factory):
    """Two launches of the 12-step resume run: the first signalled from outside after step 3; the second, in the same
    processes one after the other, resumes it to the end, then runs a copy signalled from inside while it writes
    checkpoint step 4's optimizer shard, and resumes that copy to the end."""
    work = tmp_path_factory.mktemp("interrupt")
    config, reference = resume_reference
    run, during_save = work / "signalled", work / "during-save"
    argv = resume_plan(config, sample_shards.parent, run)[0]["argv"]
    first, second = work / "first.status", work / "second.status"
    proc = launch([{"argv": argv, "status": str(first)}], work, "first")
    log = run / "log.txt"
    wait_for(lambda: log.is_file() and "step 3/" in log.read_text(), proc, "step 3")
    rank1 = rank_process(proc.pid, 1)
    signalled = time.monotonic()
    for pid in descendants(rank1):
        os.kill(pid, signal.SIGUSR2)
    assert wait_or_kill(proc), "the signalled run hung"
    seconds = time.monotonic() - signalled
    stopped_log = log.read_text()
    latest_after_stop = (run / "checkpoints" / "latest").read_text()
    marker = (run / "resubmit").read_text()
    save_argv = resume_plan(config, sample_shards.parent, during_save)[0]["argv"]
    plan = [{"argv": argv, "status": str(second)}, {"argv": save_argv, "status": str(work / "stopped")},
            {"argv": save_argv, "status": str(work / "resumed")}]
    second_proc = launch(plan, work, "second",
                         env={"ANTISMOOTH_TEST_SIGNAL_DURING_SAVE": "during-save/checkpoints/step00000004"})
    assert wait_or_kill(second_proc), "the resumed runs hung"
    output = (work / "second.log").read_text()
    return {"interrupted": {"run": run, "reference": reference, "work": work, "first": int(first.read_text()),
                            "second": int(second.read_text()), "stopped_log": stopped_log, "seconds": seconds,
                            "latest_after_stop": latest_after_stop, "marker": marker,
                            "first_output": (work / "first.log").read_text(), "second_output": output},
            "during_save": {"run": during_save, "reference": reference, "output": output,
                            "status": {when: int((work / when).read_text()) for when in ("stopped", "resumed")}}}


@pytest.fixture(scope="module")
def interrupted_run(signal_runs):
    return signal_runs["interrupted"]


@pytest.fixture(scope="module")
def signalled_during_save(signal_runs):
    """The same 12-step run: SIGUSR2 to rank 1 while it writes checkpoint step 4's optimizer shard, then the same
    run started again to its end (in the second launch of signal_runs)."""
    return signal_runs["during_save"]


def exported(run: Path, out: Path) -> dict[str, torch.Tensor]:
    from antismooth.cli import export as export_tool

    assert export_tool.main([str(run), "--out", str(out)]) == 0
    return load_file(out)


def test_a_signal_to_one_rank_saves_on_every_rank_and_exits_with_75(interrupted_run):
    assert interrupted_run["first"] == EXIT_SAVED_RESUBMIT, interrupted_run["first_output"][-4000:]
    output = interrupted_run["first_output"]
    stopped = [line for line in output.splitlines() if "Stopped at step" in line]
    assert len(stopped) == 2, output[-4000:]   # one sentence per rank, the same step on both
    assert "on SIGUSR2" in output and "on a signal to another rank" in output
    step = int(stopped[0].split("Stopped at step ")[1].split()[0])
    assert 3 < step < 12 and all(f"Stopped at step {step} " in line for line in stopped)
    assert f"step{step:08d}" in stopped[0] and "run the same command to resume (exit code 75" in stopped[0]
    assert interrupted_run["latest_after_stop"] == f"step{step:08d}"
    assert "DataLoader worker" not in output   # the workers ignored the signal, and so did
    assert "resource_tracker: process died" not in output   # multiprocessing's resource tracker
    assert interrupted_run["marker"] == f"{step}\n"   # for the recipes under torchrun
    print(f"\nsignal to exit: {interrupted_run['seconds']:.1f} s, stopped at step {step}")


def test_the_same_command_resumes_to_the_weights_of_the_uninterrupted_run(interrupted_run, tmp_path):
    assert interrupted_run["second"] == 0, interrupted_run["second_output"][-4000:]
    assert f"Resumed from {interrupted_run['latest_after_stop']}" in (interrupted_run["run"] / "log.txt").read_text()
    resumed = exported(interrupted_run["run"], tmp_path / "resumed.safetensors")
    reference = exported(interrupted_run["reference"], tmp_path / "reference.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in resumed)


@pytest.mark.parametrize("name, number", [("SIGUSR2", signal.SIGUSR2), ("USR1", signal.SIGUSR1), ("15", signal.SIGTERM)])
def test_exit_signal_names(name, number):
    assert signal_number(name) == number


def test_an_unknown_exit_signal_is_refused_with_one_sentence():
    from antismooth.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="--exit-signal 'SIGFOO' is not a signal name: use e.g. SIGUSR2"):
        TrainConfig.from_flags(exit_signal="SIGFOO")


def test_the_deadline_is_read_one_step_boundary_late():
    from antismooth.interrupt import DEADLINE, NOTHING, StopRequests

    stop = StopRequests(exit_after_minutes=1e-9, start=time.monotonic() - 1)
    assert stop.at_step_boundary() == NOTHING   # launched here, read at the next boundary
    assert stop.at_step_boundary() == DEADLINE
    assert stop.reason(DEADLINE) == "the --exit-after deadline"


def test_a_signal_only_sets_the_flag_and_the_helpers_started_later_ignore_it():
    from antismooth.interrupt import IGNORED_SIGNALS_ENV, NOTHING, SIGNAL, StopRequests

    before = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopRequests(exit_signal="SIGUSR1")
        stop.install()
        assert os.environ[IGNORED_SIGNALS_ENV] == f"{int(signal.SIGUSR1)},{int(signal.SIGTERM)}"
        os.kill(os.getpid(), signal.SIGUSR1)   # the process lives on: the handler only set the flag
        assert stop.at_step_boundary() == NOTHING
        assert stop.at_step_boundary() == SIGNAL and stop.reason(SIGNAL) == "SIGUSR1"
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
        os.environ.pop(IGNORED_SIGNALS_ENV, None)


def test_a_signal_during_a_save_is_handled_at_the_next_step_boundary(signalled_during_save, tmp_path):
    """The save of step 4 finishes; the flag is combined at that boundary and read at the next, so every rank
    stops at step 5; the same command ends with the uninterrupted run's weights."""
    runs = signalled_during_save
    assert runs["status"] == {"stopped": EXIT_SAVED_RESUBMIT, "resumed": 0}, runs["output"][-6000:]
    assert runs["output"].count("Stopped at step 5 ") == 2 and "on SIGUSR2, after saving checkpoint step00000005" in runs["output"]
    log = (runs["run"] / "log.txt").read_text()
    assert "saved checkpoint step00000004" in log and "Resumed from step00000005" in log
    resumed = exported(runs["run"], tmp_path / "resumed.safetensors")
    reference = exported(runs["reference"], tmp_path / "reference.safetensors")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_a_signal_while_the_run_starts_exits_75_before_any_step_and_after_one_saves(tiny_shards, tmp_path):
    """SLURM may signal a job that is still importing torch (preemption, a short --signal lead): pretrain.py notes
    SIGUSR2 from its first lines, so the run exits 75 (which the recipes requeue) before any step, with nothing to
    save, instead of dying by the signal and not requeued. Once past the rendezvous (the same command again,
    signalled as its engine is built, before the training loop has taken the signals over) a signal is kept for the
    first step boundaries, which save."""
    run = tmp_path / "run"
    argv = [sys.executable, str(REPO / "pretrain.py"), "--deepspeed_config", str(ds_config(tmp_path / "zero2.json", 2)),
            "--data", str(tiny_shards), *TINY_MODEL, *FULL_BATCH, "--output", str(run), "--no-eval",
            "--spectral-every", "0"]
    proc = subprocess.Popen(argv, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for(lambda: signal_in_masks(proc.pid, signal.SIGUSR2, "SigCgt"), proc, "pretrain.py's start-up handler")
    assert not run.exists(), "the signal was meant for a run still starting"
    os.kill(proc.pid, signal.SIGUSR2)
    output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == EXIT_SAVED_RESUBMIT, output[-4000:]
    assert ("Stopped on SIGUSR2 on rank 0 while the run was starting, before any step; there is no checkpoint yet: run "
            "the same command to resume (exit code 75: saved, resubmit me).") in output, output[-4000:]
    assert not (run / "checkpoints").exists() and (run / "resubmit").is_file() and not (run / "run.lock").exists()

    proc = subprocess.Popen(argv, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for(lambda: (run / "log.txt").is_file() and "planned peak" in (run / "log.txt").read_text(), proc,
             "the engine's build")
    os.kill(proc.pid, signal.SIGUSR2)
    output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == EXIT_SAVED_RESUBMIT, output[-4000:]
    stopped = re.search(r"Stopped at step (\d+) on SIGUSR2, after saving checkpoint (step\d+)", output)
    assert stopped and int(stopped[1]) <= 2, output[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == stopped[2]


@pytest.mark.slow
def test_a_rank_waiting_for_the_others_at_start_up_ends_at_once_on_a_signal(tiny_shards, tmp_path):
    """Rank 1 of 2 waits in the rendezvous for a rank 0 that never answers (a listener that accepts and stays silent,
    as a program holding the port does: rank 0 refused to start). torch's store client blocks there, where no Python
    signal handler runs; the SIGTERM a launcher then sends ends it at once with 75 and one sentence, not at the
    launcher's SIGKILL 30 s later (which was the case while pretrain.py's start-up notes held the signal)."""
    run = tmp_path / "run"
    argv = [sys.executable, str(REPO / "pretrain.py"), "--deepspeed_config", str(ds_config(tmp_path / "zero2.json", 2)),
            "--data", str(tiny_shards), *TINY_MODEL, *FULL_BATCH, "--output", str(run)]
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(LAUNCH_TIMEOUT)
        env = dict(clean_env(), RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(silent.getsockname()[1]))
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            connection, _ = silent.accept()   # rank 1 is inside torch's store client
        except TimeoutError:
            proc.kill()
            pytest.fail(f"rank 1 never reached the rendezvous:\n{proc.communicate()[0][-4000:]}")
        with connection:
            os.kill(proc.pid, signal.SIGTERM)
            sent = time.monotonic()
            try:
                output, _ = proc.communicate(timeout=20)   # a hang guard: without the fix it waits for a SIGKILL
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"rank 1 ignored SIGTERM in the rendezvous:\n{proc.communicate()[0][-4000:]}")
    assert proc.returncode == EXIT_SAVED_RESUBMIT, output[-4000:]
    assert ("Stopped on SIGTERM on rank 1 while the run was starting, before any step; there is no checkpoint yet: "
            "run the same command to resume (exit code 75: saved, resubmit me).") in output
    assert "Traceback" not in output
    print(f"\nrank 1 in the rendezvous: exit 75 {time.monotonic() - sent:.1f} s after SIGTERM")


def test_a_signal_during_an_evaluation_is_handled_at_the_next_step_boundary(zero_runs):
    """SIGUSR2 to rank 1 as the evaluation at the end of epoch 2 starts (one step an epoch): the evaluation completes,
    every rank stops at a step boundary after it with a checkpoint (exit 75), and the same command resumes to the
    weights of the uninterrupted run beside it, bit for bit."""
    signalled, reference = zero_runs["zero2-eval-signalled", 2], zero_runs[2, 2]
    status = signalled.output.parent / "zero2-eval-signalled-first-part.status"
    assert int(status.read_text()) == EXIT_SAVED_RESUBMIT, signalled.log[-6000:]
    log = (signalled.output / "log.txt").read_text()
    assert "eval epoch 2: top-1" in log, log[-4000:]
    stopped = re.search(r"Stopped at step (\d+) on SIGUSR2, after saving checkpoint", signalled.log)
    assert stopped and 3 <= int(stopped[1]) <= 4, signalled.log[-6000:]
    assert f"Resumed from step{int(stopped[1]):08d}" in log
    assert torch.equal(torch.load(signalled.probe), torch.load(reference.probe))
