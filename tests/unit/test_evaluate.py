"""The evaluation metrics' own arithmetic (their gathering over ranks: tests/integration/test_train.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robe_dist.trainer.evaluate import EvalMetrics


def test_row_count_and_log_loss_stay_exact_past_2_to_the_24_rows():
    """CriteoTB's val split has 89,137,319 rows; a float32 sum counted 89,137,320."""
    metrics = EvalMetrics(torch.device("cpu"))
    rows, batch = 89_137_319, 16384
    for n in [batch] * (rows // batch) + [rows % batch]:  # the count only: the same update per batch
        metrics.samples.update(torch.tensor(float(n)))
    assert int(metrics.samples.compute()) == rows

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4096, generator=g) * 3, torch.randint(0, 2, (4096,), generator=g).float()
    metrics = EvalMetrics(torch.device("cpu"))
    for part in range(4):
        metrics.update(logits[part * 1024 : (part + 1) * 1024], labels[part * 1024 : (part + 1) * 1024])
    out = metrics.compute()
    assert out["eval_samples"] == 4096
    expected = F.binary_cross_entropy_with_logits(logits.double(), labels.double()).item()
    assert abs(out["logloss"] - expected) < 1e-7


def test_accuracy_thresholds_the_probability_not_the_logit():
    # logits in (0, 0.5): every probability is above 0.5 (predicted 1), every logit below it
    g = torch.Generator().manual_seed(1)
    logits, labels = 0.05 + 0.4 * torch.rand(1000, generator=g), torch.randint(0, 2, (1000,), generator=g).float()
    metrics = EvalMetrics(torch.device("cpu"))
    metrics.update(logits, labels)
    out = metrics.compute()
    assert out["accuracy"] == ((torch.sigmoid(logits) > 0.5).float() == labels).float().mean().item() == labels.mean().item()
