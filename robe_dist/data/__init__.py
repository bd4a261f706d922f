"""Criteo data for robe_dist (docs/data.md; command line: ``robe-data``).

Modules: ``criteo`` (constants), ``parse``/``reader``/``ingest`` (raw text -> .npy), ``layout`` and
``npy`` (on-disk format, manifest), ``synthetic``/``planted``/``rawtext`` (generated data with a
known best AUC), ``vocab`` (dense ids for full tables), ``dataset`` (TorchRec batches), ``cli``.
Nothing is imported here, so ``import robe_dist.data.X`` loads only what X needs.
"""
