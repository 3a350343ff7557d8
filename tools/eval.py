"""Top-1, top-5 and loss of exported (or official) weights on a validation split.

Front end kept for `python tools/eval.py`; the program is antismooth.cli.eval (also installed as `antismooth-eval`).
"""
import sys

from antismooth.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
