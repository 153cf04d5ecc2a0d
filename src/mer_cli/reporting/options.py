"""What a comparison report shows, and the options that change it (`Settings`: ``compare`` in the
config, mer-compare's options).

Every other reporting module reads its metrics, figure kinds and reference rates from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from mer_cli.core.errors import MerError
from mer_cli.evaluation.metrics import BARS, METRICS, TABLE
from mer_cli.models import modalities

MODALITY_ORDER = modalities.MODALITIES.names()  # acoustic, visual, late, early, joint, xattn
# test metrics in the tables: the label-based ones also get a bootstrap interval
TABLE_METRICS = TABLE
BAR_METRICS = BARS
METRIC_TITLES = {name: m.title for name, m in METRICS.items()}
# the side-by-side figures (one panel per model): kind -> what they show
GRIDS = {
    "confusion_matrices": "confusion matrix",
    "roc_micro": "ROC (micro-average)",
    "roc_per_class": "ROC per class",
    "pr_per_class": "precision-recall per class",
    "reliability": "reliability diagram",
}
# the test split's largest class over its smallest above this: "imbalanced", and the report's
# table leads with the metrics that weigh every class alike (balanced accuracy, macro F1)
IMBALANCE_RATIO = 1.5
BALANCED_FIRST = ("balanced_accuracy", "f1_macro")
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

# a comparison as `analysis.build` makes it and comparison.json holds it: plain values (models with
# their summaries, rankings, pairwise tests, failures, the summary's sentences)
Comparison: TypeAlias = dict[str, Any]


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
