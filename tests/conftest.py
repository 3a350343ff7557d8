"""Shared pytest fixtures, one section per concern."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


# ----------------------------------------------------------------------------------------------
# Session header: what in this machine's state can slow or hang the suite.

def pytest_report_header(config) -> list[str]:
    """DeepSpeed CPU launches that built its shared-memory all-reduce (antismooth's before this was fixed, or another
    program's) leave a /dev/shm buffer per rank: RAM that stays taken, and a suite short of RAM hangs."""
    sizes = []
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            pass  # removed meanwhile
    if not sizes:
        return []
    return [f"warning: /dev/shm holds {len(sizes)} DeepSpeed all-reduce buffers ({sum(sizes) / 2**30:.1f} GiB of RAM) "
            "left by earlier launches; remove them (rm /dev/shm/deepspeed_allreduce_buffer_*) when no DeepSpeed job "
            "is running."]


# ----------------------------------------------------------------------------------------------
# `make test-fast`: the tests marked `slow` are those that wait for real training processes (a launch
# below or a test's own), a pip install or a clone; the rest run in a few minutes.

# Such fixtures are defined with launch.slow_fixture, which registers their names; collection has imported every
# test module (and so defined its fixtures) before this hook runs.

def pytest_collection_modifyitems(config, items) -> None:
    from launch import SLOW_FIXTURES

    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


# ----------------------------------------------------------------------------------------------
# Data fixtures: the repository's own real photographs and ImageFolder trees built from them.
# (Used by tests/test_shards.py; keep fixtures for other concerns in their own section.)

# 103 crops of CC0/public-domain photographs, one per class, with ImageNet's odd files (tests/data/images/README.md).
SAMPLE_IMAGES = Path(__file__).resolve().parent / "data" / "images"


@pytest.fixture(scope="session")
def sample_images() -> Path:
    """The 103 real photographs of tests/data/images (train/<class>/<file>.JPEG), one per class."""
    if not (SAMPLE_IMAGES / "train").is_dir():
        pytest.fail(f"the test images are missing: expected them at {SAMPLE_IMAGES} (tests/data/make_images.py).")
    return SAMPLE_IMAGES


@pytest.fixture
def imagefolder(sample_images: Path, tmp_path: Path) -> Path:
    """A fresh ImageFolder root in tmp: train/ holds all 103 images, val/ the same 103 class folders
    with every fourth one holding its image and the rest empty (torchvision still counts them)."""
    root = tmp_path / "imagenet"
    shutil.copytree(sample_images / "train", root / "train")
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
def sample_shards(sample_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.json and 11 shards of 10 (the last of 3) real JPEGs: 103 images, one per class, so a label
    names its image; 11 shards divide neither by 2 ranks × 2 workers nor by anything else."""
    from antismooth.data.shards import ShardOptions, build

    out = tmp_path_factory.mktemp("sample-shards")
    build(str(sample_images), str(out), ShardOptions(max_count=10), splits=("train",))
    return out / "train.json"


# ----------------------------------------------------------------------------------------------
# Training fixtures: real pretrain.py runs in real DeepSpeed processes (CPU, gloo), shared by the
# training and export tests. A DeepSpeed launch costs far more than a tiny run (docs/benchmarks.md), so each
# launch runs a plan of several runs in the same processes (tests/jobs/train_plan.py).

import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from launch import FULL_BATCH_SIZE, ds_config, launch_plan, slow_fixture  # noqa: E402  (tests/launch.py: the process-launch helpers)

# A 24-block AttnScale ViT small enough for CPU tests: 32 px, patch 8 (16 tokens), width 64.
TINY_MODEL = ["--model", "attnscale_tiny_24", "--model-kwargs", "patch_size=8", "embed_dim=64", "num_heads=4",
              "--input-size", "32"]
# Every step sees the whole 16-image set, unaugmented: runs at any world size see the same data. Read in the
# training process (--workers 0): these runs test the engine, not the loader, and starting a forkserver with two
# workers costs a run more than its steps do (docs/benchmarks.md). The runs that test the loader workers keep them: RESUME_FLAGS, WITH_WORKERS below.
FULL_BATCH = ["--no-aug", "--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--repeated-aug", "1",
              "--drop-path", "0", "--epochs", "6", "--warmup-epochs", "0", "--lr", "0.05", "--min-lr", "1e-4",
              "--workers", "0", "--log-every", "1", "--spectral-every", "3", "--no-model-ema"]
WITH_WORKERS = ["--workers", "2"]
# The model EMA where a test looks at it (tests/test_ema.py, test_elastic.py): decay 0.5, so that 6 steps move it.
# Off elsewhere: its epoch-end evaluation doubles every run's evaluations.
EMA_DECAY = 0.5
WITH_EMA = ["--model-ema", "--model-ema-decay", str(EMA_DECAY)]
EMA_RUNS = {(1, 1), (1, 2), (2, 2), (3, 2), ("zero1-resumed-compiled", 1), ("zero2-eval-signalled", 2)}   # zero_runs keys that keep one


@pytest.fixture(scope="session")
def tiny_shards(sample_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/val shards of 16 real JPEGs of 16 classes (val = the same images), shards of 5."""
    from antismooth.data.shards import ShardOptions, build

    root = tmp_path_factory.mktemp("tiny-imagefolder")
    for split in ("train", "val"):
        for class_dir in sorted((sample_images / "train").iterdir())[:FULL_BATCH_SIZE]:
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
# from their fp32 masters): 3 steps, the last with spectral diagnostics (each step runs its save and eval).
BF16 = {"bf16": {"enabled": True}}
# --compile beside the eager runs it must match (tests/test_compile.py), in the world-1 launch: ZeRO-2 as (2, 1);
# ZeRO-1 with its EMA as (1, 1), eager for 3 steps (FIRST_PART) and resumed compiled; bf16 ZeRO-2 as ("zero2-bf16", 2).
COMPILED_RUNS = [("zero2-compiled", 2, {}, ["--compile"]),
                 ("zero1-resumed-compiled", 1, {}, ["--compile"]),
                 ("zero2-bf16-compiled", 2, BF16, ["--epochs", "3", "--compile"])]
# --decode gpu through pretrain.py, the device path on the CPU (tests/test_decode.py), with the DeiT recipe it applies
# (RandAugment, random erasing): 2 steps straight through, and stopped after 1 and resumed.
DECODE_GPU_RUNS = [("decode-gpu", 2, {}, ["--decode", "gpu", "--epochs", "2", *WITH_WORKERS]),
                   ("decode-gpu-resumed", 2, {}, ["--decode", "gpu", "--epochs", "2", *WITH_WORKERS])]
AUGMENTED = {"decode-gpu", "decode-gpu-resumed"}   # runs without FULL_BATCH's --no-aug
# A first part, run before the run itself in the same folder: the run's flags less --compile, plus these.
FIRST_PART = {"zero1-resumed-compiled": ["--max-steps", "3"], "decode-gpu-resumed": ["--max-steps", "1"],
              "zero2-eval-signalled": []}
# ZeRO-2 at world size 2 (as (2, 2)) whose first part is signalled as its evaluation at the end of epoch 2 starts
# (tests/jobs/train_plan.py's "signal_in_eval_at_epoch"): saved and stopped with 75, then resumed (test_interrupt.py).
SIGNALLED_IN_EVAL = {"zero2-eval-signalled": {"signal_in_eval_at_epoch": 2}}
EXTRA_RUNS = {1: [("zero0", 0, {}, ["--epochs", "1"]),
                  ("zero2-accum2", 2, {"gradient_accumulation_steps": 2}, []),  # 2 micro-batches of 8 per step
                  *COMPILED_RUNS, *DECODE_GPU_RUNS],
              2: [("zero2-bf16", 2, BF16, ["--epochs", "3"]), ("zero3-bf16", 3, BF16, ["--epochs", "3"]),
                  ("zero2-eval-signalled", 2, {}, [])]}


# ZeRO-3 that re-gathers every parameter in every forward, as for a model past DeepSpeed's reuse thresholds:
# small test models otherwise stay gathered (or are never partitioned) and hide collective mismatches.
ZERO3_REGATHER = {"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 0,
                                        "stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 0}}
UNEVEN_VAL_IMAGES = 3  # readable validation images of uneven_val_shards (plus one corrupt sample)


@pytest.fixture(scope="session")
def uneven_val_shards(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_shards' training split beside a validation split of 4 samples whose last is corrupt: on 2 ranks ×
    2 loader workers, rank 0 evaluates 2 batches and rank 1 one (its second worker's only sample is skipped)."""
    import webdataset as wds

    out = tmp_path_factory.mktemp("uneven-val")
    for path in tiny_shards.glob("train*"):
        shutil.copy(path, out / path.name)
    manifest = json.loads((tiny_shards / "val.json").read_text())
    urls = [str(tiny_shards / shard["name"]) for shard in manifest["shards"]]
    raw = [{k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
           for sample in wds.WebDataset(urls, shardshuffle=False)]
    samples = raw[:UNEVEN_VAL_IMAGES] + [dict(raw[0], __key__="val_corrupt", jpg=b"not an image")]
    with wds.TarWriter(str(out / "val-000000.tar"), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    manifest["shards"] = [dict(manifest["shards"][0], name="val-000000.tar", num_samples=len(samples))]
    manifest["num_samples"] = len(samples)
    (out / "val.json").write_text(json.dumps(manifest))
    return out


@slow_fixture(scope="session")
def zero_runs(tiny_shards: Path, uneven_val_shards: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int | str, int], TrainedRun]:
    """attnscale_tiny_24 trained full-batch for 6 steps with ZeRO-1, -2 and -3 at world size 1 and 2:
    {(stage, world): TrainedRun}; in the same two launches, EXTRA_RUNS under {(name, world): TrainedRun}:
    ("zero0", 1), ("zero2-bf16", 2), ("zero3-bf16", 2), and ("zero3-uneven-eval", 2): one step of ZeRO-3
    re-gathering its parameters in every forward, then an evaluation on uneven_val_shards."""
    work = tmp_path_factory.mktemp("zero-runs")
    runs = {}
    for world in (2, 1):
        configs = [(stage, f"zero{stage}", stage, {}, []) for stage in (1, 2, 3)]
        configs += [(name, name, *rest) for name, *rest in EXTRA_RUNS[world]]
        if world == 2:
            configs.append(("zero3-uneven-eval", "zero3-uneven-eval", 3, ZERO3_REGATHER,
                            ["--epochs", "1", "--data", str(uneven_val_shards), *WITH_WORKERS]))
        plan, outputs = [], {}
        for key, name, stage, extra, flags in configs:
            out = outputs[key] = work / f"{name}-world{world}"
            ema = WITH_EMA if (key, world) in EMA_RUNS else []
            base = [f for f in FULL_BATCH if f != "--no-aug"] if key in AUGMENTED else FULL_BATCH
            argv = ["--deepspeed_config", str(ds_config(work / f"{name}.json", stage, **extra)), "--data",
                    str(tiny_shards), "--output", str(out), *TINY_MODEL, *base, *flags, *ema, "--save-every", "4"]
            # ZeRO-1 on one process also records its weights at the start and after every step (tests/test_ema.py)
            weights = {"weights_each_step": str(out / "weights.pt")} if (key, world) == (1, 1) else {}
            if (key, world) == (3, 1):   # the compiled runs come after it in this process (tests/test_compile.py)
                weights["linear_after"] = str(out / "functional-linear.txt")
            if key in FIRST_PART:
                first = {"argv": [a for a in argv if a != "--compile"] + FIRST_PART[key]}
                if key in SIGNALLED_IN_EVAL:
                    first.update(SIGNALLED_IN_EVAL[key], status=str(work / f"{name}-first-part.status"))
                plan.append(first)
            plan.append({"argv": argv, "probe": str(out / "probe.pt"), **weights})
        if world == 2:  # the tiny Swin runs of tests/swin_runs.py ride on this launch: ("swin-…", 2)
            from swin_runs import swin_plan
            swin_entries, swin_outputs = swin_plan(work, tiny_shards, ds_config, FULL_BATCH, WITH_EMA)
            plan += swin_entries
            outputs.update(swin_outputs)
        log = launch_plan(plan, world, work)
        for key, out in outputs.items():
            runs[key, world] = TrainedRun(out, out / "probe.pt", log)
    return runs


# --- resume: one uninterrupted reference for the kill/resume tests -------------------------------------------

# 103 images, global batch 16: 6 steps per epoch, 12 in all; full DeiT augmentation with Mixup/CutMix,
# repeated augmentation and drop path; checkpoints at steps 4, 6, 8 and 12.
RESUME_FLAGS = [*TINY_MODEL, "--epochs", "2", "--warmup-epochs", "1", "--lr", "0.01", "--workers", "2",
                "--save-every", "4", "--keep", "2", "--log-every", "1", "--drop-path", "0.1", "--model-ema-decay", "0.9"]


def resume_plan(config: Path, shards: Path, out: Path, record: bool = False) -> list[dict]:
    """The resume run's plan; `record`: every trained batch's labels and positions to out/record-rank{r}.json."""
    argv = ["--deepspeed_config", str(config), "--data", str(shards), "--output", str(out), *RESUME_FLAGS]
    return [{"argv": argv, "probe": str(out / "probe.pt"), **({"record": str(out / "record.json")} if record else {})}]


@slow_fixture(scope="session")
def resume_reference(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(ZeRO-2 config, run folder) of the 12-step resume run on 2 processes, uninterrupted: what every
    interrupted and resumed copy of it must end with, bit for bit; its batches recorded (record-rank{r}.json)."""
    work = tmp_path_factory.mktemp("resume-reference")
    config = ds_config(work / "zero2.json", 2)
    reference = work / "uninterrupted"
    launch_plan(resume_plan(config, sample_shards.parent, reference, record=True), 2, work)
    return config, reference


# --- the cluster in a box (tests/cluster/): one bring-up per session -------------------------------------------

@slow_fixture(scope="session")
def cluster():
    """Two nodes n1, n2 (network namespaces on a bridge) with munge, slurmctld, slurmd and sshd: a
    tests.cluster.Cluster (nodes, run_on(node, cmd), sbatch(script, ...), hostfile(), paths). Skipped, with one
    line saying how to enable it, where the harness cannot run (not root, packages missing)."""
    from cluster import harness

    if (reason := harness.why_unavailable()):
        pytest.skip(reason)
    with harness.session_lock():
        cluster = harness.up(2)
        try:
            yield cluster
        finally:
            harness.down()
