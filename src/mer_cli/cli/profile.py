"""mer-profile: the training split's data profile and the preprocessing it implies, without training.

Input: a dataset path in any format mer-cli reads (`data.formats` says which), or none (the
config's data, the embedded one by default), and mer-train's ``key=value`` overrides (modality,
data.split_file, preprocess.*, ...). Output: the profile's text (or profile.json's content with
``--json``) on stdout, its warnings on stderr; exit 0. The data is loaded and split as mer-train
loads it (`runs.execute.profile_only`), composed from the same config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import open_dict

from mer_cli.cli.commands import config_dir
from mer_cli.core.console import fail
from mer_cli.core.errors import ConfigError, MerError
from mer_cli.data import formats
from mer_cli.preprocess import profile
from mer_cli.runs import execute

PROG = "mer-profile"


def main(argv: list[str] | None = None) -> None:
    """mer-profile [DATA] [KEY=VALUE ...] [--json]"""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Profile a dataset's training split as mer-train would fit on it: per stream the "
        "spread of each feature's scale and offset across clips, heavy tails, constant features, the "
        "frames the length cut loses, frame rates, class balance per split; and the scaling and target "
        "length that follow (preprocess.scaling=auto, data.max_frames). Nothing is trained or written.",
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="DATA | KEY=VALUE",
        help="a dataset (a notebook pickle, an .npz or a native directory; default: the config's data, "
        "the embedded one) and mer-train overrides such as modality=joint or data.split_file=FILE",
    )
    parser.add_argument("--json", action="store_true", help="print profile.json's content instead")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    overrides = [a for a in args.args if "=" in a and not Path(a).expanduser().exists()]
    paths = [a for a in args.args if a not in overrides]
    if len(paths) > 1:
        parser.error(f"one dataset at a time, not {' and '.join(paths)}")
    try:
        data = [f"data={formats.recognise(Path(paths[0])).name}"] if paths else []
        try:
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
                cfg = compose(config_name="train", overrides=data + overrides)
        except HydraException as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        if paths:  # set here, not as an override: any path, whatever characters it holds
            with open_dict(cfg):
                cfg.data.path = str(Path(paths[0]).expanduser())
        described = execute.profile_only(cfg)
    except MerError as e:
        fail(PROG, str(e))
    if args.json:
        print(json.dumps(profile.as_dict(described), indent=2))
    else:
        print(profile.summary(described))
    for line in profile.warnings(described):
        print(f"{PROG}: warning: {line}", file=sys.stderr)
