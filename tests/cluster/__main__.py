"""Bring the test cluster up or down by hand, from the repository root, as root:

    python -m tests.cluster up [--nodes 3]     # n1..nN; then e.g. `python -m tests.cluster shell n1`
    python -m tests.cluster status
    python -m tests.cluster down
"""
from __future__ import annotations

import argparse
import os
import sys

from .harness import ROOT, ClusterError, down, load, status, up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status", "shell"])
    parser.add_argument("node", nargs="?", default="n1", help="for shell: the node (default n1)")
    parser.add_argument("--nodes", type=int, default=2, help="for up: how many nodes (default 2)")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            cluster = up(args.nodes)
            for node in cluster.nodes:
                print(f"{node.name}: {node.address} (eth0), {node.isolated_address} (eth1)")
            print(f"configs, keys and logs in {ROOT}; `python -m tests.cluster shell n1` for a shell on n1 "
                  f"(sinfo, sbatch, ssh n2 work there)")
        elif args.action == "down":
            down()
            print("down: no cluster process, namespace or link is left")
        elif args.action == "status":
            print(status())
        else:
            cluster = load()
            shell = os.environ.get("SHELL", "/bin/bash")
            os.execvpe("nsenter", cluster.command_on(args.node, [shell]), cluster.environment())
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
