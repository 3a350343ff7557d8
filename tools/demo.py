"""`make demo`: the whole path on a machine with no dataset and no GPU, in a few minutes.

scikit-learn's bundled handwritten digits (1,797 real 8×8 scans) are written as an ImageFolder
of small JPEGs, turned into shards by the real shard builder, a 24-layer AttnScale ViT is
trained on them by `deepspeed pretrain.py --deepspeed_config ds_configs/demo.json` (2 processes,
ZeRO-2, activation checkpointing on), and the newest checkpoint is exported and evaluated with
tools/export.py and tools/eval.py. The last lines print the validation top-1.

On GPUs: `python tools/demo.py --gpus 1 --deepspeed-config ds_configs/demo_bf16.json` (one process
per GPU, NCCL, bf16; that JSON sets the global batch, so the recipe is the same at any GPU count).

The recipe and why (README, "The embedded demo"): 16 px images in 4×4 patches (16 tokens),
width 64 with 4 heads, 24 blocks; no augmentation but label smoothing (the digits are centred
and tiny: random crops cut them up); AdamW, global batch 64, and a learning rate warmed up for
two epochs, then a cosine to the end.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from antismooth.cli import usage

REPO = Path(__file__).resolve().parents[1]

DIGIT_SIZE = 32            # stored JPEG size: the 8×8 scans upsampled, so JPEG blocks do not smear strokes
VAL_FRACTION = 0.2
MODEL_KWARGS = ["patch_size=4", "embed_dim=64", "num_heads=4"]
RECIPE = ["--input-size", "16", "--crop-pct", "1.0", "--no-aug", "--mixup", "0", "--cutmix", "0",
          "--repeated-aug", "1", "--smoothing", "0.1", "--drop-path", "0", "--workers", "1", "--log-every", "20",
          "--save-every", "1000", "--keep", "1",
          # DeiT's model EMA (decay 0.99996) averages over ~25,000 steps; the demo's ~440 would leave it at the
          # initial weights. Off, and said so when the demo starts.
          "--no-model-ema"]
SCHEDULE = {"epochs": 20, "lr": 8e-3, "warmup_epochs": 2}


def write_digits_imagefolder(root: Path, seed: int = 0) -> dict[str, int]:
    """scikit-learn's digits as `{train,val}/<digit>/<index>.jpg`, a stratified 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = round(len(indices) * VAL_FRACTION)
        for split, part in (("val", indices[:n_val]), ("train", indices[n_val:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize((DIGIT_SIZE, DIGIT_SIZE), Image.BILINEAR)
                image.save(folder / f"{i:04d}.jpg", quality=95)
                counts[split] += 1
    return counts


DEMO_MARK = ".antismooth-demo"   # in the folders the demo made: it replaces only those
DEFAULT_WORK, DEFAULT_SHARDS = "runs/demo", "shards/demo"


class StepFailed(Exception):
    """A step of the demo (a command it ran) failed; it printed why, its exit status is kept."""

    def __init__(self, cmd: list[str], status: int) -> None:
        step = next((arg for arg in cmd if arg.endswith(".py")), cmd[0])
        super().__init__(f"{step} stopped with exit status {status} (its message above); fix that and run the "
                         "demo again.")
        self.status = status


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=REPO).returncode
    if status != 0:
        raise StepFailed(cmd, status)


def launcher(processes: int) -> list[str]:
    """DeepSpeed's launcher: its `deepspeed` script beside this Python (a venv), else the same runner as a module
    (wheels installed with `pip install --target`, whose scripts land elsewhere)."""
    from antismooth.distributed import free_port

    script = Path(sys.executable).parent / "deepspeed"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    # A port free now rather than DeepSpeed's fixed 29500, which another job on the machine may hold.
    return [*command, "--num_gpus", str(processes), "--master_port", str(free_port())]


def check_gpus(gpus: int) -> None:
    """--gpus N asks for N GPUs: stop before training rather than fall back to N CPU processes."""
    import torch

    if gpus < 1:
        usage.fail(f"--gpus {gpus} asks for no GPU: drop --gpus to train on the CPU (--processes sets how many).")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < gpus:
        usage.fail(f"--gpus {gpus} but {visible} GPU(s) are visible: drop --gpus to train on the CPU, or check "
                   "CUDA_VISIBLE_DEVICES.")


def replaceable(flag: str, given: str, default: str) -> Path:
    """A folder the demo replaces: absent, empty, its default, or one the demo made (marked): never a folder of
    the user's that a mistyped --work or --shards names."""
    folder = REPO / given
    if folder.exists() and not folder.is_dir():
        usage.fail(f"{flag} {given} is a file: give a folder path for the demo to write.")
    if folder.is_dir() and given != default and any(folder.iterdir()) and not (folder / DEMO_MARK).exists():
        usage.fail(f"{flag} {given} is not a folder the demo made and the demo replaces it: choose a new or empty "
                   "folder, or remove it yourself.")
    usage.writable_folder(folder, flag)
    return folder


def check_args(args: argparse.Namespace) -> tuple[Path, Path]:
    """Every flag a user can get wrong, before a folder is replaced or a process started; the two folders."""
    usage.at_least(args.epochs, "--epochs", 1, "passes over the digits")
    if args.lr <= 0:
        usage.fail(f"--lr must be a positive learning rate, got {args.lr}.")
    if args.warmup_epochs < 0:
        usage.fail(f"--warmup-epochs must be 0 or more, got {args.warmup_epochs}.")
    usage.at_least(args.processes, "--processes", 1, "training processes on the CPU")
    if args.gpus is not None:
        check_gpus(args.gpus)
    usage.readable_file(REPO / args.deepspeed_config, "--deepspeed-config", "give one of ds_configs/*.json")
    if args.eval_json:
        usage.writable_file(args.eval_json, "--eval-json", overwrite=True)
    work = replaceable("--work", args.work, DEFAULT_WORK)
    shards = replaceable("--shards", args.shards, DEFAULT_SHARDS)
    if work == shards:
        usage.fail(f"--work and --shards name the same folder ({args.work}): give two folders.")
    return work, shards


@usage.entry_point(interrupted="interrupted: rerun the demo to start it again.")
def main(argv: list[str] | None = None) -> int:
    parser = usage.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="attnscale_tiny_24", help="e.g. vit_tiny_24 for the plain baseline")
    parser.add_argument("--epochs", type=int, default=SCHEDULE["epochs"])
    parser.add_argument("--lr", type=float, default=SCHEDULE["lr"],
                        help="base lr for a global batch of 512: 1e-3 at batch 64")
    parser.add_argument("--warmup-epochs", type=float, default=SCHEDULE["warmup_epochs"])
    parser.add_argument("--processes", type=int, default=2, help="training processes on the CPU (gloo)")
    parser.add_argument("--gpus", type=int, help="train on this many GPUs instead, one process each (NCCL)")
    parser.add_argument("--deepspeed-config", default="ds_configs/demo.json",
                        help="the engine's JSON; ds_configs/demo_bf16.json for GPUs")
    parser.add_argument("--work", default=DEFAULT_WORK, help="run folder (replaced, if the demo made it)")
    parser.add_argument("--shards", default=DEFAULT_SHARDS, help="shard folder (rebuilt, if the demo made it)")
    parser.add_argument("--eval-json", help="also write the final evaluation's figures to this JSON file")
    args = parser.parse_args(argv)
    work, shards = check_args(args)
    from antismooth.data.shards import ShardOptions, build

    start = time.time()
    for folder in (work, shards):
        shutil.rmtree(folder, ignore_errors=True)  # the demo's own folders: a rerun starts clean
        folder.mkdir(parents=True)
        (folder / DEMO_MARK).touch()
    counts = write_digits_imagefolder(shards / "imagefolder")
    build(str(shards / "imagefolder"), str(shards), ShardOptions(max_count=500))
    print(f"digits: {counts['train']} train / {counts['val']} val images -> shards in {shards}", flush=True)
    print("model EMA off (--no-model-ema): DeiT's decay of 0.99996 averages over ~25,000 steps, the demo runs "
          "~440.", flush=True)

    try:
        train_export_eval(shards, work, args.model, ["--epochs", str(args.epochs), "--lr", str(args.lr),
                                                     "--warmup-epochs", str(args.warmup_epochs)],
                          args.gpus or args.processes, args.deepspeed_config, args.eval_json)
    except StepFailed as failed:
        print(f"error: {failed}", file=sys.stderr)
        return failed.status
    print(f"demo finished in {time.time() - start:.0f} s", flush=True)
    return 0


def train_export_eval(shards: Path, work: Path, model: str, flags: list[str], processes: int, deepspeed_config: str,
                      eval_json: str | Path | None = None) -> None:
    """The demo's recipe (plus `flags`) trained on `shards` into `work`, its newest checkpoint exported and evaluated
    on the val split (the figures also to `eval_json`); bench/path_accuracy.py trains each input path this way."""
    run([*launcher(processes), "pretrain.py", "--deepspeed_config", deepspeed_config, "--model", model,
         "--model-kwargs", *MODEL_KWARGS, "--data", str(shards), "--output", str(work), *RECIPE, *flags])
    weights = work / f"{model}.safetensors"
    run([sys.executable, "tools/export.py", str(work / "checkpoints"), "--out", str(weights), "--overwrite"])
    run([sys.executable, "tools/eval.py", "--weights", str(weights), "--data", str(shards), "--workers", "1",
         *(["--json", str(eval_json)] if eval_json else [])])


if __name__ == "__main__":
    sys.exit(main())
