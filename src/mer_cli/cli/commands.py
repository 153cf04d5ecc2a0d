"""Console entry points: mer-train (Hydra) and mer-evaluate. The only reader of HydraConfig."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.mer_optuna_sweeper.sweeper import OptunaSweeper
from mer_cli.core import allocator
from mer_cli.core.console import debug, fail, stop_on_sigterm
from mer_cli.core.errors import MerError
from mer_cli.data import formats, native, npz
from mer_cli.data.splits import NAN_POLICIES
from mer_cli.evaluation import perturb
from mer_cli.preprocess import profile
from mer_cli.reporting import options as compare_options
from mer_cli.reporting import report as compare_report
from mer_cli.runs import evaluate, execute, outputs, robustness, rundir
from mer_cli.sweeps import callback, launchers
from mer_cli.training import hardware, tracking

log = logging.getLogger("mer_cli")

# configs/train.yaml: hydra.run.dir: ${claim_dir:outputs/<modality>/<time>}
OmegaConf.register_new_resolver("claim_dir", rundir.claim, replace=True)
launchers.register_submitit_launchers()  # hydra/launcher=submitit_local|submitit_slurm
# configs/hydra/launcher/<name>.yaml take the place of the launcher plugins' entries of the same
# name, and Hydra checks them against those entries (a mistyped key is an error): by design here,
# so its deprecation notice about that check is not shown on every sweep
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
# hparams_search: Hydra's plugin scan lists hydra_plugins/ only where it is a plain directory on
# sys.path (a wheel), not through an editable install's import hook; so register the sweeper here
Plugins.instance().register(OptunaSweeper)


def config_dir() -> str:
    """The packaged configs (a regular install) or the repo's ``configs/`` (an editable one).

    Absolute on purpose: with a console script, Hydra would read a relative ``config_path`` as a
    Python package and fail from any other working directory.
    """
    packaged = Path(__file__).resolve().parents[1] / "configs"
    if (packaged / "train.yaml").is_file():
        return str(packaged)
    return str(Path(__file__).resolve().parents[3] / "configs")


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def train_main(cfg: DictConfig) -> float:
    """mer-train: train and evaluate one model; returns val/f1_macro for sweepers."""
    allocator.configure()  # first: the malloc setting that makes CPU training fast (docs/memory.md)
    # the console entry may have configured it before Hydra's logging existed: say it in train.log
    log.info("malloc: %s", allocator.describe())
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if cfg.get("profile_only", False):  # +profile_only=true: what mer-profile prints, no training
        return profile_only_main(cfg, run_dir)
    if "SUBMITIT_EXECUTOR" not in os.environ:  # a submitit job keeps submitit's handlers (requeue)
        stop_on_sigterm()
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = Path(hc.sweep.dir) if multirun else None
    jobs = launchers.parallel_jobs(hc.launcher) if multirun else 1
    if jobs > 1 and cfg.runtime.get("num_threads") is None:  # never oversubscribe the CPU
        cfg.runtime.num_threads = hardware.cpu_threads(jobs)
        log.info("%d jobs run at once: %d torch threads each", jobs, cfg.runtime.num_threads)
    try:
        with rundir.hold(run_dir), tracking.session(sweep_dir):  # a failed run's tracked runs say so
            metrics = execute.run(cfg, run_dir, resume=cfg.resume, sweep_dir=sweep_dir)
    except Exception as e:
        if not multirun:
            if not isinstance(e, MerError):
                raise
            if not isinstance(e, rundir.RunDirBusy):  # the other process's files are not ours
                rundir.remove_if_nothing_trained(run_dir)
            fail("mer-train", str(e))
        # one failed job must not sink the sweep: record it for the report and go on
        path = callback.record_failure(run_dir, e, cfg.modality.get("name"), cfg.get("seed"))
        log.error("job failed (%s), the sweep goes on: %s", path, e)
        return math.nan
    except KeyboardInterrupt:
        if debug():
            raise
        if any(run_dir.rglob("last.pt")):
            hint = f"to resume, run the same command with resume=true hydra.run.dir={run_dir}"
        else:  # no epoch was saved: a new run loses nothing
            rundir.remove_if_nothing_trained(run_dir)
            hint = "no epoch was saved: nothing to resume"
        print(f"mer-train: interrupted: {hint}", file=sys.stderr)
        sys.exit(130)  # the shell's code for Ctrl-C
    log.info("summary (%s):\n%s", cfg.modality.name, outputs.summary_line(metrics, run_dir))
    value = metrics["val"]["f1_macro"]
    return float(value) if value is not None else math.nan


def profile_only_main(cfg: DictConfig, run_dir: Path) -> float:
    """mer-train ... +profile_only=true: print the training data's profile and the preprocessing
    it implies, then leave no run directory behind (nothing was trained)."""
    try:
        described = execute.profile_only(cfg)
    except MerError as e:
        rundir.remove_if_nothing_trained(run_dir)
        fail("mer-train", str(e))
    print(profile.summary(described), flush=True)
    for line in profile.warnings(described):
        log.warning("%s", line)
    rundir.remove_if_nothing_trained(run_dir)
    return math.nan


def evaluate_main(argv: list[str] | None = None) -> None:
    """mer-evaluate RUN_DIR [--data FILE] [--split val|test|all] | RUN_DIR --perturb [NAMES]"""
    allocator.configure()
    parser = argparse.ArgumentParser(
        prog="mer-evaluate",
        description="Reload a trained run's checkpoint and evaluate it again, into a new "
        "evaluation directory inside the run (the training results stay untouched).",
    )
    parser.add_argument("run_dir", type=Path, help="a mer-train run directory")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="another feature file with the same features (default: the run's own data)",
    )
    parser.add_argument("--split", choices=("val", "test", "all"), default=None, help="default: test")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    parser.add_argument(
        "--perturb",
        nargs="?",
        const="",
        default=None,
        metavar="NAMES",
        help="re-score the test split under corruptions instead: all of them, or the comma-separated "
        f"NAMES ({', '.join(perturb.CORRUPTIONS.names())}); writes robustness.json, robustness.csv "
        "and plots/robustness.png into the run",
    )
    parser.add_argument(
        "--perturb-seed", type=int, default=0, help="draws the corruptions (same seed, same numbers)"
    )
    parser.add_argument(
        "--audio",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --perturb: the test clips' recordings (files named by clip id, as mer-ingest read "
        "them), for the snr corruption: noise mixed into each, features computed again",
    )
    parser.add_argument(
        "--audio-model",
        type=Path,
        default=None,
        metavar="PATH",
        help="with --audio: where the acoustic features' pretrained model lies here (default: as recorded)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if args.perturb is not None:
        perturb_main(args)
        return
    if args.audio is not None or args.audio_model is not None:
        fail("mer-evaluate", "--audio and --audio-model go with --perturb (the recordings it corrupts)")
    args.split = args.split or "test"
    try:
        out_dir, metrics = evaluate.evaluate_run(
            args.run_dir,
            args.data,
            ("val", "test") if args.split == "all" else (args.split,),
            save_plots=not args.no_plots,
        )
    except MerError as e:
        fail("mer-evaluate", str(e))
    print(outputs.summary_line(metrics, out_dir))


def perturb_main(args: argparse.Namespace) -> None:
    """mer-evaluate RUN --perturb [NAMES]: the run's own test split, under corruptions."""
    try:
        if args.data is not None or args.split not in (None, "test"):
            raise MerError("--perturb re-scores the run's own test split: without --data and --split")
        if args.audio_model is not None and args.audio is None:
            raise MerError("--audio-model: give --audio DIR too (the recordings it computes features of)")
        names = [n.strip() for n in args.perturb.split(",") if n.strip()]
        result, written = robustness.evaluate_robustness(
            args.run_dir,
            names or None,
            seed=args.perturb_seed,
            save_plots=not args.no_plots,
            audio_dir=args.audio,
            audio_model=args.audio_model,
        )
    except MerError as e:
        fail("mer-evaluate", str(e))
    print("\n".join(robustness.summary_lines(result)))
    print(f"wrote {', '.join(str(p) for p in written)}")


def convert_main(argv: list[str] | None = None) -> None:
    """mer-convert IN OUT: the notebook's pickle (or an .npz) -> a native .npz or dataset directory"""
    parser = argparse.ArgumentParser(
        prog="mer-convert",
        description="Validate a feature pickle (read without running any code) or a native .npz and "
        "write it as a native .npz (OUT ending in .npz, for data=npz) or a native dataset directory "
        "(any other OUT, for data=native: plain .npy files read clip by clip, for data larger than memory)",
    )
    parser.add_argument("source", type=Path, help="the notebook's feature pickle, or a native .npz")
    parser.add_argument("target", type=Path, help="the .npz file or the new directory to write")
    parser.add_argument("--class-names", nargs="+", default=None, help="names of labels 0..K-1")
    parser.add_argument("--nan-policy", choices=NAN_POLICIES, default="error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        splits = formats.read(args.source, class_names=args.class_names, nan_policy=args.nan_policy)
        if args.target.suffix == ".npz":
            npz.save_npz(splits, args.target)
        else:
            native.save_dir(splits, args.target)
    except MerError as e:
        fail("mer-convert", str(e))
    except OSError as e:
        fail("mer-convert", f"{e.filename or args.target}: {e.strerror or e}")
    counts = ", ".join(f"{len(s)} {s.name}" for s in splits.all())
    print(f"wrote {args.target}: {counts} clips, classes {', '.join(splits.class_names)}")


def compare_main(argv: list[str] | None = None) -> None:
    """mer-compare DIR [DIR ...] [--out DIR]"""
    defaults = compare_options.Settings()
    parser = argparse.ArgumentParser(
        prog="mer-compare",
        description="Compare the runs in mer-train run or sweep directories (made on any day): "
        "tables, bar charts with confidence intervals, side-by-side curves, pairwise tests and a "
        "summary, written as report.md and a self-contained report.html into a new directory.",
    )
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="run or sweep directories")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="new directory for the report (default: outputs/comparisons/<time>)",
    )
    parser.add_argument("--bootstrap-samples", type=int, default=defaults.bootstrap_samples)
    parser.add_argument("--confidence", type=float, default=defaults.confidence)
    parser.add_argument(
        "--alpha", type=float, default=defaults.alpha, help="significance level (Holm-adjusted)"
    )
    parser.add_argument(
        "--human-reference",
        choices=compare_options.HUMAN_REFERENCE_CHOICES,
        default=defaults.human_reference,
        help="draw CREMA-D's human rates (auto: when every run read data=pickle)",
    )
    parser.add_argument(
        "--actor-pattern",
        default=None,
        help="regex whose first group is the actor in a clip id (default: each run's cv.actor_pattern)",
    )
    parser.add_argument(
        "--pairwise",
        choices=compare_options.PAIRWISE_CHOICES,
        default=defaults.pairwise,
        help="pairs tested: all, each model against the best, or auto "
        f"(all up to {compare_options.ALL_PAIRS_UP_TO} models)",
    )
    parser.add_argument(
        "--pair",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="also test model A against model B (labels as in the report, e.g. early/gru "
        "visual/gru); repeatable",
    )
    parser.add_argument("--grid-panels", type=int, default=defaults.grid_panels, help="models per figure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        settings = compare_options.Settings(
            bootstrap_samples=args.bootstrap_samples,
            confidence=args.confidence,
            alpha=args.alpha,
            human_reference=args.human_reference,
            actor_pattern=args.actor_pattern,
            pairwise=args.pairwise,
            pairs=tuple(args.pair),
            grid_panels=args.grid_panels,
        )
        out = compare_report.into_new_dir(args.dirs, Path("outputs") / "comparisons", settings, args.out)
    except MerError as e:
        fail("mer-compare", str(e))
    print(f"report: {out / 'report.html'}")
