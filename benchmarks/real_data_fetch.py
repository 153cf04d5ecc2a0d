"""Real public time-series sets as mer-cli native datasets, for `make bench-real`.

    python benchmarks/real_data_fetch.py                    # every set, into the cache (below)
    python benchmarks/real_data_fetch.py --cache DIR --sets BasicMotions

Input: the UEA/UCR time-series classification archive's ``.ts`` files that the `sktime` wheel
ships as package data (fetched with ``pip download sktime==<pinned> --no-deps`` into
``CACHE/wheels``; the wheel is opened as a zip, never installed or imported). Output: one native
dataset directory per set, ``CACHE/<set>/`` (mer_cli.data.native's format: streams ``acoustic``
and ``visual``, train/val/test, a per-stream record of what each stream is and its frame rate in
``dataset.json``'s ``ingest_settings``). CACHE defaults to ``$XDG_CACHE_HOME/mer-cli/real-data``
(else ``~/.cache/mer-cli/real-data``): nothing here is ever written into the repository.

Idempotent (a set whose directory exists is left alone) and atomic (written into a hidden sibling
and renamed, by DatasetWriter). A package that cannot be fetched is one error line, exit 2.

Splits: the archive's official test split is the test split; validation is drawn from the
official train split, stratified by class, with a fixed seed (``--val-fraction``, ``--seed``).

The sets, their sources and licences (none of them made by this project):

- BasicMotions (motion: smartwatch sensors). UEA multivariate archive (Bagnall et al., "The UEA
  multivariate time series classification archive, 2018", arXiv:1811.00075). Four students each
  recorded four activities (standing, walking, running, badminton) five times with a smart watch:
  a 3-D accelerometer and a 3-D gyroscope sampled at 10 Hz for 10 s. 40 train / 40 test clips.
  acoustic slot: the accelerometer (dimensions 1-3); visual slot: the gyroscope (dimensions 4-6;
  the archive lists accelerometer first). Speaker: the archive does not say which student
  recorded which clip, so no speaker is stored and mer-train's speaker check cannot run (logged,
  ``run.speakers.checked: false``).
- JapaneseVowels (speech). UCI Machine Learning Repository (CC BY 4.0), via the UEA archive:
  M. Kudo, J. Toyama, M. Shimbo, "Multidimensional curve classification using passing-through
  regions", Pattern Recognition Letters 20(11-13), 1999. Nine male speakers say /ae/; 12 LPC
  cepstrum coefficients per frame (10 kHz audio, 25.6 ms frames every 6.4 ms: 156.25 frames/s),
  7-29 frames per clip. The class IS the speaker (speaker identification), so every speaker is
  in every split by construction: the speakers are stored and the benchmark runs this set with
  ``data.allow_speaker_overlap=true`` (the report marks it a speaker-dependent split, as it is).
  One natural channel group, viewed as two streams by quefrency: acoustic slot = coefficients
  1-6 (low quefrency: the smooth spectral envelope, formant structure), visual slot =
  coefficients 7-12 (high quefrency: finer spectral detail), both at the same frame rate.
  270 train / 370 test clips.
- PLAID (electrical appliances: a current sensor). Gao et al., "PLAID: a public dataset of
  high-resolution electrical appliance measurements for load identification research", BuildSys
  2014 (PLAID1; github.com/jingkungao/PLAID), edited for the UCR archive by Schäfer and Leser
  (WEASEL, CIKM 2017); UCR archive 2018 (Dau et al., arXiv:1810.07758). 11 appliance types
  from 56 households; current recorded at 30 kHz, but the archive's version is resampled and its
  rate is not stated, so no rate in Hz is recorded: clips are 100-1344 samples, and their
  amplitude differs by orders of magnitude between appliances (a fridge's current next to a
  heater's). One channel, viewed as two streams at two rates: acoustic slot = the current
  samples as they are (1 feature per frame); visual slot = the envelope, RMS and peak |current|
  over non-overlapping windows of 10 samples (2 features, a tenth of the rate). 537 train / 537
  test clips. Speaker: the household would be the natural group, but the archive's files do not
  carry it: none is stored (check not run).

The archive's data are provided for research with the request to cite the archive and the
original authors (above); the sktime package that carries them is BSD-3-Clause.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mer_cli.data.native import DatasetWriter

PACKAGE = "sktime==1.2.0"  # the wheel whose package data holds the .ts files (BSD-3-Clause)
DATA_IN_WHEEL = "sktime/datasets/data"
ENVELOPE_WINDOW = 10  # PLAID: samples per envelope frame (the visual slot's rate: 1/10 of the current's)
FETCHED = "fetched.json"  # per set, what it was converted from (package, files, seed, val fraction)


class FetchError(Exception):
    """A package that cannot be fetched or a file that cannot be read: one line."""


@dataclass(frozen=True)
class Series:
    """One .ts file: clips of (frames, dimensions) float32, their labels and the declared labels."""

    clips: list[np.ndarray]
    labels: list[str]
    class_labels: list[str]
    header: dict[str, str]


def _value(text: str) -> float:
    return math.nan if text.strip() == "?" else float(text)


def parse_ts(text: str, where: str) -> Series:
    """The clips of a ``.ts`` file (the sktime/UEA text format: ``#`` comments, ``@key value``
    header lines, then after ``@data`` one clip per line, dimensions separated by ``:``, values
    by ``,``, the class label last; ``?`` is a missing value, read as NaN)."""
    header: dict[str, str] = {}
    clips: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise FetchError(f"{where}:{n}: expected a @header line before @data")
            key, _, value = line[1:].partition(" ")
            if key.lower() == "data":
                in_data = True
            else:
                header[key.lower()] = value.strip()
            continue
        if header.get("timestamps", "false").lower() == "true":
            raise FetchError(f"{where}: @timeStamps true is not supported")
        *dims, label = line.split(":")
        if not dims:
            raise FetchError(f"{where}:{n}: a clip without values")
        try:
            rows = [np.array([_value(v) for v in d.split(",")], dtype=np.float64) for d in dims]
        except ValueError as e:
            raise FetchError(f"{where}:{n}: not a number ({e})") from None
        if len({len(r) for r in rows}) != 1:
            raise FetchError(f"{where}:{n}: its dimensions have different lengths")
        clips.append(np.stack(rows, axis=1).astype(np.float32))  # (frames, dimensions)
        labels.append(label.strip())
    if not in_data:
        raise FetchError(f"{where}: no @data line")
    declared = header.get("classlabel", "").split()
    class_labels = declared[1:] if declared[:1] == ["true"] else sorted(set(labels))
    unknown = sorted(set(labels) - set(class_labels))
    if unknown:
        raise FetchError(f"{where}: labels {unknown} are not in @classLabel")
    want = header.get("dimensions")
    if want is not None and any(c.shape[1] != int(want) for c in clips):
        raise FetchError(f"{where}: a clip without @dimensions {want} dimensions")
    return Series(clips, labels, class_labels, header)


# a set's channels -> the two streams (acoustic slot, visual slot) of one clip
StreamView = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def split_channels(first: int) -> StreamView:
    """Dimensions [0, first) to the acoustic slot, the rest to the visual slot."""
    return lambda x: (x[:, :first], x[:, first:])


def current_and_envelope(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, 1) current -> itself and its envelope: per window of ENVELOPE_WINDOW samples (the last
    window shorter), RMS and peak |current|, (ceil(T / window), 2)."""
    i = x[:, 0].astype(np.float64)
    starts = np.arange(0, len(i), ENVELOPE_WINDOW)
    counts = np.diff(np.append(starts, len(i)))
    rms = np.sqrt(np.add.reduceat(i * i, starts) / counts)
    peak = np.maximum.reduceat(np.abs(i), starts)
    return x, np.stack([rms, peak], axis=1).astype(np.float32)


@dataclass(frozen=True)
class RealSet:
    name: str
    domain: str
    view: StreamView
    streams: dict[str, dict[str, object]]  # per stream, the record kept in ingest_settings
    class_names: Sequence[str] | None = None  # None: the archive's labels
    speaker_is_label: bool = False  # store each clip's class as its speaker (speaker identification)


_CEPSTRA = [f"lpc_cepstrum_{k}" for k in range(1, 13)]
SETS: dict[str, RealSet] = {
    s.name: s
    for s in (
        RealSet(
            "BasicMotions",
            "motion (smartwatch accelerometer + gyroscope)",
            split_channels(3),
            {
                "acoustic": {"what": "accelerometer", "feature_names": ["acc_x", "acc_y", "acc_z"]},
                "visual": {"what": "gyroscope", "feature_names": ["gyro_x", "gyro_y", "gyro_z"]},
            },
        ),
        RealSet(
            "JapaneseVowels",
            "speech (speaker identification, LPC cepstra)",
            split_channels(6),
            {
                "acoustic": {"what": "LPC cepstrum 1-6 (low quefrency)", "feature_names": _CEPSTRA[:6]},
                "visual": {"what": "LPC cepstrum 7-12 (high quefrency)", "feature_names": _CEPSTRA[6:]},
            },
            class_names=[f"speaker{k}" for k in range(1, 10)],
            speaker_is_label=True,
        ),
        RealSet(
            "PLAID",
            "electrical appliances (current sensor)",
            current_and_envelope,
            {
                "acoustic": {"what": "current samples", "feature_names": ["current"], "frames_per_sample": 1},
                "visual": {
                    "what": f"current envelope over {ENVELOPE_WINDOW}-sample windows",
                    "feature_names": ["rms", "peak_abs"],
                    "frames_per_sample": 1 / ENVELOPE_WINDOW,
                },
            },
            class_names=[
                "air_conditioner",
                "compact_fluorescent_lamp",
                "fan",
                "fridge",
                "hairdryer",
                "heater",
                "incandescent_bulb",
                "laptop",
                "microwave",
                "vacuum",
                "washing_machine",
            ],
        ),
    )
}
FRAME_RATES_HZ = {"BasicMotions": 10.0, "JapaneseVowels": 10_000 / 64, "PLAID": None}


def stratified_val(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Indices of the clips drawn for validation: per class round(fraction * n), at least one
    where a class has two or more clips (so each keeps a training clip), seeded."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    picked = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = min(max(1, round(fraction * len(members))), len(members) - 1)
        picked.extend(rng.permutation(members)[:k].tolist())
    return np.array(sorted(picked), dtype=np.int64)


def without_repeats_of(train: Series, test: Series) -> Series:
    """``train`` less the clips whose frames are exactly a test clip's: the archive's PLAID split
    repeats 4 of them, which would be test clips seen in training (the official test split is
    kept whole)."""
    seen = {(c.shape, c.tobytes()) for c in test.clips}
    keep = [i for i, c in enumerate(train.clips) if (c.shape, c.tobytes()) not in seen]
    if len(keep) < len(train.clips):
        print(f"{len(train.clips) - len(keep)} train clip(s) repeat a test clip: left out of train/val")
    return replace(train, clips=[train.clips[i] for i in keep], labels=[train.labels[i] for i in keep])


def convert(spec: RealSet, train: Series, test: Series, out: Path, val_fraction: float, seed: int) -> None:
    """Write ``train`` (less a stratified validation draw) and ``test`` as the native dataset ``out``."""
    if train.class_labels != test.class_labels:
        raise FetchError(f"{spec.name}: train and test declare different classes")
    index = {label: i for i, label in enumerate(train.class_labels)}
    names = list(spec.class_names or train.class_labels)
    if len(names) != len(index):
        raise FetchError(f"{spec.name}: {len(index)} classes in the files, {len(names)} names")
    train = without_repeats_of(train, test)
    y_train = [index[label] for label in train.labels]
    val = set(stratified_val(y_train, val_fraction, seed).tolist())
    rate = FRAME_RATES_HZ.get(spec.name)
    settings = {
        s: {**rec, "frame_rate_hz": rate, "source": f"UEA/UCR archive {spec.name} via {PACKAGE}"}
        for s, rec in spec.streams.items()
    }
    writer = DatasetWriter(out, names, settings)
    try:
        for part, series in (("train", train), ("test", test)):
            for i, (x, label) in enumerate(zip(series.clips, series.labels, strict=True)):
                split = "val" if part == "train" and i in val else part
                acoustic, visual = spec.view(x)
                speaker = names[index[label]] if spec.speaker_is_label else None
                # ids never begin with 4 digits: CREMA-D's default speaker pattern finds no speaker in them
                clip_id = f"{spec.name}_{part}{i:04d}"
                writer.add(split, clip_id, acoustic, visual, index[label], speaker)
    except BaseException:
        writer.abort()
        raise
    writer.finish()


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mer-cli" / "real-data"


def fetch_wheel(cache: Path) -> Path:
    """The pinned wheel in ``cache/wheels`` (downloaded there once with pip, never installed)."""
    folder = cache / "wheels"
    name = PACKAGE.split("==")[0]
    found = sorted(folder.glob(f"{name}-{PACKAGE.split('==')[1]}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary",
        ":all:",
        "-d",
        str(folder),
        PACKAGE,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(f"{name}-{PACKAGE.split('==')[1]}-*.whl"))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise FetchError(f"cannot fetch {PACKAGE} from the package index (pip download: {last})")
    return found[0]


def read_from_wheel(wheel: Path, set_name: str) -> tuple[Series, Series]:
    try:
        with zipfile.ZipFile(wheel) as z:
            parts = []
            for part in ("TRAIN", "TEST"):
                member = f"{DATA_IN_WHEEL}/{set_name}/{set_name}_{part}.ts"
                text = io.TextIOWrapper(z.open(member), encoding="utf-8-sig").read()
                parts.append(parse_ts(text, f"{wheel.name}:{member}"))
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"{wheel}: cannot read {set_name}'s .ts files ({e})") from None
    return parts[0], parts[1]


def fetch(cache: Path, names: Sequence[str], val_fraction: float, seed: int) -> dict[str, Path]:
    """Each named set's native directory under ``cache`` (converted once)."""
    out = {}
    wheel: Path | None = None
    for name in names:
        target = cache / name
        if (target / "dataset.json").is_file():
            had = json.loads((target / FETCHED).read_text()) if (target / FETCHED).is_file() else {}
            if (had.get("package"), had.get("val_fraction"), had.get("seed")) != (
                PACKAGE,
                val_fraction,
                seed,
            ):
                raise FetchError(
                    f"{target}: converted with other settings ({had}); remove it to convert again"
                )
        else:
            wheel = wheel or fetch_wheel(cache)
            train, test = read_from_wheel(wheel, name)
            convert(SETS[name], train, test, target, val_fraction, seed)
            record = {
                "package": PACKAGE,
                "wheel": wheel.name,
                "files": f"{DATA_IN_WHEEL}/{name}/",
                "val_fraction": val_fraction,
                "seed": seed,
                "domain": SETS[name].domain,
            }
            (target / FETCHED).write_text(json.dumps(record, indent=1) + "\n")
            print(f"{name}: written to {target}")
        out[name] = target
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=default_cache(), help="folder of the converted sets")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--val-fraction", type=float, default=0.2, help="of the official train split, per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation draw")
    args = p.parse_args(argv)
    try:
        fetch(args.cache, args.sets, args.val_fraction, args.seed)
    except FetchError as e:
        print(f"real_data_fetch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
