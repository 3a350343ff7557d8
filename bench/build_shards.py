"""Shard builder throughput beside GNU tar writing the same files, measured in the same run.

Replicates an ImageFolder's train/ split (default tests/data/images: 103 real photographs) into a temporary one,
then times `tar -cf` of the same file list (alone, and followed by sha256sum of the archive, as the
builder hashes every byte it writes) and the builder with 1 and 2 workers (default structural
check, and --decode-check), each 3x with the median kept. Outputs go to the same disk.

    python bench/build_shards.py [--images DIR] [--copies 20] [--repeats 3] [--max-count 128]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from antismooth.data.shards import ShardOptions, build

IMAGES = Path(__file__).resolve().parents[1] / "tests" / "data" / "images"  # the repository's own 103 photographs


def make_imagefolder(images: Path, root: Path, copies: int) -> tuple[list[str], int]:
    """Copy every image of images/train `copies` times into root/train/<class>/; (relative paths, total bytes).

    Copies, not hard links: tar would store a hard link as a link and write no data for it.
    """
    rel_paths, total = [], 0
    for src in sorted((images / "train").glob("*/*")):
        dst_dir = root / "train" / src.parent.name
        dst_dir.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            dst = dst_dir / f"c{k:03d}_{src.name}"
            shutil.copyfile(src, dst)
            rel_paths.append(str(dst.relative_to(root)))
            total += dst.stat().st_size
    return sorted(rel_paths), total


def time_tar(root: Path, file_list: Path, out: Path) -> float:
    """Seconds for GNU tar to write the listed files into one archive."""
    t0 = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(root), "--null", "-T", str(file_list)], check=True)
    return time.perf_counter() - t0


def time_tar_sha256(root: Path, file_list: Path, out: Path) -> float:
    """Seconds for tar plus sha256sum of its archive: the builder must hash every byte it writes."""
    t0 = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(root), "--null", "-T", str(file_list)], check=True)
    subprocess.run(["sha256sum", str(out)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def time_build(root: Path, out: Path, workers: int, options: ShardOptions) -> float:
    """Seconds for the builder to list, plan and write the shards and manifest."""
    t0 = time.perf_counter()
    build(str(root), str(out), options, workers=workers)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=IMAGES,
                        help="an ImageFolder root whose train/ split is copied (default: tests/data/images)")
    parser.add_argument("--copies", type=int, default=20, help="copies of each image (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is kept")
    parser.add_argument("--max-count", type=int, default=128,
                        help="samples per shard (default 128, so 2 workers have shards to share)")
    parser.add_argument("--workdir", default=None, help="folder for input and outputs (default: a temp dir)")
    args = parser.parse_args(argv)
    if not (args.images / "train").is_dir():
        print(f"error: no train/ split of class folders in {args.images}.", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.workdir))
    try:
        root = work / "src"
        rel_paths, total_bytes = make_imagefolder(args.images, root, args.copies)
        file_list = work / "files.txt"
        file_list.write_bytes(b"".join(p.encode() + b"\0" for p in rel_paths))
        n = len(rel_paths)
        fast = ShardOptions(max_count=args.max_count)
        decode = ShardOptions(max_count=args.max_count, decode_check=True)
        methods = {
            "GNU tar -cf": lambda out: time_tar(root, file_list, out / "all.tar"),
            "GNU tar -cf, then sha256sum": lambda out: time_tar_sha256(root, file_list, out / "all.tar"),
            "build_shards": lambda out: time_build(root, out, 1, fast),
            "build_shards --workers 2": lambda out: time_build(root, out, 2, fast),
            "build_shards --decode-check": lambda out: time_build(root, out, 1, decode),
            "build_shards --decode-check --workers 2": lambda out: time_build(root, out, 2, decode),
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        out = work / "out"
        out.mkdir()
        time_tar(root, file_list, out / "warm.tar")  # read every input once: all methods start from the page cache
        for _ in range(args.repeats):
            for name, run in methods.items():  # interleaved, so a slow spell of the machine hits all methods
                shutil.rmtree(out)
                out.mkdir()
                os.sync()  # start each run with no dirty pages from the previous one
                times[name].append(run(out))

        print(f"{n} images, {total_bytes / 1e6:.0f} MB ({args.copies} copies of {n // args.copies}); "
              f"median of {args.repeats} runs; {os.cpu_count()} CPUs")
        print(f"{'method':<42}{'s':>7}{'images/s':>10}{'MB/s':>8}{'vs tar':>8}")
        tar_s = statistics.median(times["GNU tar -cf"])
        for name, ts in times.items():
            s = statistics.median(ts)
            print(f"{name:<42}{s:>7.2f}{n / s:>10.0f}{total_bytes / 1e6 / s:>8.0f}{tar_s / s:>8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
