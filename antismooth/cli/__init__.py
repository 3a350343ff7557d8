"""Command-line front ends (argument parsing, progress bars, printing) over the library.

Each module's `main(argv)` is a console entry point (`antismooth-export`, …; see pyproject.toml) and is
what `python tools/<name>.py` runs, so both spellings stay the same program.
"""
