"""The two mappings: the spec's constants, torch == scalar spec, determinism, collision rate."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from robe_dist import hashing


def test_paper_constants_are_the_authors():
    # numpy.random.RandomState(1024).randint(0, P, 10)[:3] == 634329019, 1825252241, 871205356
    assert hashing.paper_constants(1024) == (871205356, 1825252241, 634329019, 2038074743)


def test_paper_start_formula_by_hand():
    # block(g, c) = (g * 871205356 + c * 1825252241 + 634329019) mod P; start = block mod (m - Z + 1)
    consts = hashing.paper_constants()
    m, z = 27_000_000, 32
    for g, c in [(0, 0), (1, 0), (123456789, 3), (2**33 - 1, 3)]:
        want = ((g * 871205356 + c * 1825252241 + 634329019) % 2038074743) % (m - z + 1)
        assert hashing.paper_start(g, c, m - z + 1, consts) == want
    assert hashing.paper_start(0, 0, m - z + 1, consts) == 634329019 % (m - z + 1)


def test_fmix64_known_values():
    # MurmurHash3 fmix64 is a bijection with fmix64(0) == 0; spot values computed with the C reference
    assert hashing.fmix64(0) == 0
    assert hashing.fmix64(1) == 0xB456BCFC34C2CB2C
    assert hashing.fnv1a64(b"") == 0xCBF29CE484222325
    assert hashing.fnv1a64(b"a") == 0xAF63DC4C8601EC8C


def test_torch_universal_matches_scalar_spec():
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64))
    ids[:4] = torch.tensor([0, 1, -1, 2**63 - 1])
    key = hashing.table_key("cat_7", seed=3)
    num_starts = 27_000_000 - 32 + 1
    got = hashing.universal_starts_torch(ids, key, 4, num_starts)
    for i, x in enumerate(ids.tolist()):
        assert got[i].tolist() == [hashing.universal_start(key, x, c, num_starts) for c in range(4)]
    assert int(got.min()) >= 0 and int(got.max()) < num_starts


def test_torch_paper_matches_scalar_spec():
    consts = hashing.paper_constants()
    ids = torch.tensor([0, 5, 39884405, 2**32])
    got = hashing.paper_starts_torch(ids, 1000, 4, 999_969, consts)
    for i, x in enumerate(ids.tolist()):
        assert got[i].tolist() == [hashing.paper_start(x + 1000, c, 999_969, consts) for c in range(4)]


def test_table_and_seed_enter_the_hash():
    keys = {hashing.table_key(n, s) for n in ("a", "b", "cat_0") for s in (0, 1)}
    assert len(keys) == 6
    ids = torch.arange(1000)
    a = hashing.universal_starts_torch(ids, hashing.table_key("a", 0), 2, 10**6)
    b = hashing.universal_starts_torch(ids, hashing.table_key("b", 0), 2, 10**6)
    assert (a == b).float().mean() < 0.01


_DIGEST_SCRIPT = """
import hashlib, torch
from robe_dist import hashing
ids = torch.arange(-5000, 5000) * 1_000_003
starts = hashing.universal_starts_torch(ids, hashing.table_key("t", 7), 4, 27_000_000 - 31)
paper = hashing.paper_starts_torch(ids.abs(), 11, 4, 999_969, hashing.paper_constants())
print(hashlib.sha256(starts.numpy().tobytes() + paper.numpy().tobytes()).hexdigest())
"""


def test_deterministic_across_processes():
    """Two fresh interpreters (fresh hash randomisation) give byte-identical starts."""
    digests = {
        subprocess.run(
            [sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert len(digests) == 1
    ids = torch.arange(-5000, 5000) * 1_000_003
    here = hashing.universal_starts_torch(ids, hashing.table_key("t", 7), 4, 27_000_000 - 31)
    paper = hashing.paper_starts_torch(ids.abs(), 11, 4, 999_969, hashing.paper_constants())
    assert digests == {hashlib.sha256(here.numpy().tobytes() + paper.numpy().tobytes()).hexdigest()}


def collision_rate(num_starts: int, pairs: int, seed: int = 0) -> float:
    """Fraction of pairs of distinct (table, id, block) keys that share a start (universal mapping)."""
    rng = np.random.default_rng(seed)
    tables = [hashing.table_key(f"cat_{i}", 0) for i in range(26)]
    ids = torch.from_numpy(rng.integers(0, 2**32, size=(2, pairs), dtype=np.int64))
    t = rng.integers(0, 26, size=(2, pairs))
    blocks = rng.integers(0, 4, size=(2, pairs))
    starts = []
    for side in range(2):
        s = torch.empty(pairs, dtype=torch.long)
        for ti in range(26):
            sel = torch.from_numpy(np.nonzero(t[side] == ti)[0])
            all_blocks = hashing.universal_starts_torch(ids[side, sel], tables[ti], 4, num_starts)
            s[sel] = all_blocks[torch.arange(len(sel)), torch.from_numpy(blocks[side][sel.numpy()])]
        starts.append(s)
    distinct = (ids[0] != ids[1]) | torch.from_numpy((t[0] != t[1]) | (blocks[0] != blocks[1]))
    return float((starts[0] == starts[1])[distinct].float().mean())


def test_collision_rate_is_one_over_num_starts():
    num_starts, pairs = 1000, 400_000
    rate = collision_rate(num_starts, pairs)
    expected = 1 / num_starts
    sigma = math.sqrt(expected * (1 - expected) / pairs)
    assert abs(rate - expected) < 5 * sigma, (rate, expected, sigma)


@pytest.mark.parametrize("m", [32, 33, 1000])
def test_blocks_never_wrap(m):
    z = 32
    s = hashing.universal_starts_torch(torch.arange(10_000), hashing.table_key("t", 0), 4, m - z + 1)
    assert int(s.min()) >= 0 and int(s.max()) + z <= m
    p = hashing.paper_starts_torch(torch.arange(10_000), 0, 4, m - z + 1, hashing.paper_constants())
    assert int(p.max()) + z <= m


def test_ids_of_uncapped_features_reach_the_model_unchanged_in_training_and_in_the_exported_model():
    """The trainer takes ids modulo the table size only for capped features (full tables, the
    paper mapping); the others keep their values, negative and 63-bit ones included, and the
    exported model takes ids exactly as the trainer did (it once used another modulus, so a
    negative id of an uncapped feature read other slots at scoring time)."""
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from robe_dist.hashing import take_moduli
    from robe_dist.inference.export import ScoringModel
    from robe_dist.trainer.data import cap_ids

    keys = ["a", "b", "c"]
    values = torch.tensor([-(2**40), 7, 2**62 + 5, -3, 2**63 - 1, 12, -1, 4], dtype=torch.int64)
    lengths = torch.tensor([2, 1, 2, 1, 1, 1], dtype=torch.int64)  # feature-major, batch 2
    moduli = torch.tensor([0, 10, 0])
    per_value = torch.repeat_interleave(moduli, torch.tensor([3, 3, 2]))
    expected = torch.tensor([-(2**40), 7, 2**62 + 5, 7, 2**63 - 1 - (2**63 - 1) // 10 * 10, 2, -1, 4])
    assert torch.equal(take_moduli(values, per_value), expected)

    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    batch = Batch(dense_features=torch.zeros(2, 13), sparse_features=kjt, labels=torch.zeros(2))
    assert torch.equal(cap_ids(batch, moduli).sparse_features.values(), expected)

    class Recorder(torch.nn.Module):  # the DLRM's place: records the ids it is given
        def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
            self.seen = features.values()
            return torch.zeros(dense.shape[0], 1)

    scoring = ScoringModel(Recorder(), keys, {"b": 10})
    scoring(torch.zeros(2, 13), values, lengths)
    assert torch.equal(scoring.dlrm.seen, expected)
