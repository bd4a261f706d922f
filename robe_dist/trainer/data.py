"""The run's data, from robe_dist.data: synthetic data generated on first use, or a Criteo dataset."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_dist.data import synthetic
from robe_dist.data.criteo import DEFAULT_CAT_NAMES
from robe_dist.data.dataset import CriteoIterableDataset, read_manifest
from robe_dist.data.layout import DataError, directory_lock, load_manifest_file
from robe_dist.data.stats import TableStats, ensure_table_stats, read_table_stats
from robe_dist.data.vocab import build_vocab
from robe_dist.hashing import take_moduli
from robe_dist.train_config import Config, ConfigError
from robe_dist.trainer.env import DistEnv, on_rank0

logger = logging.getLogger("robe_dist.train")


def _complete_vocab(path: Path) -> bool:
    """A finished vocabulary that stores its values (older ones are rebuilt: robe-predict needs
    the values to score raw rows)."""
    manifest = load_manifest_file(path) if path.is_dir() else None
    return bool(manifest and manifest.get("kind") == "vocab" and manifest.get("complete")
                and "fingerprint" in (manifest.get("vocab") or {}))  # fmt: skip


def synthetic_cache_dir(cfg: Config) -> Path:
    """``data.path``, else ``data_cache/synthetic-<rows>-<days>-<seed>-<scale>[-mh]``."""
    d = cfg.data
    if d.path:
        return Path(d.path)
    mh = "-mh" if d.multi_hot else ""
    return Path("data_cache") / f"synthetic-{d.synthetic_rows}-{d.synthetic_days}-{d.synthetic_seed}-{d.synthetic_scale:g}{mh}"


def training_data_dir(cfg: Config) -> Path:
    """The dataset directory a run of ``cfg`` reads: ``data.path`` for Criteo; for synthetic data
    its cache directory, or that directory's ``-vocab`` sibling with ``data.vocab``."""
    if cfg.data.kind != "synthetic":
        return Path(cfg.data.path)
    path = synthetic_cache_dir(cfg)
    return path.with_name(path.name + "-vocab") if cfg.data.vocab else path


def cap_ids(batch: Batch, moduli: torch.Tensor) -> Batch:
    """``batch`` with the ids of feature ``f`` taken modulo ``moduli[f]`` (TorchRec's Criteo
    "hashes"; 0: unchanged): full tables and the paper mapping need ids in ``[0, num_embeddings)``."""
    kjt = batch.sparse_features
    per_value = torch.repeat_interleave(moduli, torch.tensor(kjt.length_per_key()))
    capped = KeyedJaggedTensor(
        keys=kjt.keys(), values=take_moduli(kjt.values(), per_value), lengths=kjt.lengths(), stride=kjt.stride(),
        length_per_key=kjt.length_per_key(), offset_per_key=kjt.offset_per_key(),
    )  # fmt: skip
    return Batch(dense_features=batch.dense_features, sparse_features=capped, labels=batch.labels)


@dataclass
class RunData:
    """A dataset directory and what the trainer reads from it, for this rank."""

    path: Path
    manifest: dict
    cfg: Config
    env: DistEnv
    id_moduli: Optional[torch.Tensor] = None
    """Per feature: ids are taken modulo this (0: not; ``None``: raw ids everywhere)."""

    @property
    def feature_names(self) -> List[str]:
        return list(DEFAULT_CAT_NAMES)

    def planted_auc(self, split: str) -> Optional[float]:
        """The AUC of the model that drew the synthetic labels on ``split``: the best reachable."""
        return (self.manifest.get("planted_auc_by_split") or {}).get(split, self.manifest.get("planted_auc"))

    def num_embeddings(self) -> List[int]:
        """Table sizes: ``model.num_embeddings_per_feature``, else the dataset's ``table_sizes``."""
        if self.cfg.model.num_embeddings_per_feature is not None:
            return list(self.cfg.model.num_embeddings_per_feature)
        sizes = self.manifest.get("table_sizes")
        if not sizes:
            raise DataError(
                f"the dataset at {self.path} does not give its table sizes (raw ids, as robe-data ingest writes "
                "them) and model.num_embeddings_per_feature is null: map the ids to 0..K per table with "
                "`robe-data vocab --data DIR --out DIR --train-only` (its manifest gives the sizes), or set "
                "model.num_embeddings_per_feature (26 ints; full tables then read id % size)"
            )
        return [int(s) for s in sizes]

    def table_stats(self, top_ids: bool = False) -> List[TableStats]:
        """Per-table id statistics of the train split (``table_stats.json`` in the dataset; rank 0
        computes and writes it first if it is missing, or, with ``top_ids``, if it lacks the most
        frequent ids: one pass over the train split)."""
        try:
            on_rank0(self.env, lambda: ensure_table_stats(self.path, log=logger.info, top_ids=top_ids), (DataError, OSError))
        except OSError as e:
            raise DataError(f"{self.path}: computing the table statistics failed: {e}") from None
        stats = read_table_stats(self.path)
        assert stats is not None
        return stats

    def cap_ids_of(self, features: Sequence[str], num_embeddings: Sequence[int], capped: Sequence[str]) -> None:
        """Take the ids of the ``capped`` features modulo their table's size from now on."""
        if capped:
            sizes = dict(zip(features, num_embeddings))
            self.id_moduli = torch.tensor([sizes[f] if f in capped else 0 for f in features])

    def _local(self, global_batch_size: int, what: str) -> int:
        check_divisible(global_batch_size, what, self.env)
        return global_batch_size // self.env.world_size

    def _dataset(self, split: str, batch_size: int, **kwargs) -> CriteoIterableDataset:
        return CriteoIterableDataset(
            str(self.path), split=split, batch_size=batch_size, rank=self.env.rank, world_size=self.env.world_size,
            multi_hot=self.cfg.data.multi_hot, **kwargs,
        )  # fmt: skip

    def _batches(self, ds: CriteoIterableDataset) -> Iterator[Batch]:
        if self.id_moduli is None:
            return iter(ds)
        return (cap_ids(b, self.id_moduli) for b in ds)

    def split_rows(self, split: str) -> int:
        """Rows of ``split`` ("train", "val", "test") in the dataset."""
        from robe_dist.data.dataset import split_range

        lo, hi = split_range([f["rows"] for f in self.manifest["files"]], split)
        return hi - lo

    def steps_per_epoch(self) -> int:
        """Training steps (global batches) in one pass over the train split: the same on any world size."""
        return len(self._dataset("train", self._local(self.cfg.train.global_batch_size, "train.global_batch_size")))

    def train_batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        """This rank's slices of the global batches of ``epoch`` from global batch ``start_batch`` on.

        Interleaved by global batch (see :mod:`robe_dist.data.dataset`): global batch ``b`` is the
        same rows on any number of ranks, rank ``r`` taking its ``r``-th slice, and the order is a
        function of (seed, epoch). So a resumed run sees the batches the interrupted one would
        have, also on another world size (the position is counted in global batches)."""
        bs = self._local(self.cfg.train.global_batch_size, "train.global_batch_size")
        ds = self._dataset(
            "train", bs, shuffle_buffer=self.cfg.data.shuffle_buffer, seed=self.cfg.seed, start_batch=start_batch,
            drop_last=True, interleave=True,
        )  # fmt: skip
        ds.set_epoch(epoch)
        return self._batches(ds)

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """This rank's share of ``split`` ("val" or "test"): every sample once over all ranks; with
        ``eval.max_batches``, of the split's first ``max_batches x eval.batch_size`` rows, the same
        rows on any number of ranks."""
        bs = self._local(self.cfg.eval.batch_size, "eval.batch_size")
        cap = self.cfg.eval.max_batches
        return self._batches(self._dataset(split, bs, shuffle_buffer=0, drop_last=False,
                                           max_rows=None if cap is None else cap * self.cfg.eval.batch_size))  # fmt: skip


def make_synthetic(cfg: Config, log=logger.info) -> Path:
    """Generates the synthetic dataset of ``cfg`` unless cached, and its vocabulary with
    ``data.vocab``; returns the directory to train on (one process only)."""
    d = cfg.data
    path = synthetic_cache_dir(cfg)
    with directory_lock(path):  # runs started at once on the same cache take turns
        synthetic.generate(
            path, d.synthetic_rows, days=d.synthetic_days, seed=d.synthetic_seed, scale=d.synthetic_scale,
            multi_hot=d.multi_hot, log=log,
        )  # fmt: skip
        if not d.vocab:
            return path
        vocab_path = training_data_dir(cfg)
        if not _complete_vocab(vocab_path):
            # raw 32-bit ids: no modulo cap; counted on the train split, as in production
            build_vocab(path, vocab_path, max_ind_range=0, train_only=True, log=log)
    return vocab_path


def check_divisible(global_batch_size: int, what: str, env: DistEnv) -> None:
    """A global batch is split evenly over the ranks: ``ConfigError`` naming ``what`` otherwise."""
    if global_batch_size % env.world_size:
        raise ConfigError(
            f"{what} ({global_batch_size}) must be divisible by the number of ranks ({env.world_size}): "
            f"e.g. {global_batch_size - global_batch_size % env.world_size or env.world_size}"
        )


def prepare_data(cfg: Config, env: DistEnv) -> RunData:
    """Generates the synthetic dataset unless cached (rank 0; the others wait), and its vocabulary
    with ``data.vocab``; reads the manifest."""
    if cfg.data.kind == "synthetic":
        try:
            on_rank0(env, lambda: make_synthetic(cfg), (DataError, OSError, ValueError))
        except (OSError, DataError) as e:  # a full disk, a path that cannot be a directory: the user's to fix
            raise DataError(f"data.path: making the synthetic dataset failed: {e}") from None
    path = training_data_dir(cfg)
    return RunData(path=path, manifest=read_manifest(path), cfg=cfg, env=env)
