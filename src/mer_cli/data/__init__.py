"""Datasets: clips of named streams in train/val/test splits (`splits`), the formats they are
read from and written to (`formats`: `notebook_pickle`, `npz`, `native`, each checked by
`checks`), the embedded generator (`synthetic`), actor folds, the feature spec and ingestion of
raw files. Import the module that does the job (``from mer_cli.data.splits import Splits``)."""
