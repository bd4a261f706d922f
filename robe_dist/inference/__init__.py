"""Inference: ``robe-export`` (``robe_dist.inference.export``: a checkpoint -> one torch.export
file) and ``robe-predict`` (``robe_dist.inference.predict``: score a dataset with it). Nothing is
imported here, so that ``python -m robe_dist.inference.export`` runs its module once."""
