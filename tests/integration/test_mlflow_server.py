"""logger=mlflow against a real MLflow tracking server (``mlflow server`` on 127.0.0.1): a run's
parameters, per-epoch metrics and artifacts as the server holds them; then the server killed
after a run's first epoch: the run finishes as it would have, one warning line, and one line
naming what the server did not get (the run directory has it)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, running_mlflow
from omegaconf import OmegaConf

from conftest import cli_command, run_main, start
from mer_cli.training import tracking_mlflow, tracking_record

pytestmark = pytest.mark.integration

SMOKE = ("experiment=smoke", "modality=visual")
ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with running_mlflow(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "history.csv").open(newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def points(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """A metric's (step, value) pairs as the tracking store holds them."""
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def the_run(uri: str, experiment: str):
    found = client(uri).get_experiment_by_name(experiment)
    runs = client(uri).search_runs([found.experiment_id]) if found is not None else []
    return runs[0] if runs else None


def test_a_run_on_the_server_holds_its_config_every_epoch_and_its_files(server, tmp_path):
    run_dir = tmp_path / "run"
    args = (*SMOKE, "trainer.loop.max_epochs=3", "trainer.loop.patience_epochs=3")
    proc = run_main(
        "train",
        *args,
        "logger=mlflow",
        f"logger.tracking_uri={server.uri}",
        "logger.experiment=served",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stdout + proc.stderr
    run = the_run(server.uri, "served")
    assert run.info.status == "FINISHED" and run.data.tags[tracking_mlflow.RUN_DIR_TAG] == str(run_dir)

    # parameters: the run's own config.yaml, flattened, as typed in an override
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    expected = {
        tracking_mlflow._key(k): tracking_record.as_text(v)
        for k, v in tracking_record.parameters(config).items()
    }
    assert run.data.params == expected
    # every history.csv column, one point per epoch
    rows = history(run_dir)
    assert [r["epoch"] for r in rows] == [1.0, 2.0, 3.0]
    for key in rows[0]:
        if key != "epoch":
            assert points(server.uri, run.info.run_id, key) == [(int(r["epoch"]), r[key]) for r in rows], key
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.metrics["final/val/f1_macro"] == metrics["val"]["f1_macro"]
    # the files, uploaded through the server to its artifact store
    artifacts = {a.path for a in client(server.uri).list_artifacts(run.info.run_id)}
    assert artifacts == {f for f in tracking_record.RUN_FILES if (run_dir / f).is_file()} | {"plots"}
    assert {"config.yaml", "metrics.json", "history.csv"} <= artifacts
    plots = {Path(a.path).name for a in client(server.uri).list_artifacts(run.info.run_id, "plots")}
    assert plots == {p.name for p in (run_dir / "plots").glob("*.png")} and plots
    copy = client(server.uri).download_artifacts(run.info.run_id, "history.csv", str(tmp_path))
    assert Path(copy).read_text() == (run_dir / "history.csv").read_text()


def test_the_server_killed_mid_run_costs_one_warning_and_the_run_names_what_it_lacks(server, tmp_path):
    run_dir, epochs = tmp_path / "run", 100
    args = (*SMOKE, f"trainer.loop.max_epochs={epochs}", f"trainer.loop.patience_epochs={epochs}")
    cmd = cli_command(
        "train",
        *args,
        "runtime.save_plots=false",
        "logger=mlflow",
        f"logger.tracking_uri={server.uri}",
        "logger.experiment=killed",
        f"hydra.run.dir={run_dir}",
    )
    proc = start(cmd, cwd=tmp_path, env=ENV, stderr=subprocess.DEVNULL)  # the log: train.log
    try:
        # kill -9 the server once it holds the run's first epoch
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            run = the_run(server.uri, "killed")
            if run is not None and client(server.uri).get_metric_history(run.info.run_id, "val/loss"):
                break
            time.sleep(0.2)
        server.kill()
        proc.wait(timeout=300)
    finally:
        proc.kill()
    text = (run_dir / "train.log").read_text()
    assert proc.returncode == 0, text[-3000:]

    # the run is the run it would have been: every epoch in history.csv, its metrics written
    rows = history(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert (run_dir / "metrics.json").is_file()
    lines = text.splitlines()
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1 and "logger=mlflow" in warnings[0], warnings
    (report,) = [line for line in lines if "not sent" in line]
    first, last = map(int, re.search(r"epochs (\d+)-(\d+), the results", report).groups())
    assert last == epochs and first >= 2  # the first epoch reached the server

    # what the server's store holds (read directly: the server is gone): the epochs before the kill
    stored = the_run(server.store, "killed")
    assert stored.info.status == "RUNNING"  # nothing could close it
    logged = points(server.store, stored.info.run_id, "val/loss")
    steps = [s for s, _ in logged]
    assert steps == list(range(1, len(steps) + 1))
    assert logged == [(int(r["epoch"]), r["val/loss"]) for r in rows[: len(steps)]]
    assert set(steps) | set(range(first, last + 1)) == set(range(1, epochs + 1))  # each epoch somewhere
