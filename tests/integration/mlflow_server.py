"""A real MLflow tracking server for the integration tests: ``mlflow server`` on 127.0.0.1 on a
free port, its backend store a SQLite file and its artifacts (served through it) in a folder,
both under a given temporary folder; it and every process it started are stopped at the end.

``running_mlflow()`` skips the test, naming what is missing, where the mlflow command (the full
package: ``mlflow-skinny`` has no server) is not installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from postgres_server import free_port

START_SECONDS = 240  # a loaded 2-core machine takes a minute or more to import the server


@dataclass
class MlflowServer:
    uri: str  # the tracking URI: http://127.0.0.1:<port>
    store: str  # the backend store's URI (sqlite:///...): read directly once the server is gone
    log: Path
    proc: subprocess.Popen[bytes]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Stop the server and every process of its session (uvicorn's workers, its job runner)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            while _group_alive(self.proc.pid):
                time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def running_mlflow(root: Path) -> Iterator[MlflowServer]:
    """A started server with its state under ``root``; stopped (all its processes) when the
    block ends, however it ends."""
    mlflow = Path(sys.executable).parent / "mlflow"
    if not mlflow.exists():
        pytest.skip("the mlflow command (pip install mlflow, the full package) is not installed")
    port = free_port()
    store = f"sqlite:///{root / 'mlflow.db'}"
    log = root / "mlflow-server.log"
    cmd = [
        str(mlflow),
        "server",
        *("--backend-store-uri", store, "--artifacts-destination", str(root / "artifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", store, log, proc)
    try:
        deadline = time.monotonic() + START_SECONDS
        while not server.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        server.kill(signal.SIGTERM)
        assert not _group_alive(proc.pid), "mlflow server processes left running"
