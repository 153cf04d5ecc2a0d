"""make bench-profile: each operator's time lands in its phase and kind."""

from types import SimpleNamespace

import pytest
import step_profile  # benchmarks/step_profile.py (pytest's pythonpath)


def event(name, parent=None):
    return SimpleNamespace(name=name, cpu_parent=parent)


def test_an_operator_takes_the_phase_of_its_nearest_marked_ancestor():
    backward = event("autograd::engine::evaluate_function: MkldnnRnnLayerBackward0")
    optimizer = event("Optimizer.step#AdamW.step")
    data = event(step_profile.DATA_LABEL)
    assert step_profile.phase_of(event("aten::mul", event("aten::lerp", optimizer))) == "optimizer"
    assert step_profile.phase_of(event("aten::mkldnn_rnn_layer_backward", backward)) == "backward"
    assert step_profile.phase_of(event("aten::index_select", data)) == "data"
    assert step_profile.phase_of(event("aten::mkldnn_rnn_layer", event("aten::lstm"))) == "forward"


def test_kinds():
    kinds = {
        "aten::mkldnn_rnn_layer": "recurrent kernel",
        "aten::mkldnn_rnn_layer_backward": "recurrent kernel",
        "aten::addmm": "matmul",
        "aten::native_batch_norm_backward": "normalisation",
        "aten::_to_copy": "casts",
        "aten::flip": "element-wise and masking",
    }
    assert {name: step_profile.kind_of(name) for name in kinds} == kinds


@pytest.mark.slow
def test_a_profiled_step_of_the_default_model_accounts_for_its_time():
    row = step_profile.profile_case("bilstm", "fp32", batches=1, peaks={"fp32": 100.0, "bf16": 200.0})
    cells = row["ms_per_step"]
    assert sum(cells.values()) == pytest.approx(row["profiled_ms"], abs=0.1 * len(cells))
    assert cells["forward/recurrent kernel"] > 0 and cells["backward/recurrent kernel"] > 0
    assert (
        cells["optimizer/element-wise and masking"] > 0
        and cells["data/casts"] + cells.get("data/element-wise and masking", 0) > 0
    )
    # profiled operator time is the step's own time (less the profiler's and Python's share)
    assert 0.3 * row["step_ms"] < row["profiled_ms"] <= 1.05 * row["step_ms"]
    assert row["recurrent_gflops"] > 0
