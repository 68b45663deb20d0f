"""Token Expansion: pure tensor functions and a parameter-free module. No training or host knowledge here.

Layout: tokens are ``[B, p + n, D]`` with ``p`` prefix tokens (CLS, distillation, registers) first and ``n`` patch
tokens after them. The operator keeps the prefix aside, picks ``m`` patch tokens (spatial seeds, then the widest
tokens in sub-steps), mean-merges every leftover patch token into its most similar kept token and returns
``[B, p + m, D]`` plus the positions of the kept tokens in the input.

The selection works on one score matrix per call: the best score of each token to the selected set is updated
incrementally after each sub-step, which equals the official code's recomputation because ``max`` is exact. Index
work runs under ``no_grad``; only the final gather and ``scatter_reduce`` touch the values, so gradients reach kept
and merged tokens alike. No host-device synchronisation: every size comes from the schedule.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .schedule import ExpansionSchedule


# A plain dict rather than functools.lru_cache: torch.compile traces through dict lookups without warnings.
_SEED_CACHE: Dict[Tuple[int, float], Tuple[int, ...]] = {}


def _spatial_seed_list(n: int, init_keep_rate: float) -> Tuple[int, ...]:
    key = (n, init_keep_rate)
    if key not in _SEED_CACHE:
        count = int(n * init_keep_rate)
        stride = int(1 // init_keep_rate)  # the official float floor-division: 1 // 0.2 == 4.0
        _SEED_CACHE[key] = tuple(range(0, n, stride))[:count]
    return _SEED_CACHE[key]


def spatial_seeds(n: int, init_keep_rate: float, device: torch.device) -> torch.Tensor:
    """Raster-order seed positions ``[n0]``: every ``int(1 // r0)``-th patch until ``int(n * r0)`` are taken."""
    return torch.tensor(_spatial_seed_list(n, init_keep_rate), dtype=torch.long, device=device)


def random_seeds(batch: int, n: int, count: int, device: torch.device) -> torch.Tensor:
    """Ablation: ``count`` random seed positions per image ``[B, n0]``, ascending like the spatial seeds."""
    return torch.rand(batch, n, device=device).argsort(dim=-1)[:, :count].sort(dim=-1).values


def pairwise_score(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Scores ``[B, Na, Nb]`` between L2-normalised tokens, as the official ``get_score``.

    ``cosine`` is a similarity. ``manhattan``/``euclidean`` are distances fed to the same max-and-ascending-sort
    logic, as the official code does: expansion then adds the tokens whose *farthest* selected token is nearest,
    and merging goes to the *farthest* selected token. This is reproduced on purpose, not mirrored.
    """
    if distance == "cosine":
        return a @ b.transpose(-1, -2)
    if distance == "manhattan":
        return torch.cdist(a, b, p=1.0)
    if distance == "euclidean":
        return torch.cdist(a, b, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    raise ValueError(f"unknown distance {distance!r}")


def _columns(scores: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``scores[b, :, cols[b]]`` for ``cols`` of shape ``[B, m]`` or ``[m]``."""
    if cols.dim() == 1:
        return scores[:, :, cols]
    return scores.gather(2, cols.unsqueeze(1).expand(-1, scores.shape[1], -1))


@torch.no_grad()
def select_tokens(
    patches: torch.Tensor,
    seeds: torch.Tensor,
    substeps: List[int],
    distance: str = "cosine",
    expand: str = "widest",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose the kept patch tokens.

    Args:
     - patches: ``[B, n, D]`` patch tokens (no prefix).
     - seeds: ``[n0]`` positions shared by the batch, or ``[B, n0]``.
     - substeps: tokens added by each expansion sub-step, in order.
    Returns:
     - keep ``[B, m]``: seeds then expanded tokens in the order they were added.
     - rest ``[B, n - m]``: the other positions, ascending.
     - scores ``[B, n, n]``: the pairwise score matrix, for the merge.
    """
    batch, n, _ = patches.shape
    normed = patches / patches.norm(dim=-1, keepdim=True)
    scores = pairwise_score(normed, normed, distance)
    seeds = seeds.expand(batch, -1) if seeds.dim() == 1 else seeds
    selected = torch.zeros(batch, n, dtype=torch.bool, device=patches.device)
    selected.scatter_(1, seeds, True)
    best = _columns(scores, seeds).amax(dim=-1)  # each token's top score against the selected set
    keep = [seeds]
    for size in substeps:
        if size == 0:
            continue
        if expand == "widest":
            candidate = best.masked_fill(selected, float("inf"))
        else:
            candidate = torch.rand(batch, n, device=patches.device).masked_fill(selected, float("inf"))
        added = candidate.topk(size, dim=-1, largest=False, sorted=True).indices
        selected.scatter_(1, added, True)
        best = torch.maximum(best, _columns(scores, added).amax(dim=-1))
        keep.append(added)
    keep_idx = torch.cat(keep, dim=1)
    num_rest = n - keep_idx.shape[1]
    rest_idx = torch.argsort(selected.to(torch.int8), dim=1, stable=True)[:, :num_rest]
    return keep_idx, rest_idx, scores


def merge_tokens(
    patches: torch.Tensor, keep_idx: torch.Tensor, rest_idx: torch.Tensor, scores: Optional[torch.Tensor]
) -> torch.Tensor:
    """Kept tokens ``[B, m, D]``; with ``scores``, each rest token is averaged into its best-scoring kept token.

    The mean counts the kept token once, as ``scatter_reduce(..., "mean", include_self=True)`` does in the
    official code: ``(x_s + sum of assigned x_u) / (1 + #assigned)``. ``scores=None`` drops the rest tokens.
    """
    dim = patches.shape[-1]
    kept = patches.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, dim))
    if scores is None or rest_idx.shape[1] == 0:
        return kept
    with torch.no_grad():
        rest_to_kept = _columns(scores, keep_idx).gather(
            1, rest_idx.unsqueeze(-1).expand(-1, -1, keep_idx.shape[1])
        )
        target = rest_to_kept.argmax(dim=-1)
    rest = patches.gather(1, rest_idx.unsqueeze(-1).expand(-1, -1, dim))
    return kept.scatter_reduce(1, target.unsqueeze(-1).expand(-1, -1, dim), rest, reduce="mean", include_self=True)


def expand_tokens(
    x: torch.Tensor, schedule: ExpansionSchedule, stage: int, num_prefix_tokens: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply ToE at ``stage`` to ``x`` ``[B, p + n, D]``; returns ``(y [B, p + m, D], idx [B, p + m])``.

    ``idx`` holds positions in ``x``: ``0..p-1`` for the prefix tokens, then the kept patch tokens shifted by ``p``.
    Identity stages return ``x`` itself and ``arange(p + n)``.
    """
    batch, total, _ = x.shape
    if schedule.is_identity(stage):
        return x, torch.arange(total, device=x.device).expand(batch, -1)
    p = num_prefix_tokens
    prefix, patches = x[:, :p], x[:, p:]
    n = total - p
    if schedule.init == "spatial":
        seeds = spatial_seeds(n, schedule.init_keep_rate, x.device)
    else:
        seeds = random_seeds(batch, n, schedule.num_seeds(n), x.device)
    keep_idx, rest_idx, scores = select_tokens(
        patches, seeds, schedule.substeps(n, stage), schedule.distance, schedule.expand
    )
    kept = merge_tokens(patches, keep_idx, rest_idx, scores if schedule.merge == "mean" else None)
    prefix_idx = torch.arange(p, device=x.device).expand(batch, -1)
    return torch.cat([prefix, kept], dim=1), torch.cat([prefix_idx, keep_idx + p], dim=1)


class TokenExpansion(nn.Module):
    """Parameter-free ToE operator; the stage comes from :meth:`set_epoch`.

    Identity in stage 0, in a last stage whose kept rate is 1.0, and in eval mode unless ``sparse_eval``.
    """

    def __init__(self, schedule: ExpansionSchedule, num_prefix_tokens: int = 1, sparse_eval: bool = False):
        super().__init__()
        self.schedule = schedule
        self.num_prefix_tokens = num_prefix_tokens
        self.sparse_eval = sparse_eval
        self.stage = 0

    def set_epoch(self, epoch: int) -> int:
        self.stage = self.schedule.stage_at(epoch)
        return self.stage

    def is_active(self) -> bool:
        return (self.training or self.sparse_eval) and not self.schedule.is_identity(self.stage)

    def kept_tokens(self, n: int) -> int:
        """Patch tokens after the op for ``n`` input patch tokens, in the current stage and mode."""
        return self.schedule.kept_tokens(n, self.stage) if self.is_active() else n

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        stage = self.stage if self.is_active() else 0
        return expand_tokens(x, self.schedule, stage, self.num_prefix_tokens)

    def extra_repr(self) -> str:
        return f"stage={self.stage}, num_prefix_tokens={self.num_prefix_tokens}, schedule={self.schedule}"
