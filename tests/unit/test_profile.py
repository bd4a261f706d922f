"""The trainer's profile window (robe_dist.trainer.profile.StepProfiler) on plain CPU work."""

from __future__ import annotations

import torch
from torch.profiler import record_function

from robe_dist.trainer.profile import StepProfiler


def fake_step() -> None:
    with record_function("## forward 3 ##"):
        torch.ones(64, 64) @ torch.ones(64, 64)
    with record_function("## copy_batch_to_gpu 4 ##"):
        with record_function("## next_batch ##"):  # nested: counted once, in the data phase
            torch.zeros(1000).sum()


def test_window_reopens_after_an_empty_chunk_and_reports_its_steps(tmp_path):
    prof = StepProfiler([5, 6], tmp_path, rank=0, device=torch.device("cpu"))
    prof.before_step(4)
    assert prof.stop() is None  # not started
    prof.before_step(5)
    assert prof.stop() is None and prof.record is None  # the chunk ended before step 5 ran
    prof.before_step(5)
    fake_step()
    assert prof.after_step(5) is None
    prof.before_step(6)
    fake_step()
    record = prof.after_step(6)
    assert record["first_step"] == 5 and record["steps"] == 2
    assert set(record["phases_ms"]) == {"forward", "data: next batch (load, to device)"}
    assert record["operators_ms"]["dense layers (addmm/mm/bmm, self)"] > 0
    assert abs(record["step_ms"] - sum(record["phases_ms"].values())) < 0.003  # (each rounded to 0.001)
    assert (tmp_path / "profile" / "rank0.trace.json").is_file() and (tmp_path / "profile" / "rank0.txt").is_file()
    prof.before_step(6)
    assert prof.after_step(6) is None  # one window per run
    assert "profile of steps 5..6" in StepProfiler.describe(record)


def test_tbe_line_counts_forward_and_backward_once():
    """The operator names of one FBGEMM TBE step on CPU (torch.profiler, torchrec 1.8): the line
    takes the forward's outermost op and the backward's autograd node, none of their nested ops."""
    from robe_dist.trainer.profile import OPERATORS

    (tbe,) = [test for label, test in OPERATORS if label.startswith("FBGEMM TBE")]
    names = {  # name: counted
        "fbgemm::split_embedding_codegen_lookup_sgd_function_pt2": True,
        "fbgemm::split_embedding_codegen_forward_unweighted_pt2_wrapper": False,
        "fbgemm::split_embedding_codegen_forward_cpu": False,
        "torch::autograd::CppNode<SplitLookupFunction_sgd_Op_pt2>": True,
        "autograd::engine::evaluate_function: torch::autograd::CppNode<SplitLookupFunction_sgd_Op_pt2>": False,
        "fbgemm::split_embedding_backward_codegen_sgd_unweighted_pt2_wrapper": False,
        "fbgemm::split_embedding_backward_codegen_sgd_cpu": False,
        "fbgemm::bounds_check_indices": False,
        # a data-parallel table (DenseTableBatchedEmbeddingBagsCodegen)
        "fbgemm::dense_embedding_codegen_lookup_function": True,
        "torch::autograd::CppNode<(anonymous namespace)::SplitLookupFunction_Dense_Op>": True,
        "autograd::engine::evaluate_function: torch::autograd::CppNode<(anonymous namespace)::SplitLookupFunction_Dense_Op>": False,
    }
    assert {n: bool(tbe(n)) for n in names} == names
