"""Runs started together never share a run directory; interruptions end cleanly at any moment."""

from __future__ import annotations

import json
import multiprocessing
import signal
import time
from pathlib import Path

import pytest

from conftest import run_cli, smoke_config, start_cli, wait_for
from mer_cli.core import config
from mer_cli.core.artifacts import load_checkpoint
from mer_cli.runs import identity, rundir
from mer_cli.runs.resume import check_resumable

SMOKE = ("experiment=smoke", "modality=visual", "runtime.save_plots=false", "runtime.num_threads=1")
# far more epochs than a test lasts, and no early stop: a signal never meets a run that is
# already ending on its own (during interpreter shutdown Python restores the default handlers)
ENDLESS = ("trainer.loop.max_epochs=100000", "trainer.loop.patience_epochs=100000")


def _claim_after(barrier, path: str, results) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()  # every process claims in the same instant
    results.append(rundir.claim(path))


def test_processes_claiming_the_same_name_at_once_get_distinct_directories(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Manager().list()
    procs = [
        ctx.Process(target=_claim_after, args=(barrier, str(tmp_path / "run"), results)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(Path(r).name for r in results) == ["run", "run_2", "run_3", "run_4"]


def test_one_process_gets_the_same_directory_for_the_same_name(tmp_path):
    first = rundir.claim(str(tmp_path / "a"))
    assert rundir.claim(str(tmp_path / "a")) == first  # Hydra resolves hydra.run.dir repeatedly
    assert Path(first).is_dir()


@pytest.mark.slow
def test_runs_launched_together_each_keep_their_own_directory(tmp_path):
    # the same name for all three, as the default <modality>/<second> is for runs started together
    procs = {
        seed: start_cli(
            "train", *SMOKE, f"seed={seed}", "hydra.run.dir=${claim_dir:runs/visual}", cwd=tmp_path
        )
        for seed in (1, 2, 3)
    }
    for proc in procs.values():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    dirs = sorted((tmp_path / "runs").iterdir())
    assert [d.name for d in dirs] == ["visual", "visual_2", "visual_3"]
    seeds = sorted(json.loads((d / "metrics.json").read_text())["run"]["seed"] for d in dirs)
    assert seeds == [1, 2, 3]  # every run's results kept, none overwritten


@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_fails_with_one_line_and_leaves_the_first_alone(tmp_path):
    run_dir = tmp_path / "run"
    # far more epochs than the test lasts: the first run is still training when the second starts
    first = start_cli("train", *SMOKE, *ENDLESS, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    try:
        wait_for(first, run_dir / "last.pt")
        second = run_cli("train", *SMOKE, "seed=5", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert first.poll() is None  # still training: the refusal came from the lock
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == (
        f"mer-train: error: {run_dir} is in use by another mer-train process: wait for it, "
        "or choose another hydra.run.dir"
    )
    assert first.returncode == 130, stderr  # the first run stops as any interrupted run does
    assert "seed: 0" in (run_dir / "config.yaml").read_text().splitlines()
    assert load_checkpoint(run_dir / "last.pt")["epoch"] >= 1


@pytest.mark.slow
def test_ctrl_c_at_any_moment_ends_with_one_line_and_exit_130(tmp_path):
    """From Hydra's start-up to the last epoch: exit 130, no traceback, and either the resume
    hint with a loadable last.pt or no run directory at all."""
    moments = {
        "start-up": lambda d: d.exists(),  # the run directory was just claimed: Hydra is starting
        "first epoch": lambda d: (d / "train.log").exists() and "epoch" in (d / "train.log").read_text(),
        "first checkpoint": lambda d: (d / "last.pt").exists(),
    }
    for name, reached in moments.items():
        run_dir = tmp_path / name.replace(" ", "_")
        proc = start_cli("train", *SMOKE, *ENDLESS, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        try:
            while proc.poll() is None and not reached(run_dir):
                time.sleep(0.005)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 130, (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        last = stderr.strip().splitlines()[-1]
        if (run_dir / "last.pt").exists():
            assert last.endswith(f"to resume, run the same command with resume=true hydra.run.dir={run_dir}")
            assert load_checkpoint(run_dir / "last.pt")["epoch"] >= 1
        else:
            assert last.startswith("mer-train: interrupted"), (name, last)
            assert "nothing to resume" in last
            assert not run_dir.exists(), (name, sorted(p.name for p in run_dir.iterdir()))


# ---------------------------------------------------------------------------------------------
# Which model is this: one definition for the report's grouping, the sweep's reuse and resume


RUNTIME = (
    "runtime.num_threads=2",
    "runtime.progress=true",
    "runtime.save_plots=false",
    "runtime.eval_batch_size=7",
    "runtime.device=auto",
    "compare.bootstrap_samples=300",
)


def test_runtime_knobs_are_not_part_of_a_model_but_seeds_and_sizes_are():
    base = smoke_config()
    assert identity.model_identity(smoke_config(*RUNTIME)) == identity.model_identity(base)
    assert identity.run_identity(smoke_config(*RUNTIME)) == identity.run_identity(base)
    # another seed: the same model, another run of it
    assert identity.model_identity(smoke_config("seed=1")) == identity.model_identity(base)
    assert identity.run_identity(smoke_config("seed=1")) != identity.run_identity(base)
    # another dropout or precision: another model
    assert identity.differences(
        identity.model_identity(base), identity.model_identity(smoke_config("model.dropout=0.3"))
    ) == [
        "model.dropout: 0.5 -> 0.3",
        "model.encoder.dropout: 0.5 -> 0.3",
    ]
    assert identity.model_identity(smoke_config("trainer.loop.precision=bf16")) != identity.model_identity(
        base
    )


def test_resume_accepts_other_runtime_knobs_and_names_a_changed_model_setting(tmp_path):
    from omegaconf import OmegaConf

    from mer_cli.core.errors import ConfigError

    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(smoke_config()))
    (tmp_path / "last.pt").write_bytes(b"")
    check_resumable(OmegaConf.create(smoke_config(*RUNTIME, "resume=true")), tmp_path, resume=True)
    with pytest.raises(ConfigError, match=r"model\.dense_size: 16 -> 32"):
        check_resumable(OmegaConf.create(smoke_config("model.dense_size=32")), tmp_path, resume=True)


def test_resume_auto_continues_a_run_with_the_same_settings_and_starts_fresh_where_there_is_none(tmp_path):
    from omegaconf import OmegaConf

    from mer_cli.core.errors import ConfigError

    cfg = OmegaConf.create(smoke_config("resume=auto"))
    assert check_resumable(cfg, tmp_path, resume="auto") is False  # nothing there: fresh
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(smoke_config()))
    assert check_resumable(cfg, tmp_path, resume="auto") is False  # stopped before epoch 1
    (tmp_path / "last.pt").write_bytes(b"")
    assert check_resumable(OmegaConf.create(smoke_config(*RUNTIME)), tmp_path, resume="auto") is True
    with pytest.raises(ConfigError, match=r"resume=auto: the settings differ .*model\.dense_size: 16 -> 32"):
        check_resumable(OmegaConf.create(smoke_config("model.dense_size=32")), tmp_path, resume="auto")
    with pytest.raises(ConfigError, match=r"resume='maybe': valid: true, false, auto"):
        check_resumable(cfg, tmp_path, resume="maybe")


def test_the_report_groups_runs_that_differ_only_in_runtime_knobs_or_seed_as_one_model(tmp_path):
    from mer_cli.reporting.collect import Run, label_runs

    def run(name: str, cfg: dict) -> Run:
        return Run(
            path=tmp_path / name,
            modality="early",
            seed=cfg["seed"],
            fold=None,
            config=config.flatten(cfg),
            model_choice="bilstm",  # the same model config: labels name the keys that differ
            metrics={},
            class_names=("a",),
            test=None,  # type: ignore[arg-type]  # labels need the config only
            groups=None,
        )

    runs = [
        run("a", smoke_config()),
        run("b", smoke_config("seed=1", *RUNTIME)),
        run("c", smoke_config("model.dense_size=32")),
    ]
    labels = label_runs(runs)
    assert labels[tmp_path / "a"] == labels[tmp_path / "b"] == "early (model.dense_size=16)"
    assert labels[tmp_path / "c"] == "early (model.dense_size=32)"


def test_a_late_run_from_before_combiners_is_the_same_model_as_todays_equivalent():
    today = identity.model_identity(smoke_config("modality=late"))
    before = smoke_config("modality=late")
    del before["modality"]["combiner"]
    before["modality"]["acoustic_weight"] = 0.5
    assert identity.model_identity(before) == today
    assert identity.model_identity(smoke_config("modality=late", "modality.acoustic_weight=0.5")) == today
    before["modality"]["acoustic_weight"] = "fit"
    assert identity.model_identity(before) == identity.model_identity(
        smoke_config("modality=late", "modality.combiner=weighted")
    )
    before["modality"]["acoustic_weight"] = 0.3
    assert identity.model_identity(before) == identity.model_identity(
        smoke_config("modality=late", "modality.acoustic_weight=0.3")
    )
    assert identity.model_identity(smoke_config("modality=late", "modality.combiner=stacking")) != today


def test_a_transformer_run_from_before_attention_dropout_had_its_own_key_kept_its_dropout_there():
    today = smoke_config("model=transformer")
    before = smoke_config("model=transformer")
    del before["model"]["encoder"]["attention_dropout"]  # then model.encoder.dropout (0.1) acted there
    assert identity.differences(identity.model_identity(before), identity.model_identity(today)) == [
        "model.encoder.attention_dropout: 0.1 -> 0.0"
    ]
    same = smoke_config("model=transformer", "model.encoder.attention_dropout=0.1")
    assert identity.model_identity(before) == identity.model_identity(same)
