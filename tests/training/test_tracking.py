"""Experiment tracking (the ``logger`` group): TensorBoard event files and MLflow runs, read back
with each tool's own reader, hold what the run directory holds; a tracker never changes or breaks
a run, and is never part of a model's identity."""

from __future__ import annotations

import csv
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_main, smoke_config, start_cli, wait_for
from mer_cli.core.errors import ConfigError
from mer_cli.runs import identity
from mer_cli.runs.resume import check_resumable
from mer_cli.training import tracking

SMOKE = ("experiment=smoke", "modality=visual")


NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true"}  # no run of these tests phones MLflow's home


def mer_train(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_main("train", *args, cwd=cwd, env={**NO_TELEMETRY, **(env or {})})


def history(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "history.csv").open(newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}


def results(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {s: metrics[s] for s in ("val", "test")}


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default logger's run directory: the reference every tracked run must equal."""
    cwd = tmp_path_factory.mktemp("csv")
    proc = mer_train(*SMOKE, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]  # no tracking database, no event files
    return cwd / "run"


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking database for this module's MLflow tests (created once: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_csv_is_the_default_and_writes_history_csv_as_before(csv_run):
    assert OmegaConf.load(csv_run / "config.yaml").logger == {"name": "csv"}
    assert "tensorboard" not in {p.name for p in csv_run.iterdir()}
    with (csv_run / "history.csv").open() as f:
        header = f.readline().strip().split(",")
    assert header[0] == "epoch" and {"train/loss", "val/loss", "val/accuracy", "lr", "seconds"} <= set(header)
    assert [r["epoch"] for r in history(csv_run)] == [1.0, 2.0]


@pytest.mark.slow
def test_tensorboard_event_files_hold_every_epoch_of_history_csv(tmp_path, csv_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    proc = mer_train(*SMOKE, "logger=tensorboard", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the run itself is the csv logger's, to the number, plus the event files
    assert results(run) == results(csv_run)
    assert {f for f in files(run) if not f.startswith("tensorboard/")} == files(csv_run)

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = history(run)
    for key in rows[0]:
        if key == "epoch":
            continue
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        # event files keep float32
        assert logged == [(int(r["epoch"]), pytest.approx(r[key], rel=1e-6, abs=1e-9)) for r in rows], key
    metrics = json.loads((run / "metrics.json").read_text())
    for key, value in (
        ("final/test/f1_macro", metrics["test"]["f1_macro"]),
        ("final/val/loss", metrics["val"]["loss"]),
        ("final/run/best_epoch", metrics["run"]["best_epoch"]),
    ):
        assert events.Scalars(key)[-1].value == pytest.approx(value, rel=1e-6), key
    assert sorted(events.Tags()["images"]) == sorted(f"plots/{p.stem}" for p in (run / "plots").glob("*.png"))
    assert set(events.PluginTagToContent("hparams")) >= {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
    }


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_one_warning_and_the_run_is_the_csv_loggers(tmp_path, csv_run):
    run = tmp_path / "run"
    proc = mer_train(
        *SMOKE,
        "logger=mlflow",
        "logger.tracking_uri=http://127.0.0.1:9",  # the discard port: nothing listens
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "logger=mlflow" in warnings[0] and "127.0.0.1:9" in warnings[0]
    assert results(run) == results(csv_run)
    assert files(run) == files(csv_run)


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_experiment_with_late_fusion_members_as_child_runs(tmp_path, mlflow_db):
    # late first: it trains its members, then the acoustic job copies its acoustic member
    sweep = tmp_path / "sweep"
    proc = mer_train(
        "-m",
        "experiment=smoke",
        "modality=late,acoustic",
        "compare.enabled=false",
        "logger=mlflow",
        f"logger.tracking_uri={mlflow_db}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow = client(mlflow_db)
    experiment = mlflow.get_experiment_by_name(str(sweep))  # one experiment per sweep
    runs = {r.info.run_name: r for r in mlflow.search_runs([experiment.experiment_id])}
    assert sorted(runs) == [
        "0_late_seed0",
        "0_late_seed0/acoustic",
        "0_late_seed0/visual",
        "1_acoustic_seed0",
    ]
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    for name, r in runs.items():
        run_dir = sweep / name
        assert r.data.tags[tracking.RUN_DIR_TAG] == str(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert r.data.metrics["final/test/f1_macro"] == metrics["test"]["f1_macro"]
        assert r.data.params["modality.name"] == metrics["run"]["modality"]
        if name == "0_late_seed0":
            continue
        rows = history(run_dir)  # the copied run too: its history came with its files
        for key in rows[0]:
            if key != "epoch":
                logged = [(m.step, m.value) for m in mlflow.get_metric_history(r.info.run_id, key)]
                assert sorted(logged) == [(int(row["epoch"]), row[key]) for row in rows], (name, key)
        assert r.data.metrics["final/run/epochs_trained"] == 2

    late, late_dir = runs["0_late_seed0"], sweep / "0_late_seed0"
    for member in ("acoustic", "visual"):
        assert runs[f"0_late_seed0/{member}"].data.tags["mlflow.parentRunId"] == late.info.run_id
    assert "mlflow.parentRunId" not in runs["1_acoustic_seed0"].data.tags
    # the late run: its config, the fused metrics, its files, where its members came from
    assert late.data.params["model.encoder.hidden_sizes"] == "[8, 8]"
    assert late.data.params["trainer.loop.max_epochs"] == "2"
    assert late.data.params["modality.acoustic_weight"] == "null"
    anger = json.loads((late_dir / "metrics.json").read_text())["test"]["per_class"]["anger"]
    assert late.data.metrics["final/test/per_class/anger/recall"] == anger["recall"]
    assert late.data.tags["final/run/members/acoustic"] == "acoustic"
    artifacts = {a.path for a in mlflow.list_artifacts(late.info.run_id)}
    assert artifacts == {"config.yaml", "metrics.json", "late.json", "plots"}
    plots = {Path(a.path).name for a in mlflow.list_artifacts(late.info.run_id, "plots")}
    assert plots == {p.name for p in (late_dir / "plots").glob("*.png")}
    copy = mlflow.download_artifacts(late.info.run_id, "metrics.json", str(tmp_path))
    assert Path(copy).read_text() == (late_dir / "metrics.json").read_text()


@pytest.mark.slow
def test_ctrl_c_then_resume_continues_the_same_mlflow_run_each_epoch_once(tmp_path, mlflow_db):
    run = tmp_path / "run"
    args = (
        *SMOKE,
        "runtime.save_plots=false",
        "trainer.loop.max_epochs=20",  # Ctrl-C after the first epoch lands mid-training
        "trainer.loop.patience_epochs=20",
        "logger=mlflow",
        f"logger.tracking_uri={mlflow_db}",
        "logger.experiment=resume",
        f"hydra.run.dir={run}",
    )
    proc = start_cli("train", *args, cwd=tmp_path, env=NO_TELEMETRY)
    try:
        wait_for(proc, run / "last.pt")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    mlflow = client(mlflow_db)
    experiment = mlflow.get_experiment_by_name("resume").experiment_id
    (interrupted,) = mlflow.search_runs([experiment])
    assert interrupted.info.status == "KILLED"

    resumed = mer_train(*args, "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (done,) = mlflow.search_runs([experiment])
    assert done.info.run_id == interrupted.info.run_id and done.info.status == "FINISHED"
    rows = history(run)
    assert len(rows) == 20
    logged = sorted((m.step, m.value) for m in mlflow.get_metric_history(done.info.run_id, "val/loss"))
    assert logged == [(int(r["epoch"]), r["val/loss"]) for r in rows]  # every epoch, once


# ---------------------------------------------------------------------------------------------
# Without training


@pytest.mark.parametrize(
    "logger", [("logger=tensorboard",), ("logger=mlflow", "logger.tracking_uri=http://tracking:5000")]
)
def test_the_logger_is_never_part_of_a_model_so_resume_and_sweep_reuse_ignore_it(tmp_path, logger):
    base, tracked = smoke_config(), smoke_config(*logger)
    assert tracked["logger"] != base["logger"]
    assert identity.model_identity(tracked) == identity.model_identity(base)
    assert identity.run_identity(tracked) == identity.run_identity(base)  # sweep.find_trained's test
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(base))
    (tmp_path / "last.pt").write_bytes(b"")
    check_resumable(OmegaConf.create({**tracked, "resume": True}), tmp_path, resume=True)


def test_an_unknown_logger_is_one_error_naming_the_valid_ones(tmp_path):
    cfg = OmegaConf.create({**smoke_config(), "logger": {"name": "wandb"}})
    with pytest.raises(ConfigError, match=r"logger='wandb': valid: csv, tensorboard, mlflow"):
        tracking.start(cfg, tmp_path)


def test_a_missing_extra_is_one_warning_naming_it_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    for module in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    cfg = OmegaConf.create(smoke_config("logger=tensorboard"))
    with caplog.at_level(logging.WARNING, logger="mer_cli.training.tracking"), tracking.session():
        tracked = tracking.start(cfg, tmp_path)
        tracked.log_epoch({"epoch": 1, "val/loss": 1.0})
        tracked.finish()
        tracking.start(cfg, tmp_path / "member").finish()  # the job's later runs: no second warning
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("logger=tensorboard needs pip install 'mer-cli[tracking]' (")
    assert warning.endswith("): this run is not tracked")
    assert not (tmp_path / "tensorboard").exists()


def test_final_values_are_metrics_json_numbers_under_their_path():
    numbers, texts = tracking.final_values(
        {
            "run": {"modality": "late", "stopped_early": True, "members": {"acoustic": "acoustic"}},
            "test": {"f1_macro": 0.5, "roc_auc_micro": None, "confusion_matrix": [[1, 0], [0, 1]]},
        }
    )
    assert numbers == {"final/run/stopped_early": 1.0, "final/test/f1_macro": 0.5}
    assert texts == {"final/run/modality": "late", "final/run/members/acoustic": "acoustic"}
