"""Convert a run's checkpoint to DeepSpeed's universal checkpoint, for a resume on another number of processes.

Front end kept for `python tools/reshard.py`; the program is antismooth.cli.reshard (also installed as `antismooth-reshard`).
"""
import sys

from antismooth.cli.reshard import main

if __name__ == "__main__":
    sys.exit(main())
