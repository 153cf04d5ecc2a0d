"""Time the comparison report of a large sweep (issue 11: 5 encoders x 6 modalities = 30 models).

No training: fake run directories, as mer-train leaves them (config.yaml, .hydra/hydra.yaml with
the sweep's choices, metrics.json, predictions.csv), each model right on its own share of the
test clips. Then `reporting.report.write` builds the report, timed.

    PYTHONPATH=src python benchmarks/compare_report.py             # 30 models x 3 seeds
    PYTHONPATH=src python benchmarks/compare_report.py --seeds 1 --bootstrap-samples 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mer_cli.evaluation.metrics import score
from mer_cli.reporting import analysis, options, report
from mer_cli.reporting.collect import collect
from mer_cli.runs import outputs

ENCODERS = ("bilstm", "bilstm_notebook", "gru", "transformer", "tcn")
ENCODER_NAMES = {  # model=<name> -> model.encoder.name (models/registry.py)
    "bilstm": "birnn",
    "bilstm_notebook": "birnn",
    "gru": "birnn",
    "transformer": "transformer",
    "tcn": "tcn",
}
MODALITIES = options.MODALITY_ORDER  # acoustic, visual, late, early, joint, xattn
CLASSES = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def fake_sweep(
    root: Path,
    encoders: tuple[str, ...] = ENCODERS,
    modalities: tuple[str, ...] = MODALITIES,
    seeds: tuple[int, ...] = (0, 1, 2),
    n_clips: int = 240,
    clips_per_actor: int = 10,
) -> Path:
    """A sweep directory of ``len(encoders) x len(modalities)`` models, one run per seed.

    Model k (in sweep order) gets a clip right with probability 0.35 + 0.4 k / (models - 1): a
    spread from near chance to good, so some differences are real and some are not; the last one
    (xattn/tcn in the full sweep) with probability 0.95, the clear best.
    """
    rng = np.random.default_rng(0)
    y_true = np.arange(n_clips) % len(CLASSES)
    actors = 1001 + np.arange(n_clips) // clips_per_actor
    clip_ids = tuple(f"{a:04d}_clip{i:04d}" for i, a in enumerate(actors))
    n_models = len(encoders) * len(modalities)
    num = 0
    for k, (modality, encoder) in enumerate((m, e) for m in modalities for e in encoders):
        p_right = 0.95 if k == n_models - 1 else 0.35 + 0.4 * k / max(1, n_models - 1)
        for seed in seeds:
            run = root / f"{num}_{modality}_seed{seed}"
            num += 1
            right = rng.random(n_clips) < p_right
            y_pred = np.where(right, y_true, (y_true + rng.integers(1, len(CLASSES), n_clips)) % len(CLASSES))
            prob = rng.random((n_clips, len(CLASSES))) * 0.5
            prob[np.arange(n_clips), y_pred] += 1.0
            prob /= prob.sum(axis=1, keepdims=True)
            metrics = {
                # made-up training cost, distinct per run: for the tables that read it
                "run": {
                    "seed": seed,
                    "modality": modality,
                    "train_seconds": 10.0 * (k + 1) + seed,
                    "epochs_trained": 20 + k + seed,
                },
                "test": score(y_true, prob, CLASSES),
            }
            test = outputs.Predictions("test", clip_ids, y_true, prob)
            outputs.write(run, metrics, None, [test], CLASSES, save_plots=False)
            (run / "config.yaml").write_text(
                f"seed: {seed}\nmodality:\n  name: {modality}\n"
                f"model:\n  encoder:\n    name: {ENCODER_NAMES[encoder]}\n"
                f"    hidden_sizes: [{512 if encoder == 'bilstm_notebook' else 64}]\n"
            )
            (run / ".hydra").mkdir()
            (run / ".hydra" / "hydra.yaml").write_text(
                f"hydra:\n  runtime:\n    choices:\n      modality: {modality}\n      model: {encoder}\n"
            )
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="runs per model")
    ap.add_argument("--clips", type=int, default=240, help="test clips per run")
    ap.add_argument("--bootstrap-samples", type=int, default=options.Settings().bootstrap_samples)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sweep = fake_sweep(Path(tmp) / "sweep", seeds=tuple(range(args.seeds)), n_clips=args.clips)
        settings = options.Settings(bootstrap_samples=args.bootstrap_samples)
        start, cpu_start = time.perf_counter(), time.process_time()
        runs, failures = collect([sweep])
        loaded = time.perf_counter()
        result = analysis.build(runs, failures, settings)
        built = time.perf_counter()
        result = report.write(Path(tmp) / "report", runs, failures, settings)
        done, cpu = time.perf_counter(), time.process_time() - cpu_start
        figures = sorted(p.name for p in (Path(tmp) / "report" / "figures").iterdir())
    print(
        f"{len(result['models'])} models, {len(runs)} runs, {len(result['pairwise'])} pairwise tests, "
        f"{len(figures)} figures, B = {args.bootstrap_samples}: "
        f"read {loaded - start:.1f} s, numbers {built - loaded:.1f} s, whole report (numbers again, "
        f"figures, files) {done - built:.1f} s; wall {done - start:.1f} s, CPU {cpu:.1f} s"
    )


if __name__ == "__main__":
    main()
