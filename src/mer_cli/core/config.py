"""Plain config values: a config node as a plain dict, a nested mapping as flat dotted keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"trainer.loop.max_epochs": 100, ...}`` (flat input stays as is)."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def plain_dict(cfg: Any) -> dict[str, Any]:
    """A config node (DictConfig or mapping) as a plain, resolved dict with string keys."""
    obj = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    assert isinstance(obj, dict)
    return {str(k): v for k, v in obj.items()}
