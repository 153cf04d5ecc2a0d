"""The comparison in words: the summary's sentences, written from the numbers of `analysis.build`
(plain values, as comparison.json holds them), and the helpers that write a rate, a p-value or a
ranking the same way wherever the report shows one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mer_cli.evaluation import stats
from mer_cli.reporting.options import HUMAN_RATE_OF_MODALITY, HUMAN_RATES, METRIC_TITLES, Comparison

SUMMARY_MODELS = 5  # a ranking in the summary names this many models at most (Ranking: all)


def pct(x: float | None) -> str:
    """A rate as the report shows it, to one decimal of a percentage ("42.1 %"; "n/a" if unknown):
    the precision at which `analysis.ranking_tiers` calls models tied."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f} %"


def _p_is(p: float, floor: float | None = None) -> str:
    """The p-value in a sentence: "p = 0.034", "p < 0.001", or "p ≤ 0.012" at the ``floor``."""
    text = stats.format_p(p, floor)
    return f"p {text}" if text[0] in "<≤" else f"p = {text}"


def order_text(tiers: Sequence[Sequence[str]]) -> str:
    """``[["late", "early"], ["visual"]]`` -> "late = early > visual"."""
    return " > ".join(" = ".join(t) for t in tiers)


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


def unreachable_alpha(result: Comparison) -> str:
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


def against_best_sentences(result: Comparison) -> list[str]:
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
        elif vs_best[0]["p_holm_floor"] >= alpha:  # too few resamples: see unreachable_alpha
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
    unreachable = unreachable_alpha(result).strip()
    return out + ([unreachable] if unreachable else [])


def _f1(models: dict[str, dict[str, Any]], label: str) -> float:
    return float(models[label]["test"]["f1_macro"]["mean"])


def nothing_to_compare_sentences(result: Comparison) -> list[str]:
    """The summary when every job failed."""
    return [f"Every job failed ({len(result['failures'])}): nothing to compare."]


def summary_sentences(result: Comparison) -> list[str]:
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
        ci_txt = f", {conf} % CI {pct(ci[0])} to {pct(ci[1])}" if ci else ""
        return f"{label} ({pct(t['mean'])}{spread}{ci_txt})"

    def describe_tier(tier: Sequence[str]) -> str:
        return " and ".join(map(describe, tier)) + (", tied" if len(tier) > 1 else "")

    ranking = result["ranking"]
    if len(models) == 1:
        out.append(f"One model: {describe(ranking[0][0])}.")
    elif len(ranking) == 1:
        out.append(
            f"By macro F1 the models tie: {order_text(ranking)}, each {pct(_f1(models, ranking[0][0]))}."
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
        f"Chance (always the most frequent class) scores {pct(chance)} accuracy; "
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
        out.append(head + ". ".join(parts) + "." + note + unreachable_alpha(result))
    elif len(models) > 1:
        out.append("No two models were evaluated on the same test clips, so no paired test was run.")

    if result["human_rates"]:
        vs = []
        for label, m in models.items():
            rate = HUMAN_RATE_OF_MODALITY.get(m["modality"])
            if rate:
                vs.append(f"{label} {pct(m['test']['accuracy']['mean'])} vs {rate} {pct(HUMAN_RATES[rate])}")
        out.append("Against human raters of CREMA-D (accuracy): " + "; ".join(vs) + ".")

    if result["failures"]:
        out.append(
            f"{len(result['failures'])} job(s) failed and are left out of the comparison (see Failed jobs)."
        )
    return out
