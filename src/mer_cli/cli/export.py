"""mer-export: a trained run as one ONNX or TorchScript file (serving.export does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mer_cli.core.console import fail
from mer_cli.core.errors import MerError
from mer_cli.serving import export


def main(argv: list[str] | None = None) -> None:
    """mer-export RUN_DIR [--format onnx|torchscript] [--out FILE]"""

    parser = argparse.ArgumentParser(
        prog="mer-export",
        description="Export a trained run (any modality, late fusion with both members) as one "
        "ONNX or TorchScript file: raw padded frames and lengths per stream in, class "
        "probabilities out, the fitted preprocessing inside; a JSON sidecar beside it.",
    )
    parser.add_argument("run_dir", type=Path, help="a mer-train run directory")
    parser.add_argument("--format", choices=tuple(export.FORMATS), default="onnx")
    parser.add_argument("--out", type=Path, default=None, help="default: model.onnx | model.pt here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out if args.out is not None else Path("model" + export.FORMATS[args.format])
    try:
        sidecar = export.export(args.run_dir, args.format, out)
    except MerError as e:
        fail("mer-export", str(e))
    frames = [i for i in sidecar["inputs"] if i["dtype"] == "float32"]
    shapes = ", ".join(f"{i['name']} ({', '.join(map(str, i['shape']))})" for i in frames)
    print(
        f"wrote {out} ({args.format}) and {export.sidecar_path(out)}: {sidecar['modality']}, inputs {shapes} "
        f"and their _lengths, output {export.OUTPUT} ({len(sidecar['class_names'])} classes); "
        f"max |p_file - p_torch| {sidecar['check']['max_abs_diff']:.1e}"
    )
