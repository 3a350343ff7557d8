"""Nodes that disagree stop at start-up: each rank's software and the variables that change numerics or networking.

Every rank describes its node (`describe_node`); `check_agreement` compares each description with rank 0's and
returns one sentence naming the first node that differs and how, before any step is trained. Launchers make such
differences easily: DeepSpeed's ssh launcher passes on only NCCL*, PYTHON*, UCX*, MV2* and MLFLOW* variables to the
other nodes (deepspeed/launcher/runner.py), so a GLOO_SOCKET_IFNAME or TORCH_NCCL_* set where the user launched
reaches rank 0's node only; a node with another torch or DeepSpeed trains other numbers or fails in a collective.

What is compared, and why:
- Python, torch (with its CUDA), DeepSpeed, timm, webdataset and antismooth versions, and the antismooth
  checkout's commit: other code computes other numbers, or pickles collectives differently.
- Variables that change the numbers: TF32 and cuBLAS workspace switches, NCCL's algorithm and protocol (the order
  of a reduction's sums), PYTHONHASHSEED and WDS_SEED (orders of sets and of shards).
- Variables that change networking or failure handling: NCCL_* (but NCCL_DEBUG*, which only logs), TORCH_NCCL_*,
  TORCH_DISTRIBUTED_*, DEEPSPEED_TIMEOUT. Interface variables (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME,
  TP_SOCKET_IFNAME) may name another interface on each node (eth1 here, ens5 there), so only whether they are
  set is compared: set on one node and not on another is the launcher's forgetting, not a choice.
Not compared: OMP_NUM_THREADS and the like, which change speed, not results.
"""
from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

__all__ = ["describe_node", "check_agreement", "summary", "COMPARED_VARIABLES"]

SOFTWARE = ("python", "torch", "deepspeed", "timm", "webdataset", "antismooth", "commit")
NUMERICS_VARIABLES = ("NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "CUBLAS_WORKSPACE_CONFIG",
                      "PYTHONHASHSEED", "WDS_SEED", "DEEPSPEED_TIMEOUT")
COMPARED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_")
IGNORED_PREFIXES = ("NCCL_DEBUG",)
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME")
COMPARED_VARIABLES = NUMERICS_VARIABLES + INTERFACE_VARIABLES   # and every name with a COMPARED_PREFIXES prefix
SET_ELSEWHERE = "unset"


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> Optional[str]:
    """The commit of the checkout antismooth is imported from, None when it is not a checkout (an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def compared_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` that nodes must agree on; interface names reduced to whether they are set."""
    chosen = {}
    for name, value in environ.items():
        if name in COMPARED_VARIABLES or (name.startswith(COMPARED_PREFIXES) and not name.startswith(IGNORED_PREFIXES)):
            chosen[name] = value
    return dict(sorted(chosen.items()))


def describe_node(environ: Mapping[str, str]) -> dict:
    """This rank's host, software versions and compared variables (small: every rank sends it to every rank)."""
    torch_version = torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
    software = {"python": platform.python_version(), "torch": torch_version, "deepspeed": _version("deepspeed"),
                "timm": _version("timm"), "webdataset": _version("webdataset"), "antismooth": _version("antismooth"),
                "commit": _commit()}
    return {"host": socket.gethostname(), "software": software, "variables": compared_variables(environ)}


def _differences(here: dict, there: dict) -> list[str]:
    """How `there` (another rank's node) differs from `here` (rank 0's), each as 'what: there, here'."""
    found = []
    for name in SOFTWARE:
        if name == "commit" and None in (here["software"]["commit"], there["software"]["commit"]):
            continue  # not a checkout there, or git unreadable (another owner, no git): nothing to compare
        if here["software"].get(name) != there["software"].get(name):
            found.append(f"{name} {there['software'].get(name)} there, {here['software'].get(name)} here")
    names = sorted(set(here["variables"]) | set(there["variables"]))
    for name in names:
        a, b = here["variables"].get(name), there["variables"].get(name)
        if name in INTERFACE_VARIABLES and (a is None) == (b is None):
            continue  # each node may name its own interface
        if a != b:
            found.append(f"{name} is {_shown(b)} there, {_shown(a)} here")
    return found


def _shown(value: Optional[str]) -> str:
    return SET_ELSEWHERE if value is None else repr(value)


def check_agreement(nodes: Sequence[dict]) -> Optional[str]:
    """None when every rank's description (`nodes`, in rank order) agrees with rank 0's in what matters; else one
    sentence naming the first node that differs, the difference, and the fix."""
    here = nodes[0]
    for rank, there in enumerate(nodes[1:], start=1):
        if (found := _differences(here, there)):
            others = sum(1 for other in nodes[rank + 1:] if _differences(here, other))
            more = f" (and {others} more rank{'s' * (others > 1)} differ)" if others else ""
            return (f"rank {rank} on node {there['host']} does not run what rank 0 on {here['host']} runs: "
                    f"{'; '.join(found)}{more}. Give every node the same software and environment; with DeepSpeed's "
                    "ssh launcher (deepspeed --hostfile), which passes on only NCCL*, PYTHON*, UCX*, MV2* and MLFLOW* "
                    "variables, write the others to .deepspeed_env (bash cluster/deepspeed_env.sh) before "
                    "launching.")
    return None


def summary(nodes: Sequence[dict]) -> str:
    """One line saying what the agreeing nodes run, and each compared variable as each node has it."""
    hosts = list(dict.fromkeys(node["host"] for node in nodes))
    software = nodes[0]["software"]
    parts = [f"Python {software['python']}", f"torch {software['torch']}", f"DeepSpeed {software['deepspeed']}",
             f"timm {software['timm']}", f"webdataset {software['webdataset']}",
             f"antismooth {software['antismooth']}" + (f" (commit {software['commit']})" if software["commit"] else "")]
    variables = []
    for name in sorted({name for node in nodes for name in node["variables"]}):
        values = {node["host"]: node["variables"].get(name) for node in nodes}
        if len(set(values.values())) == 1:
            variables.append(f"{name}={next(iter(values.values()))} on every node")
        else:
            variables.append(f"{name}=" + ", ".join(f"{value} on {host}" for host, value in values.items()))
    return (f"{len(hosts)} node{'s' * (len(hosts) > 1)} ({', '.join(hosts)}) agree: {', '.join(parts)}; "
            + ("; ".join(variables) if variables else "no variable that changes numerics or networking is set"))
