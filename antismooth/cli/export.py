"""Consolidate a DeepSpeed ZeRO checkpoint of a run into one weights file that timm loads.

    python tools/export.py runs/as24 --out as24.safetensors
    python tools/export.py runs/as24/checkpoints --tag step00012000 --out as24.pth --dtype bf16
    python tools/export.py runs/as24 --out as24/ --format timm [--push-to-hub org/attnscale_small_24]

Takes a run folder, its checkpoints/ folder, or one tag folder; the default tag is the one DeepSpeed's
`latest` file names (the newest complete checkpoint). Works for ZeRO stage 1, 2 and 3 at any world size,
with DeepSpeed's own zero_to_fp32. The model name, its kwargs, the class list and the evaluation data
config go into the .safetensors metadata (or `<out>.json` beside a .pth), so tools/eval.py and
timm.create_model(name, checkpoint_path=...) need nothing else. --format timm writes timm's own folder
instead (config.json, model.safetensors, a model card README.md), which
timm.create_model("local-dir:DIR", pretrained=True) loads after `import antismooth`, and which
--push-to-hub uploads. The work is antismooth.export's and antismooth.hub's.
"""
from __future__ import annotations

import argparse
import sys
import time

from antismooth.cli import usage
from antismooth.export import DTYPES, export_checkpoint
from antismooth.hub import HubError, export_timm, push_to_hub


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = usage.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder (runs/<run>), its checkpoints/ folder, or one tag folder")
    p.add_argument("--tag", help="checkpoint tag, e.g. step00012000 (default: the one 'latest' names)")
    p.add_argument("--out", required=True,
                   help="output file: *.safetensors (recommended) or *.pth; with --format timm, a folder")
    p.add_argument("--format", choices=("file", "timm"), default="file",
                   help="file: one weights file, our description in it; timm: timm's folder (config.json, "
                        "model.safetensors, README.md) for local-dir:/hf-hub: (default: %(default)s)")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="with --format timm: also upload the model to this Hugging Face Hub repo (org/name)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="dtype of the floating-point weights written (default: %(default)s)")
    p.add_argument("--ema", action="store_true",
                   help="export the model EMA the run kept (--model-ema, on by default) instead of its weights")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if args.push_to_hub and args.format != "timm":
        usage.fail("--push-to-hub uploads timm's folder format: add --format timm.")
    check_paths(args)
    return args


def check_paths(args: argparse.Namespace) -> None:
    """The checkpoint can be read and --out written, before the slow consolidation (antismooth.export checks
    the rest: the file's suffix, an existing output without --overwrite, the checkpoint's own files)."""
    usage.readable_path(args.checkpoint, "checkpoint", "give a run folder (runs/<run>), its checkpoints/ folder, "
                                                       "or one tag folder inside it")
    if args.format == "timm":
        usage.writable_folder(args.out, "--out")
    else:
        usage.writable_file(args.out, "--out", args.overwrite)


@usage.entry_point(interrupted="interrupted: nothing was written.",
                   user_errors=(OSError, ValueError))   # the checkpoint's and the output's own sentences
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 a problem with the checkpoint or the output path)."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.format == "timm":
        result, model, card = export_timm(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype,
                                          overwrite=args.overwrite, ema=args.ema)
    else:
        result = export_checkpoint(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype,
                                   overwrite=args.overwrite, ema=args.ema)
    seconds = time.perf_counter() - start
    if args.format == "file":
        ref = result.ref
        model_name = result.meta.get("model", "an undescribed model (tools/eval.py will need --model)")
        what = "the model EMA of " if args.ema else ""
        print(f"exported {what}{ref.tag} of {ref.checkpoint_dir} (ZeRO-{ref.stage or '1/2'}, {ref.world_size} rank"
              f"{'s' if ref.world_size > 1 else ''}): {model_name}, {result.num_params / 1e6:.2f} M values in "
              f"{args.dtype} -> {result.path} ({result.num_bytes / 1e6:.1f} MB, {seconds:.1f} s)")
        return 0
    print(f"exported {result.ref.tag} of {result.ref.checkpoint_dir}: {result.meta['model']}, "
          f"{result.num_params / 1e6:.2f} M values in {args.dtype} -> {result.path}/ (timm format, "
          f"{result.num_bytes / 1e6:.1f} MB, {seconds:.1f} s); load it with "
          f"timm.create_model(\"local-dir:{result.path}\", pretrained=True) after import antismooth")
    if args.push_to_hub:
        try:
            url = push_to_hub(model, result.meta, args.push_to_hub, card, result.path)
        except HubError as e:
            raise usage.ConfigError(str(e)) from e
        print(f"uploaded to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
