"""Images/s of the input path into a training step's input, per decode path, measured side by side in one run:
the CPU path (workers decode and augment) against the GPU path (workers read bytes and draw parameters; the batch is
decoded, cropped, resized, flipped and RandAugment-ed on the device), each with the same loader workers, through
DeviceBatches (normalised on the device) as the training loop takes them; then the device path's parts (batched
decode, crop + resize + flip, RandAugment) and RandAugment per sample grouped by op against one call per sample.

    python bench/decode_throughput.py --device cuda --workers 4 --json decode.json      # on a GPU node
    python bench/decode_throughput.py --device cpu --input-size 64 --batch 64            # the device path on a CPU
    python bench/decode_throughput.py --images /data/imagenet --copies 1                 # an ImageFolder's train/

The shards are built by the real shard builder from hard links of the images (tests/data/images: 103 photographs,
median 362x300 and 26 kB, smaller than ImageNet's median 500x375 and 110 kB, so decode figures here are optimistic).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from loader import IMAGES, replicate_imagefolder  # bench/loader.py, beside this script: the same ImageFolder of links

from antismooth.data import decode
from antismooth.data.device import DeviceBatches
from antismooth.data.pipeline import AugmentConfig, StreamConfig, build_train_stream, seed_augmentation
from antismooth.data.shards import ShardOptions, build


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def path_rate(manifest: Path, decode_mode: str, augment: AugmentConfig, batch: int, workers: int,
              device: torch.device, batches: int) -> tuple[float, decode.DecodeStats]:
    """Images/s of one decode path into normalised device batches, after two warm-up batches (worker start-up and
    the first CUDA calls are not throughput)."""
    config = StreamConfig(batch_size=batch, num_workers=workers, decode=decode_mode, shuffle_buffer=500,
                          shuffle_initial=100)
    stream = build_train_stream(manifest, config, 0, 1, augment)
    stats = decode.DecodeStats()
    seen, start = 0, None
    for k, (images, *_) in enumerate(DeviceBatches(stream.loader(0, pin_memory=device.type == "cuda"), device,
                                                   augment.mean, augment.std, stats)):
        if k == 2:
            _sync(device)
            seen, start = 0, time.perf_counter()
        elif k > 2:
            seen += len(images)
        if k == batches + 2:
            break
    _sync(device)
    if start is None or not seen:
        raise SystemExit(f"too few images for {batches} batches of {batch}: raise --copies")
    return seen / (time.perf_counter() - start), stats


def _best(fn, device: torch.device, rounds: int) -> float:
    """Seconds of fn(), best of `rounds` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def device_parts(blobs: list[bytes], augment: AugmentConfig, batch: int, device: torch.device,
                 rounds: int) -> dict[str, float]:
    """Milliseconds per batch of the device path's parts on one batch, and RandAugment grouped vs per sample."""
    from antismooth.data.pipeline import train_transform

    transform = train_transform(augment)
    samples = [decode.worker_sample(blobs[k % len(blobs)], transform, k, seed_augmentation) for k in range(batch)]
    jpegs = [(k, data) for k, (data, _, cpu) in enumerate(samples) if not cpu]
    params = [p for _, p, _ in samples]
    pinned = [data.pin_memory() if device.type == "cuda" else data for _, data in jpegs]
    decoded = decode.decode_jpegs(pinned, device)
    images = [None] * batch
    for (k, _), image in zip(jpegs, decoded, strict=True):
        images[k] = image
    for k, (data, _, cpu) in enumerate(samples):
        if cpu:
            images[k] = data.to(device)
    crops = decode.crop_resize_flip(images, params)
    ops = [p.ops for p in params]
    seconds = {
        "decode": _best(lambda: decode.decode_jpegs(pinned, device), device, rounds),
        "crop_resize_flip": _best(lambda: decode.crop_resize_flip(images, params), device, rounds),
        "randaugment_grouped": _best(lambda: decode.augment_batch(crops, ops, grouped=True), device, rounds),
        "randaugment_per_sample": _best(lambda: decode.augment_batch(crops, ops, grouped=False), device, rounds),
    }
    return {name: 1000 * s for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=IMAGES, help="an ImageFolder root; its train/ is read")
    parser.add_argument("--copies", type=int, default=40, help="hard-linked copies of each image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=12, help="batches timed per path")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of each part, best taken")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    augment = AugmentConfig(input_size=args.input_size)   # DeiT's recipe: RandAugment, erasing on the device
    blobs = [p.read_bytes() for p in sorted((args.images / "train").rglob("*")) if p.is_file()]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imagefolder" / "train"
        count = replicate_imagefolder(args.images / "train", folder, args.copies)
        build(str(folder.parent), str(Path(tmp) / "shards"), ShardOptions(max_count=1000), splits=("train",))
        manifest = Path(tmp) / "shards" / "train.json"
        rates, stats = {}, {}
        for mode in ("cpu", "gpu"):
            rates[mode], stats[mode] = path_rate(manifest, mode, augment, args.batch, args.workers, device,
                                                 args.batches)
    parts = device_parts(blobs, augment, args.batch, device, args.rounds)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{count} images ({len(blobs)} photographs x {args.copies}), DeiT recipe at {args.input_size} px, batch "
          f"{args.batch}, {args.workers} loader workers, into normalised batches on {name}; decoder "
          f"{decode.decoder_backend()}")
    print("| input path | images/s | ÷ cpu path |")
    print("|---|---:|---:|")
    for mode, rate in rates.items():
        print(f"| --decode {mode} | {rate:.0f} | {rate / rates['cpu']:.2f} |")
    print(f"GPU path: {stats['gpu']}")
    print(f"\ndevice path, ms per batch of {args.batch} (best of {args.rounds}): " +
          ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    print(f"RandAugment grouped by op ÷ per sample: {parts['randaugment_grouped'] / parts['randaugment_per_sample']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "decoder": decode.decoder_backend(), "images": count, "batch": args.batch,
            "workers": args.workers, "input_size": args.input_size,
            "images_per_s": {f"decode_{k}": round(v, 1) for k, v in rates.items()},
            "ms_per_batch": {k: round(v, 2) for k, v in parts.items()},
            "gpu_path_counts": vars(stats["gpu"])}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
