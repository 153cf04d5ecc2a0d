"""A throw-away PostgreSQL server for the integration tests: a fresh cluster (initdb) in a
temporary folder, listening on 127.0.0.1 only on a free port (its unix socket in that folder
too), trust authentication for its one user, and always stopped at the end.

As root, the server runs as the ``postgres`` system user (``nobody`` where there is none):
PostgreSQL refuses to run as root. ``running_postgres()`` skips the test, naming what is missing,
where the server binaries are not installed (tests/integration/system-packages.sh installs them).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "mer"  # the cluster's superuser (initdb -U), trusted from 127.0.0.1 without a password


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian's layout), or one on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _account() -> str | None:
    """The unprivileged account to run the server as when we are root; None: as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    pytest.skip("PostgreSQL refuses to run as root and there is no postgres or nobody user")


@dataclass(frozen=True)
class PostgresServer:
    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    port: int
    account: str | None
    host: str = "127.0.0.1"
    user: str = USER

    def url(self, database: str) -> str:
        """The SQLAlchemy URL Optuna takes (psycopg2 over TCP)."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """One of the server's tools, as the server's account, checked."""
        cmd = [str(self.bin_dir / tool), *args]
        if self.account is not None:
            cmd = ["runuser", "-u", self.account, "--", *cmd]
        proc = subprocess.run(
            cmd, cwd=self.socket_dir, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: exit {proc.returncode}: {proc.stderr[-2000:]}")
        return proc

    def create_database(self, name: str) -> str:
        """A new database owned by the server's user (createdb); its URL."""
        self.run("createdb", "-h", self.host, "-p", str(self.port), "-U", self.user, name)
        return self.url(name)

    def postmaster_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(pid_file.read_text().splitlines()[0])
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(server: PostgresServer) -> None:
    """pg_ctl stop -m fast, then make sure: the postmaster (and with it its backends) is gone."""
    pid = server.postmaster_pid()
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        server.run("pg_ctl", "-D", str(server.data_dir), "-m", "fast", "-w", "-t", "60", "stop", timeout=90)
    if pid is None:
        return
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):  # pg_ctl could not stop it: no server of ours outlives the tests
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.1)
    assert not _alive(pid), f"postgres {pid} still running after the tests"


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server (skips the test where PostgreSQL is not installed); stopped and deleted
    when the block ends, however it ends."""
    bin_dir = server_binaries()
    if bin_dir is None or not (bin_dir / "postgres").exists():
        pytest.skip("PostgreSQL server (initdb, pg_ctl, postgres) not installed: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install 'mer-cli[integration]'")
    account = _account()
    root = Path(tempfile.mkdtemp(prefix="mer-postgres-"))
    data = root / "data"
    server = PostgresServer(bin_dir, data, root, free_port(), account)
    try:
        if account is not None:
            shutil.chown(root, user=account)
        server.run("initdb", "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} -c fsync=off -c synchronous_commit=off"
        )
        server.run("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")
        yield server
    finally:
        _stop(server)
        shutil.rmtree(root, ignore_errors=True)
