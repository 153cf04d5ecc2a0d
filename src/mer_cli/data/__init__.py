"""Datasets: clips of named streams in train/val/test splits, the formats they are read from and
written to, the embedded generator, actor folds and ingestion of raw files."""

from mer_cli.data.dataset import *  # noqa: F403  (transitional: callers move to the format modules)
