"""Checkpoints of a ROBE + table-wise model: DMP state_dict and torch.distributed.checkpoint."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from robe_dist import RobeConfig, RobeEmbeddingBagCollection

from test_distributed import ARRAY, MixedModel, batch_slice, gather, local_batch, make_optimizer, plan_and_wrap, robe_tables

pytestmark = pytest.mark.integration


def _rank_checkpoint(rank: int, world_size: int, path: str) -> Dict:
    # -- two ranks: train a little, save
    dmp2, _, _ = plan_and_wrap(MixedModel(seed=3), world_size, table_optimizer=(torch.optim.SGD, {"lr": 0.2}))
    opt = make_optimizer(dmp2, (torch.optim.SGD, {"lr": 0.2}))
    for step in range(3):
        kjt, labels = local_batch(step, 16, rank, world_size)
        nn.functional.binary_cross_entropy_with_logits(dmp2(kjt), labels).backward()
        opt.step()
        opt.zero_grad()
    state = dmp2.state_dict()
    kinds = {k: type(v).__name__ for k, v in state.items()}
    dcp.save(state, checkpoint_id=path)
    kjt, _ = local_batch(77, 16, rank, world_size)
    with torch.no_grad():
        out2 = torch.cat(gather(dmp2(kjt)))
    dist.barrier()

    # -- one rank, in a process group of its own: load into a freshly initialised model
    solo = dist.new_group(ranks=[0])
    result: Dict = {"kinds": kinds}
    if rank == 0:
        dmp1, _, _ = plan_and_wrap(MixedModel(seed=1234), 1, pg=solo, load_initial=False)
        kjt, _ = batch_slice(77, 16, 0, 16)
        with torch.no_grad():
            before = dmp1(kjt)
        state1 = dmp1.state_dict()
        dcp.load(state1, checkpoint_id=path, process_group=solo)
        dmp1.load_state_dict(state1)
        with torch.no_grad():
            out1 = dmp1(kjt)
        meta = dcp.FileSystemReader(path).read_metadata()
        array_chunks = [(idx.fqn, info.length) for idx, info in meta.storage_data.items() if idx.fqn == "robe.array"]
        result.update(
            out_diff=(out1 - out2).abs().max().item(),
            out_changed=(before - out2).abs().max().item(),
            array_chunks=array_chunks,
            array_chunk_meta=[list(c.sizes) for c in meta.state_dict_metadata["robe.array"].chunks],
        )
        # -- a model hashing with another seed refuses the checkpoint
        bad = MixedModel(seed=3)
        bad.robe = RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=ARRAY, block_size=16, seed=9))
        dmp_bad, _, _ = plan_and_wrap(bad, 1, pg=solo, load_initial=False)
        state_bad = dmp_bad.state_dict()
        dcp.load(state_bad, checkpoint_id=path, process_group=solo)
        try:
            dmp_bad.load_state_dict(state_bad)
            dmp_bad(kjt)
            result["refused"] = ""
        except RuntimeError as e:
            result["refused"] = str(e)
    dist.barrier()
    return result


def test_checkpoint_saved_on_two_ranks_loads_on_one(pg2, tmp_path):
    r0, r1 = pg2.run(_rank_checkpoint, path=str(tmp_path / "ckpt"))
    for r in (r0, r1):
        assert r["kinds"]["robe.array"] == "Tensor"  # replicated: a plain tensor, identical on every rank
        assert r["kinds"]["robe.hash_signature"] == "Tensor"
        assert r["kinds"]["ebc.embedding_bags.t0.weight"] in ("ShardedTensor", "DTensor")
    # the array is written once (deduplicated across ranks), whole
    assert r0["array_chunk_meta"] == [[ARRAY]]
    ((fqn, length),) = r0["array_chunks"]  # one stored item (a serialised tensor: bytes + a header)
    assert fqn == "robe.array" and ARRAY * 4 <= length < ARRAY * 4 + 4096
    assert r0["out_changed"] > 1e-4  # the fresh one-rank model differed before loading
    assert r0["out_diff"] < 1e-6
    assert "ROBE hash signature does not match" in r0["refused"] and "seed=9" in r0["refused"]


def _rank_in_backward_resume(rank: int, world_size: int, path: str) -> Dict:
    """TorchRec's DLRM example's optimisers (Adam in the backward over the embeddings, the array's
    included; Adam for the dense part): model and CombinedOptimizer saved with DCP after 3 steps,
    loaded into a fresh model, 3 more steps, against 6 steps without a stop."""
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    def build(seed: int):
        model = MixedModel(seed=seed)
        apply_optimizer_in_backward(torch.optim.Adam, model.robe.parameters(), {"lr": 0.01})
        # (fused Adagrad tables: with SGD ones, the optimiser state after init_state() asks DCP for
        # table entries the saved one lacks, "Missing key in checkpoint state_dict", torchrec 1.8)
        dmp, _, _ = plan_and_wrap(model, world_size, table_optimizer=(torch.optim.Adagrad, {"lr": 0.1}), load_initial=False)
        return dmp, make_optimizer(dmp, (torch.optim.Adam, {"lr": 0.01}))

    def train(dmp, opt, steps) -> None:
        for step in steps:
            kjt, labels = local_batch(step, 16, rank, world_size)
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(dmp(kjt), labels).backward()
            opt.step()

    dmp, opt = build(seed=3)
    train(dmp, opt, range(3))
    dcp.save({"model": dmp.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
    train(dmp, opt, range(3, 6))

    resumed, resumed_opt = build(seed=99)
    resumed_opt.init_state()  # (Adam makes its state at its first step; TorchRec loads into it in place)
    state = {"model": resumed.state_dict(), "optim": resumed_opt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optim"])
    train(resumed, resumed_opt, range(3, 6))
    array_state = opt.state_dict()["state"]["robe.array"]
    resumed_state = resumed_opt.state_dict()["state"]["robe.array"]
    return {
        "array_equal": torch.equal(dmp.module.robe.array, resumed.module.robe.array),
        "head_equal": all(torch.equal(a, b) for a, b in zip(dmp.module.head.parameters(), resumed.module.head.parameters())),
        "state_keys": sorted(array_state),
        "state_equal": all(torch.equal(array_state[k], resumed_state[k]) for k in array_state),
        "step": float(array_state["step"]),
    }


def test_in_backward_array_optimiser_resumes_from_dcp_to_the_same_weights(pg2, tmp_path):
    for r in pg2.run(_rank_in_backward_resume, path=str(tmp_path / "ckpt")):
        assert r["state_keys"] == ["exp_avg", "exp_avg_sq", "step"] and r["step"] == 6.0
        assert r["array_equal"] and r["head_equal"] and r["state_equal"]
