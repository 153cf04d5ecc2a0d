"""Validity masks in preprocessing: compacted clips are the clips without their invalid frames
(lengths from the masks alone, target length and scaler fitted on valid training frames only),
early fusion's interpolation is np.interp's, clips on disk stay on disk."""

from __future__ import annotations

import numpy as np
import pytest

from mer_cli.core.errors import ConfigError
from mer_cli.data.features.openface import fill_failed
from mer_cli.data.splits import Clips
from mer_cli.preprocess import sequences, validity


def ragged(
    rng: np.random.Generator, n: int = 12, garbage: float = 1e6
) -> tuple[Clips, Clips, list[np.ndarray]]:
    """Clips with invalid frames holding ``garbage``, their masks, and each clip's valid frames."""
    clips, masks, kept = [], [], []
    for _ in range(n):
        t = int(rng.integers(2, 15))
        m = rng.random(t) < 0.7
        m[int(rng.integers(t))] = True
        x = rng.standard_normal((t, 4)).astype(np.float32)
        x[~m] = garbage
        clips.append(x)
        masks.append(m)
        kept.append(x[m])
    return Clips.pack(clips), Clips.pack_masks(masks), kept


def test_compacted_clips_are_the_valid_frames_and_their_lengths_come_from_the_masks():
    clips, masks, kept = ragged(np.random.default_rng(0))
    compacted = validity.Compacted(clips, masks)
    np.testing.assert_array_equal(compacted.lengths, [len(k) for k in kept])
    for got, want in zip(compacted, kept, strict=True):
        np.testing.assert_array_equal(got, want)
    some = compacted.take([5, 0, 5])
    np.testing.assert_array_equal(some[2], kept[5])
    np.testing.assert_array_equal(some.lengths, [len(kept[5]), len(kept[0]), len(kept[5])])
    assert compacted.n_features == 4 and compacted.in_memory


def test_fitted_on_compacted_clips_is_fitted_on_the_clips_without_those_frames():
    clips, masks, kept = ragged(np.random.default_rng(1))
    for scaling in ("standard", "robust"):
        honoured = sequences.fit(validity.Compacted(clips, masks), 80, True, scaling)
        deleted = sequences.fit(kept, 80, True, scaling)
        assert honoured.target == deleted.target
        assert honoured.state() == deleted.state()
        # the garbage never reached the statistics
        assert np.abs(np.asarray(honoured.scaler.center)).max() < 10
    prepared = honoured.apply(validity.Compacted(clips, masks))
    reference = deleted.apply(kept)
    np.testing.assert_array_equal(prepared.frames, reference.frames)
    np.testing.assert_array_equal(prepared.offsets, reference.offsets)


@pytest.mark.parametrize("seed", range(5))
def test_invalid_frames_are_interpolated_as_np_interp_does(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((17, 5)).astype(np.float32)
    valid = rng.random(17) < 0.5
    valid[[0, -1]] = seed % 2 == 0, seed % 3 == 0  # invalid at either end in some cases
    valid[int(rng.integers(17))] = True
    got = validity.interpolate_invalid(x, valid)
    want = fill_failed(x.astype(np.float64), valid, "interpolate").astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[valid], x[valid])


def test_filled_clips_keep_their_lengths_and_clips_on_disk_stay_on_disk():
    clips, masks, _ = ragged(np.random.default_rng(2))
    filled = validity.Filled(clips, masks)
    np.testing.assert_array_equal(filled.lengths, clips.lengths)
    assert np.abs(np.concatenate(list(filled))).max() < 10

    class OnDisk(Clips):  # the `in_memory` a native dataset's clips report
        in_memory = False  # type: ignore[assignment]

    on_disk = OnDisk(clips.stores)
    assert isinstance(
        sequences.fit(on_disk, 95, True).apply(validity.Compacted(on_disk, masks)), sequences.Prepared
    )


def test_an_unknown_rule_is_one_line():
    assert validity.check_rule("honour") == "honour"
    with pytest.raises(ConfigError, match=r"^data.frame_validity='keep': valid: honour, ignore$"):
        validity.check_rule("keep")
