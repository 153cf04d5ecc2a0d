"""mer-export: a trained run as one ONNX or TorchScript file that returns class probabilities.

Input: a run directory (its checkpoint.pt; late fusion: late.json and its two member runs).
Output: the model file and a JSON sidecar beside it (``model.onnx`` -> ``model.onnx.json``).
The file takes, per input stream, raw frames ``<stream>`` (batch, time, features) float32 as
the training data held them, padded with anything after each clip's length, and
``<stream>_lengths`` (batch,) int64; batch and time are dynamic. It returns ``probabilities``
(batch, classes) float32. The fitted preprocessing is inside the graph and exact: each clip cut
to the stream's target length (its start kept) and standardized in float64, as
`sequences.StreamPrep.apply` does, then zeroed past its length. Early fusion takes the acoustic
and visual streams and stretches the action units inside the graph (`align.early_fuse`); late
fusion holds both members and the combiner of late.json. The sidecar repeats every number as
plain values (target lengths, means, stds, the combiner's weights or coefficients), with the
class names, the inputs' names and shapes, the feature counts per stream and the checkpoint's
``feature_spec`` where it has one.

A run that honours a stream's validity masks (``data.frame_validity=honour`` on data that stores
them) takes no mask input: the caller applies the mask before the graph, as mer-predict does, and
the sidecar's ``frame_validity`` says how (each clip's invalid frames left out, the valid ones
shifted together and its length reduced; early fusion: interpolated from the valid neighbours).

    mer-export outputs/early/2026-11-25_10-00-00 --format onnx --out model.onnx
    mer-export outputs/late/2026-11-25_10-00-00 --format torchscript --out model.pt
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from mer_cli.core.artifacts import atomic_open, write_json
from mer_cli.core.errors import MerError
from mer_cli.data.load import load_data
from mer_cli.models import modalities
from mer_cli.models.fusion import late as late_fusion
from mer_cli.models.layers import MaskedBiRNN
from mer_cli.preprocess import sequences
from mer_cli.preprocess.graph import EarlyFuse, StreamPreprocess
from mer_cli.runs import files, trained

log = logging.getLogger(__name__)


FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


SIDECAR_FORMAT = 1


OPSET = 17  # onnxruntime >= 1.14 runs it; the highest the legacy exporter's LSTM mapping is tested at


OUTPUT = "probabilities"


PARITY_TOLERANCE = 1e-5  # max |p_file - p_torch| an export must meet on its check batch (fp32)


EXTRA_HINT = "pip install 'mer-cli[export]'"


class RunGraph(nn.Module):
    """One trained run (every modality but late): raw streams in, class probabilities out.

    ``forward(x_1, lengths_1, x_2, lengths_2, ...)`` in the order of ``inputs`` (the run's
    ``streams``)."""

    def __init__(
        self,
        model: nn.Module,
        preps: dict[str, sequences.StreamPrep],
        modality: str,
        streams: list[str],
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.inputs = list(streams)
        self.early = EarlyFuse() if modalities.get(modality).inputs == "early" else None
        self.preps = nn.ModuleDict({name: StreamPreprocess(p) for name, p in preps.items()})
        self.model = model
        self.temperature = temperature  # eval.calibration=temperature: fitted on validation

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        pairs = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(len(self.inputs))]
        if self.early is not None:
            streams = {"early": self.early(*pairs[0], *pairs[1])}
        else:
            streams = dict(zip(self.inputs, pairs, strict=True))
        model_inputs = {name: prep(*streams[name]) for name, prep in self.preps.items()}
        return torch.softmax(self.model(model_inputs).float() / self.temperature, dim=1)


class LateGraph(nn.Module):
    """Late fusion: each member's `RunGraph` on its own stream, combined as late.json says
    (`late_fusion.LateFusion`): a weighted average in float32, or the stacker's logistic regression in
    float64, a class validation lacked getting 0."""

    coef: torch.Tensor  # float64 buffers of the stacker, when there is one
    intercept: torch.Tensor
    placement: torch.Tensor

    def __init__(
        self, members: dict[str, RunGraph], combined: late_fusion.LateFusion, n_classes: int
    ) -> None:
        super().__init__()
        self.member_names = list(combined.members)
        self.members = nn.ModuleDict({m: members[m] for m in self.member_names})
        self.inputs = [s for m in self.member_names for s in members[m].inputs]
        self.weights = list(combined.weights) if combined.weights is not None else None
        self.temperature = combined.temperature  # the fused model's (eval.calibration=temperature)
        self.stacker_inputs: list[str] = []
        if combined.stacker is not None:
            s = combined.stacker
            self.stacker_inputs = list(s.inputs)
            placement = np.zeros((len(s.classes), n_classes))
            placement[np.arange(len(s.classes)), list(s.classes)] = 1.0
            self.register_buffer("coef", torch.from_numpy(np.asarray(s.coef, dtype=np.float64)))
            self.register_buffer("intercept", torch.from_numpy(np.asarray(s.intercept, dtype=np.float64)))
            self.register_buffer("placement", torch.from_numpy(placement))  # fitted classes -> all

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self._combined(*tensors)
        if self.temperature == 1.0:
            return out
        # as calibration.rescale: softmax(log p / T), the model's own softmax at temperature T
        return torch.softmax(torch.log(out.clamp_min(1e-30)) / self.temperature, dim=1)

    def _combined(self, *tensors: torch.Tensor) -> torch.Tensor:
        probs, i = {}, 0
        for m in self.member_names:
            n = 2 * len(cast(RunGraph, self.members[m]).inputs)
            probs[m] = self.members[m](*tensors[i : i + n])
            i += n
        if self.weights is not None:
            out = self.weights[0] * probs[self.member_names[0]]
            for w, m in zip(self.weights[1:], self.member_names[1:], strict=True):
                out = out + w * probs[m]
            return out
        x = torch.cat([probs[m] for m in self.stacker_inputs], dim=1).double()
        logits = x @ self.coef.T + self.intercept
        return (torch.softmax(logits, dim=1) @ self.placement).float()


def exact_masking_everywhere(model: nn.Module) -> None:
    """Recurrent layers trained with ``masking=packed`` run the ``reverse`` path instead: the same
    weights and outputs (tests/models/test_models.py), but no ``pack_padded_sequence``, whose lengths a
    tracer would freeze into the file as constants."""
    for m in model.modules():
        if isinstance(m, MaskedBiRNN):
            m.impl = "reverse"


def run_graph(run_dir: Path) -> tuple[RunGraph, dict[str, Any], dict[str, int]]:
    """The graph of one trained run, its checkpoint meta and its inputs' feature counts."""
    model, preps, meta = trained.load_trained(run_dir)
    model.eval()
    exact_masking_everywhere(model)
    streams = list(meta["streams"])
    graph = RunGraph(model, preps, meta["modality"], streams, float(meta.get("temperature", 1.0))).eval()
    return graph, meta, input_features(run_dir, meta)


def input_features(run_dir: Path, meta: dict[str, Any]) -> dict[str, int]:
    """Features per frame of each raw input stream. Early fusion's split between its streams comes
    from the checkpoint's feature spec; a checkpoint from before specs has the fused count only,
    and the split is read from the run's data (the run's own config)."""
    if modalities.get(meta["modality"]).inputs != "early":
        return {s: int(meta["n_features"][s]) for s in meta["streams"]}
    recorded = meta.get("feature_spec", {}).get("streams", {})
    if all(recorded.get(s, {}).get("n_features") for s in meta["streams"]):  # the run's feature spec
        return {s: int(recorded[s]["n_features"]) for s in meta["streams"]}
    config_path = run_dir / "config.yaml"
    try:
        cfg = files.read_config(config_path)
        split = load_data(cfg.data).train
    except (MerError, OSError) as e:
        raise MerError(
            f"{run_dir}: early fusion: the checkpoint holds {meta['n_features']['early']} fused features "
            f"and the run's data, needed to split them between its streams, cannot be read: {e}"
        ) from None
    counts = {s: int(split.streams[s][0].shape[1]) for s in meta["streams"]}
    if sum(counts.values()) != int(meta["n_features"]["early"]):
        raise MerError(
            f"{run_dir}: early fusion: the model reads {meta['n_features']['early']} features per frame, "
            f"its data's streams have {counts}"
        )
    return counts


def late_graph(run_dir: Path) -> tuple[LateGraph, dict[str, Any]]:
    """The graph of a late fusion run (both members and the combiner) and its sidecar fields."""
    late_path = run_dir / "late.json"
    read = trained.read_late(run_dir)
    if read is None:
        raise MerError(f"{late_path}: not found")
    _, combined, member_dirs = read
    members: dict[str, RunGraph] = {}
    about: dict[str, Any] = {}
    class_names: list[str] | None = None
    features: dict[str, int] = {}
    for m, member_dir in member_dirs.items():
        graph, meta, counts = run_graph(member_dir)
        if class_names is not None and meta["class_names"] != class_names:
            raise MerError(f"{late_path}: the members were trained on different classes")
        class_names = list(meta["class_names"])
        members[m] = graph
        features.update(counts)
        about[m] = member_fields(member_dir, meta)
    assert class_names is not None
    late_fused = LateGraph(members, combined, len(class_names)).eval()
    fields = {
        "modality": "late",
        "class_names": class_names,
        "n_features": {s: features[s] for s in late_fused.inputs},
        "late": {**combined.state(), "members": about},
    }
    return late_fused, fields


def _scaling_state(prep: sequences.StreamPrep) -> dict[str, object] | None:
    """The fitted scaler as plain numbers (kind, center, scale; a checkpoint from before scaling
    options reads as standard); None: features as they are."""
    return None if prep.scaler is None else prep.scaler.state()


def member_fields(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What the sidecar says of one trained run: its preprocessing as plain numbers, the
    precision it was trained and evaluated at, its feature spec where the checkpoint has one."""
    preps = {name: sequences.StreamPrep.from_state(state) for name, state in meta["prep"].items()}
    return {
        "run": str(run_dir),
        "modality": meta["modality"],
        "streams": list(meta["streams"]),
        "trained_precision": trained.trained_precision(run_dir, meta),
        "temperature": float(meta.get("temperature", 1.0)),
        "preprocessing": {
            name: {
                "target_length": prep.target.length,
                "skip_zero_frames": prep.skip_zero_frames,
                "scaling": _scaling_state(prep),
            }
            for name, prep in preps.items()
        },
        "feature_spec": meta.get("feature_spec"),
        **validity_fields(meta),
    }


def validity_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's ``frame_validity`` for a run that honours validity masks (else nothing: the
    sidecar it always wrote): the graph takes no mask, the caller applies it first."""
    honoured = trained.honoured_streams(meta)
    if not honoured:
        return {}
    early = modalities.get(meta["modality"]).inputs == "early"
    return {
        "frame_validity": {
            "streams": honoured,
            "before_the_graph": EARLY_VALIDITY if early else COMPACT_VALIDITY,
        }
    }


COMPACT_VALIDITY = (
    "each clip's invalid frames (validity mask False) left out before the graph: the valid frames "
    "shifted together in order, the clip's length their count"
)


EARLY_VALIDITY = (
    "each clip's invalid frames (validity mask False) replaced before the graph by the linear "
    "interpolation of the nearest valid frames before and after them (the first or last valid "
    "frame held beyond them); lengths kept"
)


def build(run_dir: Path) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """The graph of any trained run, its input stream names (in argument order) and the
    sidecar's description of it."""
    run_dir = run_dir.expanduser().resolve()
    if (run_dir / "late.json").is_file():
        graph, fields = late_graph(run_dir)
        return graph, list(graph.inputs), fields
    if not (run_dir / "checkpoint.pt").is_file() and (run_dir / "cv.json").is_file():
        raise MerError(f"{run_dir}: a cross-validation run: export one of its folds (fold0/, fold1/, ...)")
    single, meta, counts = run_graph(run_dir)
    fields = {
        "modality": meta["modality"],
        "class_names": list(meta["class_names"]),
        "n_features": counts,
        **member_fields(run_dir, meta),
    }
    return single, list(single.inputs), fields


def example_batch(
    fields: dict[str, Any], inputs: list[str], batch: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """``batch`` generated clips per input stream, of lengths from one frame to ``time`` frames
    (longer than the target length: the cut is exercised), zero-padded to ``time`` frames."""
    rng = np.random.default_rng(seed)
    lengths_by = target_lengths(fields)
    tensors: list[torch.Tensor] = []
    for s in inputs:
        steps = lengths_by.get(s, 16) + 3 + seed
        lengths = np.linspace(steps, 1, batch).round().astype(np.int64)
        x = rng.standard_normal((batch, steps, fields["n_features"][s])).astype(np.float32)
        x[np.arange(steps)[None, :] >= lengths[:, None]] = 0.0
        tensors += [torch.from_numpy(x), torch.from_numpy(lengths)]
    return tuple(tensors)


def target_lengths(fields: dict[str, Any]) -> dict[str, int]:
    """Each raw input stream's target length (early fusion: the fused stream's, for both)."""
    runs = fields["late"]["members"].values() if "late" in fields else [fields]
    out: dict[str, int] = {}
    for r in runs:
        for name, p in r["preprocessing"].items():
            for s in r["streams"] if name == "early" else [name]:
                out[s] = int(p["target_length"])
    return out


def input_spec(inputs: list[str], fields: dict[str, Any]) -> list[dict[str, Any]]:
    spec: list[dict[str, Any]] = []
    for s in inputs:
        spec.append(
            {
                "name": s,
                "shape": ["batch", f"{s}_time", fields["n_features"][s]],
                "dtype": "float32",
                "stream": s,
            }
        )
        spec.append({"name": f"{s}_lengths", "shape": ["batch"], "dtype": "int64", "stream": s})
    return spec


def to_onnx(graph: nn.Module, inputs: list[str], example: tuple[torch.Tensor, ...]) -> bytes:
    """The graph as ONNX bytes, batch and time dynamic.

    torch's legacy (TorchScript-tracing) exporter, not the dynamo one: with torch 2.13 and
    onnxscript 0.7 the dynamo exporter's graph of a tiny BiLSTM classifier failed in onnxruntime
    on a batch of another shape than the traced one (a Reshape in the within-length reversal
    asked for a wrong size), and took 11 s to export where this one takes under 1 s. The legacy
    exporter maps each nn.LSTM to ONNX's LSTM operator, keeps the reversal's index arithmetic on
    the dynamic sizes, and matches torch to 1e-7.
    """
    names = [n for s in inputs for n in (s, f"{s}_lengths")]
    # each stream's time axis has its own name: the streams' frame counts differ
    axes: dict[str, dict[int, str]] = {s: {0: "batch", 1: f"{s}_time"} for s in inputs}
    axes.update({f"{s}_lengths": {0: "batch"} for s in inputs})
    axes[OUTPUT] = {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer's notes on Python values it records (all checked by the parity check below)
        # and the legacy exporter's deprecation notice would only bury the one line that matters
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            cast(Any, buffer),  # the legacy exporter writes to a file object too
            dynamo=False,
            input_names=names,
            output_names=[OUTPUT],
            dynamic_axes=axes,
            opset_version=OPSET,
        )
    return buffer.getvalue()


def to_torchscript(graph: nn.Module, example: tuple[torch.Tensor, ...]) -> bytes:
    """The graph traced to TorchScript (sizes stay dynamic: the tracer records them as ops)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # as in to_onnx; the parity check is what decides
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def require_onnxruntime(what: str = "--format onnx") -> Any:
    """onnxruntime (the export extra), or one error line naming the extra to install."""
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
        import onnxruntime
    except ImportError:
        raise MerError(f"{what} needs onnx and onnxruntime: {EXTRA_HINT}") from None
    return onnxruntime


def run_file(fmt: str, blob: bytes, inputs: list[str], tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Class probabilities of an exported file (its bytes) on ``tensors``: onnxruntime or
    torch.jit, as a user of the file would run it."""
    if fmt == "onnx":
        ort = require_onnxruntime()
        session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        names = [n for s in inputs for n in (s, f"{s}_lengths")]
        feeds = {n: t.numpy() for n, t in zip(names, tensors, strict=True)}
        return np.asarray(session.run([OUTPUT], feeds)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 marks torch.jit deprecated
        module = torch.jit.load(io.BytesIO(blob))
    with torch.no_grad():
        return np.asarray(module(*tensors).numpy())


def export(run_dir: Path, fmt: str, out: Path) -> dict[str, Any]:
    """Write ``out`` (the run as ``fmt``) and its sidecar ``out.json``; return the sidecar.

    The file is checked before anything is written: on generated clips of other lengths and
    another batch size than it was traced with, its probabilities must match torch's to
    `PARITY_TOLERANCE`, and a clip's probabilities alone must match its own in the batch.
    """
    if fmt not in FORMATS:
        raise MerError(f"--format {fmt!r}: valid: {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnxruntime()
    graph, inputs, fields = build(run_dir)
    trace_batch = example_batch(fields, inputs, batch=3, seed=0)
    blob = to_onnx(graph, inputs, trace_batch) if fmt == "onnx" else to_torchscript(graph, trace_batch)
    check = example_batch(fields, inputs, batch=5, seed=7)
    with torch.no_grad():
        expected = graph(*check).numpy()
    got = run_file(fmt, blob, inputs, check)
    # the batch's shortest clip on its own, without any padding
    shortest = [t for x, n in zip(check[::2], check[1::2], strict=True) for t in (x[-1:, : n[-1]], n[-1:])]
    alone = run_file(fmt, blob, inputs, shortest)
    error = float(max(np.abs(got - expected).max(), np.abs(alone[0] - got[-1]).max()))
    if not error < PARITY_TOLERANCE:
        raise MerError(
            f"{run_dir}: the exported {fmt} file does not reproduce the model (max |p_file - p_torch| "
            f"{error:.2e} >= {PARITY_TOLERANCE:g}): nothing written"
        )
    sidecar = {
        "format": SIDECAR_FORMAT,
        "file": out.name,
        "file_format": fmt,
        **({"onnx_opset": OPSET} if fmt == "onnx" else {}),
        "exported_from": str(run_dir.expanduser().resolve()),
        "precision": "fp32",
        "inputs": input_spec(inputs, fields),
        "outputs": [{"name": OUTPUT, "shape": ["batch", len(fields["class_names"])], "dtype": "float32"}],
        "preprocessing_in_graph": True,
        "padding": "frames past a clip's length may hold anything; 1 <= lengths <= the stream's time axis",
        **({"early_input": EARLY_INPUT} if fields["modality"] == "early" else {}),
        **fields,
        "check": {"clips": int(check[1].shape[0]), "max_abs_diff": error},
    }
    with atomic_open(out, "wb") as f:
        f.write(blob)
    try:
        write_json(sidecar_path(out), sidecar)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return sidecar


EARLY_INPUT = (
    "the acoustic and visual streams as the training data held them, each at its own frame rate; "
    "the graph stretches each clip's visual frames to its acoustic frame count (linear, first and "
    "last frames kept) and joins them per frame, acoustic features first, as mer-train did"
)


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")
