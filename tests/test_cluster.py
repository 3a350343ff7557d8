"""Every recipe of cluster/ on a real cluster: the harness's nodes (tests/cluster/), real SLURM, ssh and pdsh.

Each recipe is submitted with `sbatch --nodes 2 --wait` as a user of a CPU cluster would submit it: its GPU
requests overridden on the command line (`--gpus-per-node=0`, one CPU per task, one process per node), its run
settings from the environment variables cluster/common.sh reads. Each trains a 4-step full-batch run (the tiny
model and flags of tests/conftest.py's zero_runs) with ZeRO-2 on two processes, one per node, and its export must
equal, bit for bit, the export of the same run started by `deepspeed --num_gpus 2` on one host.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


@slow_fixture(scope="session")
def cluster_runs(cluster, tiny_shards, tmp_path_factory) -> dict:
    """{recipe: (Job, run folder)} for each sbatch recipe of cluster/."""
    work = tmp_path_factory.mktemp("cluster-runs")
    # Submitted together: the nodes hold all three at once (OverSubscribe), and their start-ups overlap.
    submitted = {recipe: cluster.submit(f"cluster/{recipe}.sbatch", *options, env=recipe_env(work, tiny_shards, recipe))
                 for recipe, options in RECIPES.items()}
    return {recipe: (submission.wait(), work / recipe) for recipe, submission in submitted.items()}


def exported(run: Path, out: Path) -> dict[str, torch.Tensor]:
    assert export_tool.main([str(run), "--out", str(out)]) == 0
    return load_file(out)


def train_args(work: Path, shards: Path, run: str) -> list[str]:
    """pretrain.py's flags as cluster/common.sh composes them from recipe_env."""
    env = recipe_env(work, shards, run)
    return ["--deepspeed_config", str(env["DS_CONFIG"]), "--model", MODEL, "--data", str(shards), "--output",
            str(env["RUN"]), *EXTRA_ARGS]


@slow_fixture(scope="session")
def reference_weights(tiny_shards, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The export of the same run by `deepspeed --num_gpus 2` on one host."""
    work = tmp_path_factory.mktemp("cluster-reference")
    cmd = [VENV_BIN / "deepspeed", "--num_gpus", "2", "--master_port", free_port(), "pretrain.py",
           *train_args(work, tiny_shards, "one-host")]
    wait_processes(start_processes([(cmd, ONE_THREAD)], work, "deepspeed"), work, "deepspeed")
    return exported(work / "one-host", work / "weights.safetensors")


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_across_two_nodes_as_on_one_host(cluster_runs, reference_weights, recipe, tmp_path):
    job, run = cluster_runs[recipe]
    assert job.returncode == 0, f"{recipe} failed under sbatch:\n{job.output[-6000:]}"
    weights = exported(run, tmp_path / "weights.safetensors")
    assert weights.keys() == reference_weights.keys()
    different = [k for k in weights if not torch.equal(weights[k], reference_weights[k])]
    assert not different, f"{recipe}: {len(different)} tensors differ from the one-host run, e.g. {different[:3]}"
    log = (run / "log.txt").read_text()
    assert "2 processes on 2 nodes" in log and "node 1 (n2)" in log
