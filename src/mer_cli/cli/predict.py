"""mer-predict: a trained run's class probabilities for new clips (serving.predict does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mer_cli.core.console import fail
from mer_cli.core.errors import DataError, MerError
from mer_cli.serving import predict

PROG = predict.PROG


def main(argv: list[str] | None = None) -> None:
    """mer-predict RUN_DIR (--audio WAV|DIR --video CSV|DIR | --data FILE) [--out FILE]"""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Predict the emotion of new clips with a trained run (any modality): from one "
        "audio file and one face table or video per clip (features computed with the run's recorded "
        "back-ends and settings) or from a feature file. Writes predictions.csv and prints a short table.",
    )
    parser.add_argument("run_dir", type=Path, help="a mer-train run directory")
    parser.add_argument("--audio", type=Path, help="a .wav file, or a folder of them")
    parser.add_argument("--video", type=Path, help="an OpenFace .csv file, or a folder of them")
    parser.add_argument(
        "--audio-model", type=Path, help="where the run's audio encoder lies here (default: as recorded)"
    )
    parser.add_argument(
        "--video-model", type=Path, help="where the run's vision encoder lies here (default: as recorded)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="a dataset instead: .npz (labels optional), a native directory or the notebook's pickle",
    )
    parser.add_argument(
        "--out", type=Path, help="the .csv to write (default: RUN_DIR/predictions/<time>/predictions.csv)"
    )
    args = parser.parse_args(argv)
    if (args.data is None) == (args.audio is None and args.video is None):
        parser.error("give --audio/--video (raw files) or --data (a feature file), not both")
    try:
        run = predict.load_run(args.run_dir)
        out = (
            args.out.expanduser()
            if args.out is not None
            else predict.default_out(args.run_dir.expanduser().resolve())
        )
        predict.check_out(out, run)
        where = str(args.run_dir)
        clips = (
            predict.read_data(run, args.data)
            if args.data
            else predict.read_files(
                run, args.audio, args.video, where, {"acoustic": args.audio_model, "visual": args.video_model}
            )
        )
        for line in clips.warnings:
            print(f"{PROG}: warning: {line}", file=sys.stderr)
        for line in clips.failed:
            print(f"{PROG}: error: {line}", file=sys.stderr)
        if not clips.clip_ids:
            raise DataError(f"{clips.source}: no clip could be predicted")
        pred = predict.predict(run, clips)
        try:
            predict.write_predictions(out, clips, pred, run.class_names)
        except OSError as e:
            raise MerError(f"{out}: cannot write: {e.strerror or e}") from e
    except MerError as e:
        fail(PROG, str(e))
    print(predict.table(clips, pred, run.class_names))
    failed = f"; {len(clips.failed)} failed (listed on stderr)" if clips.failed else ""
    n = len(pred.clip_ids)
    print(f"wrote {out}: {n} clip{'' if n == 1 else 's'}{failed}")
    sys.exit(1 if clips.failed else 0)
