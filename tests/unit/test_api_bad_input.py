"""Bad input through the Python API (modules, operators, placement, inference loaders): a clear
error naming the thing, never a crash of the interpreter or a silent result.

The cases come from an adversarial probe of the API (2026-12-02): before, the first two crashed
the process (heap corruption, SIGFPE), and the KeyedJaggedTensor cases returned a result.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

import robe_dist.ops  # noqa: F401  registers torch.ops.robe_dist.*
from robe_dist.config import RobeConfig
from robe_dist.data.stats import TableStats
from robe_dist.modules import RobeEmbeddingBagCollection, RobeHybridEmbeddingBagCollection
from robe_dist.ops import FusedUpdate
from robe_dist.placement import PlacementError, plan_placement

# one feature of dim 32 (Z = 32) in a 1000-float array: [key, rows, dim, out_col, pooling, key index, occurrence]
META = [0, 100, 32, 0, 0, 0, 0]
OP_ARGS = (2, 32, 1, 1, 0, 32, [0, 0, 0, 1], 1)  # batch, out_dim, max_blocks, occurrences, hash, Z, paper, align


def table(name="t0", features=("f0",), rows=100, dim=32):
    t = EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=max(rows, 1), feature_names=list(features))
    t.num_embeddings = rows  # (TorchRec's own check divides by it)
    return t


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter: a crash there fails the test instead of the run."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_negative_output_column_is_refused_not_written_before_the_output():
    p = run_isolated(
        "import torch, robe_dist.ops\n"
        "meta = torch.tensor([[0, 100, 32, -32, 0, 0, 0]])\n"
        "try:\n"
        "    torch.ops.robe_dist.pooled_lookup(torch.randn(1000), torch.tensor([1, 2]), None, torch.tensor([0, 1, 2]),\n"
        f"                                      meta, *{OP_ARGS!r})\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    assert p.returncode == 0, p.stderr[-2000:]  # (it aborted: "double free or corruption")
    assert "feature #0 has output column -32, expected >= 0" in p.stdout


@pytest.mark.parametrize("which", ["backward", "fused_update"])
def test_an_array_smaller_than_a_block_is_refused_by_the_backward_and_the_update(which):
    call = (
        "torch.ops.robe_dist.pooled_lookup_backward(torch.ones(2, 32), None, offsets, meta, starts, 2, 0, 32, 1, 1, 2, False)"
        if which == "backward"
        else "torch.ops.robe_dist.pooled_lookup_fused_update(torch.zeros(0), None, torch.ones(2, 32), None, offsets, "
        "meta, starts, 2, 32, 1, 1, 2, 1, 0.1, 1e-10, False)"
    )
    p = run_isolated(
        "import torch, robe_dist.ops\n"
        f"meta, offsets = torch.tensor([{META!r}]), torch.tensor([0, 1, 2])\n"
        "_, starts, _ = torch.ops.robe_dist.pooled_lookup(torch.randn(1000), torch.tensor([1, 2]), None, offsets, "
        f"meta, *{OP_ARGS!r})\n"
        "try:\n"
        f"    {call}\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    assert p.returncode == 0, p.stderr[-2000:]  # (SIGFPE: a division by zero)
    assert "array_size (0) must be >= block_size (32)" in p.stdout


def test_the_fused_update_names_a_missing_adagrad_state_and_an_unknown_optimizer():
    meta, offsets = torch.tensor([META]), torch.tensor([0, 1, 2])
    array = torch.randn(1000)
    _, starts, _ = torch.ops.robe_dist.pooled_lookup(array, torch.tensor([1, 2]), None, offsets, meta, *OP_ARGS)
    args = (torch.ones(2, 32), None, offsets, meta, starts, 2, 32, 1, 1, 2)
    with pytest.raises(ValueError, match=r"fused Adagrad update needs its state: .* got None"):
        torch.ops.robe_dist.pooled_lookup_fused_update(array, None, *args, 2, 0.1, 1e-10, False)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        torch.ops.robe_dist.pooled_lookup_fused_update(array, None, *args, 9, 0.1, 1e-10, False)
    ebc = RobeEmbeddingBagCollection([table()], RobeConfig(array_size=1000, block_size=32))
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="fused Adagrad update needs its state"):  # at the forward, not the backward
        ebc.lookup(kjt, FusedUpdate("adagrad", 0.1), None)
    for lr in (math.inf, True):
        with pytest.raises(ValueError, match="FusedUpdate.lr must be a finite non-negative float"):
            FusedUpdate("sgd", lr)


@pytest.mark.parametrize(
    "kjt, match",
    [
        # 3 lengths for 2 keys (TorchRec's EBC refuses it; the batch was taken as 1, a length ignored)
        (dict(keys=["f0", "f1"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([2, 1, 1])),
         r"has 3 lengths for 2 keys x batch \(stride\) 1"),
        (dict(keys=["f0", "f1"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1]), stride=1),
         r"has 4 lengths for 2 keys x batch \(stride\) 1"),
        # a value that no bag holds (it was dropped silently)
        (dict(keys=["f0", "f1"], values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([1, 1, 1, 1])),
         "offsets run from 0 to 4 but the KeyedJaggedTensor has 5 values"),
    ],
)  # fmt: skip
def test_a_keyed_jagged_tensor_whose_lengths_do_not_match_is_refused(kjt, match):
    ebc = RobeEmbeddingBagCollection([table(features=("f0", "f1"))], RobeConfig(array_size=1000, block_size=32))
    with pytest.raises(ValueError, match=match):
        ebc(KeyedJaggedTensor(**kjt))
    with pytest.raises(TypeError, match="the input must be a KeyedJaggedTensor, got dict"):
        ebc({"f0": torch.tensor([1])})


def test_hot_rows_route_ids_beyond_2_pow_40_to_the_array_not_another_tables_hot_row():
    """``table slot << 40 | id`` is the hot key: an id of 2**40 + 1 in the first table equalled
    the second table's hot id 1 and was read from the first table's tail row, its array weight 0."""
    tables = [table("t0", ["f0"], rows=10**6), table("t1", ["f1"], rows=10**6)]
    h = RobeHybridEmbeddingBagCollection(tables, RobeConfig(array_size=1000, block_size=32), robe_tables=["t0", "t1"],
                                         hot_ids={"t0": [1], "t1": [1]})  # fmt: skip
    big = 2**40 + 1
    robe_input, hot_input = h.hot_router(
        KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor([big, 1, 1, -5]), lengths=torch.ones(4, dtype=torch.long))
    )
    assert robe_input.weights().tolist() == [1.0, 0.0, 0.0, 1.0]  # only the true hot ids skip the array


def test_a_module_materialised_with_to_empty_is_refused_until_initialised():
    """``to_empty`` leaves the buffers the kernels read as columns and key positions holding
    whatever memory they got: the forward says so instead of reading through them."""
    cfg = RobeConfig(array_size=1000, block_size=32)
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    reference = RobeEmbeddingBagCollection([table()], cfg)
    empty = RobeEmbeddingBagCollection([table()], cfg, device=torch.device("meta")).to_empty(device="cpu")
    with torch.no_grad():
        empty.lookup_meta.fill_(-1)  # (to_empty's memory is arbitrary; make it garbage for sure)
    with pytest.raises(RuntimeError, match=r"uninitialised memory, as after to_empty.*call reset_parameters\(\)"):
        empty(kjt)
    empty.load_state_dict(reference.state_dict())  # a checkpoint makes it whole
    assert torch.equal(empty(kjt).values(), reference(kjt).values())
    fresh = RobeEmbeddingBagCollection([table()], cfg, device=torch.device("meta")).to_empty(device="cpu")
    fresh.reset_parameters()
    assert fresh(kjt).values().shape == (2, 32)
    bad = reference.state_dict()
    bad["hash_signature"] = torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match=r"hash_signature must be an int64 tensor of shape \(6,\)"):
        reference.load_state_dict(bad)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: RobeEmbeddingBagCollection([table(dim=-32)], RobeConfig(array_size=1000, block_size=32)),
         ValueError, "embedding_dim must be >= 1, got -32"),
        (lambda: RobeEmbeddingBagCollection([table()], {"array_size": 1000}), TypeError, "robe must be a RobeConfig"),
        (lambda: RobeConfig(array_size=1000, seed=2**63), ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
        (lambda: RobeConfig(array_size=2**62), ValueError, r"array_size must be < 2\*\*48"),
        (lambda: RobeConfig.from_compression([table()], math.inf), ValueError, "ratio must be a finite number > 0"),
        (lambda: RobeConfig.from_compression([table()], "abc"), ValueError, "ratio must be a finite number > 0"),
        (lambda: RobeConfig.from_compression([table()], np.float32("nan")), ValueError, "ratio must be a finite number"),
        (lambda: RobeConfig.from_compression([], 10), ValueError, "needs the tables"),
        (lambda: RobeEmbeddingBagCollection([table()], RobeConfig(array_size=1000), fused_sgd_lr=math.inf),
         ValueError, "fused_sgd_lr must be a finite positive float"),
        (lambda: RobeHybridEmbeddingBagCollection([table()], RobeConfig(array_size=1000), max_full_rows=-1),
         ValueError, "max_full_rows must be an int >= 0 or None, got -1"),
    ],
)  # fmt: skip
def test_bad_construction_arguments_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()


def stats(name, counts):
    return TableStats.from_counts(name, 100, np.asarray(counts))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(block_size=0), ValueError, "block_size must be a positive int, got 0"),
        (dict(tables=[table(dim=0)]), ValueError, "needs num_embeddings >= 1 and embedding_dim >= 1"),
        (dict(tables=[table(), table()]), ValueError, r"table names must be unique, got \['t0'\] twice"),
        (dict(tables=[table(rows=0)]), ValueError, "needs num_embeddings >= 1"),  # (set after TorchRec's checks)
        (dict(stats=[stats("f0", [])]), PlacementError, "the statistics of feature 'f0' count no id"),
        (dict(stats=[{"name": "f0"}]), TypeError, "stats must be a sequence of TableStats"),
    ],
)  # fmt: skip
def test_placement_names_degenerate_tables_and_statistics(kwargs, error, match):
    args = dict(tables=[table()], budget="10x", block_size=32) | kwargs
    with pytest.raises(error, match=match):
        plan_placement(args.pop("tables"), args.pop("budget"), **args)


def test_the_inference_loaders_take_str_paths(tmp_path):
    from robe_dist.inference.export import load_trained_model
    from robe_dist.inference.predict import ExportError, load_artifact

    with pytest.raises(ExportError, match="no such file"):
        load_artifact(str(tmp_path / "missing.pt2"))
    with pytest.raises(ExportError, match="/dev/null: not a regular file"):  # (it said "no such file")
        load_artifact("/dev/null")
    with pytest.raises(ExportError, match="no config.yaml"):  # (AttributeError: 'str' object has no attribute ...)
        load_trained_model(str(tmp_path))


def test_a_scores_file_whose_temporary_name_would_be_too_long_is_refused_before_scoring(tmp_path):
    """The scores are written beside ``--out`` under a longer temporary name, then renamed: a name
    that fits but whose temporary one does not failed only after the scoring."""
    from robe_dist.inference.predict import ExportError, check_out

    from robe_dist.inference.predict import _temporary

    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    check_out(tmp_path / ("s" * (limit - 30)), [])
    with pytest.raises(ExportError, match="its name is too long to write it atomically"):
        check_out(tmp_path / ("s" * limit), [])
    # the longest that fits: a temporary name of exactly NAME_MAX characters, written and renamed
    extra = len(_temporary(tmp_path / "s").name) - 1
    out = tmp_path / ("s" * (limit - extra))
    assert len(_temporary(out).name) == limit
    check_out(out, [])
    _temporary(out).write_text("1\n")
    _temporary(out).rename(out)


def test_scores_under_an_input_file_are_refused_as_under_a_file_not_as_that_file(tmp_path):
    """``--out model.pt2/x`` was refused as "is the --model file", which it is not."""
    from robe_dist.inference.predict import ExportError, check_out

    model = tmp_path / "model.pt2"
    model.write_bytes(b"PK")
    with pytest.raises(ExportError, match=f"--out {model}/x: {model} is not a directory$"):
        check_out(model / "x", [("--model", model)])
    with pytest.raises(ExportError, match="is the --model file"):
        check_out(model, [("--model", model)])


def test_numpy_numbers_are_numbers():
    """The type checks above take numpy's scalars (a ratio or Z read from an array, a config)."""
    assert RobeConfig.from_compression([table(rows=1000)], np.int64(10)).array_size == 3200
    assert RobeConfig.from_compression([table(rows=1000)], np.float32(10.0)).array_size == 3200
    assert plan_placement([table()], "10x", block_size=np.int64(32)).array_size > 0
    RobeHybridEmbeddingBagCollection([table()], RobeConfig(array_size=1000), max_full_rows=np.int64(10))


def test_the_hybrids_hot_columns_are_remade_when_a_checkpoint_is_loaded():
    """``hot_columns`` is derived and not saved: after ``to_empty()`` it held arbitrary memory
    that ``load_state_dict`` did not restore, and the hot rows were added into the wrong columns."""
    tables = [table("t0", ["f0"]), table("t1", ["f1"])]
    cfg = RobeConfig(array_size=1000, block_size=32)
    kw = dict(robe_tables=["t0", "t1"], hot_ids={"t0": [1, 2], "t1": [3]})
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor([1, 5, 3, 4]), lengths=torch.ones(4, dtype=torch.long))
    reference = RobeHybridEmbeddingBagCollection(tables, cfg, **kw)
    empty = RobeHybridEmbeddingBagCollection(tables, cfg, device=torch.device("meta"), **kw).to_empty(device="cpu")
    empty.hot_columns.fill_(0)  # (to_empty's memory is arbitrary)
    empty.load_state_dict(reference.state_dict())
    assert torch.equal(empty(kjt).values(), reference(kjt).values())
