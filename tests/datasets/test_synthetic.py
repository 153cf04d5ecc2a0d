import re

import numpy as np
import pytest

from mer_cli.data import synthetic


def _small(**kw):
    return synthetic.generate(synthetic.Spec(n_actors=10, clips_per_actor_per_class=2, **kw))


def test_same_seed_same_dataset_bit_for_bit():
    a, b = _small(seed=5), _small(seed=5)
    for sa, sb in zip(a.all(), b.all(), strict=True):
        assert sa.clip_ids == sb.clip_ids
        assert all(np.array_equal(x, y) for x, y in zip(sa.mfcc, sb.mfcc, strict=True))
        assert all(np.array_equal(x, y) for x, y in zip(sa.aus, sb.aus, strict=True))
    assert _small(seed=6).train.clip_ids != a.train.clip_ids


def test_looks_like_the_notebooks_features():
    s = _small()
    assert s.class_names == ("neutral", "anger", "happy", "fear", "disgust", "sad")
    for split in s.all():
        for clip_id, m, a, label in zip(split.clip_ids, split.mfcc, split.aus, split.labels, strict=True):
            assert re.fullmatch(r"10\d\d_[A-Z]{3}_(NEU|ANG|HAP|FEA|DIS|SAD)_(LO|MD|HI|XX)", clip_id)
            assert clip_id.split("_")[2] == synthetic.EMOTION_CODES[label]
            assert m.shape[1] == 52 and a.shape[1] == 17
            assert m.dtype == np.float32
            # ~100 audio frames/s and ~30 video frames/s for the same clip
            assert abs(a.shape[0] - m.shape[0] * 0.3) <= 2
            assert (a >= 0).all() and (a <= 5).all()
    lengths = [m.shape[0] for m in s.train.mfcc]
    assert min(lengths) < 200 < max(lengths)  # durations vary


def test_splits_share_no_actor_and_hold_every_class():
    s = _small()
    actors = [{c.split("_")[0] for c in split.clip_ids} for split in s.all()]
    assert not (actors[0] & actors[1] or actors[0] & actors[2] or actors[1] & actors[2])
    for split in s.all():
        assert set(split.labels.tolist()) == set(range(6))


@pytest.mark.slow
def test_default_data_ranks_the_streams_as_designed():
    """Per-clip mean/std + logistic regression: the face tells more than the voice, and the two
    together tell more than either (the property the four models are compared on)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    s = synthetic.generate(synthetic.Spec())

    def feats(split, stream):
        arrays = {"acoustic": split.mfcc, "visual": split.aus}[stream]
        return np.stack([np.concatenate([a.mean(0), a.std(0)]) for a in arrays])

    def accuracy(streams):
        x_train = np.hstack([feats(s.train, m) for m in streams])
        x_test = np.hstack([feats(s.test, m) for m in streams])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        return clf.fit(x_train, s.train.labels).score(x_test, s.test.labels)

    acoustic, visual, both = accuracy(["acoustic"]), accuracy(["visual"]), accuracy(["acoustic", "visual"])
    assert 1 / 6 + 0.1 < acoustic < visual - 0.03
    assert both > visual + 0.05
