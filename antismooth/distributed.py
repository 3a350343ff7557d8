"""The launcher's environment → rank, world, node and device; collectives on the backend's device.

The one place that knows about launchers and backends. Launchers describe a process in different
variables: DeepSpeed's launcher (pdsh, or `--hostfile … --no_ssh --node_rank N` on each node) and
torchrun set RANK/WORLD_SIZE/LOCAL_RANK; srun sets SLURM_*; Open MPI OMPI_COMM_WORLD_*; MPICH and
Intel MPI PMI_* with MPI_LOCALRANKID; MVAPICH MV2_COMM_WORLD_*. `detect_launch` reads them all into
one `Launch`; a process none of them describes is a world of one, and a process whose variables
say there are others but not who it is stops with one sentence (never N silent worlds of one).

NCCL groups serve CUDA tensors only ("No backend type associated with device type cpu"), so every
collective here works on `collective_device()`: the object and number collectives build their tensors there,
and `all_reduce_tensor` copies the tensor it is given there (a caller's CPU tensor works under NCCL too).
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError
from .nodes import check_agreement, describe_node, summary

__all__ = ["Launch", "DistEnv", "LaunchError", "detect_launch", "launch_variables", "init_distributed", "log_world", "collective_device",
           "all_reduce", "all_reduce_tensor", "all_reduce_async", "all_reduce_counts", "all_gather_object", "broadcast_object", "barrier", "leave", "check_shared_folder", "usable_cpus",
           "first_host", "tasks_on_node", "check_socket_interface", "interfaces", "check_port_free", "port_in_use",
           "PortInUse"]

_logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500           # torch.distributed's and DeepSpeed's default
SHARED_FOLDER_WAIT_SECONDS = 5.0      # network filesystems may show another node's new file a little late


class LaunchError(ConfigError):
    """The launcher's variables do not describe a usable process group; the message says what to set."""


@dataclass(frozen=True)
class Launch:
    """What the launcher's environment variables say about this process, before any process group exists."""
    launcher: str                     # "torchrun", "deepspeed", "env", "slurm", "openmpi", "mpich", "mvapich", "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: Optional[str]        # None: unknown (only an MPI launch across nodes without MASTER_ADDR)
    master_port: Optional[int]        # None: pick a free one (a world of one)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the joined world, and the device its work and its collectives run on."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    device: torch.device
    launcher: str = "none"

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


# --- reading the launcher's variables ----------------------------------------------------------------------

def _int(environ: Mapping[str, str], *names: str, default: Optional[int] = None) -> Optional[int]:
    """The first of `names` that is set, as an int; `default` when none is."""
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"{name}={value!r} is not a number: fix or unset it.") from None
    return default


def detect_launch(environ: Mapping[str, str] = os.environ) -> Launch:
    """Rank, world, local rank and rendezvous address from whichever launcher started this process."""
    if "RANK" in environ:
        return _from_torch_variables(environ)
    if "WORLD_SIZE" in environ and _int(environ, "WORLD_SIZE") != 1:
        raise LaunchError(f"WORLD_SIZE={environ['WORLD_SIZE']} is set but RANK is not: start the processes with "
                          "torchrun or deepspeed (they set both), or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT "
                          "for every process.")
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        return _from_slurm(environ)
    for launcher, rank, size, local_rank, local_size in _MPI_VARIABLES:
        if rank in environ:
            return _from_mpi(environ, launcher, rank, size, local_rank, local_size)
    tasks = _int(environ, "SLURM_NTASKS", default=1)
    if tasks > 1:
        _logger.warning("SLURM allocated %d tasks, but this process was not started by srun: it trains alone. "
                        "Start it with `srun python pretrain.py …`, or torchrun/deepspeed once per node.", tasks)
    return Launch("none", 0, 1, 0, 1, 0, "127.0.0.1", _int(environ, "MASTER_PORT"))


def _from_torch_variables(environ: Mapping[str, str]) -> Launch:
    """torchrun, DeepSpeed's launcher, or variables set by hand."""
    rank = _int(environ, "RANK")
    world = _int(environ, "WORLD_SIZE")
    if world is None:
        raise LaunchError(f"RANK={rank} is set but WORLD_SIZE is not: set WORLD_SIZE to the number of processes "
                          "(torchrun and deepspeed set both).")
    local_rank = _int(environ, "LOCAL_RANK", default=0 if world == 1 else None)
    if local_rank is None:
        raise LaunchError(f"RANK={rank} of WORLD_SIZE={world} is set but LOCAL_RANK is not: set it to the process's "
                          "index on its node (torchrun and deepspeed set it).")
    # torchrun: LOCAL_WORLD_SIZE, GROUP_RANK; DeepSpeed's launcher: LOCAL_SIZE, CROSS_RANK.
    local_world = _int(environ, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world)
    node_rank = _int(environ, "GROUP_RANK", "CROSS_RANK", "NODE_RANK", default=rank // max(local_world, 1))
    launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in environ or "GROUP_RANK" in environ
                else "deepspeed" if "CROSS_RANK" in environ or "LOCAL_SIZE" in environ else "env")
    master = environ.get("MASTER_ADDR") or ("127.0.0.1" if local_world >= world else None)
    if master is None:
        raise LaunchError(f"RANK={rank} of WORLD_SIZE={world} spans several nodes but MASTER_ADDR is not set: set it "
                          "(and MASTER_PORT) to the address of the node that runs rank 0.")
    _check_rank(rank, world, local_rank, local_world, "RANK", "LOCAL_RANK")
    return Launch(launcher, rank, world, local_rank, local_world, node_rank, master,
                  _int(environ, "MASTER_PORT", default=DEFAULT_MASTER_PORT if world > 1 else None))


def _from_slurm(environ: Mapping[str, str]) -> Launch:
    """srun: one task per process; the rendezvous is the first node of the step unless MASTER_ADDR says otherwise."""
    rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_STEP_NUM_TASKS")
    local_rank, node_rank = _int(environ, "SLURM_LOCALID", default=0), _int(environ, "SLURM_NODEID", default=0)
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or ""
    local_world = tasks_on_node(per_node, node_rank) if per_node else _int(environ, "SLURM_NTASKS_PER_NODE",
                                                                           default=world)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
    master = environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
    if master is None:
        master = "127.0.0.1" if local_world >= world else None
    if master is None:
        raise LaunchError("srun started this process on several nodes but neither MASTER_ADDR nor SLURM_JOB_NODELIST "
                          "is set: export MASTER_ADDR=<first node's hostname> before srun.")
    # Every task of a job must agree on the port without talking: derive it from the job id.
    job = _int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    port = _int(environ, "MASTER_PORT", default=DEFAULT_MASTER_PORT if job is None else 20000 + job % 20000)
    _check_rank(rank, world, local_rank, local_world, "SLURM_PROCID", "SLURM_LOCALID")
    return Launch("slurm", rank, world, local_rank, local_world, node_rank, master, port)


# (launcher, rank, size, local rank, local size) variables of the MPI launchers.
_MPI_VARIABLES = [
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
]


def _from_mpi(environ: Mapping[str, str], launcher: str, rank_var: str, size_var: str, local_rank_var: str,
              local_size_var: str) -> Launch:
    """mpirun / mpiexec: ranks from the MPI variables; MASTER_ADDR must be exported when there are several nodes."""
    rank, world = _int(environ, rank_var), _int(environ, size_var)
    if world is None:
        raise LaunchError(f"{rank_var} is set but {size_var} is not: start the processes with mpirun, which sets both.")
    local_rank = _int(environ, local_rank_var, default=rank if world == 1 else None)
    local_world = _int(environ, local_size_var, default=world)
    if local_rank is None:
        raise LaunchError(f"{launcher} set {rank_var} but not {local_rank_var}: set LOCAL_RANK for each process "
                          "(its index on its node).")
    master = environ.get("MASTER_ADDR") or ("127.0.0.1" if local_world >= world else None)
    _check_rank(rank, world, local_rank, local_world, rank_var, local_rank_var)
    return Launch(launcher, rank, world, local_rank, local_world, rank // max(local_world, 1), master,
                  _int(environ, "MASTER_PORT", default=DEFAULT_MASTER_PORT))


def _check_rank(rank: int, world: int, local_rank: int, local_world: int, rank_var: str, local_var: str) -> None:
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"{rank_var}={rank} is not a rank of a world of {world} processes: check the launcher's "
                          "variables.")
    if not 0 <= local_rank < max(local_world, 1):
        raise LaunchError(f"{local_var}={local_rank} is not a local rank among {local_world} processes on this node: "
                          "check the launcher's variables.")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],login1' → 'gpu07' (what `scontrol show hostnames`
    would print first; scontrol is not on every compute node's PATH)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise LaunchError(f"SLURM node list {nodelist!r} is not in SLURM's format: export MASTER_ADDR instead.")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node `node` from SLURM's compressed count list: '4(x2),2' → 4, 4, 2."""
    counts = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise LaunchError(f"SLURM task count {tasks_per_node!r} is not in SLURM's format: check "
                              "SLURM_TASKS_PER_NODE.")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[min(node, len(counts) - 1)]


def usable_cpus() -> int:
    """CPUs this process may run on: cgroup/SLURM/taskset limits included, unlike os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --- joining ---------------------------------------------------------------------------------------------------

def _device_for(launch: Launch, device_type: Optional[str]) -> torch.device:
    """This process's GPU from its local rank; with a per-task binding (one visible GPU per process), that one.
    The CPU when there is no GPU or `device_type` asks for it."""
    if device_type == "cuda" and not torch.cuda.is_available():
        raise LaunchError("no GPU is visible to this process: run on the CPU (--device cpu), or check "
                          "CUDA_VISIBLE_DEVICES.")
    if device_type == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if launch.local_rank >= visible:
        raise LaunchError(f"local rank {launch.local_rank} has no GPU: {visible} are visible to this process for "
                          f"{launch.local_world_size} processes on the node. Start one process per GPU, or check "
                          "CUDA_VISIBLE_DEVICES.")
    return torch.device("cuda", launch.local_rank)


def launch_variables(launch: Launch, device: torch.device) -> dict[str, str]:
    """The variables torch's env:// rendezvous and DeepSpeed read, from whichever launcher described this process.

    DeepSpeed takes LOCAL_RANK for the GPU index (its engine calls set_device(LOCAL_RANK), its process group
    binds device_id cuda:LOCAL_RANK). With one GPU visible per process (`srun --gpus-per-task=1`,
    CUDA_VISIBLE_DEVICES set per rank) that GPU is cuda:0 whatever the local rank, so LOCAL_RANK says the index
    of the GPU chosen here; DistEnv.local_rank keeps the process's place on its node."""
    local_rank = device.index if device.type == "cuda" and device.index is not None else launch.local_rank
    return dict(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(local_rank),
                LOCAL_WORLD_SIZE=str(launch.local_world_size), MASTER_ADDR=str(launch.master_addr),
                MASTER_PORT=str(launch.master_port or free_port()))


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _master_from_mpi(launch: Launch) -> Launch:
    """An MPI launch across nodes without MASTER_ADDR: rank 0's hostname, broadcast with mpi4py if installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError(f"{launch.launcher} started {launch.world_size} processes on several nodes but MASTER_ADDR "
                          "is not set: export it to the first node's address (mpirun -x MASTER_ADDR=…), or install "
                          "mpi4py.") from None
    master = MPI.COMM_WORLD.bcast(socket.gethostname() if launch.rank == 0 else None, root=0)
    return dataclasses.replace(launch, master_addr=master)


def _without_cpu_shm_all_reduce() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce.

    It JIT-compiles the op on each new install and maps a buffer of /dev/shm per rank that it never unlinks
    (docs/benchmarks.md, "Figures behind code comments"):
    every CPU launch leaks them, /dev/shm is RAM, and once it fills later launches hang in their first collective
    or die of SIGBUS (sglang#38638). The op serves only `inference_all_reduce` (tensor-parallel inference), which
    training never calls; its absence is a state DeepSpeed handles already (an op it could not build).
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # the lookup DeepSpeed's build_shm_op makes
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


INTERFACE_PROBE_SECONDS = 5.0   # a connection on one network answers in milliseconds, refused or accepted
SIOCGIFADDR = 0x8915            # linux/sockios.h: an interface's IPv4 address


def interfaces() -> dict[str, Optional[str]]:
    """This node's network interfaces and their IPv4 addresses (None where it has none)."""
    return {name: _ipv4_of(name) for _, name in socket.if_nameindex()}


def _ipv4_of(interface: str) -> Optional[str]:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", interface[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _reaches(interface: str, host: str, port: int) -> bool:
    """Whether a TCP connection to host:port can leave through `interface`: accepted or refused, the host answered;
    a timeout or no route, it cannot be reached that way. True when the check itself is not allowed here."""
    try:
        address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    except socket.gaierror:
        return True  # the rendezvous will say that the name does not resolve
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        except PermissionError:
            return True  # Linux before 5.7 lets only privileged processes choose the interface
        probe.settimeout(INTERFACE_PROBE_SECONDS)
        try:
            probe.connect(address)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return True


def check_socket_interface(launch: Launch, environ: Mapping[str, str] = os.environ) -> None:
    """Stop in seconds, with one sentence, when GLOO_SOCKET_IFNAME names an interface this node does not have or
    one through which it cannot reach MASTER_ADDR: gloo would bind there and its peers would wait for it until the
    process group's timeout (30 minutes by torch's default, 10 by DeepSpeed's), then fail with "connectFullMesh".
    Only across nodes: on one node every interface reaches the others."""
    value = environ.get("GLOO_SOCKET_IFNAME")
    if not value or launch.local_world_size >= launch.world_size or launch.master_addr is None:
        return
    host, available = socket.gethostname(), interfaces()
    listing = ", ".join(f"{name} ({address or 'no IPv4 address'})" for name, address in available.items())
    for name in value.split(","):
        if name not in available:
            raise LaunchError(f"GLOO_SOCKET_IFNAME={value} names no interface of node {host}, which has {listing}: "
                              "set GLOO_SOCKET_IFNAME to the interface on which the nodes reach each other.")
        if not _reaches(name, launch.master_addr, launch.master_port or DEFAULT_MASTER_PORT):
            raise LaunchError(f"node {host} cannot reach MASTER_ADDR {launch.master_addr} through GLOO_SOCKET_IFNAME="
                              f"{name} within {INTERFACE_PROBE_SECONDS:g} s: set GLOO_SOCKET_IFNAME to the interface "
                              f"on which the nodes reach each other (this node has {listing}), or MASTER_ADDR to rank "
                              "0's address on that interface's network.")


# --- the rendezvous port ------------------------------------------------------------------------------------------

class PortInUse(LaunchError):
    """Rank 0 cannot host the rendezvous: another program (often another training on the node) holds its port."""


def hosts_store(launch: Launch, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process will listen on MASTER_PORT: rank 0 does, unless torchrun's agent already hosts the
    store there (TORCHELASTIC_USE_AGENT_STORE) and its workers only connect."""
    return launch.rank == 0 and launch.master_port is not None and \
        environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"


def port_sentence(launch: Launch, host: Optional[str] = None) -> str:
    """The one sentence for a rendezvous port in use, with the launcher's own way to choose another."""
    port, other = launch.master_port, free_port()
    how = {"deepspeed": f"deepspeed --master_port {other} pretrain.py ...",
           "torchrun": f"torchrun --master-port {other} ...",
           "slurm": f"export MASTER_PORT={other} before srun (cluster/common.sh derives it from the job id)"}
    fix = how.get(launch.launcher, f"MASTER_PORT={other} python pretrain.py ...")
    return (f"The rendezvous port {port} (MASTER_PORT) on {host or socket.gethostname()} is in use by another program, "
            f"perhaps another training on this node: choose a free port, e.g. {fix}.")


def check_port_free(launch: Launch, environ: Mapping[str, str] = os.environ) -> None:
    """Before the process group: rank 0 stops with one sentence when the port it is to listen on is taken (binding
    as torch's store does, with SO_REUSEADDR, so a port left in TIME_WAIT counts as free). A process that joined its
    group already (several runs in one process) listens there itself and joins no other."""
    if not hosts_store(launch, environ) or dist.is_initialized():
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", launch.master_port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PortInUse(port_sentence(launch)) from None
            raise


def port_in_use(err: BaseException) -> bool:
    """Whether torch's rendezvous failed because its port was taken (DistNetworkError ... EADDRINUSE)."""
    return isinstance(err, RuntimeError) and ("EADDRINUSE" in str(err) or "address already in use" in str(err).lower())


def init_distributed(use_deepspeed: bool = True, device_type: Optional[str] = None,
                     timeout: Optional[float] = None) -> DistEnv:
    """Join the process group the launcher describes (a world of one when none does) on this process's device;
    `timeout`: seconds a collective may wait (default: torch's, DeepSpeed's), shortened later by the watchdog.

    DeepSpeed's init for training (it also sets up DeepSpeed's communication layer, and its engine needs a
    group even for one process); torch's own for tools, which need none for a world of one.
    """
    launch = detect_launch(os.environ)
    if launch.master_addr is None:
        launch = _master_from_mpi(launch)
    check_socket_interface(launch)
    device = _device_for(launch, device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:  # ranks on one machine share its cores instead of fighting over them
        torch.set_num_threads(max(1, usable_cpus() // max(launch.local_world_size, 1)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        _join(launch, device, backend, use_deepspeed, timeout)
    except RuntimeError as err:
        if port_in_use(err):
            raise PortInUse(port_sentence(launch)) from None
        raise
    return DistEnv(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank,
                   local_world_size=launch.local_world_size, node_rank=launch.node_rank, device=device,
                   launcher=launch.launcher)


def _join(launch: Launch, device: torch.device, backend: str, use_deepspeed: bool, timeout: Optional[float]) -> None:
    if use_deepspeed and not dist.is_initialized():  # DeepSpeed's engine wants its group even for one process
        os.environ.update(launch_variables(launch, device))
        import deepspeed
        if device.type == "cpu":
            _without_cpu_shm_all_reduce()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   **({"timeout": timedelta(seconds=timeout)} if timeout else {}))
    elif launch.world_size > 1 and not dist.is_initialized():
        os.environ.update(launch_variables(launch, device))
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                **({"timeout": timedelta(seconds=timeout)} if timeout else {}))


def log_world(env: DistEnv) -> None:
    """One line per node on rank 0 (every rank must call it): which ranks run where, on which devices; then what
    the nodes run, after every rank stopped, with one sentence, if a node runs other software or has other
    variables that change numerics or networking (antismooth/nodes.py)."""
    described = describe_node(os.environ) if env.world_size > 1 else None
    everyone = all_gather_object((env.node_rank, socket.gethostname(), env.rank, str(env.device), described))
    if env.world_size > 1 and (disagreement := check_agreement([node for *_, node in everyone])):
        raise ConfigError(disagreement)  # every rank has every description: all stop alike, none waits
    if env.rank != 0:
        return
    nodes = sorted({node for node, *_ in everyone})
    _logger.info("%d process%s on %d node%s (%s launch, %s backend)", env.world_size, "es" * (env.world_size > 1),
                 len(nodes), "s" * (len(nodes) > 1), env.launcher, env.backend)
    for node in nodes:
        members = [(rank, host, device) for n, host, rank, device, _ in everyone if n == node]
        _logger.info("node %d (%s): ranks %s on %s", node, members[0][1], ",".join(str(r) for r, _, _ in members),
                     ",".join(d for *_, d in members))
    if env.world_size > 1:
        _logger.info("%s", summary([node for *_, node in everyone]))


# --- collectives on the backend's device --------------------------------------------------------------------------

def collective_device() -> torch.device:
    """The device the world group's backend serves: the CPU under gloo, this process's GPU under NCCL.

    Derived from the group itself, so a helper can never hand a CPU tensor to an NCCL group.
    """
    served = getattr(dist.group.WORLD, "_device_types", None) or [torch.device("cpu")]
    if any(d.type == "cpu" for d in served):
        return torch.device("cpu")
    device = served[0]
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device.type)


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """`values` reduced over all ranks in float64 on the backend's device; as they are without a group."""
    if not _joined():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=_OPS[op])
    return tensor.tolist()


def all_reduce_tensor(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over all ranks on the backend's device, no host round trip (under NCCL it stays on the
    GPU: the caller reads it back when it needs the values); `tensor` itself without a group."""
    if not _joined():
        return tensor
    reduced = tensor.to(collective_device(), copy=True)
    dist.all_reduce(reduced, op=_OPS[op])
    return reduced


def all_reduce_async(tensor: torch.Tensor, op: str = "sum") -> tuple[torch.Tensor, Any]:
    """(the reduced copy of `tensor` on the backend's device, its work handle: `.wait()` before reading it; None
    without a group, the copy then final). The host goes on at once."""
    reduced = tensor.to(collective_device(), copy=True) if _joined() else tensor.clone()
    work = dist.all_reduce(reduced, op=_OPS[op], async_op=True) if _joined() else None
    return reduced, work


def all_reduce_counts(counts: np.ndarray) -> np.ndarray:
    """An integer array summed element-wise over all ranks (int32, on the backend's device); a copy of it
    without a group."""
    if not _joined():
        return counts.astype(np.int32, copy=True)
    tensor = torch.from_numpy(counts.astype(np.int32)).to(collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled through a tensor on the backend's device)."""
    if not _joined():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled through tensors on the backend's device)."""
    if not _joined():
        return [obj]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)  # NCCL: on torch.cuda.current_device(), which init_distributed set
    return everyone


def barrier() -> None:
    if not _joined():
        return
    device = collective_device()
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def leave() -> None:
    """Leave the process group together at the end of a finished run, as torch asks before a process exits. Left to
    the interpreter's exit, a rank could still be tearing its group down after rank 0, which hosts the store, was
    gone: it then aborted ("terminate called without an active exception") in about one 2-process test launch in
    five, though its run had finished."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def check_shared_folder(folder: str | Path, what: str = "--output") -> None:
    """Every rank must see the folder rank 0 writes in: checkpoints, `latest` and pruning are rank 0's.

    Rank 0 writes a uniquely named file, every rank looks for it, and all agree on the verdict, so either
    every rank goes on or every rank stops with the same sentence.
    """
    if not _joined():
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    name = broadcast_object(f".shared-check-{uuid.uuid4().hex}" if rank == 0 else None)
    marker = Path(folder) / name
    if rank == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(name)
    barrier()
    deadline = time.monotonic() + SHARED_FOLDER_WAIT_SECONDS
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    blind = int(all_reduce([0.0 if marker.is_file() else 1.0])[0])
    barrier()
    if rank == 0:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError(f"{what} {folder} is not the same folder on every process ({blind} of {world} do not see "
                          f"what rank 0 writes there): put {what} on storage that every node shares.")
