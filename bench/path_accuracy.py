"""What each fast input path costs in accuracy: the demo's recipe (tools/demo.py: digits, a 24-block AttnScale ViT,
2 DeepSpeed processes on the CPU) trained once per path with the same seed, exported and evaluated on the same
full-size validation shards, against the reference path (the CPU workers' full decode). The reference is also
trained with other seeds: the spread of those runs is what a path must stay within to count as costing nothing.

    python bench/path_accuracy.py --json bench/results/path_accuracy.json        # ~25 min on 2 CPU cores

Paths: `--reduced-decode` (libjpeg's DCT scaling in the workers); shards built with `--max-side 24` (every 32 px
digit re-encoded at 24 px) and `--max-side 20` (ImageNet's usual 320 at the scale of its photographs, median 500 px
long side: 320/500 of the digits' 32 px); `--decode gpu` (the device path's decode and resize, here run on the CPU).
The validation split is always the reference's full-size one, as docs/decode.md advises for --max-side.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools import demo  # noqa: E402

# name -> (ShardOptions fields of the training split, extra pretrain.py flags)
PATHS: dict[str, tuple[dict, list[str]]] = {
    "reference": ({}, ["--decode", "cpu"]),
    "reduced_decode": ({}, ["--decode", "cpu", "--reduced-decode"]),
    "max_side_24": ({"max_side": 24}, ["--decode", "cpu"]),
    "max_side_20": ({"max_side": 20}, ["--decode", "cpu"]),
    "decode_gpu_on_cpu": ({}, ["--decode", "gpu"]),
}


def build_shards(folder: Path, imagefolder: Path, reference: Path | None, options: dict) -> Path:
    """Shards of the digits with `options`; the validation split copied from `reference` (full size) when given."""
    from antismooth.data.shards import ShardOptions, build

    if not folder.joinpath("train.json").is_file():
        build(str(imagefolder), str(folder), ShardOptions(max_count=500, **options))
    if reference is not None:
        for old in folder.glob("val*"):
            old.unlink()
        for part in reference.glob("val*"):
            shutil.copy2(part, folder / part.name)
    return folder


def train(name: str, shards: Path, flags: list[str], seed: int, work: Path, processes: int) -> dict:
    """One path at one seed; a run whose figures exist is read back, an unfinished one resumes (pretrain.py's own
    resume), so an interrupted bench goes on where it stopped."""
    run_folder = work / "runs" / f"{name}-seed{seed}"
    figures = run_folder / "eval.json"
    start = time.time()
    if figures.is_file():
        return {**json.loads(figures.read_text()), "path": name, "seed": seed, "seconds": None}
    schedule = [f"--{k.replace('_', '-')}={v}" for k, v in demo.SCHEDULE.items()]
    demo.train_export_eval(shards, run_folder, "attnscale_tiny_24", [*schedule, "--seed", str(seed), *flags],
                           processes, "ds_configs/demo.json", figures)
    return {**json.loads(figures.read_text()), "path": name, "seed": seed, "seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--seed", type=int, default=0, help="the seed every path trains with")
    parser.add_argument("--spread-seeds", type=int, nargs="*", default=[1, 2],
                        help="further seeds of the reference, for the run-to-run spread")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "path_accuracy")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    imagefolder = args.work / "digits"
    if not imagefolder.is_dir():
        demo.write_digits_imagefolder(imagefolder)
    reference = build_shards(args.work / "shards-reference", imagefolder, None, {})
    runs = []
    for name in args.paths:
        options, flags = PATHS[name]
        shards = (build_shards(args.work / f"shards-{name}", imagefolder, reference, options) if options
                  else reference)
        runs.append(train(name, shards, flags, args.seed, args.work, args.processes))
    runs += [train("reference", reference, PATHS["reference"][1], seed, args.work, args.processes)
             for seed in args.spread_seeds]
    summary = summarise(runs, args.seed)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    return 0


def summarise(runs: list[dict], seed: int) -> dict:
    """Each path's top-1 and loss against the reference's at the same seed, and the reference's spread over seeds."""
    base = next(r for r in runs if r["path"] == "reference" and r["seed"] == seed)
    seeds = [r for r in runs if r["path"] == "reference"]
    spread = {"top1_range": round(max(r["top1"] for r in seeds) - min(r["top1"] for r in seeds), 2),
              "top1_stdev": round(statistics.stdev(r["top1"] for r in seeds), 2) if len(seeds) > 1 else None,
              "seeds": [r["seed"] for r in seeds]}
    paths = {r["path"]: {"top1": round(r["top1"], 2), "loss": round(r["loss"], 4),
                         "top1_vs_reference": round(r["top1"] - base["top1"], 2),
                         "loss_vs_reference": round(r["loss"] - base["loss"], 4)}
             for r in runs if r["seed"] == seed}
    return {"paths": paths, "reference_spread": spread}


if __name__ == "__main__":
    sys.exit(main())
