#!/usr/bin/env python3
"""The Keras peer of ``mer-bench``: the notebook's BiLSTM classifier in Keras 3 on TensorFlow.

Input: generated clips shaped like the real features (see ``SHAPES``), drawn the way
``mer_cli.bench.make_lengths`` draws them. Output: one JSON line on stdout with the training and
inference speed, so that ``make bench-peer`` can set mer-cli's numbers beside it.

Contract with ``mer-bench --peer-python PY --peer-script benchmarks/peer_keras.py``
(``benchmarks/bench.py``'s ``side_by_side``, checked by ``tests/benchmarks/test_bench.py``):
  - it passes ``--shape --hidden H1,H2 --dense --batch --train-batches --seed``;
  - it reads the last stdout line that starts with ``{`` and uses ``train_samples_per_s``,
    ``infer_samples_per_s``, ``epoch_s_est`` and ``versions``; a non-zero exit is a failure.

TensorFlow is a benchmark-only dependency (``make bench-peer`` installs it into its own venv) and
is imported only once a measurement starts: ``--help`` and the tests run without it.

    ~/.venvs/peer-tf/bin/python benchmarks/peer_keras.py --shape early --hidden 64,32 --dense 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

SHAPES = {"acoustic": (356, 52), "visual": (105, 17), "early": (356, 69)}  # (frames, features)
# the keys mer-bench reads from the JSON line
CONTRACT_KEYS = ("train_samples_per_s", "infer_samples_per_s", "epoch_s_est", "versions")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="peer_keras.py",
        description="Train/infer speed of the notebook's BiLSTM in Keras 3 (TensorFlow) on generated "
        "clips; prints one JSON line (the peer that mer-bench compares mer-cli with).",
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), default="acoustic")
    ap.add_argument("--hidden", default="512,256", help="LSTM units per direction, one per layer")
    ap.add_argument("--dense", type=int, default=512, help="width of the two dense layers")
    ap.add_argument("--dropout", type=float, default=0.8)
    ap.add_argument("--no-mask", action="store_true", help="no Masking layer (padding is read as data)")
    ap.add_argument("--optimizer", choices=("adabelief", "adamw"), default="adabelief")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128, help="clips per step")
    ap.add_argument("--train-batches", type=int, default=3, help="training steps to time")
    ap.add_argument("--warmup", type=int, default=1, help="training steps run before timing (tracing)")
    ap.add_argument("--infer-batches", type=int, default=2, help="predictions to time (0: none)")
    ap.add_argument("--epoch-clips", type=int, default=5000, help="the epoch epoch_s_est is for")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.hidden = [int(h) for h in str(args.hidden).split(",")]
    if not args.hidden or min(args.hidden) < 1:
        ap.error(f"--hidden: positive unit counts separated by commas, got {args.hidden}")
    return args


# ---------------------------------------------------------------------------------------------
# Data and FLOPs (the same definitions as mer_cli.bench, so the two sides compare)


def draw_batch(
    rng: np.random.Generator, batch: int, max_len: int, n_features: int, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames (batch, max_len, n_features) zero after each clip's length, one-hot labels, lengths.

    Lengths are uniform in [40 %, 100 %] of ``max_len``, and 5 % of the clips are cut at
    ``max_len`` (the real data is cut at the 95th percentile of its lengths)."""
    lengths = rng.integers(round(0.4 * max_len), max_len + 1, size=batch)
    lengths = np.where(rng.random(batch) < 0.05, max_len, lengths)
    frames = rng.standard_normal((batch, max_len, n_features), dtype=np.float32)
    frames[np.arange(max_len)[None, :] >= lengths[:, None]] = 0.0  # zero is the mask value
    labels = np.zeros((batch, n_classes), dtype=np.float32)
    labels[np.arange(batch), rng.integers(0, n_classes, size=batch)] = 1.0
    return frames, labels, lengths


def forward_flops(frames: float, n_features: int, hidden: Sequence[int], dense: int, n_classes: int) -> float:
    """Matmul FLOPs of one clip's forward pass over ``frames`` steps: per BiLSTM layer and frame,
    2 directions x 4 gates x (input + hidden) x hidden multiply-adds; then the dense head."""
    total, width = 0.0, n_features
    for units in hidden:
        total += 2 * 2 * 4 * frames * (width + units) * units
        width = 2 * units  # the next layer reads both directions
    return total + 2 * (2 * hidden[-1] * dense + dense * dense + dense * n_classes)


def summarize(
    args: argparse.Namespace,
    train_s: Sequence[float],
    infer_s: Sequence[float],
    mean_len: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The JSON row: speeds from the median batch time, plus the FLOP rates they imply.

    Training FLOPs are taken as 3x the forward pass (forward + the two products of backward)."""
    max_len, n_features = SHAPES[args.shape]
    train_sps = args.batch / statistics.median(train_s)
    padded = 3 * forward_flops(max_len, n_features, args.hidden, args.dense, args.classes)
    useful = 3 * forward_flops(mean_len, n_features, args.hidden, args.dense, args.classes)
    row: dict[str, Any] = {
        "impl": "keras",
        "variant": "nomask" if args.no_mask else "masked",
        "shape": args.shape,
        "T": max_len,
        "D": n_features,
        "hidden": list(args.hidden),
        "dense": args.dense,
        "batch": args.batch,
        "optimizer": args.optimizer,
        "train_batches": len(train_s),
        "train_batch_s": [round(s, 3) for s in train_s],
        "train_samples_per_s": round(train_sps, 2),
        "infer_samples_per_s": round(args.batch / statistics.median(infer_s), 2) if infer_s else None,
        "epoch_s_est": round(args.epoch_clips / train_sps, 1),
        "epoch_clips": args.epoch_clips,
        "train_gflop_per_sample_padded": round(padded / 1e9, 3),
        "train_gflop_per_sample_useful": round(useful / 1e9, 3),
        # the work of a fully padded clip over the time taken: what the peer is credited with
        "achieved_gflops_padded": round(padded * train_sps / 1e9, 1),
        "mean_len_frac": round(mean_len / max_len, 3),
        "seed": args.seed,
    }
    return {**row, **extra}


# ---------------------------------------------------------------------------------------------
# The model (TensorFlow from here on)


def adabelief_class(keras: Any) -> type:
    """AdaBelief for Keras 3 (it ships none): AMSGrad on the belief term and decoupled weight
    decay (the base class's ``weight_decay``). No rectification: it changes the size of a step,
    not the work a step does, which is all this script measures."""
    ops = keras.ops

    class AdaBelief(keras.optimizers.Optimizer):
        def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, **kwargs):
            super().__init__(learning_rate=learning_rate, name="adabelief", **kwargs)
            self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon

        def build(self, variables):
            if self.built:
                return
            super().build(variables)
            # per variable: first moment, belief (the gradient's variance around it), its running max
            self._first = [self.add_variable_from_reference(v, "m") for v in variables]
            self._belief = [self.add_variable_from_reference(v, "belief") for v in variables]
            self._belief_max = [self.add_variable_from_reference(v, "belief_max") for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            dtype = variable.dtype
            grad = ops.cast(gradient, dtype)
            lr = ops.cast(learning_rate, dtype)
            t = ops.cast(self.iterations + 1, dtype)
            i = self._get_variable_index(variable)
            m, belief, belief_max = self._first[i], self._belief[i], self._belief_max[i]
            self.assign(m, self.beta_1 * m + (1.0 - self.beta_1) * grad)
            surprise = ops.square(grad - m)
            self.assign(belief, self.beta_2 * belief + (1.0 - self.beta_2) * surprise + self.epsilon)
            self.assign(belief_max, ops.maximum(belief_max, belief))
            m_hat = m / (1.0 - ops.power(ops.cast(self.beta_1, dtype), t))
            s_hat = belief_max / (1.0 - ops.power(ops.cast(self.beta_2, dtype), t))
            self.assign_sub(variable, lr * m_hat / (ops.sqrt(s_hat) + self.epsilon))

    return AdaBelief


def build_model(args: argparse.Namespace, keras: Any) -> Any:
    """The notebook's stack: Masking(0) -> BiLSTM(h1, sequences) -> Dropout -> ... -> BiLSTM(hN,
    last state) -> Dropout -> Dense -> BatchNorm -> ReLU -> Dropout -> Dense(ReLU) -> Dense(softmax)."""
    layers = keras.layers
    max_len, n_features = SHAPES[args.shape]
    inputs = keras.Input((max_len, n_features))
    x = inputs if args.no_mask else layers.Masking(mask_value=0.0)(inputs)
    for i, units in enumerate(args.hidden):
        last = i == len(args.hidden) - 1
        x = layers.Bidirectional(layers.LSTM(units, return_sequences=not last))(x)
        x = layers.Dropout(args.dropout)(x)
    x = layers.Dense(args.dense)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(args.dropout)(x)
    x = layers.Dense(args.dense, activation="relu")(x)
    outputs = layers.Dense(args.classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    if args.optimizer == "adabelief":
        optimizer = adabelief_class(keras)(learning_rate=1e-3, weight_decay=1e-3)
    else:  # as configs/trainer/optimizer/adamw.yaml
        optimizer = keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=1e-3, amsgrad=True, epsilon=1e-7)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    return model


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then time ``--train-batches`` training steps and ``--infer-batches`` predictions."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    max_len, n_features = SHAPES[args.shape]
    # a few distinct batches, cycled: drawing data is not part of the timing
    pool = [draw_batch(rng, args.batch, max_len, n_features, args.classes) for _ in range(4)]
    model = build_model(args, keras)

    t0 = time.perf_counter()
    for i in range(args.warmup):
        frames, labels, _ = pool[i % len(pool)]
        model.train_on_batch(frames, labels)
    warmup_s = time.perf_counter() - t0

    train_s, loss = [], float("nan")
    for i in range(args.warmup, args.warmup + args.train_batches):
        frames, labels, _ = pool[i % len(pool)]
        t0 = time.perf_counter()
        out = model.train_on_batch(frames, labels)
        train_s.append(time.perf_counter() - t0)
        loss = float(np.ravel(np.asarray(out))[0])

    infer_s = []
    if args.infer_batches:
        model.predict_on_batch(pool[0][0])  # the first call traces the inference graph
        for i in range(args.infer_batches):
            t0 = time.perf_counter()
            model.predict_on_batch(pool[i % len(pool)][0])
            infer_s.append(time.perf_counter() - t0)

    mean_len = float(np.mean([p[2] for p in pool]))
    return summarize(
        args,
        train_s,
        infer_s,
        mean_len,
        {
            "params": int(model.count_params()),
            "warmup_s": round(warmup_s, 2),
            "loss_last": round(loss, 4),
            "xla": bool(getattr(model, "jit_compile", False)),
            "threads": tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count(),
            "versions": {
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "python": platform.python_version(),
            },
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.train_batches < 1:
        print("peer_keras.py: --train-batches must be at least 1", file=sys.stderr)
        return 2
    print(json.dumps(measure(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
