"""Convert an ImageFolder dataset (train/<wnid>/<img>, val/<wnid>/<img>) into WebDataset tar shards.

Front end kept for `python tools/build_shards.py`; the program is antismooth.cli.build_shards (also installed as `antismooth-build-shards`).
"""
import sys

from antismooth.cli.build_shards import main

if __name__ == "__main__":
    sys.exit(main())
