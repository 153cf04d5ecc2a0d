"""The training options for robustness and class imbalance: ``trainer.modality_dropout``,
``trainer.class_weights`` and ``trainer.sampler``, checked and resolved for the training loop.

Input: the ``trainer`` config node, the modality, and (once the data is loaded) the train labels,
the class names and the model's feature spec. Output: `Options`, what `loop.fit` uses (the
cross-entropy's class weights, the balanced sampler's per-clip draw weights, the stream dropout)
and `Options.record`, the plain values metrics.json's ``run`` holds. Everything is fitted on the
train labels only: validation and test never set a weight.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from mer_cli.core.errors import ConfigError
from mer_cli.models import modalities
from mer_cli.training.stream_dropout import StreamDropout, slots

log = logging.getLogger(__name__)

SAMPLERS = ("shuffle", "balanced")
DEFAULTS: dict[str, Any] = {"modality_dropout": 0.0, "class_weights": None, "sampler": "shuffle"}


def dropout_modalities() -> tuple[str, ...]:
    """The modalities whose one model reads several streams: early (joined per frame), joint and
    xattn (one encoder each). Late fusion's members each read one stream."""
    return tuple(n for n, m in modalities.MODALITIES.items() if m.inputs in ("early", "streams"))


def settings(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """The three keys from the ``trainer`` node (plain values; a missing key: its default)."""
    plain = OmegaConf.to_container(trainer, resolve=True) if OmegaConf.is_config(trainer) else trainer
    assert isinstance(plain, Mapping)
    return {k: plain.get(k, v) for k, v in DEFAULTS.items()}


def check(trainer: Mapping[str, Any], modality: str) -> None:
    """Every form the keys can be checked in before the data is loaded (the number of classes,
    which a weight list must match, is checked by `resolve`); one ConfigError line otherwise."""
    given = settings(trainer)
    check_dropout(given["modality_dropout"], modality)
    if given["sampler"] not in SAMPLERS:
        raise ConfigError(f"trainer.sampler={given['sampler']!r}: valid: {', '.join(SAMPLERS)}")
    weights = given["class_weights"]
    if weights is not None and weights != "balanced":
        _check_weight_list(weights, None)


def check_dropout(p: Any, modality: str) -> None:
    """``trainer.modality_dropout`` is a probability, and only for the multi-stream modalities."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise ConfigError(f"trainer.modality_dropout={p!r}: must be a probability in [0, 1]")
    if p > 0 and modality not in dropout_modalities():
        raise ConfigError(
            f"trainer.modality_dropout={p}: applies to modality={','.join(dropout_modalities())} "
            f"(one model reading several streams; late fusion's members read one each), "
            f"not modality={modality}"
        )


def _check_weight_list(weights: Any, class_names: Sequence[str] | None) -> tuple[float, ...]:
    """A list of positive finite weights, one per class where ``class_names`` is known."""
    shown = f"trainer.class_weights={weights!r}"
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise ConfigError(f"{shown}: valid: null, balanced, or a list of one positive weight per class")
    if not all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights):
        raise ConfigError(f"{shown}: every weight must be a number")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(f"{shown}: every weight must be positive and finite")
    if class_names is not None and len(weights) != len(class_names):
        raise ConfigError(
            f"{shown}: {len(weights)} weights for {len(class_names)} classes "
            f"({', '.join(class_names)}): one weight per class"
        )
    return tuple(float(w) for w in weights)


def balanced_weights(labels: np.ndarray, class_names: Sequence[str]) -> tuple[float, ...]:
    """``n_train / (n_classes * count_c)`` per class c from the train labels (scikit-learn's
    ``compute_class_weight('balanced')``); a class with no training clip is one error line."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    missing = [name for name, c in zip(class_names, counts, strict=True) if c == 0]
    if missing:
        raise ConfigError(
            f"trainer.class_weights=balanced: no training clip of class {', '.join(missing)}: "
            "no weight can balance it (give trainer.class_weights as a list)"
        )
    return tuple(float(w) for w in len(labels) / (len(class_names) * counts))


def resolve_class_weights(
    weights: Any, labels: np.ndarray, class_names: Sequence[str]
) -> tuple[float, ...] | None:
    """``trainer.class_weights`` as one number per class: null -> None (plain cross-entropy),
    balanced -> `balanced_weights` of the train labels, a list -> itself (checked)."""
    if weights is None:
        return None
    if weights == "balanced":
        return balanced_weights(labels, class_names)
    return _check_weight_list(weights, class_names)


def clip_draw_weights(labels: torch.Tensor) -> torch.Tensor:
    """``trainer.sampler=balanced``: each train clip's draw weight, 1 / count(its class), so every
    class present is drawn equally often in expectation."""
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].double()


@dataclass(frozen=True)
class Options:
    """What the training loop does beyond the plain recipe; the defaults are the plain recipe
    (unweighted loss, every clip once per epoch, no stream dropped) and draw no random number."""

    modality_dropout: float = 0.0
    class_weights: tuple[float, ...] | None = None  # per class; None: unweighted cross-entropy
    sampler: str = "shuffle"
    dropout: StreamDropout | None = None  # built when modality_dropout > 0

    def loss(self, device: torch.device) -> nn.Module:
        """The training loss: cross-entropy, weighted per class where class weights are set."""
        if self.class_weights is None:
            return nn.CrossEntropyLoss()
        return nn.CrossEntropyLoss(weight=torch.tensor(self.class_weights, device=device))

    def draw_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The balanced sampler's per-clip draw weights; None: every clip once per epoch."""
        return clip_draw_weights(labels) if self.sampler == "balanced" else None

    def record(self) -> dict[str, Any]:
        """metrics.json's ``run`` entries: the options as resolved (class weights as numbers)."""
        weights = None if self.class_weights is None else list(self.class_weights)
        return {"modality_dropout": self.modality_dropout, "class_weights": weights, "sampler": self.sampler}


def resolve(
    trainer: Mapping[str, Any],
    modality: str,
    labels: np.ndarray,
    class_names: Sequence[str],
    feature_spec: Mapping[str, Any],
) -> Options:
    """The options of a run of ``modality`` on train ``labels``; the dropout knows where each
    stream lies in the model's inputs from ``feature_spec`` (`stream_dropout.slots`)."""
    check(trainer, modality)
    given = settings(trainer)
    if given["class_weights"] is not None and given["sampler"] == "balanced":
        log.warning(
            "trainer.class_weights=%s with trainer.sampler=balanced: class imbalance is corrected "
            "twice (balanced batches, then weighted losses); the small classes now weigh more",
            given["class_weights"],
        )
    p = float(given["modality_dropout"])
    dropout = None
    if p > 0:
        dropout = StreamDropout(p, slots(modalities.get(modality).inputs, feature_spec))
    return Options(
        modality_dropout=p,
        class_weights=resolve_class_weights(given["class_weights"], labels, class_names),
        sampler=str(given["sampler"]),
        dropout=dropout,
    )
