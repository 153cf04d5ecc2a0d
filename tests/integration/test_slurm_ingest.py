"""Sharded mer-ingest as a SLURM array job on a real one-node cluster: one shard killed while it
writes, the array submitted again redoes only that shard, and the merged shards equal a
one-process ingest, file for file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from slurm_cluster import VENV_PYTHON, Cluster, slurm_fixture  # noqa: F401  (the fixture `slurm`)

from conftest import cli_env, make_folder
from mer_cli.data import ingest
from mer_cli.data.features import mfcc, openface

pytestmark = pytest.mark.integration

SHARDS = 3
# each array task ingests its shard; in the first round task 1 is killed (SIGKILL) as soon as it
# has started writing, as a node failure or scancel would
SCRIPT = """#!/bin/bash
set -u
i=$SLURM_ARRAY_TASK_ID
ingest() {{ exec {python} -m mer_cli ingest {parts}/part$i --audio {audio} --video {video} \\
    --no-cache --shard $i/{shards}; }}
if [ "$i" = 1 ] && [ ! -e {parts}/.second-round ]; then
    ( ingest ) &
    pid=$!
    until ls -d {parts}/.part1.tmp-* >/dev/null 2>&1 || ! kill -0 $pid 2>/dev/null; do sleep 0.02; done
    kill -9 $pid
    exit 1
fi
ingest
"""


def submit_array(cluster: Cluster, script: Path, logs: Path) -> None:
    """The array job, until slurmctld lists none of its tasks as pending or running."""
    job = (
        subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--array=0-{SHARDS - 1}",
                f"--partition={cluster.partition}",
                "--cpus-per-task=1",
                "--mem=1G",
                "--time=5",
                f"--output={logs}/%A_%a.out",
                str(script),
            ],
            env=cli_env({"SLURM_CONF": cluster.env["SLURM_CONF"]}),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        .stdout.split(";")[0]
        .strip()
    )

    def over() -> bool:
        return not cluster.command("squeue", "-h", "-r", "-j", job, "-o", "%i", check=False).split()

    cluster.wait_for(over, f"array job {job}", timeout=300, every=0.5)


def files_of(root: Path) -> dict[str, object]:
    """Every file of a native dataset directory: arrays and the index, by relative path."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = np.load(p) if p.suffix == ".npy" else json.loads(p.read_text())
    return out


def test_an_array_job_ingests_shards_redoes_only_a_killed_one_and_merges_to_the_one_process_dataset(
    slurm: Cluster, tmp_path: Path
) -> None:
    audio, video = make_folder(tmp_path / "clips", n_actors=6)
    extractors = {
        "acoustic": mfcc.Extractor(mfcc.Settings()),
        "visual": openface.Extractor(openface.Settings()),
    }
    ingest.write(tmp_path / "whole", audio, video, extractors, ingest.Names(), progress=False)

    parts, logs = tmp_path / "parts", tmp_path / "logs"
    parts.mkdir()
    logs.mkdir()
    script = tmp_path / "ingest.sbatch"
    script.write_text(SCRIPT.format(python=VENV_PYTHON, parts=parts, audio=audio, video=video, shards=SHARDS))
    submit_array(slurm, script, logs)
    assert sorted(p.name for p in parts.iterdir() if not p.name.startswith(".")) == ["part0", "part2"]
    assert list(parts.glob(".part1.tmp-*")), "shard 1 was not killed while writing"
    kept = {i: (parts / f"part{i}" / "shard.json").stat().st_mtime_ns for i in (0, 2)}

    (parts / ".second-round").touch()
    submit_array(slurm, script, logs)
    outputs = {p.name: p.read_text() for p in logs.iterdir()}
    assert sum("already there: kept" in text for text in outputs.values()) == 2, outputs
    assert sum("wrote shard 1/3" in text for text in outputs.values()) == 1, outputs
    assert {i: (parts / f"part{i}" / "shard.json").stat().st_mtime_ns for i in (0, 2)} == kept
    assert not list(parts.glob(".part1.tmp-*"))  # the killed shard's leftover removed

    merged = subprocess.run(
        [str(VENV_PYTHON), "-m", "mer_cli", "ingest", str(tmp_path / "merged"), "--merge"]
        + [str(parts / f"part{i}") for i in range(SHARDS)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert merged.returncode == 0, merged.stderr
    whole, joined = files_of(tmp_path / "whole"), files_of(tmp_path / "merged")
    assert sorted(whole) == sorted(joined)
    for name, value in whole.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, joined[name]) and value.dtype == joined[name].dtype, name  # type: ignore[union-attr]
        else:
            assert value == joined[name], name
