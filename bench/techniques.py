"""What the techniques do: plain ViT, AttnScale and FeatScale, 24 blocks each, trained with the
embedded demo's recipe and seed, then measured block by block with tools/analyze.py.

    python bench/techniques.py            # ~3 × the demo's time; writes runs/techniques/

Prints a markdown table (validation top-1, and the oversmoothing measurements at the last block)
and leaves the PNGs of tools/analyze.py in runs/techniques/report/.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("vit_tiny_24", "attnscale_tiny_24", "featscale_tiny_24")
LAST_BLOCK_MEASUREMENTS = ("hc_share", "delta_log_amplitude", "patch_uniformity")


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/techniques")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--skip-training", action="store_true", help="analyse the runs already in --out")
    args = parser.parse_args(argv)
    out = REPO / args.out
    shards = out / "shards"
    weights = {}
    for model in args.models:
        work = out / model
        weights[model] = work / f"{model}.safetensors"
        if not args.skip_training:
            run([sys.executable, "tools/demo.py", "--model", model, "--work", str(work.relative_to(REPO)),
                 "--shards", str(shards.relative_to(REPO)), "--eval-json", str(work / "eval.json")])
    run([sys.executable, "tools/analyze.py", "--weights", *map(str, weights.values()), "--data", str(shards),
         "--num-images", "128", "--out", str(out / "report"), "--overwrite"])

    report = json.loads((out / "report" / "report.json").read_text())
    print("\n| model | val top-1 % | " + " | ".join(f"{m}, last block" for m in LAST_BLOCK_MEASUREMENTS) + " |")
    print("|---|---:|" + "---:|" * len(LAST_BLOCK_MEASUREMENTS))
    for model, path in weights.items():
        top1 = json.loads((path.parent / "eval.json").read_text())["top1"]
        curves = _curves_of(report, path)
        cells = " | ".join(f"{curves[m][-1]:.3f}" for m in LAST_BLOCK_MEASUREMENTS)
        print(f"| {model} | {top1:.1f} | {cells} |")
    return 0


def _curves_of(report: dict, weights: Path) -> dict[str, list[float]]:
    """The measurement curves tools/analyze.py wrote for `weights` (labelled by the file's stem)."""
    return report["models"][weights.stem]


if __name__ == "__main__":
    sys.exit(main())
