"""The pieces of ``robe_dist.train``: process group, data, model, optimiser, evaluation,
checkpoints and metrics logging, one small module each."""
