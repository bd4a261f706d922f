"""Atomic torch.distributed.checkpoint snapshots of a run, and resuming from them.

Layout (``checkpoint.dir``, default ``<run dir>/checkpoints``)::

    step_00000100/            one complete checkpoint (only ever created by a rename)
        .metadata, *.distcp   torch.distributed.checkpoint: {"model": ..., "optim": ...}
        trainer_state.json    step, samples, data position, world size, ROBE signatures
        config.yaml           the run's resolved config
        rng_rank<R>.pt        RNG states of rank R
    step_00000120.tmp/        a checkpoint being written (or left by a crash: ignored, removed)
    step_00000200.abandoned/  a checkpoint newer than the one a run resumed from, set aside (kept,
                              never read: a later ``--resume`` continues the resumed run)

Every rank writes its shards into ``step_N.tmp`` and fsyncs them; once all are done, rank 0
fsyncs the directory and renames it to ``step_N`` (then fsyncs the parent). A run that dies at
any instant leaves every complete checkpoint in place: a checkpoint of the same step from an
earlier attempt is first renamed ``step_N.old`` and removed only after the new one is published
(a crash in between restores it on the next start).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import resource
import shutil
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
import yaml
from torch import nn

from robe_dist.train_config import Config, to_yaml
from robe_dist.trainer.env import DistEnv, on_rank0, share_failure
from robe_dist.trainer.model import robe_modules
from robe_dist.trainer.optim import TrainOptimizer

logger = logging.getLogger("robe_dist.train")


class CheckpointError(RuntimeError):
    """A checkpoint that this run cannot continue from: another model, ROBE mapping or global batch
    size, or not a complete checkpoint. robe-train says it in one line and exits with status 2."""


_STEP_DIR = re.compile(r"^step_(\d+)$")
_STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands; saved as ``trainer_state.json``."""

    step: int = 0
    """Optimiser steps done."""
    samples: int = 0
    """Training samples consumed (all ranks)."""
    epoch: int = 0
    """Current epoch (0-based)."""
    step_in_epoch: int = 0
    """Global batches of ``epoch`` already consumed: the data position. Training data is interleaved
    by global batch, so it means the same rows on any world size (resume on another is sample-exact)."""
    best_val_auc: Optional[float] = None
    """Best validation AUC so far."""
    world_size: int = 1
    """Ranks of the run that wrote the checkpoint."""
    global_batch_size: int = 0
    """``train.global_batch_size`` of that run (the data position is counted in its batches)."""
    robe_allreduce_bytes: int = 0
    """Bytes of ROBE-array gradient rank 0 handed to all-reduces so far (counted where sent)."""
    dense_allreduce_bytes: int = 0
    """The same for the other data-parallel parameters (MLPs, data-parallel tables)."""
    alltoall_bytes: int = 0
    """Bytes rank 0 sent to other ranks in training all-to-alls (sharded tables: ids, pooled
    embeddings, their gradients), counted where sent (robe_dist.distributed.comm_counter)."""
    train_rows: Optional[int] = None
    """Rows of the training split the data position counts in (``None``: a checkpoint written
    before it was recorded). A resume on a split of another size is refused."""
    eval_pending: bool = False
    """A stop signal came at a step where a validation was due, before it ran: the resumed run
    runs it first (so it stops on ``train.target_auc`` where an uninterrupted run would)."""


MODEL_SPEC_FILE = "model_spec.json"
"""What the model was built from (robe_dist.trainer.model.model_spec), beside the DCP files."""


def _robe_signatures(model: nn.Module) -> Dict[str, List[int]]:
    return {path: m.hash_signature.tolist() for path, m in robe_modules(model).items()}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / _STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def save_checkpoint(
    ckpt_dir: Path, model: nn.Module, optimizer: TrainOptimizer, state: TrainerState, cfg: Config, env: DistEnv,
    model_spec: Optional[dict] = None,
) -> Path:
    """Writes ``ckpt_dir/step_<N>`` atomically (all ranks call this) and prunes old ones.
    ``model_spec`` (tables, ROBE tables, array size, id moduli: what ``robe-export`` rebuilds the
    model from without the data) goes to ``model_spec.json``."""
    final = ckpt_dir / f"step_{state.step:08d}"
    tmp = final.with_name(final.name + ".tmp")

    def make_dir() -> None:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_files() -> None:
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=tmp)  # fsyncs its files
        _write_synced(tmp / f"rng_rank{env.rank}.pt", lambda f: f.write(_serialised(_rng_state())))
        if env.is_main:
            record = {**asdict(state), "robe_signatures": _robe_signatures(model)}
            _write_synced(tmp / "config.yaml", lambda f: f.write(to_yaml(cfg).encode()))
            if model_spec is not None:
                _write_synced(tmp / MODEL_SPEC_FILE, lambda f: f.write(json.dumps(model_spec, indent=1).encode()))
            _write_synced(tmp / _STATE_FILE, lambda f: f.write(json.dumps(record, indent=1).encode()))

    def publish() -> None:
        if env.is_main:
            _fsync_dir(tmp)
            previous = final.with_name(final.name + ".old")
            if final.exists():  # a checkpoint of the same step, from an earlier attempt: kept until replaced
                shutil.rmtree(previous, ignore_errors=True)
                final.rename(previous)
            tmp.rename(final)
            _fsync_dir(ckpt_dir)
            shutil.rmtree(previous, ignore_errors=True)
            for old in list_checkpoints(ckpt_dir)[: -cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)

    for phase in (make_dir, write_files, publish):  # each ends like a barrier
        _on_every_rank(env, phase, f"writing checkpoint {final}", ckpt_dir)
    return final


def _on_every_rank(env: DistEnv, fn, what: str, directory: Optional[Path] = None) -> None:
    """Runs ``fn`` on every rank; if it fails with an OS error (a full disk, a path that cannot be
    a directory) on any rank, every rank raises ``CheckpointError`` naming the first, instead of
    one rank dying while the others wait in the next collective. The checkpoint being written is
    a ``.tmp`` directory until its rename, so the last complete one is untouched (and the next start
    removes the partial one)."""

    def run() -> None:
        try:
            fn()
        except (OSError, CheckpointException) as e:
            rank, first = env.rank, e
            if getattr(e, "failures", None):  # DCP's: {rank: (exception, traceback)}, of every rank
                rank, (first, _) = min(e.failures.items(), key=lambda kv: kv[0])
            why = f"{type(first).__name__}: {first}"
            if not isinstance(first, OSError) and directory is not None:  # torch's zip writer says "unexpected pos"
                why += _space_limits(directory)
            raise _RankError(f"rank {rank}: {why}") from None

    failure = share_failure(env, run, (_RankError,))
    if failure is not None:
        last = latest_checkpoint(directory) if directory is not None else None
        kept = f"the last complete checkpoint, {last}, is untouched" if last else "no complete checkpoint was written before it"
        raise CheckpointError(f"{what} failed ({failure[1]}); {kept}")


def _space_limits(directory: Path) -> str:
    """What may have cut a write short without an ``OSError`` reaching us: little free space on
    ``directory``'s file system, or a file size limit (``ulimit -f``)."""
    found = []
    try:
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        if free < 256 << 20:
            found.append(f"{free:,} bytes free on its file system")
    except OSError:
        pass
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        found.append(f"a file size limit of {soft:,} bytes (ulimit -f)")
    return f" (a short write? {' and '.join(found)})" if found else ""


class _RankError(Exception):
    """A failed checkpoint phase on one rank, described."""


def _serialised(obj) -> bytes:
    """``torch.save`` into memory: the file write is then a plain one, whose failure (a full disk) is
    an ``OSError`` naming the reason, not torch's zip writer's ``RuntimeError``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_synced(path: Path, write) -> None:
    """``write(file)`` into ``path``, flushed to disk before returning."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Makes the directory's entries (created files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_shared_dir(ckpt_dir: Path, env: DistEnv) -> None:
    """Refuses a checkpoint directory that the ranks do not share. Every rank writes its shards of
    one DCP checkpoint there and rank 0 its index, so on node-local disks (several nodes, no shared
    file system) no node would hold a whole checkpoint, and ``--resume`` would find different
    checkpoints on different nodes. Rank 0 writes a token file; every rank looks for it.

    Raises:
        CheckpointError: on every rank, naming the ranks that do not see the token.
        OSError: rank 0 cannot make the directory or write in it (on every rank).
    """
    token = [f".robe_dist_shared_{random.SystemRandom().getrandbits(64):016x}"]

    def write_token() -> None:  # (on one process too: a directory that cannot be made or written
        ckpt_dir.mkdir(parents=True, exist_ok=True)  # is found now, not at the first save)
        for left in ckpt_dir.glob(".robe_dist_shared_*"):  # left by a run killed during this check
            left.unlink(missing_ok=True)
        try:
            (ckpt_dir / token[0]).write_text("robe-train checks that every rank sees this directory\n")
        finally:
            if env.world_size == 1:
                (ckpt_dir / token[0]).unlink(missing_ok=True)

    try:
        on_rank0(env, write_token, (OSError,))
    except OSError:
        if env.is_main:
            (ckpt_dir / token[0]).unlink(missing_ok=True)
        raise
    if env.world_size == 1:
        return
    dist.broadcast_object_list(token, src=0)
    seen = [None] * env.world_size
    dist.all_gather_object(seen, (ckpt_dir / token[0]).is_file())
    if env.is_main:
        (ckpt_dir / token[0]).unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise CheckpointError(
            f"checkpoint dir {ckpt_dir} is not shared by the ranks: rank{'s' if len(blind) > 1 else ''} "
            f"{', '.join(map(str, blind[:8]))}{', ...' if len(blind) > 8 else ''} cannot see a file rank 0 wrote there. "
            "A DCP checkpoint is written by every rank into one directory: put checkpoint.dir (or --run-dir) "
            "on a file system that every node mounts"
        )


def remove_partial_checkpoints(ckpt_dir: Path, env: DistEnv) -> None:
    """Deletes ``*.tmp`` directories left by runs that died while saving, and puts back a
    ``step_N.old`` whose replacement was never published (rank 0)."""
    if env.is_main and ckpt_dir.is_dir():
        for p in ckpt_dir.glob("step_*.tmp"):
            logger.info("removing the incomplete checkpoint %s (left by an interrupted save)", p)
            shutil.rmtree(p, ignore_errors=True)
        for p in ckpt_dir.glob("step_*.old"):
            final = p.with_name(p.name[: -len(".old")])
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                logger.info("restoring %s (its replacement was not finished)", final)
                p.rename(final)
    dist.barrier()


def set_aside_newer_checkpoints(ckpt_dir: Path, step: int, env: DistEnv) -> List[Path]:
    """Renames the complete checkpoints of ``ckpt_dir`` past ``step`` (those of a trajectory a
    resume from an older checkpoint abandons) to ``step_N.abandoned`` (rank 0): kept, but no longer
    the latest (a later ``--resume`` would have continued the abandoned run) nor pruned in place
    of the resumed run's own. Returns the new paths (on rank 0; empty on the others)."""
    moved: List[Path] = []
    if env.is_main:
        for p in list_checkpoints(ckpt_dir):
            if int(_STEP_DIR.match(p.name).group(1)) > step:
                target, k = p.with_name(p.name + ".abandoned"), 1
                while target.exists():
                    k += 1
                    target = p.with_name(f"{p.name}.abandoned{k}")
                p.rename(target)
                moved.append(target)
        if moved:
            _fsync_dir(ckpt_dir)
    dist.barrier()
    return moved


def _check_robe_compatible(path: Path, saved: dict, saved_cfg: dict, model: nn.Module, cfg: Config) -> None:
    """Refuses a checkpoint whose ROBE arrays were hashed differently from this model's."""
    current = _robe_signatures(model)
    theirs = saved.get("robe_signatures", {})
    if set(current) != set(theirs):
        raise CheckpointError(
            f"checkpoint {path} holds ROBE arrays at {sorted(theirs) or 'no module'}, this model at "
            f"{sorted(current) or 'no module'}: it was written for another model (robe.features, model.arch)"
        )
    for where, sig in current.items():
        if theirs[where] != sig:
            new_cfg = asdict(cfg.robe)
            old_cfg = {**asdict(type(cfg.robe)()), **saved_cfg.get("robe", {})}  # fields it predates: their defaults
            diff = [f"robe.{k}: checkpoint {old_cfg.get(k)!r}, config {new_cfg[k]!r}" for k in new_cfg if old_cfg.get(k) != new_cfg[k]]
            raise CheckpointError(
                f"checkpoint {path}: the ROBE hash signature of {where} does not match this run's "
                f"(checkpoint {theirs[where]}, this run {sig}; [version, mapping + 2 (block_align - 1), seed, Z, m, table layout]). "
                f"Differences: {'; '.join(diff) or 'the table layout (model.num_embeddings_per_feature)'}. "
                "Embeddings would be read from the wrong slots: resume with the checkpoint's robe settings."
            )


# a full table's optimiser state, by the optimiser, under FBGEMM's fused kernel (``<table>.<slot>``)
# and under the dense torch optimiser of a data-parallel table (``<name>``): the same tensors
_FUSED_SLOTS = {"adagrad": {"momentum1": "sum"}, "adam": {"momentum1": "exp_avg", "momentum2": "exp_avg_sq"}}


def _state_saved_elsewhere(state: Dict[str, dict], stored: Iterable[str], optim_name: str, step: int) -> Callable[[], None]:
    """Points the entries of ``state`` (an optimiser state dict's ``state``, to load in place)
    at where the checkpoint (``stored``: the keys of its DCP index) keeps them, where that is
    elsewhere; returns what puts them back after loading.

    - a full table's state where TorchRec's planner placed the table otherwise than in the
      checkpoint's run (fused by FBGEMM, ``fused.<param>`` ``{<table>.momentum1}``, or
      data-parallel with the dense optimiser, ``embeddings.<param>`` ``{sum}``: its choice changes
      with the number of ranks); a dense optimiser's ``step`` that a fused table did not keep is
      set to the run's step;
    - a ROBE array's state that a checkpoint of an earlier version keeps under ``embeddings.``
      (written before the arrays had their own part, ``robe.<param>``)."""
    stored = {k[len("optim.state."):] for k in stored if k.startswith("optim.state.")}
    slots = _FUSED_SLOTS.get(optim_name, {})
    moves: List[Tuple[str, str, str, str]] = []  # (key, name) as the model has it -> as stored
    steps: List[Tuple[str, str, torch.Tensor]] = []  # a step the checkpoint has not: set, not loaded
    for key, entry in state.items():
        for name, tensor in entry.items():
            if f"{key}.{name}" in stored:
                continue
            if key.startswith("fused."):  # fused here, data-parallel there?
                there = ("embeddings." + key[len("fused."):], slots.get(name.rsplit(".", 1)[-1], ""))
            elif key.startswith("embeddings."):  # data-parallel here, fused there?
                fused_key = "fused." + key[len("embeddings."):]
                if name == "step" and any(k.startswith(fused_key + ".") for k in stored):
                    steps.append((key, name, tensor))
                    continue
                table = key.split(".")[-2]  # <...>.embedding_bags.<table>.weight
                there = (fused_key, next((f"{table}.{slot}" for slot, n in slots.items() if n == name), ""))
            elif key.startswith("robe."):
                there = ("embeddings." + key[len("robe."):], name)
            else:
                continue
            if f"{there[0]}.{there[1]}" in stored:
                moves.append((key, name, *there))
    for key, name, *_ in steps:
        del state[key][name]
    for key, name, key2, name2 in moves:
        state.setdefault(key2, {})[name2] = state[key].pop(name)
    # DCP would ask the checkpoint for an empty entry; TorchRec's load_state_dict wants every
    # entry back (a fused SGD table's is empty: it keeps no state)
    empty = [k for k, v in state.items() if not v]
    for key in empty:
        del state[key]

    def put_back() -> None:
        for key, name, key2, name2 in reversed(moves):
            state.setdefault(key, {})[name] = state[key2].pop(name2)
            if not state[key2]:
                del state[key2]
        for key, name, tensor in steps:
            state.setdefault(key, {})[name] = tensor.fill_(step)
        for key in empty:
            state.setdefault(key, {})

    return put_back


def _read_index(path: Path) -> Tuple[Optional[Metadata], Optional[str]]:
    """Checkpoint ``path``'s DCP index, or None and why it cannot be read."""
    try:
        return dcp.FileSystemReader(str(path)).read_metadata(), None
    except FileNotFoundError:
        return None, "its DCP index .metadata is missing"
    except Exception as e:  # pickle / EOF errors of a truncated index
        return None, f"its DCP index .metadata cannot be read ({type(e).__name__}: {e})"


def damaged_files(path: Path, metadata: Optional[Metadata] = None) -> Optional[str]:
    """What is missing or cut short among the tensor files of checkpoint ``path`` (DCP's index
    ``.metadata`` and the ``*.distcp`` files it names, each at least as long as the index says;
    the ranks' RNG states, each readable), or None. A checkpoint directory is renamed into place only when complete, so this finds files
    lost or truncated afterwards (a copy that stopped, a disk error), before DCP's less direct error.
    ``metadata``: the index, where the caller has read it already."""
    if metadata is None:
        metadata, unreadable = _read_index(path)
        if metadata is None:
            return unreadable
    ends: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    missing = sorted(name for name in ends if not (path / name).is_file())
    if missing:
        return f"{len(missing)} of its {len(ends)} tensor files are missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
    short = sorted(name for name, end in ends.items() if (path / name).stat().st_size < end)
    if short:
        return f"tensor file {short[0]} is cut short ({(path / short[0]).stat().st_size:,} bytes, its index needs {ends[short[0]]:,})"
    try:
        written_by = int(json.loads((path / _STATE_FILE).read_text()).get("world_size") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        written_by = 0  # (a trainer state that cannot be read is refused when it is loaded)
    lost = [f"rng_rank{r}.pt" for r in range(written_by) if not (path / f"rng_rank{r}.pt").is_file()]
    if lost:  # a resume on as many ranks would silently re-seed instead of restoring them
        return f"its RNG state {lost[0]} is missing (written by {written_by} ranks)"
    for rng_file in sorted(path.glob("rng_rank*.pt")):  # every rank reads them all: one verdict for all ranks
        try:
            torch.load(rng_file, weights_only=False)
        except Exception as e:  # a truncated zip, a pickle error
            return f"its RNG state {rng_file.name} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})"
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer: TrainOptimizer, cfg: Config, env: DistEnv) -> TrainerState:
    """Loads model, optimiser and (same world size) RNG states in place; returns the trainer state.

    A full table's optimiser state is read from where the checkpoint's run kept it when TorchRec's
    planner places the table otherwise now (fused or data-parallel: its choice changes with the
    number of ranks). A checkpoint written before the ROBE arrays had their own optimiser part
    (``optim.robe_lr_factor``) holds their state under ``embeddings``: it is read from there.

    Raises:
        CheckpointError: the checkpoint's ROBE mapping or model does not match ``model``, or its
            ``train.global_batch_size`` differs (the data position is counted in its batches).
    """
    try:
        saved = json.loads((path / _STATE_FILE).read_text())
        saved_cfg = yaml.safe_load((path / "config.yaml").read_text())
    except (ValueError, yaml.YAMLError, OSError) as e:  # (json.JSONDecodeError is a ValueError)
        raise CheckpointError(f"checkpoint {path}: its {_STATE_FILE} or config.yaml cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(saved, dict) or not isinstance(saved_cfg, dict):
        raise CheckpointError(f"checkpoint {path}: its {_STATE_FILE} or config.yaml is not a mapping (damaged?)")
    index, damage = _read_index(path)
    damage = damage or damaged_files(path, index)
    if damage is not None:
        earlier = [p for p in list_checkpoints(path.parent) if p.name < path.name]
        hint = f"; resume from the one before it: --resume {earlier[-1]}" if earlier else ""
        raise CheckpointError(f"checkpoint {path} is damaged: {damage}{hint}")
    _check_robe_compatible(path, saved, saved_cfg, model, cfg)
    state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
    if state.global_batch_size != cfg.train.global_batch_size:
        raise CheckpointError(
            f"train.global_batch_size is {cfg.train.global_batch_size} but checkpoint {path} was written with "
            f"{state.global_batch_size}: the data position (epoch {state.epoch}, batch {state.step_in_epoch}) "
            "is counted in its batches; resume with the same global batch size"
        )
    saved_optim = saved_cfg.get("optim", {})
    old_optim = saved_optim.get("name")
    same_optim = old_optim == cfg.optim.name
    if not same_optim:
        logger.warning("checkpoint %s was trained with optim.name %r, this run uses %r: its optimiser state is not loaded",
                       path, old_optim, cfg.optim.name)  # fmt: skip
    # plain SGD keeps no state: nothing to load (and TorchRec's fused SGD lists placeholder entries
    # that differ between world sizes, which would refuse a resume on another number of ranks)
    stateless = cfg.optim.name == "sgd" and not cfg.optim.momentum
    # nor did it keep any for a run that now adds momentum: its buffers start from the gradient,
    # as on a first step (DCP refused the resume, blaming the model settings)
    was_stateless = old_optim == "sgd" and not saved_optim.get("momentum")
    if same_optim and was_stateless and not stateless:
        logger.warning("checkpoint %s was trained with SGD without momentum, this run uses optim.momentum %s: "
                       "its momentum starts afresh", path, cfg.optim.momentum)  # fmt: skip
    load_optim = same_optim and not stateless and not was_stateless
    sd = {"model": model.state_dict()}
    if load_optim:
        for _, opt in optimizer.optimizer.optimizers:  # lazily made state (Adam's) must exist to load in place
            if opt is not getattr(model, "fused_optimizer", None):
                opt.init_state()
        sd["optim"] = optimizer.state_dict()
    stored = index.state_dict_metadata
    unread = sorted(k[len("model."):] for k in stored if k.startswith("model.") and k[len("model."):] not in sd["model"])
    if unread:  # DCP loads what the model asks for: a part it has no place for would be dropped silently
        raise CheckpointError(
            f"checkpoint {path} holds {len(unread)} model tensor(s) this model has no place for ({', '.join(unread[:3])}"
            f"{', ...' if len(unread) > 3 else ''}): was it written with other model.* or robe.* settings (robe.features, "
            f"robe.hot_rows, model.qr_max_rows)? Its config is {path / 'config.yaml'}"
        )
    put_back = _state_saved_elsewhere(sd["optim"]["state"], stored, cfg.optim.name, state.step) if load_optim else None
    try:
        dcp.load(sd, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # DCP's error lists the failing key; say what it means
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        first = next(iter(failures.values())) if failures else e
        reason = str(first[0] if isinstance(first, tuple) else first).rstrip(".")
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: {reason}. Was it written with other model.* or robe.features "
            f"settings? Its config is {path / 'config.yaml'}"
        ) from None
    if put_back is not None:
        put_back()
    model.load_state_dict(sd["model"])
    if load_optim:
        optimizer.load_state_dict(sd["optim"])
        # FBGEMM's fused Adam counts its steps in a buffer (`iter`, for the bias correction) that
        # TorchRec's state dict leaves out: set it, or Adam's first steps after a resume would be
        # those of step 1 (about a third of the uninterrupted run's at betas (0.9, 0.999))
        optimizer.optimizer.set_optimizer_step(state.step)
    optimizer.optimizer.zero_grad(set_to_none=True)
    optimizer.step_count = state.step
    rng_file = path / f"rng_rank{env.rank}.pt"
    if state.world_size == env.world_size and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.info(
            "checkpoint written by %d ranks, resuming on %d: RNG states re-seeded from (seed, step, rank)",
            state.world_size, env.world_size,
        )
        torch.manual_seed(cfg.seed + 1_000_003 * state.step + env.rank)
    return state
