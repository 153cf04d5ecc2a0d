"""The model comparison report: many run directories in, one report (tables, figures, summary) out.

Input: run directories (or sweep directories holding them), each with config.yaml, metrics.json and
predictions.csv as `pipeline.run` writes them; job directories holding ``failed.json`` are failed
jobs. Output, in one directory: report.md, report.html (figures embedded), comparison.json,
comparison.csv, runs.csv, pairwise.csv and figures/*.png.

Runs are grouped into models by modality plus whatever else in their configs differs (e.g.
``early (model.dropout=0.2)``); the seeds and cross-validation folds of a model are its runs.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import itertools
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from omegaconf import OmegaConf

from mer_cli.core.artifacts import write_json, write_text
from mer_cli.core.config import flatten
from mer_cli.core.errors import MerError
from mer_cli.data.folds import CREMA_D_ACTOR_PATTERN, maybe_actor_ids
from mer_cli.evaluation import stats
from mer_cli.evaluation.metrics import BARS, METRICS, TABLE
from mer_cli.models import modalities
from mer_cli.runs import files, outputs
from mer_cli.runs.identity import model_identity

log = logging.getLogger(__name__)

MODALITY_ORDER = modalities.MODALITIES.names()  # acoustic, visual, late, early, joint, xattn
# test metrics in the tables: the label-based ones also get a bootstrap interval
TABLE_METRICS = TABLE
BAR_METRICS = BARS
METRIC_TITLES = {name: m.title for name, m in METRICS.items()}
# people rating CREMA-D clips (accuracy per rating, the dataset paper): drawn on the bar charts
HUMAN_RATES = {"voice": 0.409, "face": 0.582, "both": 0.636}
HUMAN_RATE_OF_MODALITY = {
    "acoustic": "voice",
    "visual": "face",
    "late": "both",
    "early": "both",
    "joint": "both",
    "xattn": "both",
}
HUMAN_REFERENCE_CHOICES = ("auto", "true", "false")
# which pairs of models get a paired test (compare.pairwise): every pair, or each model against the
# best; auto: every pair up to ALL_PAIRS_UP_TO models (15 tests), against the best beyond (a
# 30-model sweep: 29 tests, not 435, so Holm's factor leaves the real differences visible)
PAIRWISE_CHOICES = ("auto", "all", "best")
ALL_PAIRS_UP_TO = 6


@dataclass(frozen=True)
class Settings:
    """``compare`` in the config (and mer-compare's options)."""

    bootstrap_samples: int = 2000  # resamples for the intervals and the paired test
    confidence: float = 0.95
    alpha: float = 0.05  # significance level for the pairwise tests (after Holm's adjustment)
    human_reference: str = "auto"  # auto: when every run read data=pickle (CREMA-D features)
    actor_pattern: str | None = None  # None: each run's cv.actor_pattern, else CREMA-D's
    seed: int = 0  # of the bootstrap
    pairwise: str = "auto"  # auto | all | best: which pairs are tested (PAIRWISE_CHOICES)
    pairs: tuple[tuple[str, str], ...] = ()  # pairs of model labels tested besides those
    grid_panels: int = 12  # at most this many models per side-by-side figure

    def __post_init__(self) -> None:
        # from a config or the command line: lists of two labels (or "A,B" strings)
        pairs = [self.pairs] if isinstance(self.pairs, str) else self.pairs or ()
        object.__setattr__(self, "pairs", tuple(_named_pair(p) for p in pairs))
        if self.bootstrap_samples < 100:
            raise MerError(f"compare.bootstrap_samples={self.bootstrap_samples}: use at least 100")
        if not 0.5 <= self.confidence < 1.0:
            raise MerError(f"compare.confidence={self.confidence}: must be in [0.5, 1)")
        if not 0.0 < self.alpha < 1.0:
            raise MerError(f"compare.alpha={self.alpha}: must be in (0, 1)")
        if str(self.human_reference).lower() not in HUMAN_REFERENCE_CHOICES:
            raise MerError(
                f"compare.human_reference={self.human_reference!r}: "
                f"valid: {', '.join(HUMAN_REFERENCE_CHOICES)}"
            )
        if self.pairwise not in PAIRWISE_CHOICES:
            raise MerError(f"compare.pairwise={self.pairwise!r}: valid: {', '.join(PAIRWISE_CHOICES)}")
        if self.grid_panels < 1:
            raise MerError(f"compare.grid_panels={self.grid_panels}: must be at least 1")


def _named_pair(pair: Any) -> tuple[str, str]:
    items = pair.split(",") if isinstance(pair, str) else list(pair)
    if len(items) != 2 or any(not str(x).strip() for x in items) or str(items[0]) == str(items[1]):
        raise MerError(
            f"compare.pairs: {pair!r} is not a pair of two different model labels, "
            "e.g. [[early/bilstm, visual/bilstm]]"
        )
    return str(items[0]).strip(), str(items[1]).strip()


# ---------------------------------------------------------------------------------------------
# Collecting runs


@dataclass(frozen=True)
class Run:
    path: Path
    modality: str
    seed: int | None
    fold: int | None
    config: dict[str, Any]  # flattened resolved config ("model.dropout": 0.5); empty if unknown
    model_choice: str | None  # the config file it picked (``model=gru``: "gru"); None if unknown
    metrics: dict[str, Any]  # the run's own metrics.json
    class_names: tuple[str, ...]
    test: outputs.Predictions  # sorted by clip id, so runs on the same clips line up
    groups: np.ndarray | None  # actor per test clip; None when the clip ids carry none

    @property
    def test_key(self) -> str:
        return hashlib.sha1("\n".join(self.test.clip_ids).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Failure:
    path: Path
    modality: str | None
    seed: int | None
    error: str


def collect(dirs: Sequence[Path], actor_pattern: str | None = None) -> tuple[list[Run], list[Failure]]:
    """Every finished run and every failed job under ``dirs`` (a run dir is not searched further)."""
    runs: dict[Path, Run] = {}
    failures: dict[Path, Failure] = {}
    for d in dirs:
        d = Path(d).expanduser().resolve()
        if not d.is_dir():
            raise MerError(f"{d}: not a directory")
        found = 0
        for path in _job_dirs(d):
            found += 1
            if (path / "failed.json").is_file():
                failures[path] = _load_failure(path)
            else:
                try:
                    runs[path] = load_run(path, actor_pattern)
                except MerError as e:  # e.g. a job killed while writing: list it, compare the rest
                    failures[path] = Failure(path, None, None, f"unreadable run: {e}")
        if not found:
            raise MerError(f"{d}: no mer-train run (metrics.json) or failed job (failed.json) in it")
    return list(runs.values()), list(failures.values())


def _job_dirs(root: Path) -> Iterable[Path]:
    if (root / "failed.json").is_file() or (root / "metrics.json").is_file():
        yield root
        return
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        yield from _job_dirs(child)


def load_run(path: Path, actor_pattern: str | None = None) -> Run:
    metrics = _read_json(path / "metrics.json")
    cfg: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        cfg = flatten(OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False))
    pred_path = path / "predictions.csv"
    if not pred_path.is_file():
        raise MerError(f"{path}: no predictions.csv (not a finished mer-train run)")
    with pred_path.open(newline="") as f:
        header = next(csv.reader(f), [])
    class_names = tuple(c.removeprefix("prob_") for c in header if c.startswith("prob_"))
    test = outputs.read_predictions(pred_path, "test")
    if not test.clip_ids:
        raise MerError(f"{pred_path}: no test predictions")
    order = np.argsort(np.array(test.clip_ids), kind="stable")
    test = outputs.Predictions(
        "test", tuple(test.clip_ids[i] for i in order), test.y_true[order], test.y_prob[order]
    )
    pattern = actor_pattern or cfg.get("cv.actor_pattern") or CREMA_D_ACTOR_PATTERN
    actors = maybe_actor_ids(test.clip_ids, str(pattern))
    run_info = metrics.get("run", {})
    seed = run_info.get("seed", cfg.get("seed"))
    choices = _hydra_choices(path)
    fold = cfg.get("cv.fold")
    return Run(
        path=path,
        modality=str(run_info.get("modality") or cfg.get("modality.name") or "unknown"),
        seed=int(seed) if seed is not None else None,
        fold=int(fold) if fold is not None else None,
        config=cfg,
        model_choice=choices.get("model"),
        metrics=metrics,
        class_names=class_names,
        test=test,
        groups=np.array(actors) if actors is not None else None,
    )


def _hydra_choices(path: Path) -> dict[str, str]:
    """The config group options a run picked (``hydra.runtime.choices`` in the .hydra/hydra.yaml
    Hydra writes in each job's directory, the CV run's for a fold); empty for a run without one."""
    hydra_yaml = path / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file() and re.fullmatch(r"fold\d+", path.name):
        hydra_yaml = path.parent / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return {}
    try:  # plain YAML: Hydra's record keeps its interpolations unresolved, and they stay so
        record = files.read_yaml(hydra_yaml)
    except MerError:  # a damaged Hydra record only costs the short label
        return {}
    choices = ((record or {}).get("hydra") or {}).get("runtime", {}).get("choices")
    return {str(k): str(v) for k, v in choices.items()} if isinstance(choices, dict) else {}


def _load_failure(path: Path) -> Failure:
    info = _read_json(path / "failed.json")
    seed = info.get("seed")
    return Failure(
        path, info.get("modality"), int(seed) if seed is not None else None, str(info.get("error"))
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MerError(f"{path}: unreadable ({e})") from e
    if not isinstance(obj, dict):
        raise MerError(f"{path}: expected a JSON object")
    return obj


def label_runs(runs: Sequence[Run]) -> dict[Path, str]:
    """Model label per run: its modality, plus the config values that differ within that modality.

    When runs of a modality picked different ``model`` configs (a sweep over ``model=bilstm,gru``)
    and every one of them says which, the model config's name stands for its values:
    "early/gru", then any other value that differs among that modality's runs of that model
    ("early/gru (model.dropout=0.2)").
    """
    labels = {}
    for modality in {r.modality for r in runs}:
        group = [r for r in runs if r.modality == modality]
        choices = {r.model_choice for r in group}
        by_choice = len(choices) > 1 and None not in choices
        for choice in sorted(choices, key=str) if by_choice else [None]:
            members = [r for r in group if r.model_choice == choice] if by_choice else group
            name = f"{modality}/{choice}" if by_choice else modality
            identities = [model_identity(r.config) for r in members]
            keys = sorted({k for i in identities for k in i} - {"modality.name"})
            differing = [k for k in keys if len({repr(i.get(k)) for i in identities}) > 1]
            for r in members:
                extra = ", ".join(f"{k}={r.config.get(k)}" for k in differing)
                labels[r.path] = f"{name} ({extra})" if extra else name
    return labels


# ---------------------------------------------------------------------------------------------
# Numbers


@dataclass
class Model:
    label: str
    modality: str
    runs: list[Run]
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> mean/std/ci
    ci_unit: str = "clips"  # what the bootstrap resampled: "actors" or "clips"

    def samples(self) -> list[stats.Sample]:
        return [_sample(r) for r in self.runs]


def _sample(run: Run) -> stats.Sample:
    return stats.Sample(run.test.y_true, run.test.y_prob.argmax(axis=1), run.groups, run.test_key)


def build(runs: Sequence[Run], failures: Sequence[Failure], settings: Settings) -> dict[str, Any]:
    """Everything the report shows, as plain values (this is comparison.json)."""
    if not runs:
        raise MerError("no finished run to compare" + (f" ({len(failures)} failed)" if failures else ""))
    class_names = runs[0].class_names
    for r in runs:
        if r.class_names != class_names:
            raise MerError(
                f"{r.path}: classes {list(r.class_names)} differ from {runs[0].path}'s {list(class_names)}"
            )
    models = group_models(runs)
    n_classes = len(class_names)
    for m in models:
        summarize(m, n_classes, settings)
    pairwise = compare_pairs(models, n_classes, settings)
    test_sets = {r.test_key: r.test.y_true for r in runs}
    majority = [stats.majority_scores(y, n_classes) for y in test_sets.values()]
    chance = {k: float(np.mean([m[k] for m in majority])) for k in stats.BOOTSTRAP_METRICS}
    human = _human_reference(runs, settings)
    result: dict[str, Any] = {
        "settings": {
            "bootstrap_samples": settings.bootstrap_samples,
            "confidence": settings.confidence,
            "alpha": settings.alpha,
            "bootstrap_seed": settings.seed,
            "pairwise": pairwise_mode(len(models), settings),
            "pairs": [list(p) for p in settings.pairs],
        },
        "class_names": list(class_names),
        "chance": chance,
        "human_rates": HUMAN_RATES if human else None,
        "models": [
            {
                "label": m.label,
                "modality": m.modality,
                "n_runs": len(m.runs),
                "seeds": sorted({r.seed for r in m.runs if r.seed is not None}),
                "folds": sorted({r.fold for r in m.runs if r.fold is not None}),
                "ci_unit": m.ci_unit,
                "test": m.summary,
                "stream_contribution": stream_contribution(m),
                "runs": [str(r.path) for r in m.runs],
            }
            for m in models
        ],
        # best first; models tied at the precision the report shows share one inner list
        "ranking": ranking_tiers(models, "f1_macro"),
        "ranking_by_metric": {k: ranking_tiers(models, k) for k in BAR_METRICS},
        "pairwise": pairwise,
        "failures": [_failure_dict(f) for f in failures],
    }
    result["summary"] = summary_sentences(result)
    return result


def stream_contribution(model: Model) -> dict[str, float] | None:
    """Mean over the model's runs of each stream's test accuracy with the other streams zeroed
    (``stream_contribution`` in metrics.json: jointly trained multi-stream models); None when a
    run lacks it."""
    per_run = [r.metrics["test"].get("stream_contribution") for r in model.runs]
    if not per_run or any(not isinstance(c, dict) for c in per_run):
        return None
    streams = list(per_run[0])
    if any(list(c) != streams for c in per_run):
        return None
    return {s: float(np.mean([c[s] for c in per_run])) for s in streams}


def _failure_dict(f: Failure) -> dict[str, Any]:
    return {"path": str(f.path), "modality": f.modality, "seed": f.seed, "error": f.error}


def group_models(runs: Sequence[Run]) -> list[Model]:
    labels = label_runs(runs)
    models: dict[str, Model] = {}
    for r in runs:
        models.setdefault(labels[r.path], Model(labels[r.path], r.modality, [])).runs.append(r)
    for m in models.values():
        m.runs.sort(
            key=lambda r: (r.fold if r.fold is not None else -1, r.seed if r.seed is not None else -1)
        )

    def order(m: Model) -> tuple[int, str]:
        rank = MODALITY_ORDER.index(m.modality) if m.modality in MODALITY_ORDER else len(MODALITY_ORDER)
        return rank, m.label

    return sorted(models.values(), key=order)


def summarize(model: Model, n_classes: int, settings: Settings) -> None:
    """Mean, std and confidence interval of every table metric across the model's runs."""
    samples = model.samples()
    model.ci_unit = "actors" if all(s.groups is not None for s in samples) else "clips"
    if model.ci_unit == "clips":  # mixed: resample clips everywhere
        samples = [stats.Sample(s.y_true, s.y_pred, None, s.test_key) for s in samples]
    draws = stats.bootstrap(
        samples, n_classes, stats.BOOTSTRAP_METRICS, settings.bootstrap_samples, seed=settings.seed
    )
    for k in TABLE_METRICS:
        values = [r.metrics["test"].get(k) for r in model.runs]
        s = stats.spread(values, settings.confidence)
        if s.ci and k != "loss":  # a rate: with few runs the t-interval can overshoot [0, 1]
            s = replace(s, ci=(max(0.0, s.ci[0]), min(1.0, s.ci[1])))
        entry: dict[str, Any] = {
            "mean": s.mean,
            "std": s.std,
            "values": values,
            "ci": list(s.ci) if s.ci else None,
            "ci_method": "t across runs" if s.ci else None,
        }
        if k in draws:
            entry["ci"] = list(stats.interval(draws[k], settings.confidence))
            entry["ci_method"] = f"bootstrap over {model.ci_unit}" + (
                " and runs" if len(model.runs) > 1 else ""
            )
            if s.ci:
                entry["seed_ci"] = list(s.ci)
        model.summary[k] = entry
    for k in ("roc_auc_per_class", "pr_auc_per_class"):
        model.summary[k] = {
            c: stats.spread([r.metrics["test"][k].get(c) for r in model.runs], settings.confidence).mean
            for c in model.runs[0].class_names
        }
    model.summary["f1_per_class"] = {
        c: float(np.mean([r.metrics["test"]["per_class"][c]["f1"] for r in model.runs]))
        for c in model.runs[0].class_names
    }


def ranking_tiers(models: Sequence[Model], metric: str) -> list[list[str]]:
    """Model labels best first, grouped into ties: [["late", "early"], ["visual"], ...].

    Two models tie when their mean ``metric`` is the same at the precision the report shows (one
    decimal of a percentage, `_pct`): a strict order between numbers printed equal would claim a
    difference the report does not show. Within a tie, models keep the report's model order.
    """
    tiers: list[list[str]] = []
    shown = None
    for m in sorted(models, key=lambda m: -_mean(m, metric)):
        text = _pct(m.summary[metric]["mean"])
        if tiers and text == shown:
            tiers[-1].append(m.label)
        else:
            tiers.append([m.label])
            shown = text
    return tiers


def order_text(tiers: Sequence[Sequence[str]]) -> str:
    """``[["late", "early"], ["visual"]]`` -> "late = early > visual"."""
    return " > ".join(" = ".join(t) for t in tiers)


SUMMARY_MODELS = 5  # a ranking in the summary names this many models at most (Ranking: all)


def _order_text_short(tiers: Sequence[Sequence[str]]) -> str:
    """`order_text` of the best SUMMARY_MODELS models (whole tiers; a larger first tier cut
    short), then how many models follow."""
    total = sum(len(t) for t in tiers)
    if total <= SUMMARY_MODELS + 1:
        return order_text(tiers)
    parts: list[str] = []
    named = 0
    for tier in tiers:
        if parts and named + len(tier) > SUMMARY_MODELS:
            break
        if len(tier) > SUMMARY_MODELS:  # a tie too large to list: its first few
            parts.append(" = ".join(tier[:SUMMARY_MODELS]) + f" = {len(tier) - SUMMARY_MODELS} more tied")
        else:
            parts.append(" = ".join(tier))
        named += len(tier)
    rest = total - named
    return " > ".join(parts) + (f" > {rest} more (see Ranking)" if rest else " (see Ranking)")


def _mean(m: Model, metric: str) -> float:
    v = m.summary[metric]["mean"]
    return v if isinstance(v, float) and math.isfinite(v) else -math.inf


def pairwise_mode(n_models: int, settings: Settings) -> str:
    """compare.pairwise with auto decided: "all" up to ALL_PAIRS_UP_TO models, else "best"."""
    if settings.pairwise != "auto":
        return settings.pairwise
    return "all" if n_models <= ALL_PAIRS_UP_TO else "best"


def pairs_to_test(models: Sequence[Model], settings: Settings) -> list[tuple[Model, Model, str]]:
    """The pairs the report tests, each with why: "all" (every pair), "best" (the best model by
    macro F1, the first of its tier, against each other model), "named" (compare.pairs)."""
    by_label = {m.label: m for m in models}
    for pair in settings.pairs:
        for label in pair:
            if label not in by_label:
                raise MerError(
                    f"compare.pairs: no model {label!r} in this comparison; models: {', '.join(by_label)}"
                )
    mode = pairwise_mode(len(models), settings)
    chosen: list[tuple[Model, Model, str]] = []
    if mode == "all":
        chosen = [(a, b, "all") for a, b in itertools.combinations(models, 2)]
    elif len(models) > 1:
        best = by_label[ranking_tiers(models, "f1_macro")[0][0]]
        chosen = [(best, m, "best") for m in models if m is not best]
    seen = {frozenset((a.label, b.label)) for a, b, _ in chosen}
    for la, lb in settings.pairs:
        if frozenset((la, lb)) not in seen:
            seen.add(frozenset((la, lb)))
            chosen.append((by_label[la], by_label[lb], "named"))
    return chosen


def compare_pairs(models: Sequence[Model], n_classes: int, settings: Settings) -> list[dict[str, Any]]:
    """Paired tests on the same test clips (matched by seed and fold) of the pairs `pairs_to_test`
    picks, Holm-adjusted over the tests made (pairs with no common test clips are not tests)."""
    out: list[dict[str, Any]] = []
    named = {frozenset(p) for p in settings.pairs}
    for a, b, reason in pairs_to_test(models, settings):
        runs_b = {(r.seed, r.fold, r.test_key): r for r in b.runs}
        matched = [(ra, runs_b[k]) for ra in a.runs if (k := (ra.seed, ra.fold, ra.test_key)) in runs_b]
        if not matched:
            matched = _match_by_clips(a.runs, b.runs)  # e.g. one run each, different seeds
        if not matched:
            continue
        use_groups = all(ra.groups is not None for ra, _ in matched)
        pairs = [
            (_sample(ra), _sample(rb))
            if use_groups
            else (
                stats.Sample(_sample(ra).y_true, _sample(ra).y_pred, None, ra.test_key),
                stats.Sample(_sample(rb).y_true, _sample(rb).y_pred, None, rb.test_key),
            )
            for ra, rb in matched
        ]
        boot = stats.paired_bootstrap(
            pairs, n_classes, "f1_macro", settings.bootstrap_samples, settings.confidence, seed=settings.seed
        )
        tests = [stats.mcnemar(pa.y_pred == pa.y_true, pb.y_pred == pb.y_true) for pa, pb in pairs]
        # one McNemar test per matched run, never combined: runs of different seeds share their
        # test clips, so their tests are not independent, and pooling their b/c would count each
        # clip once per seed
        out.append(
            {
                "a": a.label,
                "b": b.label,
                "tested_because": reason,
                "named": frozenset((a.label, b.label)) in named,
                "n_pairs": len(pairs),
                "n_clips": int(sum(len(pa.y_true) for pa, _ in pairs)),
                "f1_macro_diff": boot.diff,
                "f1_macro_diff_ci": list(boot.ci),
                "bootstrap_unit": "actors" if use_groups else "clips",
                "p_bootstrap": boot.p_value,
                "mcnemar": [
                    {
                        "run": _run_label(ra, rb),
                        "b": t.b,
                        "c": t.c,
                        "statistic": t.statistic,
                        "p_value": t.p_value,
                        "method": t.method,
                    }
                    for t, (ra, rb) in zip(tests, matched, strict=True)
                ],
                "mcnemar_significant_runs": sum(t.p_value < settings.alpha for t in tests),
            }
        )
    adjusted = stats.holm([p["p_bootstrap"] for p in out])
    # the smallest p the bootstrap can return, and after Holm's factor (the number of pairs)
    floor = stats.p_floor(settings.bootstrap_samples)
    holm_floor = min(1.0, len(out) * floor)
    for p, adj in zip(out, adjusted, strict=True):
        p["p_holm"] = adj
        p["significant"] = adj < settings.alpha
        p["p_bootstrap_floor"] = floor
        p["p_holm_floor"] = holm_floor
        p["p_holm_at_floor"] = adj <= holm_floor * (1 + 1e-9)
    return out


def _run_label(ra: Run, rb: Run) -> str:
    """Which matched run a McNemar test is on: "seed0", "fold2", "seed0-fold2" (A/B when they differ)."""

    def one(r: Run) -> str:
        parts = [f"{name}{v}" for name, v in (("seed", r.seed), ("fold", r.fold)) if v is not None]
        return "-".join(parts) or "run"

    a, b = one(ra), one(rb)
    return a if a == b else f"{a}/{b}"


def _match_by_clips(runs_a: Sequence[Run], runs_b: Sequence[Run]) -> list[tuple[Run, Run]]:
    by_key: dict[str, Run] = {}
    for r in runs_b:
        by_key.setdefault(r.test_key, r)
    return [(r, by_key[r.test_key]) for r in runs_a[:1] if r.test_key in by_key]


def _human_reference(runs: Sequence[Run], settings: Settings) -> bool:
    choice = str(settings.human_reference).lower()
    if choice == "auto":
        return all(r.config.get("data.name") == "pickle" for r in runs)
    return choice == "true"


# ---------------------------------------------------------------------------------------------
# Words


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f} %"


def _p_is(p: float, floor: float | None = None) -> str:
    """The p-value in a sentence: "p = 0.034", "p < 0.001", or "p ≤ 0.012" at the ``floor``."""
    text = stats.format_p(p, floor)
    return f"p {text}" if text[0] in "<≤" else f"p = {text}"


def _unreachable_alpha(result: dict[str, Any]) -> str:
    """A warning when B is too small for any pair to reach α after Holm's adjustment, else ""."""
    pairs, alpha = result["pairwise"], result["settings"]["alpha"]
    if not pairs or pairs[0]["p_holm_floor"] < alpha:
        return ""
    # m * 2 / (B + 1) < alpha  <=>  B > 2 m / alpha - 1
    needed = math.floor(2 * len(pairs) / alpha - 1) + 1
    return (
        f" With {result['settings']['bootstrap_samples']} bootstrap samples and {len(pairs)} pair(s) "
        f"no pair can be significant at α = {alpha}: use compare.bootstrap_samples ≥ {needed}."
    )


def _holm_p(p: dict[str, Any]) -> str:
    return _p_is(p["p_holm"], p["p_holm_floor"])


def _pair_text(p: dict[str, Any]) -> str:
    """ "a > b (Δ 3.2 points, p = 0.012)": the better model first."""
    better, worse = (p["a"], p["b"]) if p["f1_macro_diff"] >= 0 else (p["b"], p["a"])
    return f"{better} > {worse} (Δ {100 * abs(p['f1_macro_diff']):.1f} points, {_holm_p(p)})"


def against_best_sentences(result: dict[str, Any]) -> list[str]:
    """The pairwise tests in words when each model was tested against the best (compare.pairwise):
    which differences from the best are real (significant after Holm) and which could be chance,
    then the pairs the user named."""
    pairs, alpha = result["pairwise"], result["settings"]["alpha"]
    vs_best = [p for p in pairs if p["tested_because"] == "best"]
    named = [p for p in pairs if p["named"]]
    out = []
    if vs_best:
        best = vs_best[0]["a"]
        out.append(
            f"Each model was tested against the best by macro F1, {best} (paired bootstrap, "
            f"Holm-adjusted over the {len(pairs)} tests made, α = {alpha})."
        )
        real = [p for p in vs_best if p["significant"]]
        chance = [p for p in vs_best if not p["significant"]]

        def diff(p: dict[str, Any]) -> str:
            return f"{p['b']} (Δ {100 * p['f1_macro_diff']:+.1f} points, {_holm_p(p)})"

        if real:
            out.append(
                f"Real differences: {best} is better than {len(real)} of the {len(vs_best)} others: "
                + "; ".join(map(diff, real))
                + "."
            )
        elif vs_best[0]["p_holm_floor"] >= alpha:  # too few resamples: see _unreachable_alpha
            out.append(f"No difference from {best} can be significant with this few bootstrap samples.")
        else:
            out.append(f"No model is significantly worse than {best}.")
        if chance:
            out.append(
                f"Not told apart from {best} (the difference could be chance): "
                + "; ".join(map(diff, chance))
                + "."
            )
    if named:
        out.append(
            "Pairs named in compare.pairs: "
            + "; ".join(
                f"{_pair_text(p)}, significant"
                if p["significant"]
                else f"{p['a']} vs {p['b']} (Δ {100 * p['f1_macro_diff']:+.1f} points, {_holm_p(p)}), "
                "could be chance"
                for p in named
            )
            + "."
        )
    if any(p["p_holm_at_floor"] for p in pairs):
        out.append("≤ marks a p at the smallest value the bootstrap can show (see Pairwise tests).")
    unreachable = _unreachable_alpha(result).strip()
    return out + ([unreachable] if unreachable else [])


def _f1(models: dict[str, dict[str, Any]], label: str) -> float:
    return float(models[label]["test"]["f1_macro"]["mean"])


def summary_sentences(result: dict[str, Any]) -> list[str]:
    """The plain-language summary, generated from the numbers."""
    models = {m["label"]: m for m in result["models"]}
    conf = round(100 * result["settings"]["confidence"])
    out = []
    n_runs = sum(m["n_runs"] for m in models.values())
    seeds = sorted({s for m in models.values() for s in m["seeds"]})
    folds = sorted({f for m in models.values() for f in m["folds"]})
    scope = f"{len(models)} model(s) from {n_runs} run(s)"
    if len(seeds) > 1:
        scope += f", seeds {', '.join(map(str, seeds))}"
    if folds:
        scope += f", {len(folds)} speaker-independent cross-validation folds"
    out.append(f"Compared {scope}, on the test split.")

    def describe(label: str) -> str:
        t = models[label]["test"]["f1_macro"]
        ci = t["ci"]
        spread = f" ± {100 * t['std']:.1f}" if t.get("std") is not None else ""
        ci_txt = f", {conf} % CI {_pct(ci[0])} to {_pct(ci[1])}" if ci else ""
        return f"{label} ({_pct(t['mean'])}{spread}{ci_txt})"

    def describe_tier(tier: Sequence[str]) -> str:
        return " and ".join(map(describe, tier)) + (", tied" if len(tier) > 1 else "")

    ranking = result["ranking"]
    if len(models) == 1:
        out.append(f"One model: {describe(ranking[0][0])}.")
    elif len(ranking) == 1:
        out.append(
            f"By macro F1 the models tie: {order_text(ranking)}, each {_pct(_f1(models, ranking[0][0]))}."
        )
    else:
        out.append(
            f"By macro F1 the ranking is {_order_text_short(ranking)}; best: {describe_tier(ranking[0])}; "
            f"last: {describe_tier(ranking[-1])}."
        )
    if len(models) > 1:
        differ = {
            k: order
            for k, order in result["ranking_by_metric"].items()
            if k != "f1_macro" and order != ranking
        }
        # a long ranking is cut short in words: say so when only its unnamed tail differs
        shown = {k: o for k, o in differ.items() if _order_text_short(o) != _order_text_short(ranking)}
        if not differ:
            out.append("Accuracy and balanced accuracy rank the models the same way.")
        elif not shown:
            out.append(
                f"{' and '.join(METRIC_TITLES[k] for k in differ).capitalize()} agree on the first "
                f"{SUMMARY_MODELS} and order the rest differently (see Ranking)."
            )
        else:
            others = [f"{METRIC_TITLES[k]} ({_order_text_short(o)})" for k, o in differ.items()]
            out.append(f"Other metrics order them differently: {'; '.join(others)}.")

    units = {m["ci_unit"] for m in models.values()}
    out.append(
        "Confidence intervals resample "
        + (
            "actors (all clips of an actor together, since they are not independent)"
            if units == {"actors"}
            else "clips (the clip ids carry no actor id)"
            if units == {"clips"}
            else "actors where clip ids carry one, else clips"
        )
        + (" and, across several runs, the runs themselves." if n_runs > len(models) else ".")
    )

    chance = result["chance"]["accuracy"]
    below = [
        label
        for label, m in models.items()
        if m["test"]["accuracy"]["ci"] and m["test"]["accuracy"]["ci"][0] <= chance
    ]
    out.append(
        f"Chance (always the most frequent class) scores {_pct(chance)} accuracy; "
        + (
            f"{', '.join(below)} cannot be told apart from it."
            if below
            else "every model's interval lies above it."
        )
    )

    sig = [p for p in result["pairwise"] if p["significant"]]
    not_sig = [p for p in result["pairwise"] if not p["significant"]]
    alpha = result["settings"]["alpha"]

    if result["pairwise"] and result["settings"]["pairwise"] == "best":
        out += against_best_sentences(result)
    elif result["pairwise"]:
        head = f"Paired bootstrap on macro F1, Holm-adjusted, α = {alpha}: "
        parts = []
        if sig:
            parts.append("significant: " + "; ".join(map(_pair_text, sig)))
        if not_sig:
            parts.append(
                "not significant: " + "; ".join(f"{p['a']} vs {p['b']} ({_holm_p(p)})" for p in not_sig)
            )
        floored = any(p["p_holm_at_floor"] for p in result["pairwise"])
        note = (
            " ≤ marks a p at the smallest value the bootstrap can show (see Pairwise tests)."
            if floored
            else ""
        )
        out.append(head + ". ".join(parts) + "." + note + _unreachable_alpha(result))
    elif len(models) > 1:
        out.append("No two models were evaluated on the same test clips, so no paired test was run.")

    if result["human_rates"]:
        vs = []
        for label, m in models.items():
            rate = HUMAN_RATE_OF_MODALITY.get(m["modality"])
            if rate:
                vs.append(
                    f"{label} {_pct(m['test']['accuracy']['mean'])} vs {rate} {_pct(HUMAN_RATES[rate])}"
                )
        out.append("Against human raters of CREMA-D (accuracy): " + "; ".join(vs) + ".")

    if result["failures"]:
        out.append(
            f"{len(result['failures'])} job(s) failed and are left out of the comparison (see Failed jobs)."
        )
    return out


# ---------------------------------------------------------------------------------------------
# Figures


# more models than this: bars run across (one row per model, labels readable at any count)
COLUMN_BARS_UP_TO = 8


def bar_chart(result: dict[str, Any], metric: str) -> plt.Figure:
    """Models side by side: mean (value beside the bar), CI as error bar, chance and human lines.
    Up to COLUMN_BARS_UP_TO models as columns, more as rows (a 30-model sweep stays readable)."""
    models = result["models"]
    labels = [m["label"] for m in models]
    means = np.array([m["test"][metric]["mean"] for m in models], dtype=float)
    cis = [m["test"][metric]["ci"] or [mu, mu] for m, mu in zip(models, means, strict=True)]
    lo = np.array([c[0] for c in cis], dtype=float)
    hi = np.array([c[1] for c in cis], dtype=float)
    rows = len(models) > COLUMN_BARS_UP_TO
    if rows:
        fig, ax = plt.subplots(figsize=(8.0, 0.32 * len(models) + 1.6))
    else:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(models) + 2.5), 4.8))
    x = np.arange(len(models))
    colors = [
        f"C{MODALITY_ORDER.index(m['modality']) if m['modality'] in MODALITY_ORDER else 4}" for m in models
    ]
    err = [means - lo, hi - means]
    if rows:
        ax.barh(x, means, color=colors, alpha=0.85, height=0.6)
        ax.errorbar(means, x, xerr=err, fmt="none", ecolor="black", capsize=3, lw=1.0)
        for xi, mu, top in zip(x, means, hi, strict=True):
            ax.text(top + 0.01, float(xi), f"{100 * mu:.1f} %", ha="left", va="center", fontsize=8)
    else:
        ax.bar(x, means, color=colors, alpha=0.85, width=0.6)
        ax.errorbar(x, means, yerr=err, fmt="none", ecolor="black", capsize=5, lw=1.2)
        for xi, mu, top in zip(x, means, hi, strict=True):
            ax.text(float(xi), top + 0.01, f"{100 * mu:.1f} %", ha="center", va="bottom", fontsize=9)
    line = ax.axvline if rows else ax.axhline
    chance = result["chance"][metric]
    line(chance, color="gray", ls="--", lw=1, label=f"chance: majority class ({100 * chance:.1f} %)")
    if result["human_rates"]:
        for (name, rate), style in zip(result["human_rates"].items(), (":", "-.", (0, (5, 1))), strict=True):
            line(
                rate,
                color="darkred",
                ls=style,
                lw=1,
                label=f"human raters, {name} ({100 * rate:.1f} % accuracy)",
            )
    conf = round(100 * result["settings"]["confidence"])
    top = min(1.0, max(float(np.nanmax(hi)), chance, 0.65 if result["human_rates"] else 0) + 0.15)
    ax.set_title(f"test/{metric}: mean, {conf} % CI")
    if rows:
        ax.set_yticks(x, labels, fontsize=8)
        ax.invert_yaxis()  # the report's model order, top to bottom
        ax.set_xlabel(f"test/{metric}")
        ax.set_xlim(0, top)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.6 / (0.32 * len(models) + 1.6)))
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xticks(
            x,
            labels,
            rotation=15 if max(map(len, labels)) > 10 else 0,
            ha="right" if max(map(len, labels)) > 10 else "center",
        )
        ax.set_ylabel(f"test/{metric}")
        ax.set_ylim(0, top)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


GRIDS = {
    "confusion_matrices": "confusion matrix",
    "roc_micro": "ROC (micro-average)",
    "roc_per_class": "ROC per class",
    "pr_per_class": "precision-recall per class",
}


def grid(models: Sequence[Model], kind: str, class_names: Sequence[str], part: str = "") -> plt.Figure:
    """One panel per model, test predictions pooled over its runs; ``part``: "2 of 3" when the
    models are spread over several figures."""
    n = len(models)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 4.6 * rows), squeeze=False)
    for ax, m in zip(axes.flat, models, strict=False):
        y_true = np.concatenate([r.test.y_true for r in m.runs])
        y_prob = np.concatenate([r.test.y_prob for r in m.runs])
        pooled = f" ({len(m.runs)} runs pooled)" if len(m.runs) > 1 else ""
        title = f"{m.label}{pooled}"
        if kind == "confusion_matrices":
            outputs.plot_confusion(ax, y_true, y_prob, class_names, title)
        elif kind == "roc_micro":
            outputs.plot_roc_micro(ax, y_true, y_prob, title)
        elif kind == "roc_per_class":
            outputs.plot_roc_per_class(ax, y_true, y_prob, class_names, title)
        else:
            outputs.plot_pr_per_class(ax, y_true, y_prob, class_names, title)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"test: {GRIDS[kind]}" + (f" ({part})" if part else ""))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Documents: one list of blocks, rendered to Markdown and to self-contained HTML


@dataclass(frozen=True)
class Block:
    kind: str  # h2 | p | ul | table | img
    text: str = ""
    items: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()  # table: first row is the header
    path: str = ""  # img: relative to the report


def _cell(entry: dict[str, Any], pct: bool = True) -> str:
    def f(x: float | None) -> str:
        if x is None or not math.isfinite(x):
            return "n/a"
        return f"{100 * x:.1f}" if pct else f"{x:.3f}"

    text = f(entry["mean"]) + (" %" if pct else "")
    if entry.get("std") is not None:
        text += f" ± {f(entry['std'])}"
    if entry.get("ci"):
        text += f" [{f(entry['ci'][0])}, {f(entry['ci'][1])}]"
    return text


def document(
    result: dict[str, Any], runs: Sequence[Run], figures: dict[str, list[str]], root: Path
) -> list[Block]:
    """The report's blocks; ``figures``: figure kind (bar metric or grid) -> its files, in order."""
    conf = round(100 * result["settings"]["confidence"])
    labels = {Path(p): m["label"] for m in result["models"] for p in m["runs"]}
    blocks = [Block("h2", "Summary"), Block("ul", items=tuple(result["summary"]))]
    blocks.append(Block("h2", "Test metrics per model"))
    blocks.append(
        Block(
            "p",
            f"Mean ± standard deviation across runs (seeds, folds) [{conf} % confidence interval]. "
            "Intervals of macro F1, accuracy and balanced accuracy come from the bootstrap described "
            "in the summary; the others are t-intervals across runs (none for a single run).",
        )
    )
    header = ("model", "runs", *(METRIC_TITLES[k] for k in TABLE_METRICS))
    rows = [
        (m["label"], str(m["n_runs"]), *(_cell(m["test"][k], pct=k != "loss") for k in TABLE_METRICS))
        for m in result["models"]
    ]
    blocks.append(Block("table", rows=(header, *rows)))
    blocks += contribution_blocks(result)
    blocks.append(Block("h2", "Ranking"))
    blocks.append(
        Block(
            "p",
            "By the mean over runs, best first; models whose means are equal as the table shows "
            "them (to 0.1 percentage point) are tied, written with =.",
        )
    )
    blocks.append(
        Block(
            "ul",
            items=tuple(
                f"by {METRIC_TITLES[k]}: {order_text(order)}"
                for k, order in result["ranking_by_metric"].items()
            ),
        )
    )
    for key in BAR_METRICS:
        blocks += [Block("img", text=f"test/{key}", path=f) for f in figures[key]]
    if result["pairwise"]:
        blocks.append(Block("h2", "Pairwise tests"))
        pairs = result["pairwise"]
        n_boot = result["settings"]["bootstrap_samples"]
        alpha = result["settings"]["alpha"]
        blocks.append(
            Block(
                "p",
                _tested_text(result)
                + "Δ = macro F1 of A minus B (mean over matched runs) with its paired-bootstrap "
                f"{conf} % interval; p: paired bootstrap, Holm-adjusted over all {len(pairs)} pair(s) "
                f"tested; significant: Holm-adjusted p < α = {alpha}.",
            )
        )
        blocks.append(
            Block(
                "p",
                f"With B = {n_boot} bootstrap samples the smallest p the paired bootstrap can show is "
                f"2/(B+1) ≈ {stats.round_up(pairs[0]['p_bootstrap_floor'])}, and after Holm's "
                f"adjustment over {len(pairs)} pair(s) {len(pairs)} × 2/(B+1) ≈ "
                f"{stats.round_up(pairs[0]['p_holm_floor'])}. A p at that floor is written as a bound, "
                '"≤": no resample reversed the difference, and the true p may be smaller; '
                "compare.bootstrap_samples (mer-compare --bootstrap-samples) lowers the floor."
                + _unreachable_alpha(result),
            )
        )
        blocks.append(
            Block(
                "p",
                "McNemar's test on per-clip correctness (b: clips only A gets right, c: only B) is "
                "shown for each matched run (seed, fold) separately, not combined: runs of different "
                "seeds are tested on the same clips, so their tests are not independent and pooling "
                "their counts would count every clip once per seed. The last column counts the runs "
                f"with McNemar p < α = {alpha} (not adjusted for the number of pairs).",
            )
        )
        header = (
            "A",
            "B",
            "Δ macro F1",
            "p (bootstrap)",
            "p (Holm)",
            "significant",
            "McNemar per run: b/c, p",
            "McNemar p < α",
        )
        rows = [
            (
                p["a"],
                p["b"],
                f"{100 * p['f1_macro_diff']:+.1f} [{100 * p['f1_macro_diff_ci'][0]:+.1f}, "
                f"{100 * p['f1_macro_diff_ci'][1]:+.1f}]",
                stats.format_p(p["p_bootstrap"], p["p_bootstrap_floor"]),
                stats.format_p(p["p_holm"], p["p_holm_floor"]),
                "yes" if p["significant"] else "no",
                "; ".join(
                    f"{t['run']}: {t['b']}/{t['c']}, {stats.format_p(t['p_value'])} ({t['method']})"
                    for t in p["mcnemar"]
                ),
                f"{p['mcnemar_significant_runs']} of {len(p['mcnemar'])}",
            )
            for p in pairs
        ]
        blocks.append(Block("table", rows=(header, *rows)))
    blocks.append(Block("h2", "Per class (mean over runs)"))
    classes = result["class_names"]
    for key, title in (
        ("f1_per_class", "F1"),
        ("roc_auc_per_class", "ROC-AUC"),
        ("pr_auc_per_class", "PR-AUC"),
    ):
        rows = [(m["label"], *(_pct(m["test"][key].get(c)) for c in classes)) for m in result["models"]]
        blocks.append(Block("p", f"{title} per class:"))
        blocks.append(Block("table", rows=(("model", *classes), *rows)))
    blocks.append(Block("h2", "Side by side"))
    for kind, title in GRIDS.items():
        parts = figures[kind]
        blocks += [
            Block(
                "img", text=f"test: {title}" + (f" ({i} of {len(parts)})" if len(parts) > 1 else ""), path=f
            )
            for i, f in enumerate(parts, 1)
        ]
    blocks.append(Block("h2", "Runs"))
    header = ("model", "seed", "fold", *(METRIC_TITLES[k] for k in BAR_METRICS), "run directory")
    rows = [_run_row(r, labels, root, *(_pct(r.metrics["test"].get(k)) for k in BAR_METRICS)) for r in runs]
    blocks.append(Block("table", rows=(header, *rows)))
    return blocks + late_fusion_blocks(runs, labels, root) + failure_blocks(result["failures"], root)


def _run_row(run: Run, labels: dict[Path, str], root: Path, *cells: str) -> tuple[str, ...]:
    """One run's table row: its model, seed and fold, ``cells``, then its directory."""
    seed = "" if run.seed is None else str(run.seed)
    fold = "" if run.fold is None else str(run.fold)
    return (labels[run.path], seed, fold, *cells, _rel(run.path, root))


def _tested_text(result: dict[str, Any]) -> str:
    """Which pairs the table holds, when not every pair (compare.pairwise), else ""."""
    if result["settings"]["pairwise"] != "best":
        return ""
    named = sum(p["tested_because"] == "named" for p in result["pairwise"])
    return (
        f"With {len(result['models'])} models (more than {ALL_PAIRS_UP_TO}, or compare.pairwise=best) "
        "each model is tested against the best by macro F1, not every pair against every other"
        + (f", plus {named} pair(s) named in compare.pairs" if named else "")
        + " (compare.pairwise=all tests every pair). "
    )


def late_fusion_of(run: Run) -> tuple[str, str]:
    """A late run's combiner and what it weighed its members with (metrics.json's run section;
    runs from before ``modality.combiner`` held one ``acoustic_weight``)."""
    info = run.metrics.get("run", {})
    weights = info.get("weights")
    if weights is None and "acoustic_weight" in info:
        w = float(info["acoustic_weight"])
        weights = {"acoustic": w, "visual": 1.0 - w}
    combiner = str(info.get("combiner", "mean"))
    if weights is None:
        return combiner, "logistic regression on the members' probabilities (late.json)"
    return combiner, ", ".join(f"{m} {float(w):.2f}" for m, w in weights.items())


def late_fusion_blocks(runs: Sequence[Run], labels: dict[Path, str], root: Path) -> list[Block]:
    late = [r for r in runs if r.modality == "late"]
    if not late:
        return []
    header = ("model", "seed", "fold", "combiner", "weights", "run directory")
    rows = [_run_row(r, labels, root, *late_fusion_of(r)) for r in late]
    return [
        Block("h2", "Late fusion"),
        Block(
            "p",
            "How each late fusion run combined its members' class probabilities (modality.combiner): "
            "mean averages them, weighted uses weights fitted on validation, stacking a classifier "
            "fitted on validation; the test split chose none of them.",
        ),
        Block("table", rows=(header, *rows)),
    ]


def contribution_blocks(result: dict[str, Any]) -> list[Block]:
    """Each stream's contribution to the multi-stream models that recorded it (empty if none)."""
    models = [m for m in result["models"] if m.get("stream_contribution")]
    if not models:
        return []
    streams = list(dict.fromkeys(s for m in models for s in m["stream_contribution"]))
    header = ("model", METRIC_TITLES["accuracy"], *(f"{s} only" for s in streams))
    rows = [
        (
            m["label"],
            _pct(m["test"]["accuracy"]["mean"]),
            *(_pct(m["stream_contribution"].get(s)) for s in streams),
        )
        for m in models
    ]
    text = (
        "Test accuracy of each jointly trained model with all its streams, and with one stream "
        "kept and the others' frames zeroed (mean over runs): how much the model relies on each."
    )
    return [Block("h2", "Stream contribution"), Block("p", text), Block("table", rows=(header, *rows))]


def failure_blocks(failures: Sequence[dict[str, Any]], root: Path) -> list[Block]:
    if not failures:
        return []
    rows = [(_rel(Path(f["path"]), root), str(f["modality"]), str(f["seed"]), f["error"]) for f in failures]
    return [Block("h2", "Failed jobs"), Block("table", rows=(("job", "modality", "seed", "error"), *rows))]


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "ul":
            lines += [f"- {i}" for i in b.items] + [""]
        elif b.kind == "table":
            head, *body = b.rows
            lines.append("| " + " | ".join(map(esc, head)) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(map(esc, r)) + " |" for r in body]
            lines.append("")
        elif b.kind == "img":
            lines += [f"![{b.text}]({b.path})", ""]
    return "\n".join(lines)


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}"
    "img{max-width:100%;display:block;margin:1em 0}"
)


def to_html(title: str, blocks: Sequence[Block], root: Path) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for b in blocks:
        if b.kind == "h2":
            out.append(f"<h2>{e(b.text)}</h2>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head, *body = b.rows
            out.append(
                "<table><tr>"
                + "".join(f"<th>{e(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )
        elif b.kind == "img":
            data = base64.b64encode((root / b.path).read_bytes()).decode("ascii")
            out.append(f'<img alt="{e(b.text)}" src="data:image/png;base64,{data}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Writing


def write(
    out_dir: Path, runs: Sequence[Run], failures: Sequence[Failure], settings: Settings
) -> dict[str, Any]:
    """Build the comparison of ``runs`` and write every report file into ``out_dir``."""
    title = "mer-cli model comparison"
    if not runs and failures:  # every job failed: the report still says why
        summary = [f"Every job failed ({len(failures)}): nothing to compare."]
        result: dict[str, Any] = {
            "models": [],
            "failures": [_failure_dict(f) for f in failures],
            "summary": summary,
        }
        blocks = [Block("h2", "Summary"), Block("ul", items=tuple(summary))]
        blocks += failure_blocks(result["failures"], out_dir)
        write_json(out_dir / "comparison.json", result)
        write_text(out_dir / "report.md", to_markdown(title, blocks))
        write_text(out_dir / "report.html", to_html(title, blocks, out_dir))
        return result
    result = build(runs, failures, settings)
    models = group_models(runs)
    class_names = runs[0].class_names
    figures: dict[str, list[str]] = {}
    for key in BAR_METRICS:
        figures[key] = [f"figures/bars_{key}.png"]
        outputs.save_figure(bar_chart(result, key), out_dir / figures[key][0])
    # at most compare.grid_panels models per figure: grid_<kind>.png, or grid_<kind>_1.png, _2, ...
    per_figure = math.ceil(len(models) / math.ceil(len(models) / settings.grid_panels))  # even parts
    chunks = [models[i : i + per_figure] for i in range(0, len(models), per_figure)]
    for kind in GRIDS:
        figures[kind] = []
        for i, chunk in enumerate(chunks, 1):
            name = f"figures/grid_{kind}_{i}.png" if len(chunks) > 1 else f"figures/grid_{kind}.png"
            part = f"{i} of {len(chunks)}" if len(chunks) > 1 else ""
            # laid out by tight_layout, nothing outside the panels: no cropping pass (the slow part)
            outputs.save_figure(grid(chunk, kind, class_names, part), out_dir / name, crop=False)
            figures[kind].append(name)
    write_json(out_dir / "comparison.json", result)
    write_text(out_dir / "comparison.csv", _models_csv(result))
    write_text(out_dir / "runs.csv", _runs_csv(runs, label_runs(runs), out_dir))
    write_text(out_dir / "pairwise.csv", _pairwise_csv(result))
    blocks = document(result, [r for m in models for r in m.runs], figures, out_dir)
    write_text(out_dir / "report.md", to_markdown(title, blocks))
    write_text(out_dir / "report.html", to_html(title, blocks, out_dir))
    return result


def _csv(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()


def _num(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.6g}"


def _models_csv(result: dict[str, Any]) -> str:
    header = ["model", "modality", "n_runs", "seeds", "folds", "ci_unit"]
    for k in TABLE_METRICS:
        header += [f"test/{k}", f"test/{k}_std", f"test/{k}_ci_low", f"test/{k}_ci_high"]
    rows: list[list[Any]] = [header]
    for m in result["models"]:
        row = [
            m["label"],
            m["modality"],
            m["n_runs"],
            " ".join(map(str, m["seeds"])),
            " ".join(map(str, m["folds"])),
            m["ci_unit"],
        ]
        for k in TABLE_METRICS:
            t = m["test"][k]
            ci = t["ci"] or [None, None]
            row += [_num(t["mean"]), _num(t["std"]), _num(ci[0]), _num(ci[1])]
        rows.append(row)
    return _csv(rows)


def _runs_csv(runs: Sequence[Run], labels: dict[Path, str], root: Path) -> str:
    rows: list[list[Any]] = [
        ["model", "modality", "seed", "fold", *(f"test/{k}" for k in TABLE_METRICS), "path"]
    ]
    for r in runs:
        rows.append(
            [
                labels[r.path],
                r.modality,
                r.seed,
                r.fold,
                *(_num(r.metrics["test"].get(k)) for k in TABLE_METRICS),
                _rel(r.path, root),
            ]
        )
    return _csv(rows)


def _pairwise_csv(result: dict[str, Any]) -> str:
    rows: list[list[Any]] = [
        [
            "a",
            "b",
            "tested_because",
            "named",
            "n_pairs",
            "f1_macro_diff",
            "ci_low",
            "ci_high",
            "p_bootstrap",
            "p_bootstrap_floor",
            "p_holm",
            "p_holm_floor",
            "p_holm_at_floor",
            "significant",
            "mcnemar_runs",
            "mcnemar_b",
            "mcnemar_c",
            "mcnemar_p",
            "mcnemar_significant_runs",
        ]
    ]
    for p in result["pairwise"]:
        tests = p["mcnemar"]  # one per matched run, in the order of mcnemar_runs, ";"-separated
        rows.append(
            [
                p["a"],
                p["b"],
                p["tested_because"],
                p["named"],
                p["n_pairs"],
                _num(p["f1_macro_diff"]),
                _num(p["f1_macro_diff_ci"][0]),
                _num(p["f1_macro_diff_ci"][1]),
                _num(p["p_bootstrap"]),
                _num(p["p_bootstrap_floor"]),
                _num(p["p_holm"]),
                _num(p["p_holm_floor"]),
                p["p_holm_at_floor"],
                p["significant"],
                ";".join(t["run"] for t in tests),
                ";".join(str(t["b"]) for t in tests),
                ";".join(str(t["c"]) for t in tests),
                ";".join(_num(t["p_value"]) for t in tests),
                p["mcnemar_significant_runs"],
            ]
        )
    return _csv(rows)


def into_new_dir(dirs: Sequence[Path], out_root: Path, settings: Settings, out: Path | None = None) -> Path:
    """mer-compare: the report of ``dirs`` in a new directory (``out``, else out_root/<time>)."""
    if out is None:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        out, n = out_root / stamp, 1
        while out.exists():
            n += 1
            out = out_root / f"{stamp}_{n}"
    elif out.exists() and any(out.iterdir()):
        raise MerError(f"{out}: exists and is not empty; choose a new --out directory")
    runs, failures = collect(dirs, settings.actor_pattern)
    # written into a hidden sibling and renamed: a failure leaves no half-written report
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp, runs, failures, settings)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def into_sweep(sweep_dir: Path, settings: Settings) -> dict[str, Any]:
    """The report of a finished sweep, written at its root directory."""
    runs, failures = collect([sweep_dir], settings.actor_pattern)
    return write(sweep_dir, runs, failures, settings)
