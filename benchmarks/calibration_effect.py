#!/usr/bin/env python3
"""What temperature scaling changes: a sweep trained with ``eval.calibration=temperature``, each run
scored with and without its temperature, ECE / NLL / Brier side by side with intervals.

The uncalibrated numbers come from mer-evaluate itself: the sweep is copied, every copy's
calibration.json removed (late fusion's members read from the copies), and each run re-evaluated
on its own test split. Intervals: 95 % bootstrap over actors (the clips of a resampled actor, all
seeds pooled), with the calibrated-minus-uncalibrated difference resampled on the same actors.

    mer-train -m modality=acoustic,visual,early,late seed=0,1,2 eval.calibration=temperature \\
        hydra.sweep.dir=outputs/sweeps/calibration
    python benchmarks/calibration_effect.py outputs/sweeps/calibration
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mer_cli.data.folds import CREMA_D_ACTOR_PATTERN, actor_ids
from mer_cli.evaluation import metrics
from mer_cli.runs import outputs
from mer_cli.runs.evaluate import evaluate_run

SCORES = {"ece": metrics.ece, "nll": metrics.loss, "brier": metrics.brier}


def uncalibrated_copy(sweep: Path, into: Path) -> Path:
    """The sweep without its temperatures (calibration.json files, late.json's ``temperature``),
    late.json's member paths pointed at the copies."""
    copy = into / sweep.name
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("evaluations", "*.png", "last.pt"))
    for path in copy.rglob("calibration.json"):
        path.unlink()
    for path in copy.rglob("late.json"):  # the fused model's own temperature is kept in late.json
        late = json.loads(path.read_text().replace(str(sweep.resolve()), str(copy.resolve())))
        late.pop("temperature", None)
        path.write_text(json.dumps(late))
    return copy


def test_predictions(run_dir: Path, evaluate: bool) -> outputs.Predictions:
    """The run's test predictions (``evaluate``: re-evaluated), rows renormalised: predictions.csv
    keeps 6 significant digits, so its rows sum to 1 only within ~1e-6."""
    if evaluate:
        run_dir, _ = evaluate_run(run_dir, None, ("test",), save_plots=False)
    p = outputs.read_predictions(run_dir / "predictions.csv", "test")
    return outputs.Predictions(p.split, p.clip_ids, p.y_true, p.y_prob / p.y_prob.sum(axis=1, keepdims=True))


def bootstrap(
    pairs: list[tuple[outputs.Predictions, outputs.Predictions]], n: int, seed: int
) -> dict[str, dict[str, list[float]]]:
    """Per score: [point, low, high] for calibrated, uncalibrated and their difference."""
    y = np.concatenate([c.y_true for c, _ in pairs])
    cal = np.concatenate([c.y_prob for c, _ in pairs])
    raw = np.concatenate([r.y_prob for _, r in pairs])
    actors = np.array([a for c, _ in pairs for a in actor_ids(c.clip_ids, CREMA_D_ACTOR_PATTERN)])
    groups = [np.flatnonzero(actors == a) for a in np.unique(actors)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[tuple[float, float]]] = {k: [] for k in SCORES}
    for _ in range(n):
        idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        for k, f in SCORES.items():
            draws[k].append((f(y[idx], cal[idx]), f(y[idx], raw[idx])))
    out = {}
    for k, f in SCORES.items():
        d = np.array(draws[k])
        point = (f(y, cal), f(y, raw))
        out[k] = {
            name: [v, *np.percentile(col, [2.5, 97.5]).tolist()]
            for name, v, col in (
                ("temperature", point[0], d[:, 0]),
                ("none", point[1], d[:, 1]),
                ("difference", point[0] - point[1], d[:, 0] - d[:, 1]),
            )
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--bootstrap-samples", type=int, default=1000)
    args = parser.parse_args()
    jobs = sorted(p.parent for p in args.sweep.glob("*/metrics.json"))
    with tempfile.TemporaryDirectory() as tmp:
        copy = uncalibrated_copy(args.sweep, Path(tmp))
        by_modality: dict[str, list[tuple[outputs.Predictions, outputs.Predictions]]] = {}
        temperatures: dict[str, list[float]] = {}
        for job in jobs:
            modality = re.sub(r"^\d+_|_seed\d+$", "", job.name)
            pair = (test_predictions(job, False), test_predictions(copy / job.name, True))
            by_modality.setdefault(modality, []).append(pair)
            t = json.loads((job / "metrics.json").read_text())["run"].get("temperature")
            if t is not None:
                temperatures.setdefault(modality, []).append(round(t, 3))
    result = {
        m: {"runs": len(p), "temperatures": temperatures.get(m), **bootstrap(p, args.bootstrap_samples, 0)}
        for m, p in by_modality.items()
    }
    print(json.dumps(result, indent=1))
    print("\nmodality | T per seed | ECE none -> temperature (difference) | NLL none -> temperature | Brier")
    for m, r in result.items():

        def pct(v: list[float]) -> str:
            return f"{100 * v[0]:.1f} [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"

        def num(v: list[float]) -> str:
            return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

        e, n, b = r["ece"], r["nll"], r["brier"]
        print(
            f"{m} | {r['temperatures']} | {pct(e['none'])} -> {pct(e['temperature'])} "
            f"({pct(e['difference'])}) "
            f"| {num(n['none'])} -> {num(n['temperature'])} | {num(b['none'])} -> {num(b['temperature'])}"
        )


if __name__ == "__main__":
    main()
