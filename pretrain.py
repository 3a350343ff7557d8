"""Train an AttnScale/FeatScale ViT or CaiT on WebDataset shards with a DeepSpeed ZeRO engine.

    deepspeed pretrain.py --deepspeed_config ds_configs/zero2.json \\
        --model attnscale_small_24 --data shards/imagenet --output runs/as24

Also runs under `torchrun` and as plain `python pretrain.py ...` (one process). Starting the
same command again resumes from the newest complete checkpoint in --output, sample-exactly.
Front end kept for `deepspeed pretrain.py`; the program is antismooth.startup (also installed as `antismooth-train`).
"""
import sys

from antismooth.startup import build_parser, command, main, parse_config, run  # noqa: F401  (pretrain.main for tests)

if __name__ == "__main__":
    sys.exit(command())
