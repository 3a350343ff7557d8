"""Convert a run's checkpoint to DeepSpeed's universal checkpoint, for a resume on another number of processes.

    python tools/reshard.py runs/as48 [--tag step00012000] [--workers 8]

pretrain.py does this by itself when a run resumes on another world size (rank 0 converts while the
others wait). Run it beforehand to convert while no GPUs wait, or to see DeepSpeed's whole output.
The result sits beside the checkpoint as `<tag>_universal`; pretrain.py reuses it, and prunes it once
a newer checkpoint is saved. DeepSpeed's converter shows a progress bar per phase.
"""
from __future__ import annotations

import argparse
from typing import Optional

from antismooth.checkpoint import CheckpointError, RunFolder, convert_to_universal, list_tags, resolve_checkpoint
from antismooth.cli import usage
from antismooth.distributed import usable_cpus


def build_parser() -> argparse.ArgumentParser:
    p = usage.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a pretrain.py --output folder")
    p.add_argument("--tag", help="checkpoint to convert (default: the newest complete one, as `latest` names it)")
    p.add_argument("--workers", type=int, default=max(1, min(8, usable_cpus())),
                   help="processes for DeepSpeed's extract and merge phases (default: the CPUs here, at most 8)")
    return p


def check_run(args: argparse.Namespace) -> tuple[RunFolder, str]:
    """The run folder and the tag to convert, every rank's files there, and room to write the conversion."""
    usage.at_least(args.workers, "--workers", 1, "processes")
    root = usage.readable_folder(args.run, "run", "give the --output folder of a pretrain.py run")
    if root.name == "checkpoints" and (root / "latest").is_file():
        usage.fail(f"{root} is a run's checkpoints/ folder: give the run folder above it, {root.parent}.")
    run = RunFolder(root)
    tag = args.tag or run.latest_tag()
    if tag is None or not run.tag_dir(tag).is_dir():
        what = f"no checkpoint {tag}" if tag else "no complete checkpoint"
        tags = list_tags(run.checkpoints)
        usage.fail(f"{run.checkpoints} has {what}: give the --output folder of a pretrain.py run (and --tag one of "
                   f"its step* folders{': ' + ', '.join(tags) if tags else ''}).")
    if run.saved_world_size(tag) is not None:   # ZeRO shards to convert
        resolve_checkpoint(run.checkpoints, tag)   # every rank's files are there
        usage.writable_folder(run.checkpoints, "run")
    return run, tag


@usage.entry_point(interrupted="interrupted: the checkpoint is untouched; rerun to convert it.",
                   user_errors=(CheckpointError,))
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run, tag = check_run(args)
    saved = run.saved_world_size(tag)
    if saved is None:
        print(f"{tag} holds no ZeRO shards (ZeRO-0): it loads on any number of processes as it is; nothing to do.")
        return 0
    conversion = convert_to_universal(run.checkpoints, tag, workers=args.workers)
    done = "was already converted" if conversion.reused else f"converted in {conversion.seconds:.1f} s"
    print(f"{tag} (saved by {saved} processes) {done}: {conversion.folder}. Resume with the same pretrain.py "
          "command on any number of processes.")
    return 0
