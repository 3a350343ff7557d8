"""Elastic runs: a checkpoint saved by N processes resumes on M, with its optimizer state, schedule, global batch
and data position (real DeepSpeed engines, real launchers, CPU and gloo).

Three launches serve every test here (a DeepSpeed launch costs ~20-40 s on the CI machine):
  A: two torchrun "nodes" of one process each: every chain's first part, then node 1 is gone;
  B: node 0 alone (`torchrun --nnodes 1 --nproc_per_node 1`, the README's command): each chain goes on at world 1;
  C: two "nodes" again, by DeepSpeed's hostfile launcher once per node (`--hostfile H --no_ssh --node_rank N`):
     each chain goes on at world 2 and finishes; it also trains conftest's full-batch ZeRO-2 run from scratch,
     which must equal the 2-process run of one launcher.
The chains: ZeRO-1, 2 and 3 (fp32) and ZeRO-3 bf16 on conftest's full-batch runs (every step sees all 16 images,
so the losses of an uninterrupted run at any world size are the reference), and conftest's resume run (103 images,
full DeiT augmentation, repeated augmentation, 6 steps per epoch) changing size mid-epoch, batches recorded; a
last chain changes only --workers.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from antismooth import startup
from antismooth.cli import reshard as reshard_tool
from antismooth.checkpoint import RunFolder, convert_to_universal
from conftest import BF16, EMA_RUNS, FULL_BATCH, TINY_MODEL, WITH_EMA, resume_plan
from launch import (DEEPSPEED, ONE_THREAD, REPO, TRAIN_PLAN, clean_env, ds_config, free_port, launch_plan,
                    slow_fixture, start_processes, torchrun_nodes, wait_processes, write_plan)
from test_ema import export
from test_train import scalars

# (name, ZeRO stage, extra JSON, --epochs, the zero_runs reference key, the steps after launch A and after B)
CHAINS = [("zero1", 1, {}, 6, (1, 2), 2, 4), ("zero2", 2, {}, 6, (2, 2), 2, 4), ("zero3", 3, {}, 6, (3, 2), 2, 4),
          ("zero3-bf16", 3, BF16, 3, ("zero3-bf16", 2), 1, 2)]
DATA_STEPS = (3, 8)          # the resume run: world 2 to step 3 (mid epoch 0), world 1 to step 8 (mid epoch 1), world 2
WORKERS_STEPS = 3            # the workers chain: 2 workers to step 3, then 3 workers


def _deepspeed_nodes(hostfile: Path, plan: Path) -> list[tuple[list, dict]]:
    """DeepSpeed's launcher run once per node, without ssh: `--hostfile H --no_ssh --node_rank N`."""
    port = str(free_port())
    return [([*DEEPSPEED, "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node),
              "--master_addr", "127.0.0.1", "--master_port", port, TRAIN_PLAN, plan], ONE_THREAD) for node in (0, 1)]


@slow_fixture(scope="module")
def elastic(tiny_shards, sample_shards, resume_reference, tmp_path_factory):
    work = tmp_path_factory.mktemp("elastic")
    data_config, _ = resume_reference
    plans: dict[str, list[dict]] = {"A": [], "B": [], "C": []}
    chains = {}
    for name, stage, extra, epochs, _, first, second in CHAINS:
        out = chains[name] = work / name
        argv = ["--deepspeed_config", str(ds_config(work / f"{name}.json", stage, **extra)), "--data", str(tiny_shards),
                "--output", str(out), *TINY_MODEL, *FULL_BATCH, *WITH_EMA, "--epochs", str(epochs),
                "--save-every", "4", "--no-eval", "--spectral-every", "0"]
        plans["A"].append({"argv": [*argv, "--max-steps", str(first)], "state_at_end": str(out / "A-end.pt")})
        plans["B"].append({"argv": [*argv, "--max-steps", str(second)], "state_after_load": str(out / "B-load.pt"),
                           "state_at_end": str(out / "B-end.pt")})
        plans["C"].append({"argv": argv, "state_after_load": str(out / "C-load.pt"), "probe": str(out / "probe.pt")})
    data = chains["data"] = work / "data"
    [entry] = resume_plan(data_config, sample_shards.parent, data)
    for part, steps in zip("ABC", (*DATA_STEPS, None), strict=True):
        limit = ["--max-steps", str(steps)] if steps else []
        plans[part].append({"argv": [*entry["argv"], *limit], "record": str(data / f"{part}.json")})
    workers = chains["workers"] = work / "workers"
    [entry] = resume_plan(data_config, sample_shards.parent, workers)
    plans["A"].append({"argv": [*entry["argv"], "--max-steps", str(WORKERS_STEPS)], "record": str(workers / "A.json")})
    plans["C"].append({"argv": [*entry["argv"], "--workers", "3", "--max-steps", "6"],   # to the end of epoch 0
                       "record": str(workers / "C.json")})

    full = chains["full"] = work / "full-batch"
    plans["C"].append({"argv": ["--deepspeed_config", str(ds_config(work / "full.json", 2)), "--data", str(tiny_shards),
                                "--output", str(full), *TINY_MODEL, *FULL_BATCH, "--save-every", "4"],
                       "probe": str(full / "probe.pt")})
    hostfile = work / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # one line per node, unique names

    logs = {"A": wait_processes(start_processes(torchrun_nodes(write_plan(plans["A"], work)), work, "A"), work, "A")}
    logs["B"] = launch_plan(plans["B"], 1, work, env=ONE_THREAD, torchrun=True)   # node 1 is gone
    node_logs = wait_processes(start_processes(_deepspeed_nodes(hostfile, write_plan(plans["C"], work)), work, "C"),
                               work, "C")
    logs["C"] = node_logs[0]   # rank 0's
    return {"work": work, "chains": chains, "logs": logs}


# --- optimizer state, schedule, global batch ---------------------------------------------------------------

@pytest.mark.parametrize("chain", [c[0] for c in CHAINS])
def test_the_optimizer_state_is_the_saved_one_after_each_change_of_world_size(elastic, chain):
    out = elastic["chains"][chain]
    for saved, loaded in (("A-end.pt", "B-load.pt"), ("B-end.pt", "C-load.pt")):   # 2 → 1, then 1 → 2
        before, after = torch.load(out / saved), torch.load(out / loaded)
        assert before.keys() == after.keys()
        for name in before:
            for what, a, b in zip(("weights", "exp_avg", "exp_avg_sq"), before[name], after[name], strict=True):
                assert torch.equal(a, b), f"{chain} {saved} → {loaded}: {name} {what} differs"
        assert any(m.abs().sum() > 0 for _, m, _ in before.values())   # real moments, not a fresh optimizer


@pytest.mark.parametrize("chain,stage,extra,epochs,reference,first,second", CHAINS)
def test_the_run_continues_as_the_uninterrupted_run_with_its_batch_and_schedule(elastic, zero_runs, chain, stage,
                                                                                 extra, epochs, reference, first,
                                                                                 second):
    out, logs = elastic["chains"][chain], elastic["logs"]
    uninterrupted = zero_runs[reference].output
    bf16 = bool(extra)
    assert scalars(out, "train/lr") == pytest.approx(scalars(uninterrupted, "train/lr"), rel=1e-6)
    assert scalars(out, "train/loss") == pytest.approx(scalars(uninterrupted, "train/loss"), rel=1e-2 if bf16 else 1e-5)
    torch.testing.assert_close(torch.load(out / "probe.pt"), torch.load(zero_runs[reference].probe),
                               rtol=5e-2 if bf16 else 1e-3, atol=5e-2 if bf16 else 1e-3)
    assert f"Resumed from step{first:08d}: epoch {first}, step {first}" in logs["B"]
    assert f"step{first:08d}_universal (converted in" in logs["B"] and "saved by 2 processes, loaded on 1" in logs["B"]
    assert f"Resumed from step{second:08d}" in logs["C"] and "saved by 1 process, loaded on 2" in logs["C"]
    assert "global batch 16 = 8 per process × 2 accumulation × 1 process;" in logs["B"]
    if reference in EMA_RUNS:   # the model EMA, cut and joined again at each change of world size
        averages = [export(run, out.parent / f"{chain}-{i}.safetensors", "--ema", "--overwrite")
                    for i, run in enumerate((out, uninterrupted))]
        for name in averages[1]:
            torch.testing.assert_close(averages[0][name], averages[1][name], rtol=0, atol=1e-5)
    folder = RunFolder(out)
    assert folder.latest_tag() == f"step{epochs:08d}"
    left = sorted(p.name for p in folder.checkpoints.iterdir())
    assert not [name for name in left if "universal" in name], left   # conversions pruned once superseded


# --- the data position ------------------------------------------------------------------------------------

def _records(folder: Path, part: str, world: int) -> list[list[dict]]:
    return [json.loads((folder / f"{part}-rank{r}.json").read_text()) for r in range(world)]


def _epoch_labels(records: list[list[dict]], epoch: int) -> collections.Counter:
    return collections.Counter(y for rank in records for batch in rank if batch["epoch"] == epoch for y in batch["labels"])


def _steps_per_rank(records: list[list[dict]], epoch: int) -> set[int]:
    return {sum(1 for batch in rank if batch["epoch"] == epoch) for rank in records}


def test_an_epoch_that_changes_world_size_uses_every_sample_exactly_once(elastic, resume_reference):
    """The sample shards hold one image per class, so a label names its image. Epoch 0 runs 3 steps on 2 processes
    and 3 on 1 (2 micro-batches per step); epoch 1 runs 2 on 1 and 4 on 2. Repeated augmentation (3 copies)
    and a global batch of 16: an epoch is 96 samples, 32 images 3 times each, the uninterrupted run's images."""
    data = elastic["chains"]["data"]
    a, b, c = _records(data, "A", 2), _records(data, "B", 1), _records(data, "C", 2)
    reference = _records(resume_reference[1], "record", 2)
    for epoch, parts in ((0, (a, b)), (1, (b, c))):
        seen = sum((_epoch_labels(part, epoch) for part in parts), collections.Counter())
        assert sum(seen.values()) == 96 and set(seen.values()) == {3}, (epoch, seen)
        assert seen == _epoch_labels(reference, epoch)
    assert _steps_per_rank(a, 0) == {3} and _steps_per_rank(c, 1) == {4}        # equal steps on every rank
    assert _steps_per_rank(b, 0) == {6} and _steps_per_rank(b, 1) == {4}        # 3 and 2 steps of 2 micro-batches
    assert "now the rest of its samples to 1 × 2" in elastic["logs"]["B"]


def test_changing_only_the_loader_workers_keeps_exactly_once(elastic, resume_reference):
    folder = elastic["chains"]["workers"]
    a, c = _records(folder, "A", 2), _records(folder, "C", 2)
    seen = _epoch_labels(a, 0) + _epoch_labels(c, 0)
    assert sum(seen.values()) == 96 and set(seen.values()) == {3}
    assert seen == _epoch_labels(_records(resume_reference[1], "record", 2), 0)
    assert _steps_per_rank(c, 0) == {3}
    assert "dealt to 2 × 2 loader workers, now the rest of its samples to 2 × 3" in elastic["logs"]["C"]


# --- DeepSpeed's hostfile launcher on two nodes ------------------------------------------------------------------

def test_two_deepspeed_nodes_train_as_the_two_process_run(elastic, zero_runs):
    log = elastic["logs"]["C"]
    assert "2 processes on 2 nodes (deepspeed launch, gloo backend)" in log
    assert "node 1 (" in log and "ranks 1 on cpu" in log
    full, two_processes = elastic["chains"]["full"], zero_runs[2, 2].output
    assert scalars(full, "train/loss") == pytest.approx(scalars(two_processes, "train/loss"), rel=1e-4)
    torch.testing.assert_close(torch.load(full / "probe.pt"), torch.load(zero_runs[2, 2].probe), rtol=1e-3, atol=1e-4)
    assert RunFolder(full).latest_tag() == "step00000006"


def test_a_two_node_run_exports(elastic, tmp_path, capsys):
    from antismooth.cli import export as export_tool
    from antismooth.export import create_model_from_weights
    from jobs.train_plan import probe_images

    out = tmp_path / "two-nodes.safetensors"
    assert export_tool.main([str(elastic["chains"]["full"]), "--out", str(out)]) == 0, capsys.readouterr().err
    model, _ = create_model_from_weights(out)
    with torch.no_grad():
        logits = model.eval()(probe_images(model.patch_embed.img_size[0]))
    torch.testing.assert_close(logits, torch.load(elastic["chains"]["full"] / "probe.pt"), rtol=0, atol=1e-5)


# --- the conversion ---------------------------------------------------------------------------------------

def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_conversion_killed_midway_leaves_the_checkpoint_usable_and_runs_again(zero_runs, tmp_path, capsys):
    import shutil
    run = Path(shutil.copytree(zero_runs[3, 2].output, tmp_path / "run"))
    tag = RunFolder(run).latest_tag()
    checkpoint = run / "checkpoints" / tag
    before = _files(checkpoint)
    partial = run / "checkpoints" / f"{tag}_universal.partial"
    cmd = [sys.executable, str(REPO / "tools" / "reshard.py"), str(run), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (partial / "zero").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial.is_dir(), "the conversion finished before it could be killed"
    assert not (run / "checkpoints" / f"{tag}_universal").exists()
    assert _files(checkpoint) == before and RunFolder(run).damaged_files(tag, 0) == []
    assert RunFolder(run).latest_tag() == tag

    again = convert_to_universal(run / "checkpoints", tag)   # what the tool or pretrain.py's rank 0 runs
    assert not again.reused and again.folder == run / "checkpoints" / f"{tag}_universal"
    assert not partial.exists() and (again.folder / "zero").is_dir()
    assert not (run / "checkpoints" / "latest_universal").exists()
    assert reshard_tool.main([str(run)]) == 0
    assert f"{tag} (saved by 2 processes) was already converted" in capsys.readouterr().out
    assert reshard_tool.main([str(tmp_path / "no-run")]) == 2
    assert "does not exist: give the --output folder of a pretrain.py run" in capsys.readouterr().err


def test_a_world_size_that_cannot_hold_the_global_batch_stops_with_the_sizes_that_can(zero_runs, tiny_shards,
                                                                                      tmp_path, monkeypatch, capsys):
    """A 2-process run with a global batch of 16 (8 per process) restarted on 3 processes."""
    import shutil
    run = Path(shutil.copytree(zero_runs[2, 2].output, tmp_path / "run"))
    before = _files(run)
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    config = json.loads((run / "run.json").read_text())["flags"]
    code = startup.main(["--deepspeed_config", config["deepspeed_config"], "--data", str(tiny_shards), *TINY_MODEL,
                         "--output", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("error: 3 processes × 8 per process (train_micro_batch_size_per_gpu) cannot make "
                                 "the global batch of 16 this run was trained with: resume on 1 or 2 processes."), err
    assert _files(run) == before
