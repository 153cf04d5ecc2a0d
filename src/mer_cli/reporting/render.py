"""The report's files as text: its `Block`s as Markdown and as self-contained HTML (figures
embedded), and the comparison's tables as CSV (comparison.csv, runs.csv, pairwise.csv).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mer_cli.reporting.collect import Run, relative_path
from mer_cli.reporting.document import Block
from mer_cli.reporting.options import TABLE_METRICS, Comparison


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "ul":
            lines += [f"- {i}" for i in b.items] + [""]
        elif b.kind == "table":
            head, *body = b.rows
            lines.append("| " + " | ".join(map(esc, head)) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(map(esc, r)) + " |" for r in body]
            lines.append("")
        elif b.kind == "img":
            lines += [f"![{b.text}]({b.path})", ""]
    return "\n".join(lines)


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}"
    "img{max-width:100%;display:block;margin:1em 0}"
)


def to_html(title: str, blocks: Sequence[Block], root: Path) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for b in blocks:
        if b.kind == "h2":
            out.append(f"<h2>{e(b.text)}</h2>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head, *body = b.rows
            out.append(
                "<table><tr>"
                + "".join(f"<th>{e(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )
        elif b.kind == "img":
            data = base64.b64encode((root / b.path).read_bytes()).decode("ascii")
            out.append(f'<img alt="{e(b.text)}" src="data:image/png;base64,{data}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _csv(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()


def _num(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.6g}"


def models_csv(result: Comparison) -> str:
    """comparison.csv: one row per model, each table metric's mean, std and interval."""
    header = ["model", "modality", "n_runs", "seeds", "folds", "ci_unit"]
    for k in TABLE_METRICS:
        header += [f"test/{k}", f"test/{k}_std", f"test/{k}_ci_low", f"test/{k}_ci_high"]
    rows: list[list[Any]] = [header]
    for m in result["models"]:
        row = [
            m["label"],
            m["modality"],
            m["n_runs"],
            " ".join(map(str, m["seeds"])),
            " ".join(map(str, m["folds"])),
            m["ci_unit"],
        ]
        for k in TABLE_METRICS:
            t = m["test"][k]
            ci = t["ci"] or [None, None]
            row += [_num(t["mean"]), _num(t["std"]), _num(ci[0]), _num(ci[1])]
        rows.append(row)
    return _csv(rows)


def runs_csv(runs: Sequence[Run], labels: dict[Path, str], root: Path) -> str:
    """runs.csv: one row per run, its model and test metrics, its directory relative to ``root``."""
    rows: list[list[Any]] = [
        ["model", "modality", "seed", "fold", *(f"test/{k}" for k in TABLE_METRICS), "path"]
    ]
    for r in runs:
        rows.append(
            [
                labels[r.path],
                r.modality,
                r.seed,
                r.fold,
                *(_num(r.test_metric(k)) for k in TABLE_METRICS),
                relative_path(r.path, root),
            ]
        )
    return _csv(rows)


def pairwise_csv(result: Comparison) -> str:
    """pairwise.csv: one row per pair tested."""
    rows: list[list[Any]] = [
        [
            "a",
            "b",
            "tested_because",
            "named",
            "n_pairs",
            "f1_macro_diff",
            "ci_low",
            "ci_high",
            "p_bootstrap",
            "p_bootstrap_floor",
            "p_holm",
            "p_holm_floor",
            "p_holm_at_floor",
            "significant",
            "mcnemar_runs",
            "mcnemar_b",
            "mcnemar_c",
            "mcnemar_p",
            "mcnemar_significant_runs",
        ]
    ]
    for p in result["pairwise"]:
        tests = p["mcnemar"]  # one per matched run, in the order of mcnemar_runs, ";"-separated
        rows.append(
            [
                p["a"],
                p["b"],
                p["tested_because"],
                p["named"],
                p["n_pairs"],
                _num(p["f1_macro_diff"]),
                _num(p["f1_macro_diff_ci"][0]),
                _num(p["f1_macro_diff_ci"][1]),
                _num(p["p_bootstrap"]),
                _num(p["p_bootstrap_floor"]),
                _num(p["p_holm"]),
                _num(p["p_holm_floor"]),
                p["p_holm_at_floor"],
                p["significant"],
                ";".join(t["run"] for t in tests),
                ";".join(str(t["b"]) for t in tests),
                ";".join(str(t["c"]) for t in tests),
                ";".join(_num(t["p_value"]) for t in tests),
                p["mcnemar_significant_runs"],
            ]
        )
    return _csv(rows)
