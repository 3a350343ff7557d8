"""Shared pytest fixtures, one section per concern."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# ----------------------------------------------------------------------------------------------
# Data fixtures: the real ImageNet sample images and ImageFolder trees built from them.
# (Used by tests/test_shards.py; keep fixtures for other concerns in their own section.)

IMAGENET_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """The 103 real ImageNet JPEGs (train/<wnid>/<file>.JPEG) next to the repo, never copied into it."""
    if not (IMAGENET_SAMPLE / "train").is_dir():
        pytest.fail(f"the ImageNet sample images are missing: expected them at {IMAGENET_SAMPLE} "
                    "(../shared/data/imagenet-sample from the repo root).")
    return IMAGENET_SAMPLE


@pytest.fixture
def imagefolder(imagenet_sample: Path, tmp_path: Path) -> Path:
    """A fresh ImageFolder root in tmp: train/ holds all 103 images, val/ the same 103 class folders
    with every fourth one holding its image and the rest empty (torchvision still counts them)."""
    root = tmp_path / "imagenet"
    shutil.copytree(imagenet_sample / "train", root / "train")
    for i, class_dir in enumerate(sorted((root / "train").iterdir())):
        val_dir = root / "val" / class_dir.name
        val_dir.mkdir(parents=True)
        if i % 4 == 0:
            for image in class_dir.iterdir():
                shutil.copyfile(image, val_dir / image.name)
    return root


# ----------------------------------------------------------------------------------------------
# Stream fixtures: shards of the sample images, built once per session with the real builder.

@pytest.fixture(scope="session")
def sample_shards(imagenet_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.json and 11 shards of 10 (the last of 3) real JPEGs: 103 images, one per class, so a label
    names its image; 11 shards divide neither by 2 ranks × 2 workers nor by anything else."""
    from antismooth.data.shards import ShardOptions, build

    out = tmp_path_factory.mktemp("sample-shards")
    build(str(imagenet_sample), str(out), ShardOptions(max_count=10), splits=("train",))
    return out / "train.json"


# ----------------------------------------------------------------------------------------------
# Training fixtures: real pretrain.py runs in real DeepSpeed processes (CPU, gloo), shared by the
# training and export tests. A DeepSpeed launch costs ~20-40 s here, so each launch runs a plan
# of several runs in the same processes (tests/jobs/train_plan.py).

import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TRAIN_PLAN = REPO / "tests" / "jobs" / "train_plan.py"
# A 24-block AttnScale ViT small enough for CPU tests: 32 px, patch 8 (16 tokens), width 64.
TINY_MODEL = ["--model", "attnscale_tiny_24", "--model-kwargs", "patch_size=8", "embed_dim=64", "num_heads=4",
              "--input-size", "32"]
# Every step sees the whole 16-image set, unaugmented: runs at any world size see the same data.
FULL_BATCH = ["--no-aug", "--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--repeated-aug", "1",
              "--drop-path", "0", "--epochs", "6", "--warmup-epochs", "0", "--lr", "0.05", "--min-lr", "1e-4",
              "--workers", "2", "--log-every", "1", "--spectral-every", "3"]
FULL_BATCH_SIZE = 16


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


def launch_plan(plan: list[dict], world: int, workdir: Path, env: dict | None = None, check: bool = True,
                popen: bool = False, torchrun: bool = False):
    """Run a plan with `deepspeed --num_gpus world` (world > 1), `torchrun`, or plain python (world 1)."""
    plan_file = workdir / f"plan-{len(list(workdir.glob('plan-*.json')))}.json"
    plan_file.write_text(json.dumps(plan))
    if torchrun:
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(free_port()),
               str(TRAIN_PLAN), str(plan_file)]
    elif world == 1:
        cmd = [sys.executable, str(TRAIN_PLAN), str(plan_file)]
    else:
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()),
               str(TRAIN_PLAN), str(plan_file)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    log_file = open(workdir / f"{plan_file.stem}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    if popen:
        return proc
    proc.wait(timeout=900)
    log_file.close()
    output = (workdir / f"{plan_file.stem}.log").read_text()
    if check and proc.returncode != 0:
        pytest.fail(f"training plan failed (exit {proc.returncode}):\n{output[-6000:]}")
    return output


@pytest.fixture(scope="session")
def tiny_shards(imagenet_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/val shards of 16 real JPEGs of 16 classes (val = the same images), shards of 5."""
    from antismooth.data.shards import ShardOptions, build

    root = tmp_path_factory.mktemp("tiny-imagefolder")
    for split in ("train", "val"):
        for class_dir in sorted((imagenet_sample / "train").iterdir())[:FULL_BATCH_SIZE]:
            shutil.copytree(class_dir, root / split / class_dir.name)
    out = tmp_path_factory.mktemp("tiny-shards")
    build(str(root), str(out), ShardOptions(max_count=5))
    return out


@dataclass(frozen=True)
class TrainedRun:
    output: Path          # the run folder (--output)
    probe: Path           # the live engine's fp32 logits on tests/jobs/train_plan.py's probe_images(img_size)
    log: str              # the launch's console output


# The runs of each launch besides fp32 ZeRO-1/2/3, for the export tests: (key name, ZeRO stage, extra DeepSpeed
# JSON, flags after FULL_BATCH). A ZeRO-0 checkpoint (which export refuses): one step; bf16 engines (exported
# from their fp32 masters): 3 steps, the last with spectral diagnostics (each step with its save and eval: ~2.5 s).
BF16 = {"bf16": {"enabled": True}}
EXTRA_RUNS = {1: [("zero0", 0, {}, ["--epochs", "1"]),
                  ("zero2-accum2", 2, {"gradient_accumulation_steps": 2}, [])],  # 2 micro-batches of 8 per step
              2: [("zero2-bf16", 2, BF16, ["--epochs", "3"]), ("zero3-bf16", 3, BF16, ["--epochs", "3"])]}


@pytest.fixture(scope="session")
def zero_runs(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int | str, int], TrainedRun]:
    """attnscale_tiny_24 trained full-batch for 6 steps with ZeRO-1, -2 and -3 at world size 1 and 2:
    {(stage, world): TrainedRun}; in the same two launches, EXTRA_RUNS under {(name, world): TrainedRun}:
    ("zero0", 1), ("zero2-bf16", 2), ("zero3-bf16", 2)."""
    work = tmp_path_factory.mktemp("zero-runs")
    runs = {}
    for world in (2, 1):
        configs = [(stage, f"zero{stage}", stage, {}, []) for stage in (1, 2, 3)]
        configs += [(name, name, *rest) for name, *rest in EXTRA_RUNS[world]]
        plan, outputs = [], {}
        for key, name, stage, extra, flags in configs:
            out = outputs[key] = work / f"{name}-world{world}"
            argv = ["--deepspeed_config", str(ds_config(work / f"{name}.json", stage, **extra)), "--data",
                    str(tiny_shards), "--output", str(out), *TINY_MODEL, *FULL_BATCH, *flags, "--save-every", "4"]
            plan.append({"argv": argv, "probe": str(out / "probe.pt")})
        log = launch_plan(plan, world, work)
        for key, out in outputs.items():
            runs[key, world] = TrainedRun(out, out / "probe.pt", log)
    return runs
