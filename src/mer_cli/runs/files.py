"""A run directory's files read back as plain data, whoever made them.

A run directory may come from anyone (a model shared online): its config.yaml is read with no
interpolation or resolver evaluated (mer-train writes it resolved, so a ``${...}`` is refused),
its checkpoint.pt with torch's weights-only unpickler, its JSON files as JSON. A file that is not
what mer-train writes is one error line naming it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from mer_cli.core.artifacts import load_checkpoint
from mer_cli.core.errors import MerError, one_line


def _interpolations(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [where] if "${" in value else []
    if isinstance(value, dict):
        return [w for k, v in value.items() for w in _interpolations(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [w for i, v in enumerate(value) for w in _interpolations(v, f"{where}[{i}]")]
    return []


def read_run_config(run_dir: Path) -> tuple[Path, DictConfig]:
    """A run directory (resolved) and its config.yaml (`read_config`); a directory without one is
    one `MerError` line."""
    run_dir = run_dir.expanduser().resolve()
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise MerError(f"{run_dir}: no config.yaml: not a mer-train run directory")
    return run_dir, read_config(config_path)


def read_config(path: Path) -> DictConfig:
    """A run's resolved config.yaml as a config whose values are exactly the file's."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise MerError(f"{path}: not a mer-train config (expected a mapping)")
    found = _interpolations(raw, "")
    if found:
        raise MerError(
            f"{path}: {found[0]} holds an interpolation (${{...}}); a run's config.yaml is written "
            "resolved, so this one did not come from mer-train"
        )
    cfg = OmegaConf.create(raw)
    assert isinstance(cfg, DictConfig)
    return cfg


def read_yaml(path: Path) -> Any:
    """A YAML file as plain data (mappings, lists, scalars), nothing resolved or constructed."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise MerError(f"{path}: unreadable ({one_line(e)})") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of a run (metrics.json, late.json, failed.json, calibration.json)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MerError(f"{path}: unreadable ({e})") from e
    if not isinstance(obj, dict):
        raise MerError(f"{path}: expected a JSON object")
    return obj


def read_checkpoint(path: Path) -> dict[str, Any]:
    """checkpoint.pt's contents: tensors and plain values only (anything else is refused)."""
    try:
        meta = load_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = one_line(e)
        raise MerError(f"{path}: not a mer-cli checkpoint, refused ({first})") from None
    if not isinstance(meta, dict):
        raise MerError(f"{path}: not a mer-cli checkpoint (expected a mapping)")
    return meta
