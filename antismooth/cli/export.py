"""Consolidate a DeepSpeed ZeRO checkpoint of a run into one weights file that timm loads.

    python tools/export.py runs/as24 --out as24.safetensors
    python tools/export.py runs/as24/checkpoints --tag step00012000 --out as24.pth --dtype bf16

Takes a run folder, its checkpoints/ folder, or one tag folder; the default tag is the one DeepSpeed's
`latest` file names (the newest complete checkpoint). Works for ZeRO stage 1, 2 and 3 at any world size,
with DeepSpeed's own zero_to_fp32. The model name, its kwargs, the class list and the evaluation data
config go into the .safetensors metadata (or `<out>.json` beside a .pth), so tools/eval.py and
timm.create_model(name, checkpoint_path=...) need nothing else. The work is antismooth.export's.
"""
from __future__ import annotations

import argparse
import sys
import time

from antismooth.export import DTYPES, export_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder (runs/<run>), its checkpoints/ folder, or one tag folder")
    p.add_argument("--tag", help="checkpoint tag, e.g. step00012000 (default: the one 'latest' names)")
    p.add_argument("--out", required=True, help="output file: *.safetensors (recommended) or *.pth")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="dtype of the floating-point weights written (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 a problem with the checkpoint or the output path)."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        result = export_checkpoint(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype,
                                   overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written.", file=sys.stderr)
        return 130
    ref, meta = result.ref, result.meta
    model = meta.get("model", "an undescribed model (tools/eval.py will need --model)")
    print(f"exported {ref.tag} of {ref.checkpoint_dir} (ZeRO-{ref.stage or '1/2'}, {ref.world_size} rank"
          f"{'s' if ref.world_size > 1 else ''}): {model}, {result.num_params / 1e6:.2f} M values in {args.dtype} "
          f"-> {result.path} ({result.num_bytes / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
