"""robe-export: a trained checkpoint -> one ``torch.export`` file that scores without the trainer.

    robe-export --checkpoint runs/tiny_synthetic/checkpoints/step_00000976 --out model.pt2
    robe-export --checkpoint RUN/checkpoints/step_N --out model_bf16.pt2 --dtype bf16 --data DATASET
                                          # bf16 array and tables; prints the validation AUC change

The checkpoint may come from any number of ranks (its DCP shards are gathered into one process, no
process group needed). The artifact holds the dense MLPs, the ROBE array, the full tables of a
mixed model and the hash constants (buffers of the module), captured with ``torch.export`` around
``ScoringModel``: ``(dense [B, 13] float32, values [N] int64, lengths [26 * B] int64) ->
probabilities [B]``, the KeyedJaggedTensor's layout (feature-major lengths). Loading it needs
``import robe_dist.ops`` (the lookup's custom op, FBGEMM's ops) and ``torch.export.load`` only;
``robe-predict`` does both. Its metadata (``robe_dist.json`` inside the file) says what it holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_dist.hashing import take_moduli

FORMAT_VERSION = 2
"""The newest artifact format this robe_dist writes and reads: 2 where the ROBE lookup has a
``block_align`` argument (an aligned model: older readers cannot load its graph), else 1;
robe-predict refuses newer ones."""
META_FILE = "robe_dist.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ValueError):
    """A checkpoint or artifact that cannot be exported or loaded; the message says why."""


def is_or_inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` (also through symbolic or hard links) or lies inside the
    directory ``other``: where an output must not go, lest it overwrite an input."""
    p, o = path.resolve(), other.resolve()
    if p == o or o in p.parents:
        return True
    try:
        return os.path.samefile(path, other)
    except OSError:  # one of them does not exist
        return False


class ScoringModel(nn.Module):
    """A trained DLRM as a scoring function of plain tensors (what is exported).

    Call args:
        dense (Tensor): ``[B, 13]`` float32 dense features (as the dataset yields them).
        values (Tensor): ``[N]`` int64 ids of the 26 sparse features, feature-major (a KJT's values).
        lengths (Tensor): ``[26 * B]`` int64 bag lengths, feature-major.

    Returns:
        Tensor: ``[B]`` click probabilities.

    Ids of the features in ``id_moduli`` are taken modulo their table size first, as the trainer
    did (full tables and the paper mapping; ``robe_dist.hashing.take_moduli``); the others
    are left as they are.
    """

    def __init__(self, dlrm: nn.Module, keys: List[str], id_moduli: Dict[str, int]) -> None:
        super().__init__()
        self.dlrm = dlrm
        self.keys = list(keys)
        self.register_buffer("moduli", torch.tensor([id_moduli.get(k, 0) for k in keys], dtype=torch.int64))
        self.capped = bool(id_moduli)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.capped:
            per_key = lengths.view(len(self.keys), -1).sum(1)
            values = take_moduli(values, torch.repeat_interleave(self.moduli, per_key, output_size=values.shape[0]))
        kjt = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths)
        return torch.sigmoid(self.dlrm(dense, kjt).squeeze(-1).float())


def checkpoint_parts(checkpoint: Path) -> Tuple[Any, Dict]:
    """The run's config and model spec saved in ``checkpoint``."""
    from robe_dist.train_config import load_config
    from robe_dist.trainer.checkpoint import MODEL_SPEC_FILE

    if not checkpoint.is_dir():
        raise ExportError(f"--checkpoint {checkpoint}: not a directory (a checkpoint is RUN/checkpoints/step_N)")
    for name in ("config.yaml", MODEL_SPEC_FILE, ".metadata"):
        if not (checkpoint / name).is_file():
            what = "written by robe_dist before model specs existed: retrain, or " if name == MODEL_SPEC_FILE else ""
            raise ExportError(f"--checkpoint {checkpoint}: no {name} ({what}not a complete robe-train checkpoint)")
    try:
        cfg = load_config(checkpoint / "config.yaml")
    except ValueError as e:
        raise ExportError(f"--checkpoint {checkpoint}: its config.yaml does not load: {e}") from None
    try:
        spec = json.loads((checkpoint / MODEL_SPEC_FILE).read_text())
    except ValueError as e:  # (json.JSONDecodeError)
        raise ExportError(f"--checkpoint {checkpoint}: its {MODEL_SPEC_FILE} is not valid JSON ({e})") from None
    return cfg, spec


def load_trained_model(checkpoint: Path) -> Tuple[ScoringModel, Dict[str, Any]]:
    """The checkpoint's model on CPU in one process (DCP shards of any world size gathered), as a
    ``ScoringModel`` in eval mode, and what it holds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from robe_dist.data.criteo import DEFAULT_CAT_NAMES
    from robe_dist.trainer.checkpoint import MODEL_SPEC_FILE, damaged_files
    from robe_dist.trainer.model import build_collection, build_dlrm, placeholder_hot_ids, tables_of_spec

    cfg, spec = checkpoint_parts(Path(checkpoint))
    try:
        tables = tables_of_spec(spec)
        collection = build_collection(cfg, tables, spec["robe_tables"], spec["array_size"], device=torch.device("cpu"),
                                      hot_ids=placeholder_hot_ids(spec))  # fmt: skip
        train_model = build_dlrm(cfg, collection, torch.device("cpu"))
    except (ValueError, KeyError, TypeError) as e:  # an edited config.yaml or model spec
        raise ExportError(
            f"--checkpoint {checkpoint}: its config.yaml and {MODEL_SPEC_FILE} do not describe a model robe_dist "
            f"can build ({type(e).__name__}: {e})"
        ) from None
    damage = damaged_files(checkpoint)
    if damage is not None:
        raise ExportError(f"--checkpoint {checkpoint}: damaged: {damage}")
    state = train_model.state_dict()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, checkpoint_id=str(checkpoint))
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException (a BaseException): missing keys, shapes
        raise ExportError(f"--checkpoint {checkpoint}: its tensors do not fit the model of its config: {str(e).strip()[:300]}") from None
    try:
        train_model.load_state_dict(state)  # the ROBE modules check their hash signature here
    except RuntimeError as e:  # e.g. a config.yaml edited to another robe.seed or mapping
        raise ExportError(f"--checkpoint {checkpoint}: {str(e).strip().splitlines()[0]}") from None
    dlrm = train_model.model
    model = ScoringModel(dlrm, list(DEFAULT_CAT_NAMES), spec["id_moduli"]).eval()
    info = {
        "format_version": 2 if spec["robe_tables"] and cfg.robe.block_align > 1 else 1,
        "checkpoint": str(checkpoint), "arch": cfg.model.arch,
        "embedding_dim": cfg.model.embedding_dim, "tables": len(tables), "robe_tables": spec["robe_tables"],
        "array_size": spec["array_size"], "full_tables": [t.name for t in tables if t.name not in spec["robe_tables"]],
        "hash": cfg.robe.hash if spec["robe_tables"] else None, "robe_seed": cfg.robe.seed if spec["robe_tables"] else None,
        "block_size": cfg.robe.block_size if spec["robe_tables"] else None,
        "block_align": cfg.robe.block_align if spec["robe_tables"] else None, "id_moduli": spec["id_moduli"],
        "data": cfg.data.path or "synthetic", "multi_hot": cfg.data.multi_hot, "ids": spec.get("ids", "raw"),
        "vocab": spec.get("vocab"), "hot_rows": dict(spec.get("hot_rows", {})),
        "embedding_floats": sum(p.numel() for n, p in dlrm.named_parameters() if n.startswith("sparse_arch.")),
    }  # fmt: skip
    return model, info


def example_inputs(batch: int = 4, keys: int = 26, device: torch.device = torch.device("cpu")) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.ones(keys * batch, dtype=torch.int64, device=device)
    return torch.zeros(batch, 13, device=device), torch.zeros(keys * batch, dtype=torch.int64, device=device), lengths


def export_model(model: ScoringModel, info: Dict[str, Any], out: Path, dtype: str = "fp32",
                 device: torch.device = torch.device("cpu")) -> Dict[str, Any]:  # fmt: skip
    """Casts the embeddings to ``dtype``, captures ``model`` (on ``device``) with ``torch.export``
    (dynamic batch and id count) and writes it to ``out`` atomically; returns the metadata written."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype != "fp32":
        for p in model.dlrm.sparse_arch.parameters():  # the ROBE array and full tables; MLPs stay fp32
            p.data = p.data.to(DTYPES[dtype])
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    n = torch.export.Dim("ids", min=1, max=1 << 34)
    with torch.no_grad():
        ep = torch.export.export(
            model, example_inputs(device=device), dynamic_shapes={"dense": {0: batch}, "values": {0: n}, "lengths": {0: torch.export.Dim.AUTO}},
            strict=False,
        )  # fmt: skip
    meta = dict(info, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    # beside ``out`` (so that the rename is atomic), hidden, and ending in .pt2 as torch.export.save expects
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.pt2")
    try:
        torch.export.save(ep, str(tmp), extra_files={META_FILE: json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # (after the rename there is nothing left to remove)
    meta["bytes"] = out.stat().st_size
    return meta


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="robe-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a robe-train checkpoint dir (RUN/checkpoints/step_N)")
    p.add_argument("--out", type=Path, required=True, help="the artifact to write (e.g. model.pt2)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="storage type of the ROBE array and tables")
    p.add_argument("--data", type=Path, default=None,
                   help="a dataset (npy layout): score its validation split with the fp32 model and the artifact and print both AUCs")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from robe_dist.data.layout import DataError

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # "is_fx_tracing will return true ...", every export
    # TorchRec's full tables split the KJT by key while exported: a one-time cost it warns of on the root logger
    logging.getLogger().addFilter(lambda record: "non-strict torch.export KJT to_dict" not in record.getMessage())

    try:
        if is_or_inside(args.out, args.checkpoint):
            raise ExportError(
                f"--out {args.out}: is the --checkpoint directory {args.checkpoint} or inside it; the artifact would "
                "overwrite or add to the checkpoint: write it elsewhere"
            )
        if args.data is not None and is_or_inside(args.out, args.data):
            raise ExportError(f"--out {args.out}: is the --data dataset {args.data} or inside it: write the artifact elsewhere")
        if args.out.is_dir():
            raise ExportError(f"--out {args.out}: is a directory; give the artifact's file name (e.g. {args.out / 'model.pt2'})")
        model, info = load_trained_model(args.checkpoint)
        if args.data is not None:
            from robe_dist.inference.predict import check_dataset_ids

            check_dataset_ids(info, args.data)
        reference = None
        if args.data is not None and args.dtype != "fp32":
            from robe_dist.inference.predict import metrics, score_split

            probs, labels = score_split(model, args.data, "val", 16384, info["multi_hot"])
            reference = metrics(probs, labels)["auc"]
        meta = export_model(model, info, args.out, args.dtype)
        if args.data is not None:
            from robe_dist.inference.predict import load_artifact, metrics, score_split

            exported, _ = load_artifact(args.out)
            probs, labels = score_split(exported, args.data, "val", 16384, info["multi_hot"])
            auc = metrics(probs, labels)["auc"]
    except (ExportError, DataError, FileNotFoundError) as e:
        print(f"robe-export: {e}", file=sys.stderr)
        return 2
    full = len(meta["full_tables"])
    print(
        f"robe-export: wrote {args.out} ({meta['bytes']:,} bytes, {meta['dtype']}): {meta['arch']} with "
        f"{meta['embedding_floats']:,} embedding floats"
        + (f", a ROBE array of {meta['array_size']:,} floats for {len(meta['robe_tables'])} tables "
           f"({meta['hash']} mapping, Z={meta['block_size']}"
           + (f", starts aligned to {meta['block_align']}" if (meta.get("block_align") or 1) > 1 else "") + ")"
           if meta["robe_tables"] else "")
        + (f", exact rows for {sum(meta['hot_rows'].values()):,} hot ids of {len(meta['hot_rows'])} of them"
           if meta.get("hot_rows") else "")
        + (f", {full} full tables" if full else "")
    )  # fmt: skip
    if args.data is not None and auc != auc:  # NaN: one label class
        print(f"robe-export: validation AUC of the artifact on {args.data}: undefined (every label is the same)")
    elif args.data is not None:
        change = f" (fp32 {reference:.4f}, change {auc - reference:+.5f})" if reference is not None else ""
        print(f"robe-export: validation AUC of the artifact on {args.data}: {auc:.4f}{change}")
    return 0


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
