"""The comparison's numbers: runs grouped into models, each model's test metrics summarized (mean,
spread, bootstrap intervals), rankings, and the paired tests between models.

`build` returns them as plain values (`Comparison`, what comparison.json holds), its summary's
sentences included; nothing here draws.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mer_cli.core.errors import MerError
from mer_cli.evaluation import stats
from mer_cli.evaluation.metrics import METRICS
from mer_cli.reporting.collect import Failure, Run, label_runs
from mer_cli.reporting.options import (
    ALL_PAIRS_UP_TO,
    BALANCED_FIRST,
    BAR_METRICS,
    HUMAN_RATES,
    IMBALANCE_RATIO,
    MODALITY_ORDER,
    TABLE_METRICS,
    Comparison,
    Settings,
)
from mer_cli.reporting.prose import nothing_to_compare_sentences, pct, summary_sentences


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


def build(runs: Sequence[Run], failures: Sequence[Failure], settings: Settings) -> Comparison:
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
    balance = test_balance(list(test_sets.values()), class_names)
    result: Comparison = {
        "settings": {
            "bootstrap_samples": settings.bootstrap_samples,
            "confidence": settings.confidence,
            "alpha": settings.alpha,
            "bootstrap_seed": settings.seed,
            "pairwise": pairwise_mode(len(models), settings),
            "pairs": [list(p) for p in settings.pairs],
        },
        "class_names": list(class_names),
        "test_balance": balance,
        # the table's metrics in the order it shows them
        "table_metrics": list(
            dict.fromkeys([*BALANCED_FIRST, *TABLE_METRICS]) if balance["imbalanced"] else TABLE_METRICS
        ),
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
        "failures": [f.as_dict() for f in failures],
    }
    result["summary"] = summary_sentences(result)
    return result


def test_balance(test_sets: Sequence[np.ndarray], class_names: Sequence[str]) -> dict[str, Any]:
    """How unequal the test split's classes are: the largest class's clips over the smallest's, in
    the most unequal test set compared (folds have one each); imbalanced above IMBALANCE_RATIO."""
    worst: dict[str, Any] = {"ratio": 1.0}
    for y in test_sets:
        counts = np.bincount(y, minlength=len(class_names))
        ratio = math.inf if counts.min() == 0 else float(counts.max() / counts.min())
        if ratio >= worst["ratio"]:
            worst = {
                "ratio": ratio,
                "largest": [class_names[int(counts.argmax())], int(counts.max())],
                "smallest": [class_names[int(counts.argmin())], int(counts.min())],
            }
    return {**worst, "imbalanced": worst["ratio"] > IMBALANCE_RATIO, "threshold": IMBALANCE_RATIO}


def nothing_to_compare(failures: Sequence[Failure]) -> Comparison:
    """The comparison when every job failed: the failures, and a summary that says so."""
    result: Comparison = {"models": [], "failures": [f.as_dict() for f in failures]}
    result["summary"] = nothing_to_compare_sentences(result)
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
        values = [r.test_metric(k) for r in model.runs]
        s = stats.spread(values, settings.confidence)
        if s.ci and METRICS.get(k).percent:  # a rate: with few runs the t-interval can overshoot [0, 1]
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
    decimal of a percentage, `prose.pct`): a strict order between numbers printed equal would claim a
    difference the report does not show. Within a tie, models keep the report's model order.
    """
    tiers: list[list[str]] = []
    shown = None
    for m in sorted(models, key=lambda m: -_mean(m, metric)):
        text = pct(m.summary[metric]["mean"])
        if tiers and text == shown:
            tiers[-1].append(m.label)
        else:
            tiers.append([m.label])
            shown = text
    return tiers


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
