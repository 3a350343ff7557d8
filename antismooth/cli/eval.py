"""Top-1, top-5 and loss of exported (or official) weights on a validation split.

    python tools/eval.py --weights as24.safetensors --data shards/imagenet
    torchrun --nproc_per_node 2 tools/eval.py --weights as24.safetensors --data /data/imagenet --json eval.json
    python tools/eval.py --weights deit_small_patch16_224-cd65a155.pth --model attnscale_small_12 --data shards/imagenet

The model, its kwargs, classes and evaluation transform come from the weights file's metadata
(tools/export.py writes them), or from a timm folder's config.json (--format timm); --model (with
--num-classes / --img-size) serves files without it.
The data's labels are matched to the model's classes by name: the data may hold a subset of them.
--data is a shard folder holding <split>.json, a manifest, or an ImageFolder root (<split>/<class>/<img>).
Under torchrun every image is evaluated on exactly one rank (gloo on CPU, nccl on GPU) and the counts
are summed. The work is antismooth.evaluate's; this file parses flags, shows progress and prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from antismooth.atomic import write_atomic
from antismooth.cli import usage
from antismooth.data.device import pin_memory_for
from antismooth.data.pipeline import reduce_eval_metrics
from antismooth.distributed import DistEnv, LaunchError, detect_launch, init_distributed, leave
from antismooth.evaluate import (build_eval_model, eval_augment, eval_batches, evaluate, match_classes,
                                 resolve_eval_data)
from antismooth.models.checks import check_model_name

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = usage.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True,
                   help="weights file (.safetensors or .pth, read with weights_only=True), or a timm folder "
                        "(tools/export.py --format timm)")
    p.add_argument("--data", required=True, help="shard folder or manifest (.json), or an ImageFolder root")
    p.add_argument("--split", default="val", help="split to evaluate (default: %(default)s)")
    p.add_argument("--model", help="timm model name, for weights files that do not name their model")
    p.add_argument("--num-classes", type=int,
                   help="model outputs, for files without metadata (default: the data's class count)")
    p.add_argument("--img-size", type=int, help="model input size, for files without metadata (default: the model's)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch and process (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="loader processes per rank (default: %(default)s)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="fp32",
                   help="autocast dtype of the forward pass (default: %(default)s)")
    p.add_argument("--device", help="cpu or cuda (each process takes its local rank's GPU; cuda:N in a single "
                                    "process); default: cuda when there is one, else cpu")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file (replaced if it exists)")
    args = p.parse_args(argv)
    check_args(args)
    return args


DATA_SUFFIXES = {".json": "a shard manifest", ".tar": "a shard"}


def check_weights(path: str | Path, flag: str = "--weights") -> None:
    """A weights file or a timm folder that can be read, and not the data given in its place."""
    usage.readable_path(path, flag, "give a .safetensors or .pth file (tools/export.py writes one) or a timm folder")
    what = DATA_SUFFIXES.get(Path(path).suffix) if Path(path).is_file() else None
    if what:
        usage.fail(f"{flag} {path} is {what}, not weights: give a .safetensors or .pth file, and the data to --data.")


def check_args(args: argparse.Namespace) -> None:
    """Every flag a user can get wrong, before a process group is joined or a model built."""
    check_weights(args.weights)
    usage.readable_path(args.data, "--data", "give a shard folder holding <split>.json, a manifest, or an "
                                             "ImageFolder root")
    usage.at_least(args.batch_size, "--batch-size", 1, "images per batch and process")
    usage.at_least(args.workers, "--workers", 0, "loader processes; 0 loads in this process")
    usage.at_least(args.num_classes, "--num-classes", 1, "model outputs")
    usage.at_least(args.img_size, "--img-size", 1, "pixels")
    if args.model:
        check_model_name(args.model)
    if args.json is not None:
        usage.writable_file(args.json, "--json", overwrite=True)


def setup_distributed(device_flag: str | None) -> tuple[DistEnv, bool]:
    """This process's place in the world its launcher describes (torchrun, srun, mpirun or none), and whether
    this call joined the process group (and so must leave it)."""
    device_type, _, index = (device_flag or "").partition(":")
    if device_type not in ("", "cpu", "cuda"):
        raise LaunchError(f"--device {device_flag} is not a device this tool runs on: pass cpu or cuda.")
    local_world = detect_launch().local_world_size
    if index and local_world > 1:
        raise LaunchError(f"--device {device_flag} would put all {local_world} processes of this node on one device: "
                          f"pass --device {device_type}, and each process takes its local rank's.")
    joined_before = dist.is_initialized()
    env = init_distributed(use_deepspeed=False, device_type=device_type or None)
    if index and device_type == "cuda":
        env = dataclasses.replace(env, device=torch.device("cuda", int(index)))
        torch.cuda.set_device(env.device)
    return env, dist.is_initialized() and not joined_before


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    """Evaluate and return the figures (the same on every rank)."""
    data = resolve_eval_data(args.data, args.split)
    model, described = build_eval_model(args.weights, args.model, args.num_classes, args.img_size,
                                        default_num_classes=len(data.classes))
    # Labels as the model's outputs, by class name.
    data = match_classes(model, described.classes if described else None, data)
    augment = eval_augment(model, described)
    batches = eval_batches(data, augment, args.batch_size, rank, world, args.workers, pin_memory_for(device))
    model.to(device)
    name = described.model if described else args.model
    bar = tqdm(batches, total=len(batches), desc=f"eval {name}", unit="batch", dynamic_ncols=True,
               disable=rank != 0 or not sys.stderr.isatty())
    start = time.perf_counter()
    counts = evaluate(model, bar, device, AMP_DTYPES[args.amp], mean=augment.mean, std=augment.std)
    metrics = reduce_eval_metrics(**counts)
    seconds = time.perf_counter() - start
    bar.close()
    return {**metrics, "images_per_s": metrics["count"] / seconds, "seconds": seconds, "model": name,
            "weights": str(args.weights), "data": str(data.path), "split": args.split, "world_size": world}


def speaks() -> bool:
    """Rank 0 says a mistake (every rank finds it, before any process group); one that cannot tell its rank too."""
    try:
        return detect_launch().rank == 0
    except LaunchError:
        return True


@usage.entry_point(interrupted="interrupted: no figures were written.", user_errors=(LaunchError,), speaks=speaks)
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 a problem with the weights, the data or the flags)."""
    args = parse_args(argv)
    env, started = setup_distributed(args.device)
    rank, world = env.rank, env.world_size
    try:
        figures = run(args, rank, world, env.device)
    except (OSError, ValueError) as e:  # the library's sentences (WeightsMismatchError is a ValueError)
        if started:   # no barrier here: a rank that failed alone must not wait for the others
            dist.destroy_process_group()
        raise usage.ConfigError(str(e)) from e
    if started:
        leave()   # every rank finished: leave the process group together, as pretrain.py does
    if rank == 0:
        print(f"{figures['model']} on {figures['data']}: top-1 {figures['top1']:.2f} %  top-5 {figures['top5']:.2f} %  "
              f"loss {figures['loss']:.4f}  ({figures['count']} images, {figures['images_per_s']:.1f} img/s on "
              f"{world} process{'es' if world > 1 else ''})")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(args.json, (json.dumps(figures, indent=2) + "\n").encode())   # never half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
