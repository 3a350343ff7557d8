"""One training per --output (run.lock, antismooth.checkpoint.lock) and the rendezvous port in use, with real
processes and a real bound socket: a second training into a live run's folder is refused with the sentence naming
the holder; a lock left by a killed training (a dead pid on this host), by a host that stopped refreshing it, or by
an earlier start of the same requeued SLURM job is taken over with a log line."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FULL_BATCH, TINY_MODEL
from launch import REPO, clean_env, ds_config, kill_tree
from antismooth import startup
from antismooth.checkpoint import lock as run_lock
from antismooth.checkpoint.lock import LOCK_FILE, LockHolder, RunLock
from antismooth.config import ConfigError
from antismooth.distributed import PortInUse, init_distributed, usable_cpus

START_TIMEOUT = 300   # s for a training process to reach its lock on this shared 2-core machine


def _argv(config: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--deepspeed_config", str(config), "--data", str(data), "--output", str(out), *TINY_MODEL, *FULL_BATCH,
            *extra]


def _pretrain(argv: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "pretrain.py", *argv], cwd=REPO, env=clean_env(env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kwargs)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the first training exited ({proc.returncode}) before taking its lock:\n"
                        f"{proc.stdout.read()[-3000:]}\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
            pytest.fail(f"the first training took no lock in {START_TIMEOUT} s")
        time.sleep(0.2)


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not (path.is_file() and text in path.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.2)


def test_a_second_training_into_a_live_run_is_refused_and_a_killed_runs_lock_is_taken_over(tiny_shards, tmp_path):
    """Also: the live run said once that its data have no val.json and that its --workers were capped."""
    config = ds_config(tmp_path / "zero1.json", 1)
    out = tmp_path / "run"
    data = tmp_path / "no-val"   # the first run also shows what it says once of data without val.json and of
    data.mkdir()                 # more --workers than CPUs
    for path in tiny_shards.glob("train*"):
        (data / path.name).symlink_to(path)
    argv = _argv(config, data, out, "--epochs", "100000")
    del argv[argv.index("--workers"):argv.index("--workers") + 2]   # --workers left out: the default, capped
    first = _pretrain(argv)
    try:
        _wait_for(out / LOCK_FILE, first)
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

        second = subprocess.run([sys.executable, "pretrain.py", *_argv(config, tiny_shards, out)], cwd=REPO,
                                env=clean_env(), capture_output=True, text=True, timeout=START_TIMEOUT)
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip()
        assert err.startswith(f"error: --output {out} is in use by another training (pid {first.pid} on "
                              f"{socket.gethostname()}, since {holder['started']}"), err
        assert "\n" not in err and "Traceback" not in second.stderr
        assert first.poll() is None   # the first run goes on
        _wait_for_text(out / "log.txt", "step 1/", first)
    finally:
        kill_tree(first.pid)          # SIGKILL: the one exit that leaves the lock behind
        first_out, first_err = first.communicate()
    assert (out / LOCK_FILE).exists()
    logged = (out / "log.txt").read_text()
    assert logged.count(f"no validation split: {data} has no val.json") == 1, logged[-3000:]
    capped = f"--workers 8 (the default) is more than the {usable_cpus()} CPU(s)"
    assert logged.count(capped) == (usable_cpus() < 8)
    assert "worker processes in total" not in first_out + first_err   # torch's DataLoader warning

    lock, refusal = startup.take_run_lock(startup.parse_config(_argv(config, tiny_shards, out)), rank=0)
    assert refusal is None and lock.holds()
    assert lock.taken_over.endswith(f"its holder, pid {first.pid} on this host, is dead."), lock.taken_over
    lock.release()
    assert not (out / LOCK_FILE).exists()


def _write_lock(folder: Path, holder: LockHolder, age: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps(holder.__dict__))
    then = time.time() - age
    os.utime(folder / LOCK_FILE, (then, then))


ELSEWHERE = LockHolder(host="node-elsewhere", pid=4242, started="2026-12-06T18:00:00+00:00", job=None, restart=0,
                       token="theirs")


def test_a_lock_from_another_host_is_live_while_refreshed_and_taken_over_once_its_lease_expired(tmp_path):
    _write_lock(tmp_path, ELSEWHERE, age=5)
    with pytest.raises(ConfigError, match="is in use by another training \\(pid 4242 on node-elsewhere, since "
                                          "2026-12-06T18:00:00\\+00:00\\)"):
        RunLock.take(tmp_path)
    _write_lock(tmp_path, ELSEWHERE, age=run_lock.LEASE_EXPIRY + 5)
    lock = RunLock.take(tmp_path)
    try:
        assert lock.holds() and "held by pid 4242 on node-elsewhere, since" in lock.taken_over
        assert ": not refreshed for 12" in lock.taken_over
    finally:
        lock.release()


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_start(tmp_path, monkeypatch):
    """SLURM requeues a job under its id (SLURM_RESTART_COUNT + 1) once the old allocation's processes are
    killed: the new start must not wait for the old lock's lease, whichever node it ran on."""
    earlier = LockHolder(host="node-elsewhere", pid=4242, started="2026-12-06T18:00:00+00:00", job="777", restart=0,
                         token="earlier")
    _write_lock(tmp_path, earlier, age=1)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock.take(tmp_path)
    try:
        assert "SLURM job 777 was requeued" in lock.taken_over
        assert json.loads((tmp_path / LOCK_FILE).read_text())["restart"] == 1
    finally:
        lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "778")   # another job while 777 runs: refused
    _write_lock(tmp_path, earlier, age=1)
    with pytest.raises(ConfigError, match="SLURM job 777, since"):
        RunLock.take(tmp_path)


def test_workers_restarted_by_torchrun_take_over_the_lock_of_their_earlier_generation(tmp_path, monkeypatch):
    """An elastic restart may put rank 0 on another node: the old rank 0's lock must not wait for its lease."""
    earlier = LockHolder(host="node-elsewhere", pid=4242, started="2026-12-06T18:00:00+00:00", token="earlier",
                         elastic="as24", elastic_restart=0)
    _write_lock(tmp_path, earlier, age=1)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "as24")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(ConfigError, match="in use by another training"):
        RunLock.take(tmp_path)   # the same generation on another node: live
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    lock = RunLock.take(tmp_path)
    lock.release()
    assert "torchrun restarted the workers of run as24" in lock.taken_over


def test_the_holder_refreshes_its_lease_and_a_refused_start_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "LEASE_REFRESH", 0.05)
    lock = RunLock.take(tmp_path / "new")
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    deadline = time.monotonic() + 30
    while lock.path.stat().st_mtime < old + 500 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.path.stat().st_mtime > old + 500   # refreshed by the lease thread
    lock.remove_folder_if_unused()                   # what run() does when start-up refuses after the lock
    assert not (tmp_path / "new").exists()


# --- the rendezvous port ---------------------------------------------------------------------------------------

@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_the_rendezvous_port_in_use_is_one_sentence_before_the_launch(taken_port, tiny_shards, tmp_path, monkeypatch,
                                                                      capsys):
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(taken_port)}.items():
        monkeypatch.setenv(key, value)   # rank 0 as DeepSpeed's launcher starts it
    out = tmp_path / "run"
    code = startup.main(_argv(ds_config(tmp_path / "z.json", 1), tiny_shards, out))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"error: The rendezvous port {taken_port} (MASTER_PORT) on ") and \
        "deepspeed --master_port " in err
    assert not out.exists()


def test_torchs_own_port_in_use_error_becomes_the_sentence(taken_port, monkeypatch):
    """The check before the launch can lose a race: torch's DistNetworkError (EADDRINUSE) says the same."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "TORCHELASTIC_RUN_ID": "x", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(taken_port)}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(PortInUse, match=f"The rendezvous port {taken_port} .* torchrun --master-port "):
        init_distributed(use_deepspeed=False, device_type="cpu", timeout=20)


def test_the_deepspeed_launcher_with_its_port_taken_ends_in_the_sentence(taken_port, tiny_shards, tmp_path):
    """Rank 0 stops with the sentence; rank 1, waiting in the rendezvous, ends at the launcher's SIGTERM with 75
    (test_interrupt's test_a_rank_waiting_for_the_others_…), so the launch ends in seconds."""
    config = ds_config(tmp_path / "z.json", 1)
    out = tmp_path / "run"
    done = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                           str(taken_port), "pretrain.py", *_argv(config, tiny_shards, out)], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=START_TIMEOUT)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines and f"The rendezvous port {taken_port} (MASTER_PORT)" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not out.exists()

