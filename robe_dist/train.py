"""robe-train: DLRM / DLRM-DCN with ROBE embeddings, from a config file to a checkpointed, evaluated model.

One process (CPU or one GPU)::

    python -m robe_dist.train                                   # configs/tiny_synthetic.yaml, about 1 min on 2 CPU cores
    python -m robe_dist.train --config configs/tiny_synthetic.yaml --set train.max_steps=100 --set optim.lr=0.001
    robe-train --config configs/tiny_synthetic.yaml --run-dir runs/tiny --resume    # continue from the last checkpoint

Several processes on one node (gloo on CPU, nccl on GPU, chosen automatically)::

    torchrun --nproc_per_node=2 -m robe_dist.train --config configs/tiny_synthetic.yaml --run-dir runs/tiny_2p
    NPROC=8 CONFIG=configs/criteo_tb_dlrm_robe.yaml bash launch/run_local.sh --set data.path=/data/criteo_1tb

Several nodes: ``sbatch launch/slurm.sbatch`` (torchrun with c10d rendezvous), see docs/training.md.

Each run writes to its run dir (``--run-dir``, default ``runs/<name>``): ``config.yaml`` (resolved),
``metrics.jsonl`` (one JSON object per line: train, eval and summary records) and
``checkpoints/step_<N>/``. ``--print-config`` shows the resolved config and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import itertools
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

if __name__ == "__main__":  # python -m robe_dist.train: a signal while torch is imported ends in one line
    from robe_dist import early_signals

    early_signals.install()

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist

from robe_dist import ops
from robe_dist.data.layout import DataError
from robe_dist.distributed.comm_counter import CommCounter
from robe_dist.train_config import Config, ConfigError, load_config, read_yaml, to_dict, to_yaml
from robe_dist.trainer import checkpoint as ckpt
from robe_dist.trainer.data import RunData, check_divisible, prepare_data
from robe_dist.trainer.env import (
    SHUTDOWN_WAIT_S,
    DistEnv,
    init_distributed,
    lost_a_peer,
    on_rank0,
    setup_logging,
    shutdown,
)
from robe_dist.trainer.evaluate import EvalStopped, evaluate
from robe_dist.trainer.metrics_log import (
    MetricsError,
    MetricsLog,
    RunningLoss,
    held_bytes,
    max_over_ranks,
    peak_memory_bytes,
    sum_over_ranks,
)
from robe_dist.placement import Placement, PlacementError
from robe_dist.trainer.model import (
    build_collection, build_dlrm, check_device_settings, embedding_parameters, has_sharded_modules, model_spec,
    place_tables, robe_modules, shard_model, table_configs,
)  # fmt: skip
from robe_dist.trainer.optim import TrainOptimizer, fuse_robe_updates, optimizer_spec
from robe_dist.trainer.profile import StepProfiler

logger = logging.getLogger("robe_dist.train")


class _NoStreamsOnCpu(logging.Filter):
    """Drops TorchRec's warning that a pipelined postproc module "has no default/dist stream ...
    race conditions and NaNs": on CPU there are no streams and the pipeline's stages run in order
    on one thread, so nothing can race (on CUDA the pipeline gives it its streams and says nothing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "stream. This may cause race conditions" not in record.getMessage()


EXIT_DIVERGED = 3
EXIT_PEER_LOST = 4
"""This rank's collective failed because another rank had left (that rank says why)."""
PEER_LOST_WAIT_S = 3.0
"""How long a rank whose collective failed as its peer left waits before it exits: the rank that
left first (it may still be tearing down its interpreter) exits before it, so torchrun records
that rank's status, the cause, and not only this one's, a consequence (``robe_dist.torchrun``)."""
STOP_CHECK_EVERY = 10
"""Steps between the ranks' agreement on a stop request (an all-reduce); every step on 1 rank."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT: the run stopped after a step (or inside an evaluation, ``during``) and
    saved a checkpoint."""

    def __init__(self, signame: str, step: int, checkpoint: Optional[Path], during: Optional[str] = None) -> None:
        where = f"during {during} " if during else ""
        super().__init__(f"interrupted by {signame} {where}at step {step}; checkpoint {checkpoint}; rerun with --resume")
        self.signame = signame


class StopRequest:
    """SIGTERM (Slurm preemption, torchrun forwarding it) or SIGINT (Ctrl-C) asks the run to stop:
    the handler only records it; the loop finishes the step, the ranks agree on the step to stop
    at, and the run checkpoints. A second signal of the same kind stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signame: Optional[str] = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signame == name:  # asked twice: stop now
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signame = name

    def agreed(self, env: DistEnv, step: int) -> Optional[str]:
        """The signal to stop on, the same on every rank (checked every ``STOP_CHECK_EVERY`` steps
        on several ranks, where it costs a one-element all-reduce)."""
        if env.world_size == 1:
            return self.signame
        if step % STOP_CHECK_EVERY:
            return None
        code = torch.tensor([0 if self.signame is None else signal.Signals[self.signame].value], device=env.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        value = int(code.item())
        return signal.Signals(value).name if value else None


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="robe-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: configs/tiny_synthetic.yaml)")
    parser.add_argument("--run-dir", type=Path, default=None, help="where metrics, config and checkpoints go (default: runs/<name>)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.5 --set data.path=/data/criteo (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="continue from the run dir's latest checkpoint (or from CHECKPOINT); starts afresh if there is none",
    )  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """One training run: builds everything from the config, then ``run()``."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, stop_request: Optional[StopRequest] = None) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        self.data: RunData = prepare_data(cfg, env)
        ops.set_bus_error_message(
            f"robe-train: rank {env.rank}: bus error (SIGBUS) reading the memory-mapped data: a file under "
            f"{self.data.path} was truncated or replaced while the run read it; the run stops, and --resume "
            "continues from its last checkpoint on data made whole again"
        )

        seed_everything(cfg.seed)
        num_embeddings = self.data.num_embeddings()
        tables, robe_names = table_configs(cfg, self.data.feature_names, num_embeddings)
        self.placement: Optional[Placement] = None
        array_size = None
        raw_ids = self.data.manifest.get("kind") != "vocab"
        if cfg.robe.hot_rows and cfg.robe.hash == "paper" and raw_ids:
            raise ConfigError(  # the router would match raw hot ids against ids taken modulo the table size
                f"robe.hot_rows with robe.hash 'paper' needs ids below the table sizes, and {self.data.path} holds raw "
                "ids (the paper mapping takes them modulo the table size, so the hot ids of the statistics would "
                "never be met): use a vocabulary (data.vocab: true, or robe-data vocab) or robe.hash 'universal'"
            )
        if cfg.robe.budget is not None:
            stats = self.data.table_stats(top_ids=cfg.robe.hot_rows) if cfg.robe.features == "auto" else None
            self.placement = place_tables(cfg, tables, robe_names, stats)
            robe_names, array_size = self.placement.robe_tables, self.placement.array_size or None
            logger.info("%s", self.placement.describe())
        # full tables and the paper mapping read ids modulo the table size
        bounded = [t.feature_names[0] for t in tables if cfg.robe.hash == "paper" or t.name not in robe_names]
        self.data.cap_ids_of(self.data.feature_names, num_embeddings, bounded)
        sizes = dict(zip(self.data.feature_names, num_embeddings))
        # the ids (and dense transform) a scorer must give the model: robe_dist's raw ids, its
        # vocabulary's, or a TorchRec-made npy directory's (log(x - min + 2), TorchRec's own ids)
        ids = "torchrec-npy" if self.data.manifest.get("kind") == "torchrec-npy" else "raw" if raw_ids else "vocab"
        fingerprint = (self.data.manifest.get("vocab") or {}).get("fingerprint")
        vocab = {"path": str(Path(self.data.path).resolve()), "fingerprint": fingerprint} if fingerprint else None
        if ids == "vocab" and vocab is None:
            logger.warning(
                "%s: a vocabulary written before robe-data vocab stored its values: robe-predict will score npy "
                "datasets with this model, but raw Criteo rows only with --vocab of a rebuilt vocabulary", self.data.path
            )
        hot_ids = self.placement.hot_ids if self.placement is not None else {}
        self.model_spec = model_spec(cfg, tables, robe_names, array_size, {f: sizes[f] for f in bounded}, ids, vocab, hot_ids)
        model = build_dlrm(cfg, build_collection(cfg, tables, robe_names, array_size, hot_ids=hot_ids), env.device)
        opt_cls, opt_kwargs = optimizer_spec(cfg.optim)
        self.model = shard_model(model, cfg, env, opt_cls, opt_kwargs)
        self.robe = robe_modules(self.model)
        self.optimizer = TrainOptimizer(self.model, cfg.optim, embedding_parameters(self.model))
        fused = fuse_robe_updates(self.model, self.optimizer, cfg.robe.fused_update, env.world_size)
        if fused:
            logger.info("%s", fused)
        if has_sharded_modules(self.model):
            # pipeline_postproc: the hot-id router of a hybrid with exact rows (a module without
            # parameters between the batch and the sharded children) runs a batch ahead too
            postproc_log = logging.getLogger("torchrec.distributed.train_pipeline.postproc")
            if env.device.type == "cpu" and not any(isinstance(f, _NoStreamsOnCpu) for f in postproc_log.filters):
                postproc_log.addFilter(_NoStreamsOnCpu())
            self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, env.device, execute_all_batches=True,
                                                    pipeline_postproc=True)  # fmt: skip
        else:
            logger.warning(
                "the model has no sharded module (no sharder for its embedding collection): "
                "TrainPipelineSparseDist cannot trace it, training with TrainPipelineBase (plain loop)"
            )
            self.pipeline = TrainPipelineBase(self.model, self.optimizer, env.device)
        self.state = ckpt.TrainerState(world_size=env.world_size, global_batch_size=cfg.train.global_batch_size,
                                       train_rows=self.data.split_rows("train"))  # fmt: skip
        self._sent_base = (0, 0, 0)  # bytes counted by the runs this one resumed
        # TorchRec's all-to-alls (sharded tables) are counted where they are called; evaluation
        # and checkpoints pause it (robe_dist.distributed.comm_counter)
        self.comm = CommCounter().install() if env.world_size > 1 else None
        self.stop_request = stop_request if stop_request is not None else StopRequest()
        self.profiler = StepProfiler(cfg.logging.profile_steps, run_dir, env.rank, env.device)
        self.stopping: Optional[str] = None
        self.last_checkpoint: Optional[Path] = None
        self.results: dict = {}
        self.paused_s = 0.0
        """Seconds spent in evaluations and checkpoints (left out of the summary's train_s)."""
        logger.info(
            "model: %s, %d ROBE tables (array %s floats), %d full tables; %d parameters on rank %d; pipeline %s",
            cfg.model.arch, len(robe_names), f"{cfg.robe.robe_config(array_size).array_size:,}" if robe_names else "-",
            len(tables) - len(robe_names),
            sum(p.numel() for p in self.model.parameters()), env.rank, type(self.pipeline).__name__,
        )  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def resume(self, which: str) -> None:
        path = ckpt.latest_checkpoint(self.ckpt_dir) if which == "latest" else Path(which)
        if path is None:
            logger.info("--resume: no checkpoint in %s yet, starting from step 0", self.ckpt_dir)
            return
        if not (path / "trainer_state.json").is_file():
            raise ckpt.CheckpointError(f"--resume {path}: not a complete checkpoint (no trainer_state.json)")
        rows = self.state.train_rows  # this run's split (__init__)
        self.state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.cfg, self.env)
        if self.state.train_rows is not None and self.state.train_rows != rows:
            raise DataError(
                f"--resume {path}: the checkpoint was written on a training split of {self.state.train_rows:,} rows, "
                f"data.path {self.data.path} now has {rows:,}: its data position (epoch {self.state.epoch}, batch "
                f"{self.state.step_in_epoch}) would point at other rows. Resume on the data it was trained on"
            )
        self.state.train_rows = rows
        self.state.world_size = self.env.world_size
        self._sent_base = (self.state.robe_allreduce_bytes, self.state.dense_allreduce_bytes, self.state.alltoall_bytes)
        self.last_checkpoint = path
        logger.info("resumed from %s: step %d, epoch %d, batch %d of the epoch", path, self.state.step, self.state.epoch, self.state.step_in_epoch)
        moved = ckpt.set_aside_newer_checkpoints(self.ckpt_dir, self.state.step, self.env)
        if moved:
            logger.warning(
                "--resume %s: %s held %d later checkpoint(s) of the run this one leaves; set aside, not deleted, so "
                "that a later --resume continues this run: %s", path, self.ckpt_dir, len(moved), ", ".join(p.name for p in moved),
            )  # fmt: skip

    def save(self) -> None:
        sent = self.sent_bytes()
        self.state.robe_allreduce_bytes, self.state.dense_allreduce_bytes = sent["robe_allreduce_bytes"], sent["dense_allreduce_bytes"]
        self.state.alltoall_bytes = sent["alltoall_bytes"]
        with self.comm_paused():
            self.last_checkpoint = ckpt.save_checkpoint(
                self.ckpt_dir, self.model, self.optimizer, self.state, self.cfg, self.env, self.model_spec
            )
        self.log.write("checkpoint", step=self.state.step, path=str(self.last_checkpoint))

    def interrupt(self, during: Optional[str] = None) -> None:
        """Saves a checkpoint of the current step (unless one exists) and raises ``Interrupted``."""
        if self.last_checkpoint != self.ckpt_dir / f"step_{self.state.step:08d}":
            self.save()
        raise Interrupted(self.stopping or "a signal", self.state.step, self.last_checkpoint, during)

    # ------------------------------------------------------------------ logging
    def log_train(self, running: RunningLoss, since: float, steps: int) -> None:
        """Writes a train record (all ranks take part: the loss is averaged over them)."""
        loss = running.reduce()
        if loss is None:
            return
        if math.isnan(loss):
            first = self.state.step - steps + 1
            when = f"at step {first}" if steps == 1 else f"between steps {first} and {self.state.step}"
            raise Diverged(
                f"the training loss became NaN/inf {when}; "
                f"stopping. The last good checkpoint is {self.last_checkpoint or 'none (no checkpoint was written yet)'}. "
                "Lower optim.lr, add optim.warmup_steps or set optim.grad_clip_norm."
            )
        elapsed = max(time.time() - since, 1e-9)
        rate = steps * self.cfg.train.global_batch_size / elapsed
        record = dict(
            step=self.state.step, samples=self.state.samples, epoch=self.state.epoch, loss=round(loss, 6),
            lr=self.optimizer.lr, samples_per_s=round(rate, 1),
            peak_mem_bytes=max_over_ranks(peak_memory_bytes(self.env.device), self.env),
            **self.sent_bytes(),
        )  # fmt: skip
        if self.cfg.optim.grad_clip_norm is not None:
            record["grad_norm"] = float(self.optimizer.last_grad_norm)
        self.log.write("train", **record)
        self.log.progress(steps, self.state.step, loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}")

    def held_memory(self) -> dict:
        """Bytes of parameters (embeddings: DLRM's sparse arch) and optimiser state that the ranks
        hold, measured on their tensors (max over ranks and sum over ranks)."""
        sd = self.model.state_dict()
        local = {
            "param_bytes": held_bytes(sd),
            "embedding_bytes": held_bytes({k: v for k, v in sd.items() if ".sparse_arch." in k}),
            "optimizer_state_bytes": held_bytes(self.optimizer.state_dict()),
        }
        out = {f"{k}_max_rank": max_over_ranks(v, self.env) for k, v in local.items()}
        out.update({f"{k}_all_ranks": sum_over_ranks(v, self.env) for k, v in local.items()})
        out["sharding"] = getattr(self.model, "sharding_summary", {})
        return out

    def sent_bytes_per_rank(self) -> dict:
        """``sent_bytes()`` of every rank: ``{"alltoall_bytes": [rank 0, rank 1, ...], ...}``."""
        mine = self.sent_bytes()
        if self.env.world_size == 1:
            return {k: [v] for k, v in mine.items()}
        every: list = [None] * self.env.world_size
        with self.comm_paused():
            dist.all_gather_object(every, mine)
        return {k: [r[k] for r in every] for k in mine}

    @contextlib.contextmanager
    def comm_paused(self):
        """A context in which collectives are not counted and time is not training time
        (evaluation, checkpoints)."""
        t0 = time.time()
        try:
            with self.comm.paused() if self.comm is not None else contextlib.nullcontext():
                yield
        finally:
            self.paused_s += time.time() - t0

    def sent_bytes(self) -> dict:
        """Bytes this rank has sent for training since step 0, counted where they are sent: handed
        to gradient all-reduces (ROBE arrays: robe_dist's own hook, or DDP's buckets; the rest of
        DDP's buckets) and sent to other ranks by all-to-alls (sharded tables)."""
        counter = getattr(self.model, "allreduce_counter", None)
        sent_robe = sum(getattr(m, "allreduce_bytes", 0) for m in self.robe.values())
        sent = {"robe": sent_robe + (counter.sent["robe"] if counter else 0), "dense": counter.sent["dense"] if counter else 0}
        return {
            "robe_allreduce_bytes": self._sent_base[0] + sent["robe"],
            "dense_allreduce_bytes": self._sent_base[1] + sent["dense"],
            "alltoall_bytes": self._sent_base[2] + int(self.comm.bytes["all_to_all"] if self.comm is not None else 0),
        }

    def run_eval(self, split: str, final: bool = False) -> dict:
        """Evaluates ``split`` on every rank and logs it. A stop signal cuts it short: the run
        checkpoints (a validation during training stays due: the resumed run runs it first; the
        final evaluation is run again by the resumed run, which has no steps left) and stops."""
        t0 = time.time()
        try:
            with self.comm_paused():
                result = evaluate(self.pipeline, self.model, self.data.eval_batches(split), self.env,
                                  self.cfg.eval.max_batches, stop=lambda: self.stop_request.signame)  # fmt: skip
        except EvalStopped as e:
            self.stopping = e.signame
            if not final:
                self.state.eval_pending = True
            self.interrupt(during=f"the {'final ' if final else ''}evaluation of the {split} split")
        result = {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}
        result["step"] = self.state.step
        self.results[split] = result
        if split == "val":
            self.state.best_val_auc = max(result["auc"], self.state.best_val_auc or 0.0)
        self.log.write("eval", split=split, samples=self.state.samples, **result, eval_s=round(time.time() - t0, 2))
        self.log.message(
            f"eval {split} @ step {self.state.step}: auc {result['auc']:.4f}  logloss {result['logloss']:.4f}  "
            f"accuracy {result['accuracy']:.4f}  ({result['eval_samples']} samples)"
        )
        return result

    def validated_now(self) -> bool:
        """Whether the last validation was at the current step."""
        return self.results.get("val", {}).get("step") == self.state.step

    # ------------------------------------------------------------------ the loop
    def train_chunk(self, batches, running: RunningLoss) -> int:
        """Trains on ``batches`` through the pipeline (which drains at their end); returns the
        number of steps done. Stops early, after a whole step, when the ranks agree on a stop
        request (``self.stopping`` is then the signal's name)."""
        self.pipeline.reset()
        try:
            done = self._train_steps(batches, running, self.cfg.train.log_every_steps)
        except BaseException:
            self.profiler.stop()  # (an error, a NaN: no profile record)
            raise
        self.log_profile(self.profiler.stop())  # a window cut short by the end of the chunk
        return done

    def _train_steps(self, batches, running: RunningLoss, log_every: int) -> int:
        """``train_chunk``'s loop: the steps, their logging and the profile window."""
        state = self.state
        t_log, since_log, done = time.time(), 0, 0
        while True:
            self.profiler.before_step(state.step + 1)
            try:
                loss, _, _ = self.pipeline.progress(batches)
            except StopIteration:
                break
            self.log_profile(self.profiler.after_step(state.step + 1))
            state.step += 1
            state.step_in_epoch += 1
            state.samples += self.cfg.train.global_batch_size
            running.add(loss)
            done += 1
            since_log += 1
            if state.step % log_every == 0:
                self.log_train(running, t_log, since_log)
                t_log, since_log = time.time(), 0
            self.stopping = self.stop_request.agreed(self.env, state.step)
            if self.stopping:
                break
        self.log_train(running, t_log, since_log)  # before any eval or save: never keep a NaN model
        return done

    def log_profile(self, record: Optional[dict]) -> None:
        if record is not None:
            self.log.write("profile", **record)
            self.log.message(StepProfiler.describe(record))

    def steps_per_epoch(self) -> int:
        """Global batches in the train split; ``DataError`` if not even one (checked before the
        run dir is committed: a refused run leaves it as it found it)."""
        steps = self.data.steps_per_epoch()
        if steps < 1:
            rows = self.data.split_rows("train")
            raise DataError(
                f"the train split of {self.data.path} holds {rows:,} rows, less than one global batch "
                f"(train.global_batch_size={self.cfg.train.global_batch_size}): lower the batch or use more data"
            )
        return steps

    def run(self) -> dict:
        """Trains until the epochs, ``train.max_steps`` or ``train.target_auc`` say stop, with
        evaluations and checkpoints in between; then evaluates, saves and returns the summary."""
        cfg, state = self.cfg, self.state
        steps_per_epoch = self.steps_per_epoch()
        total = cfg.train.epochs * steps_per_epoch
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        window = cfg.logging.profile_steps
        if window and self.env.is_main and not state.step < window[0] <= total:  # (it wrote nothing, silently)
            logger.warning("logging.profile_steps %s: this run trains steps %d-%d, so no step is profiled",
                           window, state.step + 1, total)  # fmt: skip
        eval_every = math.ceil(cfg.eval.every_samples / cfg.train.global_batch_size) if cfg.eval.every_samples else None
        ckpt_every = cfg.checkpoint.every_steps
        self.log = MetricsLog(self.run_dir, self.env, total, state.step, cfg.logging.progress_bar)
        self.log.write("start", step=state.step, total_steps=total, steps_per_epoch=steps_per_epoch, world_size=self.env.world_size,
                       pipeline=type(self.pipeline).__name__, planted_val_auc=self.data.planted_auc("val"))  # fmt: skip
        if self.placement is not None:
            self.log.write("placement", **self.placement.to_dict())
        self.log.write("memory", **self.held_memory())
        running = RunningLoss(self.env)
        stop = None  # (a resumed run with no step left stops as the run it resumes did)
        if state.step >= total:
            stop = "max_steps" if cfg.train.max_steps is not None and state.step >= cfg.train.max_steps else "epochs"
        try:
            if state.eval_pending:  # the validation a stop signal cut off, before anything else
                state.eval_pending = False
                if not (stop and cfg.eval.at_end):
                    auc = self.run_eval("val")["auc"]
                    if cfg.train.target_auc is not None and auc >= cfg.train.target_auc:
                        stop = "target_auc"
                    self.save()  # this step's checkpoint again, no longer pending, with the validation's result
            t_start, start_step, paused_before = time.time(), state.step, self.paused_s
            epoch_batches, batches_epoch = None, None
            while stop is None:
                if batches_epoch != state.epoch:
                    epoch_batches, batches_epoch = self.data.train_batches(state.epoch, state.step_in_epoch), state.epoch
                # a chunk runs up to the next evaluation, checkpoint or end of epoch
                end = min(total, state.step + steps_per_epoch - state.step_in_epoch)
                for every in (eval_every, ckpt_every):
                    if every:
                        end = min(end, (state.step // every + 1) * every)
                if self.train_chunk(itertools.islice(epoch_batches, end - state.step), running) == 0 and not self.stopping:
                    raise RuntimeError(f"the training data yielded no batch for epoch {state.epoch} (from batch {state.step_in_epoch})")
                # the epoch is over: its data ran out before `end` (not a stop request), or it is complete
                if (state.step < end and not self.stopping) or state.step_in_epoch >= steps_per_epoch:
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                if self.stopping:
                    state.eval_pending = bool(eval_every and state.step % eval_every == 0 and not self.validated_now())
                    self.interrupt()
                if state.step >= total:
                    stop = "max_steps" if state.step == cfg.train.max_steps else "epochs"
                if eval_every and state.step % eval_every == 0 and not (stop and cfg.eval.at_end):
                    auc = self.run_eval("val")["auc"]
                    if cfg.train.target_auc is not None and auc >= cfg.train.target_auc:
                        stop = "target_auc"
                if ckpt_every and state.step % ckpt_every == 0 and not (stop and cfg.checkpoint.at_end):
                    self.save()
            train_s = time.time() - t_start - (self.paused_s - paused_before)  # (evaluations, checkpoints left out)
            if cfg.checkpoint.at_end and self.last_checkpoint != self.ckpt_dir / f"step_{state.step:08d}":
                self.save()
            if cfg.eval.at_end:
                if not self.validated_now():  # (target_auc: just evaluated)
                    self.run_eval("val", final=True)
                self.run_eval("test", final=True)
        except Diverged as e:
            self.log.write("diverged", step=state.step, message=str(e))
            self.log.close()
            raise
        except Interrupted as e:
            self.log.write("interrupted", step=state.step, signal=e.signame, checkpoint=str(self.last_checkpoint))
            self.log.close()
            raise
        summary = dict(
            step=state.step, samples=state.samples, stop=stop, train_s=round(train_s, 1),
            samples_per_s=round((state.step - start_step) * cfg.train.global_batch_size / max(train_s, 1e-9), 1),
            val_auc=self.results.get("val", {}).get("auc"), test_auc=self.results.get("test", {}).get("auc"),
            best_val_auc=state.best_val_auc, planted_val_auc=self.data.planted_auc("val"),
            planted_test_auc=self.data.planted_auc("test"),
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            sent_bytes_per_rank=self.sent_bytes_per_rank(),
        )  # fmt: skip
        self.log.write("summary", **summary)
        self.log.message(format_summary(summary))
        self.log.close()
        return summary


def format_summary(s: dict) -> str:
    """The final lines on the console."""
    lines = [
        f"summary: {s['step']} steps, {s['samples']:,} samples in {s['train_s']} s "
        f"({s['samples_per_s']:,.0f} samples/s); stopped by: {s['stop']}"
    ]
    for split in ("val", "test"):
        auc, planted = s.get(f"{split}_auc"), s.get(f"planted_{split}_auc")
        if auc is not None:
            best = f"   (planted model, the best reachable: {planted:.4f})" if planted is not None else ""
            lines.append(f"  {split:<4} AUC {auc:.4f}{best}")
    lines.append(f"  checkpoint: {s['checkpoint']}")
    return "\n".join(lines)


class RunDirError(RuntimeError):
    """The run directory cannot be made or written (a path under a file, a full disk): one line, exit 2."""


class RunDirLock:
    """An exclusive ``flock`` on the run directory itself, held by rank 0 for the whole run: a
    second robe-train in the same run dir (a double submission, a run started twice) is refused
    at once instead of both writing checkpoints and ``metrics.jsonl``. (On the directory, not on a
    file in it: a lock file deleted while the run lives would let a second run in.) Where the file
    system has no ``flock`` (some NFS mounts) it goes on without one, as the data cache's lock does."""

    def __init__(self) -> None:
        self._fd: Optional[int] = None

    def acquire(self, run_dir: Path) -> None:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"--run-dir {run_dir} is in use by another robe-train (it holds a lock on the directory): let it "
                "end, or choose another --run-dir"
            ) from None
        except OSError:  # no flock here
            os.close(fd)
            return
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (closing releases the lock)
            self._fd = None


def prepare_run_dir(run_dir: Path, cfg: Config, env: DistEnv, resume: Optional[str], lock: RunDirLock) -> None:
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"

    def check_and_create() -> None:
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"--run-dir {run_dir} is a file, expected a directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(run_dir)
        for left in run_dir.glob(".config.yaml.*.tmp"):  # left by a run killed while writing it
            left.unlink(missing_ok=True)
        if resume is None and ckpt.list_checkpoints(ckpt_dir):
            raise RunDirError(
                f"{ckpt_dir} already holds checkpoints of an earlier run: pass --resume to continue it, or "
                "choose another --run-dir"
            )

    try:
        on_rank0(env, check_and_create, (RunDirError, OSError))
    except RunDirError:
        raise
    except OSError as e:
        raise RunDirError(f"--run-dir {run_dir}: cannot be made or written ({e})") from None
    try:
        ckpt.check_shared_dir(ckpt_dir, env)
    except OSError as e:
        raise RunDirError(f"checkpoint dir {ckpt_dir}: cannot be made or written ({e})") from None
    ckpt.remove_partial_checkpoints(ckpt_dir, env)


def commit_run_dir(run_dir: Path, cfg: Config, env: DistEnv, resume: Optional[str]) -> None:
    """Once the run is known to start (the model built, a checkpoint loaded): the run dir takes
    this run's config, and a fresh run drops the metrics of an earlier one that left no
    checkpoint. Not earlier: a run refused at start-up leaves the run dir as it found it."""

    def write() -> None:
        if resume is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            changed = config_changes(run_dir / "config.yaml", cfg)
            if changed:
                logger.warning("--resume with another config than the run's config.yaml: %s. The run continues with "
                               "the new one; to continue it as it was, pass the same --config and --set again",
                               "; ".join(changed))  # fmt: skip
        tmp = run_dir / f".config.yaml.{os.getpid()}.tmp"
        try:
            tmp.write_text(to_yaml(cfg))
            os.replace(tmp, run_dir / "config.yaml")
        finally:
            tmp.unlink(missing_ok=True)  # (a write that failed leaves nothing behind)

    try:
        on_rank0(env, write, (OSError,))
    except OSError as e:
        raise RunDirError(f"--run-dir {run_dir}: cannot be written ({e})") from None


def config_changes(path: Path, cfg: Config, limit: int = 8) -> List[str]:
    """``"key: old -> new"`` for each field of ``cfg`` that differs from the config a run wrote
    to ``path`` (nothing when there is none or it cannot be read; ``run_dir`` is not compared: the
    same directory may be given by another path)."""
    def flat(tree: object, prefix: str = "") -> dict:
        if not isinstance(tree, dict):
            return {prefix: tree}
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    try:
        old = flat(read_yaml(path, "the run's config"))
    except (FileNotFoundError, ValueError):
        return []
    new = flat(to_dict(cfg))
    changed = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in dict.fromkeys([*old, *new])
               if k != "run_dir" and old.get(k) != new.get(k)]  # fmt: skip
    return changed[:limit] + ([f"and {len(changed) - limit} more"] if len(changed) > limit else [])


def _config_error(e: Exception, this_rank_only: bool = False) -> int:
    """Says a config error found before any process group exists, and returns exit status 2.
    Under torchrun every rank meets it: rank 0 says it, the others wait a moment so that rank 0
    has said it before torchrun stops the workers; an error only this rank meets, it says itself."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or this_rank_only:
        print(f"robe-train: config error{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr)
    else:
        time.sleep(3)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        return _config_error(e)
    if args.run_dir is not None:
        cfg.run_dir = str(args.run_dir)
    if args.print_config:
        if os.environ.get("RANK", "0") == "0":  # (under torchrun: once, not once per rank)
            print(to_yaml(cfg), end="")
        return 0
    try:
        env = init_distributed(cfg.dist)
    except ConfigError as e:
        return _config_error(e, e.this_rank_only)
    setup_logging(env, cfg.logging.all_ranks)
    run_dir = cfg.resolved_run_dir
    logger.info("run %s: %d rank(s), %s, backend %s, run dir %s", cfg.name, env.world_size, env.device, env.backend, run_dir)
    trainer: Optional[Trainer] = None
    together = True  # False: this rank leaves because of an error the others may not have met
    said: Optional[str] = None  # the one line this run ends with (rank 0 says it; a rank alone, itself)
    # a signal during start-up (making data, building the model) is kept for its end
    stop_request = StopRequest()
    stop_request.install()
    run_dir_lock = RunDirLock()
    made: List[Path] = []  # directories this run made before it was known to start
    try:
        if args.resume not in (None, "latest") and not Path(args.resume).is_dir():
            what = "is a file" if Path(args.resume).exists() else "does not exist"
            raise ckpt.CheckpointError(f"--resume {args.resume} {what}: expected a checkpoint directory "
                                       "(RUN_DIR/checkpoints/step_N), or --resume alone for the latest")  # fmt: skip
        for what, size in (("train.global_batch_size", cfg.train.global_batch_size), ("eval.batch_size", cfg.eval.batch_size)):
            check_divisible(size, what, env)  # (the evaluation's batches are cut at the end of training)
        check_device_settings(cfg, env)  # (before the data is made and the tables placed)
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        made = [p for p in (ckpt_dir, run_dir) if not p.exists()]  # removed again, if still empty, by a refusal
        prepare_run_dir(run_dir, cfg, env, args.resume, run_dir_lock)
        trainer = Trainer(cfg, env, run_dir, stop_request)
        if args.resume:
            trainer.resume(args.resume)
        signame = stop_request.agreed(env, 0)
        if signame:  # nothing trained since the checkpoint (if any) it started from
            if env.is_main:
                print(f"robe-train: interrupted by {signame} during start-up, before any step; nothing to save: "
                      "rerun the same command", file=sys.stderr)  # fmt: skip
            return 128 + signal.Signals[signame].value
        trainer.steps_per_epoch()  # (refused before the run dir's config.yaml and metrics.jsonl change)
        commit_run_dir(run_dir, cfg, env, args.resume)
        made = []
        trainer.run()
    except Diverged as e:
        said = str(e)
        if env.is_main:
            logger.error("%s", e)
        return EXIT_DIVERGED
    except Interrupted as e:
        said = f"robe-train: {e}"
        if env.is_main:
            print(said, file=sys.stderr)
        return 128 + signal.Signals[e.signame].value
    except ConfigError as e:  # found once the data or the machine is known; the same on every rank
        said = f"robe-train: config error: {e}"
        if env.is_main:
            logger.error("%s", said)
        return 2
    except MetricsError as e:  # rank 0 alone writes metrics.jsonl: no other rank will stop with it, none waits
        together, said = False, f"robe-train: {e}"
        logger.error("%s", said)
        return 2
    except (DataError, FileExistsError, RunDirError, PlacementError, ckpt.CheckpointError) as e:
        said = f"robe-train: {e}"
        if env.is_main:  # every rank meets the same error: rank 0 says it
            logger.error("%s", said)
        return 2
    except BaseException as e:  # a bug, out of memory, ...: possibly on this rank alone (env.shutdown)
        together = False
        if env.world_size > 1 and lost_a_peer(e):  # the rank that left says why: one line here, no traceback
            print(f"robe-train: rank {env.rank}: a collective failed because another rank stopped (its output "
                  f"says why): {' '.join(str(e).split())}", file=sys.stderr)  # fmt: skip
            time.sleep(PEER_LOST_WAIT_S)
            return EXIT_PEER_LOST
        raise
    finally:
        stop_request.uninstall()
        on_sigterm = signal.getsignal(signal.SIGTERM)
        if said is not None:
            # leaving with a status of our own, said in one line: torchrun, stopping this worker
            # because another left first, must not turn it into -15 ("none said why"); cli() keeps
            # it so until the process has exited
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run_dir_lock.release()
        if CommCounter._installed is not None:
            CommCounter._installed.uninstall()
        # the model holds the process group (TorchRec's ShardingEnv, the ROBE module's _pg) inside
        # reference cycles (TorchRec's PipelinedForward, module hooks): free it now, so that
        # destroy_process_group() destroys the group and joins gloo's threads, not the interpreter's
        # finalisation (or nothing, with the threads still running at exit)
        trainer = None
        gc.collect()
        # an error every rank should meet, met by this one alone after all: rank 0 has not said it
        alone = None if said is None or env.is_main else (
            f"robe-train: rank {env.rank}: {said.removeprefix('robe-train: ')} (the other ranks did not stop "
            f"with it within {SHUTDOWN_WAIT_S:.0f} s; ending the job)")  # fmt: skip
        shutdown(wait_for_all=together, timeout_s=None if said is None else SHUTDOWN_WAIT_S, alone=alone)
        if said is not None and env.is_main:  # refused at start-up: the run dir as it was found, not an empty one
            for path in made:
                with contextlib.suppress(OSError):  # (not empty: something else is there, kept)
                    path.rmdir()
        signal.signal(signal.SIGTERM, on_sigterm)
    return 0


def cli() -> None:
    """Console entry point (``robe-train``, ``python -m robe_dist.train``): ``main()``'s status.

    ``main()`` destroys the process group before it returns, with nothing left holding it: the
    ROBE module's gradient hook refers to it weakly and the model's reference cycles are collected
    first, so gloo's threads are joined there, not during interpreter finalisation (where an
    earlier version saw rank 1 abort now and then, and left through ``os._exit``;
    tests/integration/test_faults.py checks that no gloo thread outlives ``main()``). A status
    that robe-train has explained in one line is not replaced by torchrun's SIGTERM while the
    interpreter exits (``main()`` ignores it while it leaves; so does this, until the exit).
    """
    code = main()
    if code != 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    cli()
