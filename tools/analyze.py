"""Oversmoothing diagnostics, block by block, of trained or freshly initialised models side by side.

Front end kept for `python tools/analyze.py`; the program is antismooth.cli.analyze (also installed as `antismooth-analyze`).
"""
import sys

from antismooth.cli.analyze import main

if __name__ == "__main__":
    sys.exit(main())
