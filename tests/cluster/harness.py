"""A real cluster in one box: nodes as network namespaces on a bridge, real munge, slurmctld, slurmd, sshd and pdsh.

Each node is a long-lived anchor process (`unshare --net --uts --mount … sleep infinity`) with its own hostname,
its own /etc/hosts (bind-mounted in its own mount namespace: the host's file is never touched), its own /sys, and
two interfaces: eth0 on the cluster network (10.213.0.0/24, a bridge joining every node) and eth1 on a network of
its own (10.214.K.0/24, a link to nowhere, with the default route: a management network the other nodes cannot
reach). Every daemon is started inside its node (nsenter into the anchor), so every process of the cluster, job
steps and ssh sessions included, lives in a node's namespaces: teardown kills whatever is in them, and the
namespaces, their links and their mounts vanish with their last process. The filesystem is the host's, as a
cluster's shared filesystem: the repository, the venv, shards and run folders are at the same path on every node.

Everything the harness writes (configs, keys, logs, state) lives under ROOT; `state.json` there names the anchors
and their namespaces, so that `up` first removes what a killed session left.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(os.environ.get("ANTISMOOTH_CLUSTER_ROOT", "/tmp/antismooth-cluster"))
BRIDGE = "asc-br"                    # host-side names: asc-* on the cluster network, asm-* on the isolated ones
DATA_SUBNET = "10.213.0"             # eth0 of node K: 10.213.0.K/24, all nodes on one bridge
ISOLATED_SUBNET = "10.214"           # eth1 of node K: 10.214.K.2/24, alone on its link
DATA_INTERFACE, ISOLATED_INTERFACE = "eth0", "eth1"
PARTITION = "test"
PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge", "pdsh", "openssh-server"]
COMMANDS = ["slurmd", "slurmctld", "sbatch", "munged", "mungekey", "sshd", "ssh-keygen", "pdsh", "nsenter", "unshare",
            "ip"]
READY_TIMEOUT = 60.0                 # s for slurmd to register and sshd to answer


class ClusterError(RuntimeError):
    """The harness could not bring the cluster up (or a command on it failed); the message says what."""


@dataclass(frozen=True)
class Node:
    name: str                        # also its hostname and its SLURM NodeName
    index: int                       # 1-based
    address: str                     # on the cluster network (eth0)
    isolated_address: str            # on its own network (eth1)
    anchor: int                      # pid of the process that holds its namespaces


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]


def why_unavailable() -> Optional[str]:
    """None when this machine can run the cluster; else one sentence saying how to enable it."""
    if os.geteuid() != 0:
        return "the cluster tests need root (network namespaces, daemons): run `make test` as root to enable them."
    missing = missing_commands()
    if missing:
        return (f"the cluster tests need {', '.join(missing)}: run `make test` as root on Debian/Ubuntu (it installs "
                f"them), or `apt-get install -y {' '.join(PACKAGES)}`.")
    return None


def _run(cmd: Sequence[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if check and result.returncode:
        raise ClusterError(f"`{' '.join(map(str, cmd))}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _netns_id(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


@dataclass
class Cluster:
    """A running cluster: its nodes, the paths of what the harness wrote, and ways to run things on a node."""
    nodes: list[Node]
    root: Path = ROOT
    repo: Path = field(default_factory=lambda: Path(__file__).resolve().parents[2])

    # --- paths ---------------------------------------------------------------------------------------------
    @property
    def slurm_conf(self) -> Path:
        return self.root / "slurm" / "slurm.conf"

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh" / "config"

    @property
    def bin(self) -> Path:
        """ssh (with this cluster's config) for the launchers that call plain `ssh`: DeepSpeed's check, pdsh."""
        return self.root / "bin"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def jobs(self) -> Path:
        """Where sbatch() writes each job's output."""
        return self.root / "jobs"

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def hostfile(self, slots: int = 1) -> Path:
        """A DeepSpeed hostfile naming every node, `slots` processes each."""
        path = self.root / f"hostfile-{slots}"
        path.write_text("".join(f"{n.name} slots={slots}\n" for n in self.nodes))
        return path

    # --- running things --------------------------------------------------------------------------------------
    def environment(self, extra: Optional[dict] = None) -> dict:
        """The environment a command on a node gets: this one's, plus SLURM's config, this cluster's ssh first on
        PATH, and `extra` (a value None removes the variable)."""
        env = dict(os.environ, SLURM_CONF=str(self.slurm_conf), PATH=f"{self.bin}:{os.environ.get('PATH', '')}")
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def command_on(self, node: str | Node, cmd: Sequence[str], cwd: Optional[Path] = None) -> list[str]:
        """`cmd` run inside `node`, in `cwd` (entering a mount namespace moves nsenter to the anchor's folder)."""
        anchor = (self.node(node) if isinstance(node, str) else node).anchor
        return ["nsenter", "-t", str(anchor), "--net", "--uts", "--mount", f"--wd={cwd or self.repo}", "--",
                *map(str, cmd)]

    def run_on(self, node: str | Node, cmd: Sequence[str], env: Optional[dict] = None, check: bool = True,
               timeout: Optional[float] = 600, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        """Run `cmd` inside `node` (its network, hostname and /etc/hosts), from the repository by default."""
        result = subprocess.run(self.command_on(node, cmd, cwd), capture_output=True, text=True, timeout=timeout,
                                env=self.environment(env))
        if check and result.returncode:
            raise ClusterError(f"on {node if isinstance(node, str) else node.name}: `{' '.join(map(str, cmd))}` "
                               f"exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def popen_on(self, node: str | Node, cmd: Sequence[str], env: Optional[dict] = None, cwd: Optional[Path] = None,
                 **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command_on(node, cmd, cwd), env=self.environment(env), **kwargs)

    def sbatch(self, script: str | Path, *options: str, env: Optional[dict] = None, node: str = "n1",
               timeout: float = 600) -> "Job":
        """`sbatch --wait` of `script` from the repository root on `node`; the job's id, exit status and output."""
        return self.submit(script, *options, env=env, node=node).wait(timeout)

    def submit(self, script: str | Path, *options: str, env: Optional[dict] = None, node: str = "n1") -> "Submission":
        """`sbatch --wait` started in the background: several jobs can wait at once; `.wait()` for the Job."""
        self.jobs.mkdir(exist_ok=True)
        name = f"{Path(script).stem}-{time.time_ns()}"
        output = self.jobs / f"{name}-%j.out"
        proc = self.popen_on(node, ["sbatch", "--wait", "--parsable", f"--output={output}", *options, script],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return Submission(self.jobs, name, script, proc)


@dataclass
class Submission:
    jobs: Path
    name: str
    script: str | Path
    proc: subprocess.Popen

    def wait(self, timeout: float = 600) -> "Job":
        try:
            stdout, stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            stdout, stderr = self.proc.communicate()
            raise ClusterError(f"sbatch {self.script} did not finish within {timeout:.0f} s.") from None
        job_id = stdout.strip().split(";")[0].splitlines()[-1] if stdout.strip() else ""
        if not job_id.isdigit():
            raise ClusterError(f"sbatch {self.script} was refused: {stderr.strip()}")
        log = self.jobs / f"{self.name}-{job_id}.out"
        return Job(int(job_id), self.proc.returncode, log.read_text() if log.exists() else "", stderr)


@dataclass(frozen=True)
class Job:
    id: int
    returncode: int
    output: str                      # what the batch script and its steps wrote (--output)
    sbatch_stderr: str


LOCK_TIMEOUT = 1200.0                # s a test session waits for another one's cluster to go down


@contextlib.contextmanager
def session_lock(root: Path = ROOT):
    """One cluster per machine at a time (the names, addresses and ROOT are fixed): a second test session waits."""
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"another test session has held the cluster for {LOCK_TIMEOUT:.0f} s "
                                       f"({lock.name}): wait for it to end.") from None
                time.sleep(1)
        yield


# --- bring-up ----------------------------------------------------------------------------------------------------

def up(count: int = 2, root: Path = ROOT) -> Cluster:
    """Bring up `count` nodes n1..nN with munge, slurmctld (n1), slurmd and sshd on each; first remove the
    leftovers of an earlier session."""
    if not 1 <= count <= 200:
        raise ClusterError(f"{count} nodes: the harness makes 1 to 200.")
    if (reason := why_unavailable()):
        raise ClusterError(reason)
    down(root)
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("log", "run", "jobs", "bin", "etc"):
        (root / sub).mkdir(parents=True)
    state = {"anchors": [], "links": [BRIDGE]}
    try:
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "link", "set", BRIDGE, "up"])
        names = [f"n{k}" for k in range(1, count + 1)]
        (root / "etc" / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{DATA_SUBNET}.{k} n{k}\n" for k in range(1, count + 1)))
        nodes = []
        for k, name in enumerate(names, start=1):
            node = _make_node(k, name, root, state)
            nodes.append(node)
        cluster = Cluster(nodes, root)
        _start_munge(cluster)
        _start_slurm(cluster)
        _start_sshd(cluster)
        _wait_ready(cluster)
        state["nodes"] = [node.__dict__ for node in nodes]
        _write_state(root, state)
        return cluster
    except BaseException:
        down(root)
        raise


def _write_state(root: Path, state: dict) -> None:
    (root / "state.json").write_text(json.dumps(state, indent=1))


def _make_node(k: int, name: str, root: Path, state: dict) -> Node:
    """An anchor process in new network, UTS and mount namespaces, wired to the bridge and to its own network."""
    anchor = subprocess.Popen(["unshare", "--net", "--uts", "--mount", "--propagation", "private", "sleep", "infinity"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    _ANCHORS.append(anchor)
    deadline = time.monotonic() + 10
    while _netns_id(anchor.pid) == _netns_id(os.getpid()):  # unshare execs sleep once its namespaces exist
        if time.monotonic() > deadline or anchor.poll() is not None:
            raise ClusterError(f"unshare could not make the namespaces of {name}.")
        time.sleep(0.01)
    state["anchors"].append({"pid": anchor.pid, "netns": _netns_id(anchor.pid), "name": name})
    _write_state(root, state)
    inside = ["nsenter", "-t", str(anchor.pid), "--net", "--uts", "--mount", "--wd=/", "--"]
    address, isolated = f"{DATA_SUBNET}.{k}", f"{ISOLATED_SUBNET}.{k}.2"
    for host_end, node_end in ((f"asc-{name}", DATA_INTERFACE), (f"asm-{name}", ISOLATED_INTERFACE)):
        state["links"].append(host_end)
        _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end, "netns", anchor.pid])
        _run(["ip", "link", "set", host_end, "up"])
    _run(["ip", "link", "set", f"asc-{name}", "master", BRIDGE])
    for cmd in (["ip", "link", "set", "lo", "up"],
                ["ip", "addr", "add", f"{address}/24", "dev", DATA_INTERFACE],
                ["ip", "link", "set", DATA_INTERFACE, "up"],
                ["ip", "addr", "add", f"{isolated}/24", "dev", ISOLATED_INTERFACE],
                ["ip", "link", "set", ISOLATED_INTERFACE, "up"],
                # The default route leaves by the isolated network, as on a node whose management Ethernet is its
                # default: only the cluster network's own subnet is reachable through eth0.
                ["ip", "route", "add", "default", "via", f"{ISOLATED_SUBNET}.{k}.1", "dev", ISOLATED_INTERFACE],
                ["hostname", name],
                ["mount", "--bind", root / "etc" / "hosts", "/etc/hosts"],
                ["mount", "-t", "sysfs", "sysfs", "/sys"]):  # /sys/class/net shows this node's interfaces
        _run([*inside, *cmd])
    return Node(name, k, address, isolated, anchor.pid)


def _start_munge(cluster: Cluster) -> None:
    """One key for every node; one munged, in n1: its socket is a path on the shared filesystem."""
    munge = cluster.root / "munge"
    munge.mkdir(mode=0o755)  # munged wants its socket folder open to all (to connect)
    key = munge / "munge.key"
    _run(["mungekey", "--create", f"--keyfile={key}"])
    shutil.chown(munge, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    _run(cluster.command_on("n1", ["runuser", "-u", "munge", "--", "munged", f"--key-file={key}",
                                   f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}",
                                   f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"]))


def slurm_conf(cluster: Cluster) -> str:
    root = cluster.root
    first = cluster.nodes[0]
    lines = [
        "ClusterName=antismooth-test",
        f"SlurmctldHost={first.name}({first.address})",
        # cred_expire also holds a requeued job this long before it may start again (default 120 s).
        "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'},cred_expire=30",
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={root / 'slurm' / 'state'}",
        f"SlurmdSpoolDir={root / 'slurm' / 'spool-%n'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        # This machine mounts cgroup v1 under a tmpfs; neither plugin below needs cgroups (cgroup.conf says v1).
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill", "MpiDefault=none", "SwitchType=switch/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2", "SlurmdParameters=config_overrides",
        "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=30",
        # `sbatch --wait` polls every 2 s only while that is under MinJobAge / 2, else 8 s then 10 s: a short
        # job would wait up to 10 s for nothing. A finished job stays in `scontrol show job` this long.
        "MinJobAge=5",
        "SchedulerParameters=sched_interval=1",
    ]
    lines += [f"NodeName={n.name} NodeAddr={n.address} CPUs={os.cpu_count()} State=UNKNOWN" for n in cluster.nodes]
    lines.append(f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4")
    return "\n".join(lines) + "\n"


def _start_slurm(cluster: Cluster) -> None:
    slurm = cluster.root / "slurm"
    (slurm / "state").mkdir(parents=True)
    cluster.slurm_conf.write_text(slurm_conf(cluster))
    (slurm / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
    env = cluster.environment()
    _run(cluster.command_on("n1", ["slurmctld", "-c", "-f", cluster.slurm_conf]), env=env)
    for node in cluster.nodes:
        _run(cluster.command_on(node, ["slurmd", "-f", cluster.slurm_conf]), env=env)


def _start_sshd(cluster: Cluster) -> None:
    """One host key and one client key for all nodes, a known_hosts naming every node, an ssh config, and an sshd
    per node that listens on the node's cluster address only."""
    ssh = cluster.root / "ssh"
    ssh.mkdir(mode=0o700)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh / "host_key"])
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh / "id_ed25519"])
    host_key = (ssh / "host_key.pub").read_text().split()[:2]
    (ssh / "authorized_keys").write_text((ssh / "id_ed25519.pub").read_text())
    (ssh / "known_hosts").write_text("".join(f"{n.name},{n.address} {' '.join(host_key)}\n" for n in cluster.nodes))
    config = [f"Host {n.name}\n  HostName {n.address}\n" for n in cluster.nodes]
    config.append(f"Host *\n  User root\n  IdentityFile {ssh / 'id_ed25519'}\n  IdentitiesOnly yes\n"
                  f"  UserKnownHostsFile {ssh / 'known_hosts'}\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
                  "  LogLevel ERROR\n")
    cluster.ssh_config.write_text("".join(config))
    wrapper = cluster.bin / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {cluster.ssh_config} "$@"\n')
    wrapper.chmod(0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)   # sshd's compiled-in privilege separation directory
    for node in cluster.nodes:
        conf = ssh / f"sshd_config-{node.name}"
        conf.write_text(f"ListenAddress {node.address}\nHostKey {ssh / 'host_key'}\n"
                        f"PidFile {cluster.root / 'run' / f'sshd-{node.name}.pid'}\n"
                        f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                        "PrintMotd no\nLogLevel ERROR\n")
        _run(cluster.command_on(node, ["/usr/sbin/sshd", "-f", conf, "-E", cluster.logs / f"sshd-{node.name}.log"]))


def _wait_ready(cluster: Cluster) -> None:
    """Until every slurmd has registered (idle) and n1 reaches every node's sshd."""
    deadline = time.monotonic() + READY_TIMEOUT
    states = ""
    while time.monotonic() < deadline:
        result = cluster.run_on("n1", ["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=30)
        states = result.stdout.strip() or result.stderr.strip()
        idle = {line.split()[0] for line in states.splitlines() if line.split()[-1] == "idle"}
        if idle >= {n.name for n in cluster.nodes}:
            break
        time.sleep(0.5)
    else:
        raise ClusterError(f"the slurmds did not register within {READY_TIMEOUT:.0f} s (sinfo: {states}); see "
                           f"{cluster.logs}.")
    for node in cluster.nodes:
        result = cluster.run_on("n1", ["ssh", node.name, "hostname"], check=False, timeout=30)
        if result.stdout.strip() != node.name:
            raise ClusterError(f"ssh from n1 to {node.name} failed: {result.stderr.strip()}; see {cluster.logs}.")


# --- teardown ----------------------------------------------------------------------------------------------------

def _processes_in(namespaces: set[str]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and _netns_id(int(entry.name)) in namespaces:
            pids.append(int(entry.name))
    return pids


def _kill_all(namespaces: set[str], grace: float = 3.0) -> None:
    """SIGTERM every process in `namespaces`, SIGKILL those still there after `grace` s, until none is left."""
    doomed = _processes_in(namespaces)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in _processes_in(namespaces):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _processes_in(namespaces) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.05)
        if not _processes_in(namespaces):
            _wait_gone(doomed)
            return
    raise ClusterError(f"processes {_processes_in(namespaces)} survived SIGKILL in the cluster's namespaces.")


_ANCHORS: list[subprocess.Popen] = []   # started by this process: reaped here (never os.waitpid(-1): other tests'
                                        # children are theirs to wait for)


def _reap() -> None:
    for anchor in _ANCHORS:
        anchor.poll()


def _wait_gone(pids: list[int], timeout: float = 5.0) -> None:
    """Until the killed processes are reaped (daemons are orphans: their reaper is PID 1), so that a check right
    after down() finds no zombie of them."""
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)


def _ours(pid: int, root: Path) -> bool:
    try:
        return str(root) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _held_by_us(anchor: dict, root: Path) -> bool:
    if _netns_id(anchor["pid"]) == anchor["netns"]:
        return True
    return any(_ours(pid, root) for pid in _processes_in({anchor["netns"]}))


def down(root: Path = ROOT) -> None:
    """Stop every process of the cluster in `root` (of this session or a killed one) and remove its links.

    The nodes' namespaces, their veths and their mounts go with their last process."""
    state_file = root / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"anchors": []}
    # A namespace id names ours only while our anchor or one of our daemons holds it: ids are reused once it goes.
    namespaces = {a["netns"] for a in state.get("anchors", []) if a.get("netns") and _held_by_us(a, root)}
    if namespaces:
        _kill_all(namespaces)
    for pidfile in sorted((root / "run").glob("*.pid")) + [root / "munge" / "munged.pid"]:
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        if _ours(pid, root):  # a daemon the harness started whose namespace was lost
            os.kill(pid, signal.SIGKILL)
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(("asc-", "asm-")):
            _run(["ip", "link", "delete", name], check=False)
    if state_file.exists():
        state_file.unlink()


def status(root: Path = ROOT) -> str:
    """What is left of a cluster in `root`: its nodes and their processes, and the links of the harness."""
    state_file = root / "state.json"
    if not state_file.exists():
        return f"no cluster in {root}"
    state = json.loads(state_file.read_text())
    lines = []
    for anchor in state.get("anchors", []):
        pids = _processes_in({anchor["netns"]}) if anchor.get("netns") else []
        names = sorted({Path(f"/proc/{p}/comm").read_text().strip() for p in pids if Path(f"/proc/{p}").exists()})
        lines.append(f"{anchor['name']}: {len(pids)} processes ({', '.join(names)})")
    return "\n".join(lines)


def load(root: Path = ROOT) -> Cluster:
    """The cluster `up` left running in `root` (for the command line)."""
    state_file = root / "state.json"
    if not state_file.exists() or "nodes" not in json.loads(state_file.read_text()):
        raise ClusterError(f"no cluster is up in {root}: run `python -m tests.cluster up` first.")
    return Cluster([Node(**n) for n in json.loads(state_file.read_text())["nodes"]], root)
