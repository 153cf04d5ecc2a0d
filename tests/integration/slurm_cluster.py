"""A real one-node Slurm cluster for the integration tests, everything under one temporary folder.

munged with its own key and socket, slurmctld and slurmd with a generated slurm.conf naming this
host on 127.0.0.1 and two free ports, no accounting database (``sacct`` does not work: the tests
and the launcher ask ``squeue``/``scontrol``). The client commands reach it through
``SLURM_CONF``. Test files import the fixture ``slurm``: ``from slurm_cluster import slurm_fixture``.

Teardown (also after a failed start) stops every daemon by its pid file, then checks with pgrep
that none of them is left: a second run right after the first starts from a clean state.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
PARTITION = "debug"
# the jobs run this test run's own interpreter (make test-integration: the checkout's .venv)
VENV_PYTHON = Path(sys.executable)


@dataclass(frozen=True)
class Cluster:
    """A running cluster: the environment its client commands need and where its files are."""

    root: Path
    env: dict[str, str]  # os.environ + SLURM_CONF (+ the munge socket for the clients)
    partition: str
    node: str

    def command(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        """A Slurm client command against this cluster; its stdout."""
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def job_state(self, job_id: str) -> str | None:
        """The job's state as slurmctld knows it (None once it forgot the job: MinJobAge)."""
        out = self.command("squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%T", check=False)
        return out.split()[0] if out.split() else None

    def wait_for(self, predicate, what: str, timeout: float = 120, every: float = 0.5):  # type: ignore[no-untyped-def]
        """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = predicate()
            if got:
                return got
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.is_file():
                parts.append(f"--- {name} (tail)\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)


def missing_binaries() -> list[str]:
    return [
        b
        for b in (*DAEMONS, *CLIENTS, "mungekey")
        if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_line(node: str) -> str:
    """This machine's NodeName line with its real CPUs and memory (``slurmd -C``)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    first = next(line for line in out.splitlines() if line.startswith("NodeName="))
    fields = dict(f.split("=", 1) for f in first.split())
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return (
        f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} "
        + " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
        + " State=UNKNOWN"
    )


def write_conf(root: Path, node: str, munge_socket: Path) -> Path:
    for d in ("state", "spool", "log", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=mertest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "run" / "slurmctld.pid"}
SlurmdPidFile={root / "run" / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=30
KillWait=5
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
{node_line(node)}
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def pid_of(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cancel_all(cluster: Cluster) -> None:
    """Cancel every job left (a failed test's) and wait for the queue to drain: its processes
    end with their job, before the daemons that would reap them."""
    ids = cluster.command("squeue", "-h", "-o", "%i", check=False).split()
    if ids:
        cluster.command("scancel", *ids, check=False)
        cluster.wait_for(
            lambda: not cluster.command("squeue", "-h", "-o", "%i", check=False).split(),
            "the queue to drain",
            60,
        )


def stop(root: Path) -> list[str]:
    """Stop the daemons by their pid files (TERM, then KILL), then any job process of this
    cluster still running (slurmstepd, a job script: their command lines name its spool folder);
    the command lines of any still running."""
    pids = [p for p in (pid_of(root / "run" / f"{d}.pid") for d in ("slurmd", "slurmctld", "munged")) if p]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    for pid in pids_under(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    left = pids_under(root)
    shown = subprocess.run(
        ["ps", "-o", "pid,args", "-p", ",".join(map(str, left))], capture_output=True, text=True
    )
    return shown.stdout.splitlines()[1:] if left else []


def pids_under(root: Path) -> list[int]:
    """Every process of this cluster: its command line names the cluster's folder (the daemons),
    or its environment its slurm.conf (slurmstepd, a job's script and the programs it runs)."""
    conf = f"SLURM_CONF={root / 'slurm.conf'}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if str(root).encode() in cmdline or conf in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def start(root: Path) -> Cluster:
    node = socket.gethostname().split(".")[0]
    (root / "munge").mkdir(parents=True)
    os.chmod(root / "munge", 0o700)
    key, sock = root / "munge" / "munge.key", root / "munge" / "munge.socket"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    conf = write_conf(root, node, sock)
    subprocess.run(
        [
            "munged",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--pid-file={root / 'run' / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
            "--force",  # root in a temporary folder: skip munged's directory-ownership checks
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    # slurmctld first, with a clean state (-c): no job of an earlier run comes back
    subprocess.run(["slurmctld", "-c", "-f", str(conf)], env=env, check=True, capture_output=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True, capture_output=True)
    cluster = Cluster(root, env, PARTITION, node)

    def idle() -> bool:
        out = cluster.command("sinfo", "-h", "-N", "-o", "%t", check=False).split()
        return bool(out) and out[0] == "idle"

    cluster.wait_for(idle, f"node {node} idle in sinfo", timeout=60)
    return cluster


# the one cluster of a test session and how many test modules hold it: each module that imports
# the fixture gets its own copy of it (no conftest.py here), and they share this one
_shared: dict[str, Any] = {"cluster": None, "users": 0}


@pytest.fixture(scope="session", name="slurm")
def slurm_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running one-node cluster for the whole session; stopped (and checked gone) at the end."""
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"Slurm/munge not installed ({', '.join(missing)}): bash tests/integration/system-packages.sh"
        )
    if not VENV_PYTHON.is_file():
        pytest.skip(f"{VENV_PYTHON}: no interpreter for the jobs")
    if _shared["cluster"] is None:
        root = Path(tmp_path_factory.mktemp("slurm", numbered=True))
        try:
            _shared["cluster"] = start(root)
        except BaseException:
            stop(root)
            raise
    cluster: Cluster = _shared["cluster"]
    _shared["users"] += 1
    try:
        yield cluster
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            _shared["cluster"] = None
            try:
                cancel_all(cluster)
            finally:
                left = stop(cluster.root)
            assert not left, f"processes left after stopping the cluster: {left}"
