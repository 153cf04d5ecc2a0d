"""The modalities: the one list of what ``modality=<name>`` trains, which streams it reads and how
they meet (one stream, frames fused before the encoder, one encoder per stream fused in the
model, or two trained models' probabilities combined).

Adding a modality is one entry here and one ``configs/modality/<name>.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mer_cli.core.registry import Registry

# how a model's input streams are made from the data's (``modality.streams``)
INPUT_KINDS = ("single", "early", "streams", "late")


@dataclass(frozen=True)
class Modality:
    """``inputs``: single (one stream as it is), early (several stretched to the first one's
    frames and joined per frame), streams (several, each at its own frame rate, one encoder
    each), late (the probabilities of one trained model per member stream, combined).
    ``classifier``: the model registry's classifier (None for late fusion). ``options``: the
    ``modality.*`` keys the classifier takes (they change the model, so they are part of its
    identity)."""

    name: str
    inputs: str
    classifier: str | None = None
    options: tuple[str, ...] = ()
    members: tuple[str, ...] = ()  # late fusion: one single-stream model per member


MODALITIES: Registry[Modality] = Registry("modality")
for _m in (
    Modality("acoustic", "single", "single"),
    Modality("visual", "single", "single"),
    Modality("late", "late", members=("acoustic", "visual")),
    Modality("early", "early", "single"),
    Modality("joint", "streams", "joint", ("ogm_alpha", "ogm_noise")),
    Modality("xattn", "streams", "xattn", ("ogm_alpha", "ogm_noise", "attention_heads")),
):
    MODALITIES.add(_m.name, _m)


def get(name: object) -> Modality:
    """The modality ``name``; one error line listing the valid ones otherwise."""
    return MODALITIES.get(name)


def jointly_trained() -> tuple[str, ...]:
    """The modalities whose one model reads several streams (stream contribution is measured)."""
    return tuple(n for n, m in MODALITIES.items() if m.inputs == "streams")
