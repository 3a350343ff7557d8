"""Convert an ImageFolder dataset (train/<wnid>/<img>, val/<wnid>/<img>) into WebDataset tar shards.

    python tools/build_shards.py --src /data/imagenet --out shards/imagenet
    python tools/build_shards.py --out shards/imagenet --verify

Writes {split}-000000.tar ... and a manifest {split}.json per split. Rerunning the same command
after an interruption keeps the complete shards and writes the rest. The work is done by
antismooth.data.shards; this file parses flags, shows progress and prints the summary.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from tqdm import tqdm

from antismooth.cli import usage
from antismooth.data import shards
from antismooth.distributed import usable_cpus


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; defaults live in antismooth.data.shards."""
    p = usage.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", help="dataset root holding the split folders (train/, val/)")
    p.add_argument("--out", default="shards/imagenet", help="output folder (default: %(default)s)")
    p.add_argument("--splits", default=",".join(shards.DEFAULT_SPLITS),
                   help="split folders to convert, comma-separated; absent ones are passed over "
                        "(default: %(default)s)")
    p.add_argument("--names", help="class names file: lines 'wnid name' or JSON; stored in the manifest")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample-to-shard shuffle (default: %(default)s)")
    p.add_argument("--max-count", type=int, default=shards.DEFAULT_MAX_COUNT,
                   help="samples per shard at most (default: %(default)s)")
    p.add_argument("--max-size-mb", type=float, default=shards.DEFAULT_MAX_SIZE_MB,
                   help="megabytes (10^6 bytes) per shard at most (default: %(default)s)")
    p.add_argument("--max-size", type=int, default=None, metavar="N",
                   help="re-encode images whose shorter side exceeds N pixels to JPEG with that side N "
                        "(default: off, images are stored byte for byte)")
    p.add_argument("--quality", type=int, default=shards.DEFAULT_QUALITY,
                   help="JPEG quality of images re-encoded by --max-size (default: %(default)s)")
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="re-encode images whose longer side exceeds N pixels to JPEG with that side N (FFCV's "
                        "max_resolution: fewer bytes to read and pixels to decode, fewer source pixels for large "
                        "crops; docs/decode.md) (default: off)")
    p.add_argument("--max-side-quality", type=int, default=shards.DEFAULT_QUALITY,
                   help="JPEG quality of images re-encoded by --max-side (default: %(default)s)")
    p.add_argument("--decode-check", action="store_true",
                   help="decode every image while building instead of the structural check (slower)")
    p.add_argument("--workers", type=int, default=usable_cpus(),
                   help="processes writing shards; the output is the same for any number "
                        "(default: the CPUs this process may use, cgroup and SLURM limits included: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace shards built with other options or input")
    p.add_argument("--skip-unknown-classes", action="store_true",
                   help="leave out (and list in the manifest) class folders of a split that train/ does not have, "
                        "instead of refusing: labels are train/'s class indices in every split")
    p.add_argument("--verify", action="store_true",
                   help="check the shards in --out against their manifests instead of building; exit 1 on mismatch")
    args = p.parse_args(argv)
    if not args.verify and not args.src:
        usage.fail("--src is required to build shards: pass the folder that holds train/ and val/ (or --verify "
                   "to check existing shards).")
    given, args.splits = args.splits, [s for s in args.splits.split(",") if s]
    if not args.splits:
        usage.fail(f"--splits {given!r} names no split: pass split folder names, e.g. --splits train,val.")
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every flag a user can get wrong, before anything is listed or written."""
    usage.at_least(args.workers, "--workers", 1, "processes writing shards")
    if args.verify:
        usage.readable_folder(args.out, "--out", "give the folder tools/build_shards.py wrote the shards into")
        return
    usage.readable_folder(args.src, "--src", "give the folder that holds train/ and val/ (ImageFolder layout)")
    usage.writable_folder(args.out, "--out")
    src, out = os.path.realpath(args.src), os.path.realpath(args.out)
    if out == src or out.startswith(src + os.sep):
        usage.fail(f"--out {args.out} is inside --src {args.src}: the shards would mix with the images; give an "
                   "output folder outside it.")
    if args.names:
        usage.readable_file(args.names, "--names", "give a file of 'wnid name' lines or a JSON object")
    usage.at_least(args.max_count, "--max-count", 1, "samples per shard")
    if args.max_size_mb <= 0:
        usage.fail(f"--max-size-mb must be a positive number of megabytes, got {args.max_size_mb}.")
    usage.at_least(args.max_size, "--max-size", 1, "pixels of the shorter side")
    usage.at_least(args.max_side, "--max-side", 1, "pixels of the longer side")
    usage.in_range(args.quality, "--quality", 1, 100, "JPEG quality")
    usage.in_range(args.max_side_quality, "--max-side-quality", 1, 100, "JPEG quality")


def say_missing_splits(args: argparse.Namespace, listings: list[shards.SplitListing]) -> None:
    """A split asked for but absent under --src is said once, with what happens without it (the default
    --splits train,val: no val/ means no evaluation anywhere downstream)."""
    found = {listing.split for listing in listings}
    for split in args.splits:
        if split in found:
            continue
        then = (" pretrain.py will train without evaluating, and tools/eval.py and tools/analyze.py need "
                "--split train or another validation set." if split == "val" else "")
        print(f"note: {args.src} has no {split}/ folder: no {split} shards are built.{then}", file=sys.stderr)


def _bar(desc: str, total: int, unit: str, unit_scale: bool = True) -> tqdm:
    """A progress bar on stderr; silent when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def build(args: argparse.Namespace) -> int:
    """Build every split found under --src and print one summary line per split."""
    options = shards.ShardOptions(seed=args.seed, max_count=args.max_count, max_size_mb=args.max_size_mb,
                                  max_size=args.max_size, quality=args.quality, decode_check=args.decode_check,
                                  max_side=args.max_side, max_side_quality=args.max_side_quality)
    names = shards.load_names(args.names) if args.names else None
    # List every split before writing anything, so a layout or class problem in val/ surfaces before train is built.
    if sys.stderr.isatty():
        print(f"listing the split folders under {args.src} ...", file=sys.stderr)
    listings = shards.list_splits(args.src, args.splits, args.skip_unknown_classes)
    say_missing_splits(args, listings)
    with shards.WorkerPool(args.workers) as pool:
        for listing in listings:
            split = listing.split
            start, done_bytes = time.perf_counter(), 0
            with _bar(split, len(listing.files), "img") as bar:
                def progress(images: int, nbytes: int, start: float = start) -> None:
                    nonlocal done_bytes
                    done_bytes += nbytes
                    bar.set_postfix_str(f"{done_bytes / 1e6 / max(time.perf_counter() - start, 1e-9):.0f} MB/s",
                                        refresh=False)
                    bar.update(images)

                report = shards.build_split(listing, args.out, options, names=names, overwrite=args.overwrite,
                                            progress=progress, pool=pool)
            m = report.manifest
            gb = sum(s["bytes"] for s in m["shards"]) / 1e9
            kept = f"; {report.kept} shards kept from an earlier run" if report.kept else ""
            reencoded = f", {m['reencoded']} re-encoded smaller" if "reencoded" in m else ""
            print(f"{split}: wrote {m['num_samples']} images{reencoded} in {len(m['shards'])} shards ({gb:.2f} GB), "
                  f"skipped {len(m['skipped'])} files (listed in {os.path.join(args.out, split + '.json')}){kept}")
    return 0


def verify(args: argparse.Namespace) -> int:
    """Check every split's shards against its manifest; print each problem and return 1 if any."""
    failed = False
    for split in shards.find_manifests(args.out, args.splits):
        manifest = shards.load_manifest(os.path.join(args.out, f"{split}.json"))
        with _bar(f"verify {split}", len(manifest["shards"]), "shard", unit_scale=False) as bar:
            problems = shards.verify_split(args.out, split, workers=args.workers, progress=bar.update)
        for problem in problems:
            print(f"{split}: {problem}")
        status = f"{len(problems)} problem(s)" if problems else "OK"
        print(f"{split}: verified {len(manifest['shards'])} shards, {manifest['num_samples']} images: {status}")
        failed |= bool(problems)
    return 1 if failed else 0


@usage.entry_point(interrupted="interrupted: rerun the same command to resume from the complete shards.",
                   user_errors=(OSError, ValueError))   # antismooth.data.shards' own sentences (a bad layout...)
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 verify found problems, 2 a usage or input error)."""
    args = parse_args(argv)
    return verify(args) if args.verify else build(args)


if __name__ == "__main__":
    sys.exit(main())
