"""mer-evaluate: a trained run re-scored on its own data or another dataset, into a new
``evaluations/<time>/`` directory inside the run (the training results are never touched).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mer_cli.data import formats
from mer_cli.data.load import load_data
from mer_cli.evaluation.metrics import score
from mer_cli.models import modalities
from mer_cli.runs import files, outputs, trained
from mer_cli.runs.late import late_predictions

log = logging.getLogger(__name__)


def evaluate_run(
    run_dir: Path, data_path: Path | None, split_names: tuple[str, ...], save_plots: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Re-evaluate a trained run (single-stream or late fusion) into ``run_dir/evaluations/<time>/``.

    ``data_path``: another feature pickle with the same features; None: the run's own data.
    The training results in ``run_dir`` are never touched.
    """
    run_dir, cfg = files.read_run_config(run_dir)
    data_cfg = cfg.data
    if data_path is not None:
        data_cfg = OmegaConf.merge(
            data_cfg,
            {
                "name": formats.recognise(data_path).name,
                "path": str(data_path),
                "limit_per_split": None,
                # the run's protocol and speaker map name the clips of its own data, not another's
                "split_file": None,
                "speaker_file": None,
            },
        )
    # a cross-validation fold is re-evaluated on its own fold; another file has no folds
    cv_cfg = cfg.cv if data_path is None and "cv" in cfg else None
    splits = load_data(data_cfg, cv_cfg)
    late = trained.read_late(run_dir)
    late_info: dict[str, Any] = {}
    if late is not None:
        _, combined, member_dirs = late
        members = {m: trained.predict_run(d, splits, split_names) for m, d in member_dirs.items()}
        predictions = late_predictions(members, combined, split_names)
        late_info = {"combiner": combined.combiner}
    else:
        predictions = list(trained.predict_run(run_dir, splits, split_names).values())
    metrics = {
        "run": {
            "evaluated_run": str(run_dir),
            "modality": cfg.modality.name,
            **late_info,
            "data": splits.source,
        },
        **{p.split: score(p.y_true, p.y_prob, splits.class_names) for p in predictions},
    }
    if cfg.modality.name in modalities.jointly_trained() and "test" in split_names:
        metrics["test"]["stream_contribution"] = trained.run_stream_contribution(run_dir, splits.test)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = run_dir / "evaluations" / stamp
    n = 1
    while out_dir.exists():
        n += 1
        out_dir = run_dir / "evaluations" / f"{stamp}_{n}"
    # written into a hidden sibling and renamed: a failure leaves no half-written evaluation
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    try:
        outputs.write(
            tmp,
            metrics,
            None,
            predictions,
            splits.class_names,
            save_plots=save_plots,
            plot_splits=split_names,
        )
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir, metrics
