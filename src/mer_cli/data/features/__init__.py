"""Feature back-ends: how a clip's raw files (a recording, a video, a face toolkit's table)
become per-frame features, one module per back-end, found by name in `catalog` (``mer-ingest
--audio-features NAME``, ``--video-features NAME``).

`base` holds the contract (`Backend`, `Extractor`, `Frames`, the record that a dataset and every
run trained on it keep); `catalog` the two registries; `cache` the per-clip feature cache;
`audio` the one reader of recordings. Import the module that does the job."""
