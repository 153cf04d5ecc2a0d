"""The comparison report's classic baselines, for runs that carry a baselines.json
(`runs.baselines`: ``report.baselines=true``).

Input: the report's runs, its models (`analysis.Model`) and its comparison. Output: `summarize`,
plain values for comparison.json's ``baselines`` (None when no run has a baselines.json): per
baseline (one per dataset and split its runs read, a cross-validation's folds together) what
`analysis.summarize` gives a model, from the baseline's test predictions, so its metrics and
intervals are the models' own, and its paired difference from the best deep model;
`sentences`, the summary's words on them; `add_rows`, their rows of the report's main table;
`blocks`, a section of what each chose on validation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import MerError
from mer_cli.data.folds import CREMA_D_ACTOR_PATTERN, maybe_actor_ids
from mer_cli.evaluation import stats
from mer_cli.reporting.analysis import Model
from mer_cli.reporting.analysis import summarize as summarize_model
from mer_cli.reporting.collect import Run, relative_path
from mer_cli.reporting.document import Block, metric_cell
from mer_cli.reporting.options import METRIC_TITLES, Comparison, Settings
from mer_cli.reporting.prose import pct
from mer_cli.runs import files, outputs

FILE = "baselines.json"
MARK = "baseline: "  # the start of a baseline's label: rows of the main table marked as baselines
MODALITY = "baseline"  # a baseline's "modality" in comparison.json and comparison.csv


def speakers_by_clip(run: Run, clip_ids: Sequence[str]) -> tuple[str, ...] | None:
    """Each of ``clip_ids``' speaker as ``run``'s predictions.csv stores it (the very test clips a
    baseline of the same data scores), or None where it stores none."""
    if run.test.speakers is None:
        return None
    speaker_of = dict(zip(run.test.clip_ids, run.test.speakers, strict=True))
    found = tuple(speaker_of.get(c, "") for c in clip_ids)
    return found if all(found) else None


def read(path: Path) -> dict[str, Any]:
    """A run's baselines.json, checked for what the report reads: one `MerError` line if not."""
    result = files.read_json(path)
    try:
        str(result["key"]), str(result["group"]), list(result["class_names"]), list(result["data"]["streams"])
        for entry in result["baselines"]:
            str(entry["name"]), str(entry["title"]), dict(entry["test"]), dict(entry["chosen"])
            p = entry["test_predictions"]
            if not len(p["clip_ids"]) == len(p["y_true"]) == len(p["y_prob"]):
                raise ValueError("test_predictions of unequal lengths")
    except (KeyError, TypeError, ValueError) as e:
        raise MerError(f"{path}: not a mer-cli baselines file ({type(e).__name__}: {e})") from None
    return result


def baseline_runs(runs: Sequence[Run], settings: Settings) -> dict[tuple[str, str], list[Run]]:
    """Each baseline's runs, keyed by (data group, baseline name): one run per distinct
    baselines.json key (a sweep's jobs on the same data share one), made from its test
    predictions as `collect.load_run` makes a model's."""
    out: dict[tuple[str, str], list[Run]] = {}
    seen: set[str] = set()
    for r in runs:
        path = r.path / FILE
        if not path.is_file():
            continue
        result = read(path)
        if result["key"] in seen:
            continue
        seen.add(result["key"])
        if tuple(result["class_names"]) != r.class_names:
            raise MerError(
                f"{path}: classes {result['class_names']} differ from the run's {list(r.class_names)}"
            )
        pattern = (
            settings.actor_pattern
            or result.get("bootstrap", {}).get("actor_pattern")
            or CREMA_D_ACTOR_PATTERN
        )
        for entry in result["baselines"]:
            p = entry["test_predictions"]
            order = np.argsort(np.array(p["clip_ids"]), kind="stable")
            test = outputs.Predictions(
                "test",
                tuple(p["clip_ids"][i] for i in order),
                np.asarray(p["y_true"], dtype=np.int64)[order],
                np.asarray(p["y_prob"], dtype=np.float64).reshape(len(order), -1)[order],
            )
            actors = speakers_by_clip(r, test.clip_ids) or maybe_actor_ids(test.clip_ids, str(pattern))
            fold = result["data"].get("fold")
            run = Run(
                path=r.path,
                modality=MODALITY,
                seed=None,
                fold=int(fold) if fold is not None else None,
                config={},
                model_choice=None,
                metrics={"run": {"baseline": entry, "data": result["data"]}, "test": entry["test"]},
                class_names=tuple(result["class_names"]),
                test=test,
                groups=np.array(actors) if actors is not None else None,
            )
            out.setdefault((str(result["group"]), str(entry["name"])), []).append(run)
    return out


def _labels(
    keys: Sequence[tuple[str, str]], by_key: dict[tuple[str, str], list[Run]]
) -> dict[tuple[str, str], str]:
    """ "baseline: 1-NN DTW (acoustic+visual)"; where two data groups would share a label (two
    datasets in one comparison), the group's hash after it."""
    plain = {}
    for k in keys:
        info = by_key[k][0].metrics["run"]
        plain[k] = f"{MARK}{info['baseline']['title']} ({'+'.join(info['data']['streams'])})"
    counts: dict[str, int] = {}
    for label in plain.values():
        counts[label] = counts.get(label, 0) + 1
    return {k: label if counts[label] == 1 else f"{label} [{k[0][:8]}]" for k, label in plain.items()}


def summarize(
    runs: Sequence[Run], models: Sequence[Model], result: Comparison, settings: Settings
) -> list[dict[str, Any]] | None:
    """comparison.json's ``baselines``: per baseline its label, runs (folds), and the test
    summary of `analysis.summarize`; ``vs_best``: the paired bootstrap of its macro F1 minus the
    best deep model's (`ranking`'s first) on the test clips they share. None: no baselines.json."""
    by_key = baseline_runs(runs, settings)
    if not by_key:
        return None
    n_classes = len(result["class_names"])
    labels = _labels(list(by_key), by_key)
    best_label = result["ranking"][0][0] if result.get("ranking") else None
    best = next((m for m in models if m.label == best_label), None)
    out = []
    for key, members in by_key.items():
        members.sort(key=lambda r: -1 if r.fold is None else r.fold)
        model = Model(labels[key], MODALITY, members)
        summarize_model(model, n_classes, settings)
        entry = members[0].metrics["run"]["baseline"]
        out.append(
            {
                "label": model.label,
                "modality": MODALITY,
                "baseline": entry["name"],
                "title": entry["title"],
                "streams": members[0].metrics["run"]["data"]["streams"],
                "hard_labels": bool(entry.get("hard_labels", False)),
                "n_runs": len(members),
                "seeds": [],
                "folds": sorted({r.fold for r in members if r.fold is not None}),
                "ci_unit": model.ci_unit,
                "test": model.summary,
                "per_run": [
                    {
                        "path": str(r.path),
                        "fold": r.fold,
                        "chosen": r.metrics["run"]["baseline"]["chosen"],
                        "val_f1_macro": r.metrics["run"]["baseline"].get("val", {}).get("f1_macro"),
                        "test_f1_macro": r.metrics["test"].get("f1_macro"),
                        "seconds": r.metrics["run"]["baseline"].get("seconds"),
                    }
                    for r in members
                ],
                "vs_best": None if best is None else versus(model, best, n_classes, settings),
                "runs": [str(r.path) for r in members],
            }
        )
    return out


def versus(baseline: Model, model: Model, n_classes: int, settings: Settings) -> dict[str, Any] | None:
    """The paired bootstrap of macro F1, baseline minus ``model``, over the model's runs whose
    test clips a baseline run shares (the baseline run repeated against each seed); None when
    they share none."""
    by_clips = {r.test_key: r for r in baseline.runs}
    matched = [(by_clips[r.test_key], r) for r in model.runs if r.test_key in by_clips]
    if not matched:
        return None
    use_groups = all(a.groups is not None and b.groups is not None for a, b in matched)

    def sample(r: Run) -> stats.Sample:
        return stats.Sample(
            r.test.y_true, r.test.y_prob.argmax(axis=1), r.groups if use_groups else None, r.test_key
        )

    pairs = [(sample(a), sample(b)) for a, b in matched]
    boot = stats.paired_bootstrap(
        pairs, n_classes, "f1_macro", settings.bootstrap_samples, settings.confidence, seed=settings.seed
    )
    return {
        "model": model.label,
        "n_pairs": len(pairs),
        "f1_macro_diff": boot.diff,
        "f1_macro_diff_ci": list(boot.ci),
        "p_bootstrap": boot.p_value,
        "p_bootstrap_floor": stats.p_floor(settings.bootstrap_samples),
        "unit": "actors" if use_groups else "clips",
    }


def _f1(entry: dict[str, Any]) -> str:
    """ "93.0 % [90.0, 95.0]": a mean macro F1 with its interval, as the report writes one."""
    t = entry["test"]["f1_macro"]
    ci = t.get("ci")
    return pct(t["mean"]) + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def sentences(result: Comparison) -> list[str]:
    """The summary's sentences on the baselines: which beat every deep model on test macro F1
    (by the mean, to the report's precision), with the best deep model and the paired
    difference; or, when none does, how far the best deep model is ahead of the best baseline."""
    baselines, models = result.get("baselines") or [], result["models"]
    if not baselines or not models:
        return []

    def mean(entry: dict[str, Any]) -> float:
        v = entry["test"]["f1_macro"]["mean"]
        return round(100 * v, 1) if isinstance(v, float) and math.isfinite(v) else -math.inf

    # the best deep model as the ranking names it (the first of its tier): the one `versus` tested
    first = result["ranking"][0][0] if result.get("ranking") else None
    best = next((m for m in models if m["label"] == first), max(models, key=mean))
    conf = round(100 * result["settings"]["confidence"])

    def difference(b: dict[str, Any]) -> str:
        vs = b.get("vs_best")
        if not vs or vs["model"] != best["label"]:
            return ""
        lo, hi = vs["f1_macro_diff_ci"]
        p = stats.format_p(vs["p_bootstrap"], vs["p_bootstrap_floor"])
        return (
            f" (Δ {100 * vs['f1_macro_diff']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}], "
            f"paired bootstrap p {p if p[0] in '<≤' else '= ' + p})"
        )

    winners = [b for b in sorted(baselines, key=mean, reverse=True) if mean(b) > mean(best)]
    against = f"the best of the {len(models)}, {best['label']}" if len(models) > 1 else best["label"]

    def name(b: dict[str, Any]) -> str:
        text = b["label"].removeprefix(MARK)
        return text[:1].upper() + text[1:]

    out = [
        f"{name(b)} beats every deep model on test macro F1: {_f1(b)} against {against}, "
        f"{_f1(best)}{difference(b)}."
        for b in winners
    ]
    if not winners:
        top = max(baselines, key=mean)
        relation = "ties with" if mean(top) == mean(best) else "is ahead of"
        out.append(
            f"The best deep model, {best['label']} ({_f1(best)}), {relation} the best classic baseline, "
            f"{top['label'].removeprefix(MARK)} ({_f1(top)}), on test macro F1{difference(top)}."
        )
    out.append(
        f'Rows marked "{MARK.strip()}" in the table are classic baselines fitted on the same training '
        f"clips, their settings chosen on validation, with the models' {conf} % intervals."
    )
    return out


def add_sentences(summary: list[str], result: Comparison) -> list[str]:
    """The summary with `sentences` before its words on the intervals (at the end without those)."""
    at = next((i for i, s in enumerate(summary) if s.startswith("Confidence intervals")), len(summary))
    return [*summary[:at], *sentences(result), *summary[at:]]


def add_rows(blocks: list[Block], result: Comparison) -> list[Block]:
    """The baselines as rows of the main table (the first table after "Test metrics per
    model"), cells matched to its header: a column that is no metric (a model's setting) is
    left empty for them."""
    baselines = result.get("baselines") or []
    heading = next(
        (i for i, b in enumerate(blocks) if b.kind == "h2" and b.text == "Test metrics per model"), None
    )
    if not baselines or heading is None:
        return blocks
    at = next((i for i in range(heading, len(blocks)) if blocks[i].kind == "table"), None)
    if at is None:
        return blocks
    header, *rows = blocks[at].rows
    metric_of = {title: name for name, title in METRIC_TITLES.items()}

    def cell(b: dict[str, Any], column: int, title: str) -> str:
        if column == 0:
            return b["label"]
        if title == "runs":
            return str(b["n_runs"])
        name = metric_of.get(title)
        return metric_cell(b["test"][name], name) if name is not None and name in b["test"] else ""

    extra = tuple(tuple(cell(b, i, t) for i, t in enumerate(header)) for b in baselines)
    table = Block("table", rows=(header, *rows, *extra))
    return [*blocks[:at], table, *blocks[at + 1 :]]


def blocks(result: Comparison, root: Path) -> list[Block]:
    """The section on the baselines: what they are, and what each chose on validation, its
    validation macro F1 and its time (empty without baselines)."""
    baselines = result.get("baselines") or []
    if not baselines:
        return []
    text = (
        "Classic baselines computed on each run's own splits (report.baselines=true; baselines.json): "
        "per clip, the mean, standard deviation, minimum, maximum and least-squares slope of every "
        "feature of the streams the models read, standardised on the training clips, into logistic "
        "regression or an RBF SVM (softmax of its decision values), C chosen on validation macro F1; "
        "and 1-nearest-neighbour DTW on each clip z-normalised per feature (training clips the "
        "references; the streams' distances summed, each over its median between training clips; "
        "the Sakoe-Chiba window chosen on validation macro F1). The test split chose nothing. "
        "1-NN predicts one label, so its ROC-AUC, loss and ECE are those of hard labels."
    )
    header = (
        "baseline",
        "fold",
        "chosen on val",
        "val macro F1",
        "test macro F1",
        "seconds",
        "run directory",
    )
    rows = [
        (
            b["label"].removeprefix(MARK),
            "" if r["fold"] is None else str(r["fold"]),
            ", ".join(f"{k}={float(v):g}" for k, v in r["chosen"].items()),
            pct(r["val_f1_macro"]),
            pct(r["test_f1_macro"]),
            "" if r["seconds"] is None else f"{float(r['seconds']):.1f}",
            relative_path(Path(r["path"]), root),
        )
        for b in baselines
        for r in b["per_run"]
    ]
    return [Block("h2", "Classic baselines"), Block("p", text), Block("table", rows=(header, *rows))]


def insert(document_blocks: list[Block], section: list[Block]) -> list[Block]:
    """``section`` placed before the report's "Runs" heading (at the end if it has none)."""
    at = next(
        (i for i, b in enumerate(document_blocks) if b.kind == "h2" and b.text == "Runs"),
        len(document_blocks),
    )
    return [*document_blocks[:at], *section, *document_blocks[at:]]
