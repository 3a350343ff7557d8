"""Images/s of the training stream (full DeiT augmentation, uint8 out) beside a torchvision ImageFolder
loader, beside the raw decode + augment rate of one core, and the GPU path's workers (bytes, checks and parameters
only: --decode gpu leaves the decode and augmentation to the device), all measured in one run on the same images;
first, per core: the full decode, the reduced-size decode (antismooth.data.decode), images stored at a longest
side of 512 and 320 (build_shards --max-side), the GPU path's worker share (header, check, parameters), and the
full path's milliseconds per stage.

    python bench/loader.py                       # tests/data/images' 103 photographs ×10, 224 px
    python bench/loader.py --images /data/imagenet --copies 1     # an ImageFolder's train/ split
    python bench/loader.py --src /data/imagenet/val --copies 1    # or any split folder of class folders
    python bench/loader.py --src DIR --workers --json loader.json # per-core figures only, also as JSON

The ImageFolder is made of hard links to the images (nothing is copied), the shards
by the real shard builder from that folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from antismooth.data.decode import GpuSampleStage, SampleDecoder
from antismooth.data.pipeline import AugmentConfig, StreamConfig, build_train_stream, seed_augmentation, train_transform
from antismooth.data.shards import ShardOptions, build, image_for_shard

IMAGES = Path(__file__).resolve().parents[1] / "tests" / "data" / "images"  # the repository's own 103 photographs


def replicate_imagefolder(src: Path, dst: Path, copies: int) -> int:
    """An ImageFolder of `copies` hard links of every image under src; returns the image count."""
    n = 0
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / class_dir.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir()):
            for c in range(copies):
                link = dst / class_dir.name / f"{image.stem}_{c}{image.suffix}"
                try:
                    os.link(image, link)
                except OSError:
                    link.write_bytes(image.read_bytes())
                n += 1
    return n


def time_loader(loader, limit: int) -> float:
    """Images/s over the loader, after one warm-up batch (worker start-up is not throughput)."""
    it = iter(loader)
    next(it)
    seen, start = 0, time.perf_counter()
    for images, *_ in it:
        seen += len(images)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def raw_rate(folder: Path, transform, limit: int) -> float:
    """Decode + augment in this process, no loader: the per-core ceiling a worker can reach."""
    blobs = [p.read_bytes() for p in sorted(folder.rglob("*.JPEG"))[:limit]]
    start = time.perf_counter()
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as img:
            transform(img.convert("RGB"))
    return len(blobs) / (time.perf_counter() - start)


def _decode_all(stage, blobs: list[bytes]) -> float:
    """Seconds for one pass of a worker's per-sample work over `blobs` (seeded per sample, as in the stream)."""
    start = time.perf_counter()
    for k, blob in enumerate(blobs):
        image, finish = stage.decode(blob, k, seed_augmentation)
        finish(image)
    return time.perf_counter() - start


def per_core_rates(blobs: list[bytes], augment: AugmentConfig, rounds: int) -> dict[str, float]:
    """Images/s of one core for each way of feeding it, best of `rounds` passes interleaved (so drifts in a shared
    machine's load hit every variant alike): full and reduced decode of the stored bytes, the bytes re-encoded at a
    longest side of 512 and 320 by the shard builder's own function (reduced decode on), and the GPU path's worker."""
    transform = train_transform(augment)
    stored = {"full": blobs, "reduced": blobs}
    for side in (512, 320):
        stored[f"max_side_{side}"] = [image_for_shard(b, ShardOptions(max_side=side))[1] for b in blobs]
    stages = {"full": SampleDecoder(transform, reduced=False), "reduced": SampleDecoder(transform, reduced=True),
              "max_side_512": SampleDecoder(transform, reduced=True),
              "max_side_320": SampleDecoder(transform, reduced=True)}
    from antismooth.data.decode import CpuSampleStage
    runs = {name: CpuSampleStage(stage) for name, stage in stages.items()}
    runs["gpu_path_worker"] = GpuSampleStage(transform)
    stored["gpu_path_worker"] = blobs
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, stage in runs.items():
            best[name] = min(best[name], _decode_all(stage, stored[name]))
    return {name: len(blobs) / seconds for name, seconds in best.items()}


def stage_ms(blobs: list[bytes], augment: AugmentConfig, rounds: int) -> dict[str, float]:
    """Milliseconds per image of each stage of the full path (decode, RandomResizedCrop + resize, RandAugment,
    the rest: flip and the uint8 tensor), best of `rounds` passes."""
    transform = train_transform(augment)
    crop, *middle, tensor = transform.transforms
    flips = [op for op in middle if type(op).__name__ == "RandomHorizontalFlip"]
    randaugment = [op for op in middle if op not in flips]
    best = dict(decode=float("inf"), crop_resize=float("inf"), randaugment=float("inf"), rest=float("inf"))
    for _ in range(rounds):
        spent = dict.fromkeys(best, 0.0)
        for k, blob in enumerate(blobs):
            t0 = time.perf_counter()
            with Image.open(io.BytesIO(blob)) as img:
                img.load()
                image = img.convert("RGB")
            t1 = time.perf_counter()
            seed_augmentation(k)
            image = crop(image)
            t2 = time.perf_counter()
            for op in flips:
                image = op(image)
            t3 = time.perf_counter()
            for op in randaugment:
                image = op(image)
            t4 = time.perf_counter()
            tensor(image)
            t5 = time.perf_counter()
            for name, seconds in (("decode", t1 - t0), ("crop_resize", t2 - t1), ("randaugment", t4 - t3),
                                  ("rest", (t3 - t2) + (t5 - t4))):
                spent[name] += seconds
        best = {name: min(best[name], spent[name]) for name in best}
    return {name: 1000 * seconds / len(blobs) for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, default=IMAGES,
                        help="an ImageFolder root: its train/ split is read (default: tests/data/images)")
    source.add_argument("--src", type=Path, help="an ImageFolder split (class folders of images) instead")
    parser.add_argument("--copies", type=int, default=10, help="hard-linked copies of each image")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                        help="loader worker counts to compare (none: the per-core figures only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--core-rounds", type=int, default=4, help="interleaved passes of the per-core figures")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--json", type=Path, help="write the per-core figures to this file")
    parser.add_argument("--loader-json", type=Path, help="write the loader figures (images/s per loader) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core per worker, as in training; the main process only collates

    split = args.src or args.images / "train"
    blobs = [p.read_bytes() for p in sorted(split.rglob("*")) if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg")]
    sizes = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as img:
            sizes.append(img.size)
    augment = AugmentConfig(input_size=args.input_size)
    rates = per_core_rates(blobs, augment, args.core_rounds)
    stages = stage_ms(blobs, augment, args.core_rounds)
    median_size = [int(statistics.median(w for w, _ in sizes)), int(statistics.median(h for _, h in sizes))]
    print(f"\n{len(blobs)} images (median {median_size[0]}x{median_size[1]}), {args.input_size} px DeiT recipe to "
          f"uint8, one core, best of {args.core_rounds} interleaved passes")
    print("| per core | images/s | ÷ full |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / rates['full']:.2f} |")
    print("| full path, ms per image | " + " | ".join(f"{k} {v:.2f}" for k, v in stages.items()) + " |")
    if args.json:
        args.json.write_text(json.dumps({
            "images": len(blobs), "median_size": median_size, "input_size": args.input_size,
            "images_per_s_per_core": {k: round(v, 1) for k, v in rates.items()},
            "ms_per_image": {k: round(v, 3) for k, v in stages.items()}}, indent=1) + "\n")
    if not args.workers:
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imagefolder" / "train"
        n = replicate_imagefolder(args.src or args.images / "train", folder, args.copies)
        build(str(folder.parent), str(Path(tmp) / "shards"), ShardOptions(max_count=250), splits=("train",))
        manifest = Path(tmp) / "shards" / "train.json"
        config = StreamConfig(batch_size=args.batch, num_workers=1, decode="cpu")
        stream = build_train_stream(manifest, config, 0, 1, augment)
        limit = (n // args.batch - 2) * args.batch

        rates: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            rates.setdefault("raw decode + augment, 1 core", []).append(raw_rate(folder, stream.transform, 300))
            for workers in args.workers:
                config = StreamConfig(batch_size=args.batch, num_workers=workers, shuffle_buffer=1000,
                                      shuffle_initial=100, decode="cpu")
                train = build_train_stream(manifest, config, 0, 1, augment)
                rates.setdefault(f"antismooth stream, {workers} worker(s)", []).append(
                    time_loader(train.loader(0), limit))
                # The GPU path's workers: bytes, checks and parameters only (the device's share is not timed here).
                bytes_only = build_train_stream(manifest, dataclasses.replace(config, decode="gpu"), 0, 1, augment)
                rates.setdefault(f"antismooth stream --decode gpu (the workers' share), {workers} worker(s)",
                                 []).append(time_loader(bytes_only.loader(0), limit))
                folder_loader = torch.utils.data.DataLoader(
                    ImageFolder(str(folder), transform=stream.transform), batch_size=args.batch, shuffle=True,
                    num_workers=workers, drop_last=True)
                rates.setdefault(f"ImageFolder + DataLoader, {workers} worker(s)", []).append(
                    time_loader(folder_loader, limit))

    medians = {name: statistics.median(r) for name, r in rates.items()}
    if args.loader_json:
        args.loader_json.write_text(json.dumps({"images": n, "batch": args.batch, "images_per_s": {
            name: round(rate, 1) for name, rate in medians.items()}}, indent=1) + "\n")
    raw = medians["raw decode + augment, 1 core"]
    print(f"\n{n} images, 224 px DeiT augmentation (RandomResizedCrop, RandAugment) to uint8 (normalisation and "
          f"erasing run on the device, not here), batch {args.batch}, median of {args.rounds} rounds")
    print("| loader | images/s | per worker ÷ raw core | ÷ ImageFolder |")
    print("|---|---:|---:|---:|")
    for name, rate in medians.items():
        if name.startswith("raw"):
            print(f"| {name} | {rate:.0f} | 1.00 | |")
            continue
        workers = int(name.rsplit(", ", 1)[1].split()[0])
        ours = name.startswith("antismooth")
        twin = medians[f"ImageFolder + DataLoader, {workers} worker(s)"]
        print(f"| {name} | {rate:.0f} | {rate / workers / raw:.2f} | {rate / twin:.2f} |" if ours else
              f"| {name} | {rate:.0f} | {rate / workers / raw:.2f} | 1.00 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
