"""Joint fusion: each stream's pooled vector concatenated, then the shared head."""

from __future__ import annotations

from mer_cli.models.fusion.streams import MultiStreamClassifier


class JointClassifier(MultiStreamClassifier):
    """``modality=joint``: each stream's encoder pooled vector, concatenated, one shared head."""
