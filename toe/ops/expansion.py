"""Token Expansion: pure tensor functions and a parameter-free module. No training or host knowledge here.

Layout: tokens are ``[B, p + n + s, D]`` with ``p`` prefix tokens (CLS, distillation, registers, VPT's prompts)
first, ``n`` patch tokens, and ``s`` suffix tokens last (YOLOS's detection tokens; none elsewhere). The operator keeps
the prefix and the suffix aside, picks ``m`` patch tokens (spatial seeds, then the widest tokens in sub-steps),
mean-merges every leftover patch token into its most similar kept token and returns ``[B, p + m + s, D]`` plus the
positions of the kept tokens in the input.

The selection keeps each token's best score to the selected set and updates it with the score columns of the
tokens each sub-step adds, which equals the official code's recomputation because ``max`` is exact. Index
work runs under ``no_grad``; only the final ``index_select`` and ``index_add`` touch the values, so gradients reach
kept and merged tokens alike. No host-device synchronisation: every size comes from the schedule.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from toe.ops.schedule import ExpansionSchedule
from toe.ops.tokens import BlockTokens, reduced_block_tokens

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


def flat_rows(idx: torch.Tensor, rows_per_item: int) -> torch.Tensor:
    """Row numbers in a ``[B * rows_per_item, D]`` view for per-item positions ``idx [B, m]``."""
    base = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * rows_per_item
    return (idx + base).reshape(-1)


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``tokens[b, idx[b]]`` for ``idx [B, m]`` (or ``[m]`` shared by the batch).

    Row-wise ``index_select`` on the flattened ``[B * N, D]`` view: on CPU it is 5-20x faster than ``gather``
    with an index expanded over ``D``, and its backward is an ``index_add``.
    """
    batch, rows, dim = tokens.shape
    if idx.dim() == 1:
        return tokens.index_select(1, idx)
    flat = tokens.reshape(batch * rows, dim)  # a view for contiguous tokens
    return flat.index_select(0, flat_rows(idx, rows)).view(batch, -1, dim)


@torch.no_grad()
def select_tokens(
    patches: torch.Tensor,
    seeds: torch.Tensor,
    substeps: List[int],
    distance: str = "cosine",
    expand: str = "widest",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose the kept patch tokens.

    Each token's best score against the selected set, and which selected token gives it, are updated with the
    score columns of the tokens each sub-step adds: ``n x m`` work rather than ``n x n``, and no score matrix is
    kept. A later column wins only if strictly better, so ties go to the earliest kept token, as ``argmax`` does.

    Args:
     - patches: ``[B, n, D]`` patch tokens (no prefix).
     - seeds: ``[n0]`` positions shared by the batch, or ``[B, n0]``.
     - substeps: tokens added by each expansion sub-step, in order.
    Returns:
     - keep ``[B, m]``: seeds then expanded tokens in the order they were added.
     - rest ``[B, n - m]``: the other positions, ascending.
     - nearest ``[B, n]``: for every token, the index in ``keep`` of its best-scoring kept token (the merge target).
    """
    batch, n, _ = patches.shape
    normed = patches / patches.norm(dim=-1, keepdim=True)
    seeds = seeds.expand(batch, -1) if seeds.dim() == 1 else seeds
    selected = torch.zeros(batch, n, dtype=torch.bool, device=patches.device)
    selected.scatter_(1, seeds, True)
    best, nearest = pairwise_score(normed, gather_tokens(normed, seeds), distance).max(dim=-1)
    keep, num_kept = [seeds], seeds.shape[-1]
    for size in substeps:
        if size == 0:
            continue
        if expand == "widest":
            candidate = best.masked_fill(selected, float("inf"))
        else:
            candidate = torch.rand(batch, n, device=patches.device).masked_fill(selected, float("inf"))
        added = candidate.topk(size, dim=-1, largest=False, sorted=True).indices
        selected.scatter_(1, added, True)
        block_best, block_arg = pairwise_score(normed, gather_tokens(normed, added), distance).max(dim=-1)
        better = block_best > best
        best = torch.where(better, block_best, best)
        nearest = torch.where(better, block_arg + num_kept, nearest)
        keep.append(added)
        num_kept += size
    keep_idx = torch.cat(keep, dim=1)
    rest_idx = torch.argsort(selected.to(torch.int8), dim=1, stable=True)[:, : n - num_kept]
    return keep_idx, rest_idx, nearest


def merge_tokens(
    x: torch.Tensor,
    positions: torch.Tensor,
    rest_positions: torch.Tensor,
    targets: Optional[torch.Tensor],
) -> torch.Tensor:
    """Tokens of ``x`` at ``positions [B, k]``; rest tokens are averaged into ``targets [B, r]`` (indices into
    ``positions``), or dropped when ``targets`` is ``None``.

    The mean counts the kept token once, as the official ``scatter_reduce(..., "mean", include_self=True)``:
    ``(x_s + sum of assigned x_u) / (1 + #assigned)``, here with ``index_add`` (faster on CPU, and no host sync on
    CUDA). Gradients reach kept and merged tokens.
    """
    kept = gather_tokens(x, positions)
    if targets is None or rest_positions.shape[1] == 0:
        return kept
    batch, num_kept, dim = kept.shape
    rows = flat_rows(targets, num_kept)
    with torch.no_grad():
        counts = torch.ones(batch * num_kept, 1, dtype=kept.dtype, device=kept.device)
        counts.index_add_(0, rows, torch.ones(rows.shape[0], 1, dtype=kept.dtype, device=kept.device))
    rest = gather_tokens(x, rest_positions).reshape(-1, dim)
    sums = kept.reshape(batch * num_kept, dim).index_add(0, rows, rest)
    return (sums / counts).view(batch, num_kept, dim)


def expand_tokens(
    x: torch.Tensor, schedule: ExpansionSchedule, stage: int, num_prefix_tokens: int = 1, num_suffix_tokens: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply ToE at ``stage`` to ``x`` ``[B, p + n + s, D]``; returns ``(y [B, p + m + s, D], idx [B, p + m + s])``.

    ``idx`` holds positions in ``x``: ``0..p-1`` for the prefix tokens, then the kept patch tokens shifted by ``p``,
    then ``p+n..p+n+s-1`` for the suffix tokens, which the official YOLOS code splits off before the operator and
    appends again after it, as this does. Identity stages return ``x`` itself and ``arange(p + n + s)``.
    """
    batch, total, _ = x.shape
    if schedule.is_identity(stage):
        return x, torch.arange(total, device=x.device).expand(batch, -1)
    p, s = num_prefix_tokens, num_suffix_tokens
    x = x.contiguous()
    n = total - p - s
    patches = x[:, p : p + n]
    if schedule.init == "spatial":
        seeds = spatial_seeds(n, schedule.init_keep_rate, x.device)
    else:
        seeds = random_seeds(batch, n, schedule.num_seeds(n), x.device)
    keep_idx, rest_idx, nearest = select_tokens(
        patches, seeds, schedule.substeps(n, stage), schedule.distance, schedule.expand
    )
    pieces = [torch.arange(p, device=x.device).expand(batch, -1), keep_idx + p]
    if s:
        pieces.append(torch.arange(p + n, total, device=x.device).expand(batch, -1))
    positions = torch.cat(pieces, dim=1)
    targets = nearest.gather(1, rest_idx) + p if schedule.merge == "mean" else None
    return merge_tokens(x, positions, rest_idx + p, targets), positions


def unexpand(x: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Put the reduced tokens ``x`` ``[B, m, D]`` back at their positions ``idx`` ``[B, m]`` (as
    :func:`expand_tokens` returns them) in a ``[B, n, D]`` sequence; positions that were merged away are zeros, as
    the official code restores them for LV-ViT's dense head. The counterpart of ToMe's ``unmerge``."""
    if idx.shape[1] == n:  # identity stage: nothing was reduced
        return x
    restored = x.new_zeros(x.shape[0], n, x.shape[2])
    return restored.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]), x)


class TokenExpansion(nn.Module):
    """Parameter-free ToE operator; the stage comes from :meth:`set_epoch`.

    Identity in stage 0, in a last stage whose kept rate is 1.0, and in eval mode unless ``sparse_eval``.
    ``num_suffix_tokens`` trailing tokens (YOLOS's detection tokens) are kept aside like the prefix.
    """

    def __init__(
        self,
        schedule: ExpansionSchedule,
        num_prefix_tokens: int = 1,
        sparse_eval: bool = False,
        num_suffix_tokens: int = 0,
    ):
        super().__init__()
        self.schedule = schedule
        self.num_prefix_tokens = num_prefix_tokens
        self.num_suffix_tokens = num_suffix_tokens
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

    def block_tokens(self, num_patches: int, depth: int) -> BlockTokens:
        """(tokens into the attention, tokens into the MLP) of each block, prefix and suffix included, now: the
        first block sees every token, the others the kept ones."""
        aside = self.num_prefix_tokens + self.num_suffix_tokens
        return reduced_block_tokens(aside, num_patches, self.kept_tokens(num_patches), depth)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        stage = self.stage if self.is_active() else 0
        return expand_tokens(x, self.schedule, stage, self.num_prefix_tokens, self.num_suffix_tokens)

    def extra_repr(self) -> str:
        suffix = f", num_suffix_tokens={self.num_suffix_tokens}" if self.num_suffix_tokens else ""
        return f"stage={self.stage}, num_prefix_tokens={self.num_prefix_tokens}{suffix}, schedule={self.schedule}"
