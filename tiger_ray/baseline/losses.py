"""Softmax losses for the dual encoder: full-catalog and in-batch sampled with log-Q correction.

In-batch negatives are the other rows' targets, so popular items are sampled as negatives far more
often than rare ones and the model learns to push them down. The log-Q correction (Yi et al.,
"Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations", RecSys 2019)
subtracts log Q(j), the log probability that item j is drawn as a candidate, from every logit of
column j, which makes the sampled softmax an unbiased estimate of the full one's gradient.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def full_softmax_loss(queries: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                      scale: float = 1.0) -> torch.Tensor:
    """Cross-entropy over the whole catalog.

    queries [B, d]; items [N+1, d] indexed by item id (row 0 is padding and never a candidate);
    targets [B] item ids.
    """
    logits = scale * queries @ items.T
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets)


def in_batch_softmax_loss(queries: torch.Tensor, target_vectors: torch.Tensor, targets: torch.Tensor,
                          log_q: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """Sampled softmax whose candidates for row i are all the batch's targets.

    queries [B, d]; target_vectors [B, d] (vector of targets[j] in row j); targets [B] item ids;
    log_q [N+1] log sampling probability by item id. logit[i, j] = scale * <q_i, v_j> - log_q[t_j].
    When the same item is the target of rows i and j, column j is not a negative for row i and is
    masked out (otherwise the model would be pushed away from its own positive).
    """
    logits = scale * queries @ target_vectors.T
    if log_q is not None:
        logits = logits - log_q[targets].unsqueeze(0)
    same_item = targets.unsqueeze(0) == targets.unsqueeze(1)
    diagonal = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    logits = logits.masked_fill(same_item & ~diagonal, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(targets), device=targets.device))


def log_sampling_probability(targets: np.ndarray, num_items: int) -> torch.Tensor:
    """log Q by item id [N+1] from how often each item is a training target.

    An item appears among the in-batch candidates in proportion to its target frequency. Items that
    are never targets are never candidates, so their value does not matter; they get count 1 to
    keep the table finite.
    """
    return log_q_from_counts(np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_items + 1))


def log_q_from_counts(counts: np.ndarray) -> torch.Tensor:
    """log Q by item id [N+1] from target counts by item id (e.g. the streamed item_counts.npy)."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    counts[0] = 1.0
    return torch.from_numpy(np.log(counts / counts[1:].sum())).float()
