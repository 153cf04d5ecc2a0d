"""Plain config values: a nested mapping as flat dotted keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"trainer.loop.max_epochs": 100, ...}`` (flat input stays as is)."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}
