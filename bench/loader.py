"""Images/s of the training stream (full DeiT augmentation, uint8 out) beside a torchvision ImageFolder
loader and beside the raw decode + augment rate of one core, all measured in one run on the same images.

    python bench/loader.py                       # tests/data/images' 103 photographs ×10, 224 px
    python bench/loader.py --images /data/imagenet --copies 1     # an ImageFolder's train/ split
    python bench/loader.py --src /data/imagenet/val --copies 1    # or any split folder of class folders

The ImageFolder is made of hard links to the images (nothing is copied), the shards
by the real shard builder from that folder.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from antismooth.data.pipeline import AugmentConfig, StreamConfig, build_train_stream
from antismooth.data.shards import ShardOptions, build

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, default=IMAGES,
                        help="an ImageFolder root: its train/ split is read (default: tests/data/images)")
    source.add_argument("--src", type=Path, help="an ImageFolder split (class folders of images) instead")
    parser.add_argument("--copies", type=int, default=10, help="hard-linked copies of each image")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core per worker, as in training; the main process only collates

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imagefolder" / "train"
        n = replicate_imagefolder(args.src or args.images / "train", folder, args.copies)
        build(str(folder.parent), str(Path(tmp) / "shards"), ShardOptions(max_count=250), splits=("train",))
        manifest = Path(tmp) / "shards" / "train.json"
        augment = AugmentConfig()
        stream = build_train_stream(manifest, StreamConfig(batch_size=args.batch, num_workers=1), 0, 1, augment)
        limit = (n // args.batch - 2) * args.batch

        rates: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            rates.setdefault("raw decode + augment, 1 core", []).append(raw_rate(folder, stream.transform, 300))
            for workers in args.workers:
                config = StreamConfig(batch_size=args.batch, num_workers=workers, shuffle_buffer=1000,
                                      shuffle_initial=100)
                train = build_train_stream(manifest, config, 0, 1, augment)
                rates.setdefault(f"antismooth stream, {workers} worker(s)", []).append(
                    time_loader(train.loader(0), limit))
                folder_loader = torch.utils.data.DataLoader(
                    ImageFolder(str(folder), transform=stream.transform), batch_size=args.batch, shuffle=True,
                    num_workers=workers, drop_last=True)
                rates.setdefault(f"ImageFolder + DataLoader, {workers} worker(s)", []).append(
                    time_loader(folder_loader, limit))

    medians = {name: statistics.median(r) for name, r in rates.items()}
    raw = medians["raw decode + augment, 1 core"]
    print(f"\n{n} images, 224 px DeiT augmentation (RandomResizedCrop, RandAugment) to uint8 (normalisation and "
          f"erasing run on the device, not here), batch {args.batch}, median of {args.rounds} rounds")
    print("| loader | images/s | per worker ÷ raw core | ÷ ImageFolder |")
    print("|---|---:|---:|---:|")
    for name, rate in medians.items():
        if name.startswith("raw"):
            print(f"| {name} | {rate:.0f} | 1.00 | |")
            continue
        workers = int(name.split(", ")[1].split()[0])
        ours = name.startswith("antismooth")
        twin = medians[f"ImageFolder + DataLoader, {workers} worker(s)"]
        print(f"| {name} | {rate:.0f} | {rate / workers / raw:.2f} | {rate / twin:.2f} |" if ours else
              f"| {name} | {rate:.0f} | {rate / workers / raw:.2f} | 1.00 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
