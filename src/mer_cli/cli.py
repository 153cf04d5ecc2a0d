"""Console entry points: mer-train (Hydra) and mer-evaluate. The only reader of HydraConfig."""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mer_cli import compare, pipeline, sweep
from mer_cli.errors import MerError

log = logging.getLogger("mer_cli")


def config_dir() -> str:
    """The packaged configs (a regular install) or the repo's ``configs/`` (an editable one).

    Absolute on purpose: with a console script, Hydra would read a relative ``config_path`` as a
    Python package and fail from any other working directory.
    """
    packaged = Path(__file__).resolve().parent / "configs"
    if (packaged / "train.yaml").is_file():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "configs")


# files Hydra and the pipeline create before any training: removed when a run fails that early,
# so a bad input never leaves a half-made run directory behind
_SETUP_ONLY = {".hydra", "train.log", "config.yaml"}


def _remove_if_nothing_trained(run_dir: Path) -> None:
    if not run_dir.is_dir() or any(p.name not in _SETUP_ONLY for p in run_dir.iterdir()):
        return
    for name in _SETUP_ONLY:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    run_dir.rmdir()


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def train_main(cfg: DictConfig) -> float:
    """mer-train: train and evaluate one model; returns val/f1_macro for sweepers."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        metrics = pipeline.run(
            cfg, run_dir, resume=cfg.resume, sweep_dir=Path(hc.sweep.dir) if multirun else None
        )
    except Exception as e:
        if not multirun:
            if not isinstance(e, MerError):
                raise
            _remove_if_nothing_trained(run_dir)
            _fail("mer-train", str(e))
        # one failed job must not sink the sweep: record it for the report and go on
        path = sweep.record_failure(run_dir, e, cfg.modality.get("name"), cfg.get("seed"))
        log.error("job failed (%s), the sweep goes on: %s", path, e)
        return math.nan
    except KeyboardInterrupt:
        log.warning("interrupted: to resume, run the same command with resume=true hydra.run.dir=%s", run_dir)
        raise
    log.info("summary (%s):\n%s", cfg.modality.name, pipeline.report.summary_line(metrics, run_dir))
    value = metrics["val"]["f1_macro"]
    return float(value) if value is not None else math.nan


def evaluate_main(argv: list[str] | None = None) -> None:
    """mer-evaluate RUN_DIR [--data FILE] [--split val|test|all]"""
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
    parser.add_argument("--split", choices=("val", "test", "all"), default="test")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        out_dir, metrics = pipeline.evaluate_run(
            args.run_dir,
            args.data,
            ("val", "test") if args.split == "all" else (args.split,),
            save_plots=not args.no_plots,
        )
    except MerError as e:
        _fail("mer-evaluate", str(e))
    print(pipeline.report.summary_line(metrics, out_dir))


def compare_main(argv: list[str] | None = None) -> None:
    """mer-compare DIR [DIR ...] [--out DIR]"""
    defaults = compare.Settings()
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
        choices=compare.HUMAN_REFERENCE_CHOICES,
        default=defaults.human_reference,
        help="draw CREMA-D's human rates (auto: when every run read data=pickle)",
    )
    parser.add_argument(
        "--actor-pattern",
        default=None,
        help="regex whose first group is the actor in a clip id (default: each run's cv.actor_pattern)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        settings = compare.Settings(
            bootstrap_samples=args.bootstrap_samples,
            confidence=args.confidence,
            alpha=args.alpha,
            human_reference=args.human_reference,
            actor_pattern=args.actor_pattern,
        )
        out = compare.into_new_dir(args.dirs, Path("outputs") / "comparisons", settings, args.out)
    except MerError as e:
        _fail("mer-compare", str(e))
    print(f"report: {out / 'report.html'}")
