"""Plan a run before launching it: per-rank memory of a model under a DeepSpeed config, and whether it fits.

Front end kept for `python tools/plan.py`; the program is antismooth.cli.plan (also installed as `antismooth-plan`).
"""
import sys

from antismooth.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
