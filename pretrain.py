"""Train an AttnScale/FeatScale ViT or CaiT on WebDataset shards with a DeepSpeed ZeRO engine.

    deepspeed pretrain.py --deepspeed_config ds_configs/zero2.json \\
        --model attnscale_small_24 --data shards/imagenet --output runs/as24

Also runs under `torchrun` and as plain `python pretrain.py ...` (one process). Starting the
same command again resumes from the newest complete checkpoint in --output, sample-exactly.
Front end kept for `deepspeed pretrain.py`; the program is antismooth.startup (also installed as `antismooth-train`).
"""
import signal
import sys


def _note_early_signal(number, frame):
    """SLURM may signal a job that is still starting (a preemption, a short --signal lead): SIGTERM and SIGUSR2 are
    only noted here, so the run exits 75 (requeued by cluster/*.sbatch) instead of dying by the signal: at once if
    the ranks have not met yet (antismooth.interrupt.signals_end_the_rendezvous: nothing trained), else after saving
    at its first step boundaries (antismooth.interrupt.StopRequests adopts the note)."""
    _note_early_signal.received.append(number)


_note_early_signal.received = []
for _number in (signal.SIGTERM, signal.SIGUSR2):   # antismooth.interrupt.EARLY_SIGNALS; first: the imports below take seconds
    signal.signal(_number, _note_early_signal)

from antismooth.startup import build_parser, command, main, parse_config, run  # noqa: F401  (pretrain.main for tests)

if __name__ == "__main__":
    sys.exit(command())
