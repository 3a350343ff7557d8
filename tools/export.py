"""Consolidate a DeepSpeed ZeRO checkpoint of a run into one weights file that timm loads.

Front end kept for `python tools/export.py`; the program is antismooth.cli.export (also installed as `antismooth-export`).
"""
import sys

from antismooth.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
