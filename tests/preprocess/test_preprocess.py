import numpy as np
import pytest
import torch
from scipy import ndimage

from mer_cli.data.splits import Split
from mer_cli.preprocess import sequences
from mer_cli.preprocess.align import early_fuse, stretch_frames
from mer_cli.runs import trained


def test_target_length_comes_from_train_lengths():
    train = [np.zeros((n, 3)) for n in (10, 20, 30, 40)]
    target = sequences.fit_target_length(train, percentile=95)
    assert target.length == 39  # ceil(38.5)
    assert target.pad_or_truncate(np.ones((500, 3))).shape == (39, 3)


def test_pad_or_truncate_keeps_the_start_and_pads_zeros_at_the_end():
    target = sequences.TargetLength(4)
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_array_equal(target.pad_or_truncate(x), x[:4])
    short = np.ones((2, 2), dtype=np.float32)
    np.testing.assert_array_equal(target.pad_or_truncate(short), [[1, 1], [1, 1], [0, 0], [0, 0]])


def _split(name, mfcc, aus):
    return Split(
        name,
        tuple(f"{name}{i}" for i in range(len(mfcc))),
        tuple(mfcc),
        tuple(aus),
        np.zeros(len(mfcc), dtype=np.int64),
    )


def test_fit_uses_train_only_and_apply_pads_with_true_lengths():
    rng = np.random.default_rng(0)
    train = _split(
        "t",
        [rng.normal(5, 2, (n, 3)).astype(np.float32) for n in (4, 6, 8, 10)],
        [np.ones((2, 1), np.float32)] * 4,
    )
    prep = sequences.fit(list(train.mfcc), percentile=95, normalize=True)
    frames = np.concatenate([m[: prep.target.length] for m in train.mfcc])
    np.testing.assert_allclose(prep.scaler.center, frames.mean(0), rtol=1e-6)
    np.testing.assert_allclose(prep.scaler.scale, frames.std(0), rtol=1e-6)

    # a wild test split changes nothing that was fitted, and is cut to the train length
    test = _split("x", [np.full((50, 3), 1e6, np.float32)], [np.ones((2, 1), np.float32)])
    out = prep.apply(list(test.mfcc))
    assert out.clip(0).shape == (prep.target.length, 3)  # cut to the train length, never padded
    assert out.lengths.tolist() == [prep.target.length]

    short = prep.apply([train.mfcc[0][:2]])
    assert short.lengths.tolist() == [2]
    x = short.pad(torch.tensor([0]), prep.target.length)  # padded when a batch is gathered
    assert x.shape == (1, prep.target.length, 3)
    assert x[0, 2:].abs().sum() == 0  # padding stays exactly zero after normalization
    np.testing.assert_allclose(x[0, :2].numpy(), prep.scaler.transform(train.mfcc[0][:2]), rtol=1e-6)


def test_normalize_false_leaves_features_as_they_are():
    train = _split("t", [np.full((3, 2), 7.0, np.float32)], [np.ones((2, 1), np.float32)])
    prep = sequences.fit(list(train.mfcc), percentile=95, normalize=False)
    assert prep.scaler is None
    assert prep.apply(list(train.mfcc)).clip(0)[0].tolist() == [7.0, 7.0]


def test_stretch_frames_matches_hand_computed_values():
    aus = np.array([[0.0, 10.0], [2.0, 20.0], [4.0, 40.0]], dtype=np.float32)
    # 3 -> 5 frames: output i samples input time i * 2 / 4
    expected = [[0, 10], [1, 15], [2, 20], [3, 30], [4, 40]]
    np.testing.assert_allclose(stretch_frames(aus, 5), expected)


# (16, 80) and (8, 26): sizes where zoom's default mode writes 0 for the last frame
SIZES = [(31, 100), (105, 356), (7, 7), (10, 4), (16, 80), (8, 26)]


@pytest.mark.parametrize(("t_in", "t_out"), SIZES)
def test_stretch_frames_matches_the_notebooks_scipy_zoom_except_its_zeroed_last_frame(t_in, t_out):
    x = np.random.default_rng(t_in).random((t_in, 17)) + 1.0  # no zero anywhere in the input
    ours = stretch_frames(x, t_out)
    notebook = ndimage.zoom(x, (t_out / t_in, 1), order=1)  # the notebook's call, default mode
    assert notebook.shape == ours.shape == (t_out, 17)
    np.testing.assert_allclose(ours[:-1], notebook[:-1], atol=1e-9)
    # the first and last input frames are kept, as the docstring says
    np.testing.assert_allclose(ours[[0, -1]], x[[0, -1]], atol=1e-12)
    # zoom with mode="nearest" agrees everywhere, the last frame included
    np.testing.assert_allclose(ours, ndimage.zoom(x, (t_out / t_in, 1), order=1, mode="nearest"), atol=1e-9)
    if (t_in, t_out) in ((16, 80), (8, 26)):  # the documented difference
        np.testing.assert_array_equal(notebook[-1], 0.0)
    else:
        np.testing.assert_allclose(notebook[-1], x[-1], atol=1e-9)


def test_early_fuse_concatenates_at_the_audio_frame_rate():
    mfcc = np.zeros((9, 4), np.float32)
    aus = np.arange(3, dtype=np.float32)[:, None]
    fused = early_fuse(mfcc, aus)
    assert fused.shape == (9, 5)
    np.testing.assert_allclose(fused[:, 4], np.linspace(0, 2, 9))
    np.testing.assert_array_equal(np.interp(np.linspace(0, 2, 9), [0, 1, 2], aus[:, 0]), fused[:, 4])


def test_early_stream_is_cut_to_the_acoustic_target_length():
    mfcc = [np.ones((n, 2), np.float32) for n in (10, 20, 30, 40)]
    aus = [np.ones((n // 3, 1), np.float32) for n in (10, 20, 30, 40)]
    train = _split("t", mfcc, aus)
    fused = trained.model_inputs(train, "early", ["acoustic", "visual"])
    early = sequences.fit(fused["early"], percentile=95, normalize=False)
    acoustic = sequences.fit(list(train.mfcc), percentile=95, normalize=False)
    assert early.target.length == acoustic.target.length == 39
    ragged = early.apply(fused["early"])
    assert ragged.lengths.tolist() == [10, 20, 30, 39] and ragged.n_features == 3


def test_skip_zero_frames_drops_them_from_the_fit_and_every_split_and_travels_in_the_checkpoint():
    rng = np.random.default_rng(3)
    train = [rng.normal(5.0, 1.0, (n, 2)).astype(np.float32) for n in (6, 8, 10)]
    for clip in train:
        clip[1::2] = 0.0  # every other frame lost: standardizing the zeros would drag the mean to ~2.5
    prep = sequences.fit(train, percentile=100, normalize=True, skip_zero_frames=True)
    kept = np.concatenate([c[0::2] for c in train])
    np.testing.assert_allclose(prep.scaler.center, kept.mean(axis=0), rtol=1e-6)
    assert prep.target.length == 10  # from the clips' own frame counts, as the notebook's cut
    test = [np.array([[0, 0], [1, 2], [0, 0], [3, 4]], dtype=np.float32)]
    out = prep.apply(test)
    assert out.lengths.tolist() == [2]
    np.testing.assert_allclose(out.clip(0), prep.scaler.transform(test[0][[1, 3]]))
    again = sequences.StreamPrep.from_state(prep.state())
    assert again.skip_zero_frames is True and again.apply(test).lengths.tolist() == [2]
    before = {k: v for k, v in prep.state().items() if k != "skip_zero_frames"}  # older checkpoints
    assert sequences.StreamPrep.from_state(before).skip_zero_frames is False
    assert sequences.fit(train, 100, True).apply(test).lengths.tolist() == [4]  # off by default
