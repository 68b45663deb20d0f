"""A plain, slow, loop-based ToE written straight from the method description (the ToE paper, arXiv 2404.00672,
and its official code, Osilly/TokenExpansion).

It exists to check :mod:`toe.ops.expansion` and to time it against; it is never used for training. One image at a
time, Python lists for the selected and unselected sets, scores recomputed from scratch at every sub-step.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from toe.ops.schedule import ExpansionSchedule


def _score(u: torch.Tensor, s: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return u @ s.T
    diff = u[:, None, :] - s[None, :, :]
    if distance == "manhattan":
        return diff.abs().sum(-1)
    return (diff**2).sum(-1).sqrt()


def reference_expand_tokens(
    x: torch.Tensor,
    schedule: ExpansionSchedule,
    stage: int,
    num_prefix_tokens: int = 1,
    seeds: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`toe.ops.expansion.expand_tokens`; ``seeds [B, n0]`` overrides the spatial seeds."""
    batch, total, _ = x.shape
    p = num_prefix_tokens
    if schedule.is_identity(stage):
        return x, torch.arange(total).expand(batch, -1)
    n = total - p
    outputs, indices = [], []
    for b in range(batch):
        tokens = x[b, p:]
        if seeds is None:
            stride, count = schedule.seed_stride(), schedule.num_seeds(n)
            selected = [i for i in range(n) if i % stride == 0][:count]
        else:
            selected = [int(i) for i in seeds[b]]
        unselected = [i for i in range(n) if i not in selected]
        normed = (tokens / tokens.norm(dim=-1, keepdim=True)).detach()  # choosing tokens is not differentiable
        for size in schedule.substeps(n, stage):
            if size == 0:
                continue
            scores = _score(normed[unselected], normed[selected], schedule.distance)
            nearest = scores.max(dim=-1).values
            order = sorted(range(len(unselected)), key=lambda j: float(nearest[j]))
            added = [unselected[j] for j in order[:size]]
            selected += added
            unselected = [i for i in unselected if i not in added]
        kept = [tokens[i] for i in selected]
        if schedule.merge == "mean" and unselected:
            scores = _score(normed[unselected], normed[selected], schedule.distance)
            groups = {j: [tokens[selected[j]]] for j in range(len(selected))}
            for row, u in enumerate(unselected):
                groups[int(scores[row].argmax())].append(tokens[u])
            kept = [torch.stack(groups[j]).mean(0) for j in range(len(selected))]
        outputs.append(torch.cat([x[b, :p], torch.stack(kept)]))
        indices.append(torch.tensor(list(range(p)) + [i + p for i in selected]))
    return torch.stack(outputs), torch.stack(indices)
