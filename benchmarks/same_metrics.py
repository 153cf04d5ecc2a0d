#!/usr/bin/env python3
"""Do two sweeps give the same metrics, run for run? (e.g. sequential vs ``hydra/launcher=joblib``)

Pairs the jobs of two sweep directories by their directory name less the job number
(``3_late_seed0`` -> ``late_seed0``) and compares every validation and test number of their
``metrics.json``. Prints one line per run and exits 1 if any run differs or is missing.

    python benchmarks/same_metrics.py outputs/sweeps/sequential outputs/sweeps/joblib2
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any


def runs(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The sweep's jobs' val and test metrics, by job directory name less the job number."""
    out = {}
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        out[re.sub(r"^\d+_", "", path.parent.name)] = {s: metrics.get(s) for s in ("val", "test")}
    return out


def numbers(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a metrics dict, by its path (``test/per_class/anger/f1``)."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in numbers(value, f"{prefix}{key}/").items()}
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in numbers(value, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): obj}


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest absolute difference between two metrics dicts (inf where their keys differ)."""
    na, nb = numbers(a), numbers(b)
    if na.keys() != nb.keys():
        return math.inf
    diffs = [
        abs(float(na[k]) - float(nb[k])) if isinstance(na[k], (int, float)) else float(na[k] != nb[k])
        for k in na
        if na[k] is not None or nb[k] is not None
    ]
    return max(diffs, default=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_a", type=Path)
    parser.add_argument("sweep_b", type=Path)
    args = parser.parse_args(argv)
    a, b = runs(args.sweep_a), runs(args.sweep_b)
    if not a or not b:
        print(f"no runs (*/metrics.json) in {args.sweep_a if not a else args.sweep_b}")
        return 1
    same = True
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            print(f"{name}: only in {args.sweep_a if name in a else args.sweep_b}")
            same = False
            continue
        identical = a[name] == b[name]
        same &= identical
        verdict = (
            "identical"
            if identical
            else f"DIFFERENT (largest difference {max_difference(a[name], b[name]):.3g})"
        )
        print(f"{name}: {verdict}")
    print(f"{len(a.keys() & b.keys())} runs paired: {'same metrics run for run' if same else 'NOT the same'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
