"""A real SLURM cluster on this machine, for the tests of launch/slurm.sbatch.

Debian's slurm-wlm 22.05 and munge (`apt-get install slurmctld slurmd slurm-client munge`),
run as root: munged and slurmctld in a network namespace `PREFIX-ctl` that holds a bridge
(10.77.0.1/24), and one slurmd per node, `node1` (10.77.0.11) and `node2` (10.77.0.12), each
in a network namespace of its own joined to the bridge by a veth pair, under its own host
name (a UTS namespace) and with its own /etc/hosts (a mount namespace) that names the
cluster's hosts. Nothing is bound to the machine's own network, so two clusters (two test
sessions) do not meet, and no address outside this machine is ever contacted.
No cgroup plugins: proctrack/linuxproc, task/none. All state, logs included, lives in one
folder; the namespaces are named after the process that made them (`ijx-PID-...`), and
those of a process no longer alive are removed (with everything running in them) by the
next cluster that starts.

    python tests/cluster/slurm_cluster.py up [DIR]     # a cluster until Ctrl-C; how to use it
    python tests/cluster/slurm_cluster.py clean        # remove the clusters of dead processes
    python tests/cluster/slurm_cluster.py clean --all  # remove every cluster, live ones too
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODES = {"node1": "10.77.0.11", "node2": "10.77.0.12"}
CONTROLLER = ("ctl", "10.77.0.1")
NAMESPACE_PREFIX = "ijx-"
TOOLS = ("ip", "nsenter", "unshare", "munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
# Requeued jobs wait cred_expire seconds before they start again (slurm.conf(5)): 120 by
# default, here SLURM's least (5), so a test sees the second attempt within seconds.
CRED_EXPIRE_S = 5
# What each node offers as GPUs (see `_write_files`): launch/slurm.sbatch's default.
GPUS_PER_NODE = 8
# A requeued job, once eligible, waits for the main scheduler's next pass: sched_interval in
# SLURM_CONF below, 60 s by default, 1 s here.
# A node whose slurmd stops answering is set DOWN, and its jobs requeued, after this long.
SLURMD_TIMEOUT_S = 10

SLURM_CONF = """\
ClusterName=ijx
SlurmctldHost={ctl_name}({ctl_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={state}/munge/munge.socket,cred_expire={cred_expire}
StateSaveLocation={state}/slurmctld
SlurmctldPidFile={state}/slurmctld.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdSpoolDir={state}/%n/spool
SlurmdPidFile={state}/%n/slurmd.pid
SlurmdLogFile={state}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ReturnToService=2
SlurmdTimeout={slurmd_timeout}
MinJobAge=3600
KillWait=10
SlurmdParameters=config_overrides
GresTypes=gpu
{nodes}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""


class ClusterUnavailable(RuntimeError):
    """The cluster could not be started: the message says why and what to do."""


def _run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise ClusterUnavailable(f"`{' '.join(args)}` failed ({done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip()}")
    return done


def namespaces() -> list[str]:
    """The names of this machine's named network namespaces."""
    listed = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def _pids_in(namespace: str) -> list[int]:
    listed = _run("ip", "netns", "pids", namespace, check=False).stdout
    return [int(pid) for pid in listed.split()]


def _kill_namespaces(names: list[str], children: list[subprocess.Popen] = ()) -> None:
    """SIGKILLs everything running in the namespaces `names`, until nothing is (a dying
    process's children may appear in between), waits until all of it is gone from the
    process table (reaped by its parent, or by init for the daemons' own children), then
    deletes the namespaces. A process is listed only while it runs: each is noted before
    any other is killed, whose death could end it unlisted. `children`, this process's own,
    are reaped here."""
    seen = set()
    for _ in range(50):
        pids = {pid for name in names for pid in _pids_in(name)}
        if not pids:
            break
        seen |= pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for child in children:
            child.poll()
        if not any(Path(f"/proc/{pid}").exists() for pid in seen):
            break
        time.sleep(0.1)
    for name in names:
        _run("ip", "netns", "delete", name, check=False)


def remove_stale_clusters(everything: bool = False) -> list[str]:
    """Removes the namespaces (and their processes) of clusters whose maker is dead, or of
    every cluster with `everything`; returns their names."""
    removed = []
    for namespace in namespaces():
        match = re.fullmatch(rf"{NAMESPACE_PREFIX}(\d+)-\w+", namespace)
        if not match:
            continue
        owner = int(match.group(1))
        if not everything and owner != os.getpid() and Path(f"/proc/{owner}").exists():
            continue
        removed.append(namespace)
    _kill_namespaces(removed)
    return removed


class SlurmCluster:
    """munged, slurmctld and a slurmd on each of NODES, each in its namespace, with their
    state and logs in `state`. `start()`, then `client(...)` to run sbatch, scontrol, ...
    against it, and `stop()` (always: it removes what `start()` made, even half made)."""

    def __init__(self, state: Path):
        self.state = Path(state).resolve()
        self.prefix = f"{NAMESPACE_PREFIX}{os.getpid()}-"
        self.conf = self.state / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._daemons: list[subprocess.Popen] = []

    def namespace(self, host: str) -> str:
        return self.prefix + host

    # Starting.

    def start(self, timeout_s: float = 60) -> None:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise ClusterUnavailable(
                f"{', '.join(missing)} not found: apt-get install slurmctld slurmd "
                "slurm-client munge iproute2 util-linux (and run as root)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("network namespaces need root: run the cluster tests as root")
        remove_stale_clusters()
        for folder in ("log", "munge", "slurmctld", *(f"{node}/spool" for node in NODES)):
            (self.state / folder).mkdir(parents=True, exist_ok=True)
        self._make_network()
        self._write_files()
        self._start_munged()
        self._spawn(CONTROLLER[0], "slurmctld", "slurmctld", "-D", "-i")
        for node in NODES:
            self.start_node(node)
        self.wait_until_idle(timeout_s)

    def _make_network(self) -> None:
        ctl = self.namespace(CONTROLLER[0])
        try:
            _run("ip", "netns", "add", ctl)
        except ClusterUnavailable as e:
            raise ClusterUnavailable(f"cannot create a network namespace here ({e}); the "
                                     "cluster tests need root and `ip netns add`") from None
        _run("ip", "-n", ctl, "link", "set", "lo", "up")
        _run("ip", "-n", ctl, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", ctl, "addr", "add", f"{CONTROLLER[1]}/24", "dev", "br0")
        _run("ip", "-n", ctl, "link", "set", "br0", "up")
        for index, (node, address) in enumerate(NODES.items()):
            namespace = self.namespace(node)
            _run("ip", "netns", "add", namespace)
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
            # Both ends are made in the node's namespace, then one is moved to the bridge's.
            _run("ip", "-n", namespace, "link", "add", "eth0", "type", "veth",
                 "peer", "name", f"veth{index}")
            _run("ip", "-n", namespace, "link", "set", f"veth{index}", "netns", ctl)
            _run("ip", "-n", ctl, "link", "set", f"veth{index}", "master", "br0")
            _run("ip", "-n", ctl, "link", "set", f"veth{index}", "up")
            _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _run("ip", "-n", namespace, "link", "set", "eth0", "up")

    def _write_files(self) -> None:
        hosts = ["127.0.0.1 localhost", f"{CONTROLLER[1]} {CONTROLLER[0]}",
                 *(f"{address} {node}" for node, address in NODES.items())]
        (self.state / "hosts").write_text("\n".join(hosts) + "\n")
        key = self.state / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        nodes = "\n".join(f"NodeName={node} NodeAddr={address} CPUs={os.cpu_count()} "
                          f"Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
                          for node, address in NODES.items())
        # GPUs that are /dev/null: jobs that ask for GPUs are scheduled as on a GPU cluster
        # (launch/slurm.sbatch's own --gpus-per-node=8), and given CUDA_VISIBLE_DEVICES.
        for gpu in range(GPUS_PER_NODE):  # each a /dev/null (character device 1, 3)
            os.mknod(self.state / f"gpu{gpu}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (self.state / "gres.conf").write_text(
            f"Name=gpu File={self.state}/gpu[0-{GPUS_PER_NODE - 1}]\n")
        self.conf.write_text(SLURM_CONF.format(
            ctl_name=CONTROLLER[0], ctl_addr=CONTROLLER[1], state=self.state,
            cred_expire=CRED_EXPIRE_S, slurmd_timeout=SLURMD_TIMEOUT_S, nodes=nodes,
            node_names=",".join(NODES)))

    def _start_munged(self) -> None:
        munge = self.state / "munge"
        self._spawn(CONTROLLER[0], "munged", "munged", "--foreground", "--force",
                    f"--socket={munge}/munge.socket", f"--key-file={munge}/munge.key",
                    f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed",
                    f"--log-file={self.state}/log/munged.log")
        self._wait_for(lambda: (munge / "munge.socket").exists(), 10, "munged's socket")

    def start_node(self, node: str) -> None:
        """Starts `node`'s slurmd (again, after `kill_node`)."""
        self._spawn(node, f"slurmd.{node}", "slurmd", "-D", "-N", node)

    def _spawn(self, host: str, log_name: str, *command: str) -> None:
        """Runs `command` in `host`'s namespaces: its network, a host name of its own, and
        the cluster's /etc/hosts bound over the machine's in a mount namespace of its own."""
        inside = ('mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"')
        log = open(self.state / "log" / f"{log_name}.out", "ab")  # noqa: SIM115 - the child's
        with log:
            self._daemons.append(subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.namespace(host)}", "unshare", "--uts",
                 "--mount", "sh", "-c", inside, str(self.state / "hosts"), host, *command],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))

    def wait_until_idle(self, timeout_s: float) -> None:
        """Waits until sinfo lists every node idle."""
        def idle() -> bool:
            states = self.node_states()
            return all(states.get(node) == "idle" for node in NODES)
        self._wait_for(idle, timeout_s, "both nodes idle in sinfo")

    def node_states(self) -> dict[str, str]:
        listed = self.client("sinfo", "--noheader", "--Node", "--format=%N %T", check=False)
        return dict(line.split() for line in listed.stdout.splitlines() if line.strip())

    def _wait_for(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            ended = [d for d in self._daemons if d.poll() is not None]
            if ended or time.monotonic() > deadline:
                why = (f"{len(ended)} daemon(s) exited" if ended else f"not after {timeout_s} s")
                raise ClusterUnavailable(f"waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.2)

    # Using.

    def client(self, *command: str, check: bool = True,
               timeout: float = 30) -> subprocess.CompletedProcess:
        """Runs a SLURM client command (sbatch, scontrol, ...) beside slurmctld."""
        done = subprocess.run(["ip", "netns", "exec", self.namespace(CONTROLLER[0]), *command],
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}: "
                                 f"{done.stdout}{done.stderr}")
        return done

    def client_command(self, *command: str) -> list[str]:
        """`command` as run beside slurmctld, for a caller that runs it itself (with
        `self.env`)."""
        return ["ip", "netns", "exec", self.namespace(CONTROLLER[0]), *command]

    def kill_node(self, node: str) -> list[int]:
        """SIGKILLs everything in `node`'s namespace (slurmd, the job's processes), as a
        node that loses power; returns their pids."""
        pids = _pids_in(self.namespace(node))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def logs(self, lines: int = 40) -> str:
        """The last `lines` lines of each daemon's log, for a failure's report (its console,
        the .out, repeats its log but for what it wrote before opening it)."""
        parts = []
        for log in sorted((self.state / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts)

    # Stopping.

    def stop(self) -> None:
        """Ends everything the cluster runs and removes its namespaces."""
        ours = [self.namespace(host) for host in (*NODES, CONTROLLER[0])]
        _kill_namespaces([name for name in namespaces() if name in ours], self._daemons)
        for daemon in self._daemons:
            if daemon.poll() is None:  # not in a namespace: started before it was made
                daemon.kill()
            daemon.wait(timeout=10)


def _usage() -> None:
    print(__doc__.split("\n\n")[-1], file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("up", "clean"):
        _usage()
    if argv[0] == "clean":
        for namespace in remove_stale_clusters(everything=argv[1:] == ["--all"]):
            print(f"removed {namespace}")
        return
    state = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="slurm_cluster."))
    cluster = SlurmCluster(state)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through `finally` as Ctrl-C
    try:
        cluster.start()
        print(f"Up. Logs in {state}/log. Commands: SLURM_CONF={cluster.conf} ip netns exec "
              f"{cluster.namespace(CONTROLLER[0])} sinfo   (Ctrl-C stops it)")
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
