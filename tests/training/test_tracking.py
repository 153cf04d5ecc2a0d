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
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_main, smoke_config, start_cli, wait_for
from mer_cli.core.errors import ConfigError
from mer_cli.runs import identity
from mer_cli.runs.resume import check_resumable
from mer_cli.training import background, tracking, tracking_mlflow, tracking_record

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
        cwd=tmp_path,  # MLflow's own retries (ours by default): in the background, training goes on
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "logger=mlflow" in warnings[0] and "127.0.0.1:9" in warnings[0]
    # what the server would have had is named, once: every epoch and the results
    (report,) = [line for line in lines if "not sent" in line]
    assert report.endswith("): epochs 1-2, the results; its run directory has them")
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
        assert r.data.tags[tracking_mlflow.RUN_DIR_TAG] == str(run_dir)
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
    numbers, texts = tracking_record.final_values(
        {
            "run": {"modality": "late", "stopped_early": True, "members": {"acoustic": "acoustic"}},
            "test": {"f1_macro": 0.5, "roc_auc_micro": None, "confusion_matrix": [[1, 0], [0, 1]]},
        }
    )
    assert numbers == {"final/run/stopped_early": 1.0, "final/test/f1_macro": 0.5}
    assert texts == {"final/run/modality": "late", "final/run/members/acoustic": "acoustic"}


# ---------------------------------------------------------------------------------------------
# The background sender (MLflow's requests): training never waits for the server


class HangingBackend:
    """A tracking server that takes each request until ``answer`` is set, then fails them all
    (``up``: succeeds): a stand-in for one that stops answering mid-run."""

    def __init__(self, up: bool = False) -> None:
        self.answer, self.up = threading.Event(), up
        self.epochs: list[int] = []
        self.results = 0
        self.status: str | None = None

    def _request(self) -> None:
        self.answer.wait()
        if not self.up:
            raise ConnectionError("http://127.0.0.1:9: Connection refused")

    def open(self) -> None:
        self._request()

    def probe(self) -> None:
        if not self.up:
            raise ConnectionError("still refused")

    def log_epoch(self, epoch, values) -> None:
        self._request()
        self.epochs.append(epoch)

    def logged_epochs(self) -> set[int]:
        self._request()
        return set(self.epochs)

    def log_results(self, out_dir, final, texts) -> None:
        self._request()
        self.results += 1

    def close(self, status) -> None:
        self._request()
        self.status = status


def _history_csv(run_dir: Path, epochs: int) -> None:
    lines = ["epoch,val/loss"] + [f"{e},{1.0 / e}" for e in range(1, epochs + 1)]
    (run_dir / "history.csv").write_text("\n".join(lines) + "\n")


def test_a_hanging_server_never_holds_up_an_epoch_and_what_it_lacks_is_named(tmp_path, caplog):
    backend = HangingBackend()
    tracker = tracking.Tracker("mlflow", tmp_path, "run", backend, background.Sender(), flush_timeout=5)
    with caplog.at_level(logging.INFO, logger="mer_cli.training.tracking"):
        for epoch in (1, 2, 3):  # each returns while the server still holds the first request
            tracker.log_epoch({"epoch": epoch, "val/loss": 1.0 / epoch})
        assert not backend.answer.is_set() and tracker.sender.pending == 4  # start + 3 epochs queued
        backend.answer.set()  # the server answers at last: refused
        _history_csv(tmp_path, 3)
        (tmp_path / "metrics.json").write_text('{"val": {"f1_macro": 0.5}}')
        tracker.finish()  # tries once more (the server is still away), then gives up
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "logger=mlflow: sending the run's start of run failed, the run tries again at its end: "
        "http://127.0.0.1:9: Connection refused"
    ]
    assert tracker.not_sent == ["epochs 1-3", "the results"]
    (report,) = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    assert report.startswith("logger=mlflow: run: not sent (still refused): epochs 1-3, the results")
    assert backend.epochs == [] and backend.status is None and tracker.sender.pending == 0


def test_a_server_back_by_the_end_of_the_run_gets_every_epoch_held_back_once(tmp_path, caplog):
    backend = HangingBackend()
    tracker = tracking.Tracker("mlflow", tmp_path, "run", backend, background.Sender(), flush_timeout=5)
    backend.up = True
    backend.answer.set()
    tracker.log_epoch({"epoch": 1, "val/loss": 1.0})
    assert tracker.sender.drain(5)
    backend.up = False  # away for epochs 2 and 3
    tracker.log_epoch({"epoch": 2, "val/loss": 0.5})
    tracker.log_epoch({"epoch": 3, "val/loss": 0.3})
    assert tracker.sender.drain(5) and tracker.offline
    backend.up = True  # back before the run ends
    _history_csv(tmp_path, 3)
    tracker.finish()
    assert sorted(backend.epochs) == [1, 2, 3] and backend.results == 1 and backend.status == "FINISHED"
    assert tracker.not_sent == []


def test_the_end_of_a_run_waits_for_a_hanging_server_no_longer_than_its_flush_timeout(tmp_path):
    backend = HangingBackend()  # never answers while the run ends
    tracker = tracking.Tracker("mlflow", tmp_path, "run", backend, background.Sender(), flush_timeout=0.2)
    tracker.log_epoch({"epoch": 1, "val/loss": 1.0})
    _history_csv(tmp_path, 1)
    tracker.finish()
    assert tracker.backend is None and tracker.not_sent == ["epochs 1", "the results"]
    backend.answer.set()  # the late answers go nowhere
