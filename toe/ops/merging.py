"""Token Merging (ToMe; Bolya et al., ICLR 2023) by bipartite soft matching: pure tensor functions and a
parameter-free module, written from the paper's algorithm. No training or host knowledge here.

Layout: tokens are ``[B, p + n + s, D]`` with ``p`` prefix tokens first and ``s`` suffix tokens last (YOLOS's
detection tokens), neither ever merged. In a block, the ``n`` patch tokens
alternate between set A (even offsets) and set B (odd offsets); each token of A is scored against every token of B
by the cosine similarity of a metric (the attention keys, averaged over heads); the ``r`` tokens of A whose best
score is highest are merged into their best partner of B by a size-weighted mean, where a token's size is how many
input patches it holds. Output order: prefix, the A tokens that stay, B, suffix. Matching runs under ``no_grad``; only
the gathers and the ``index_add`` that apply it touch the values, so gradients reach every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from toe.ops.expansion import flat_rows, gather_tokens
from toe.ops.schedule import MergeSchedule
from toe.ops.tokens import BlockTokens


def merge_count(n: int, r: int) -> int:
    """Tokens merged away of ``n`` patch tokens for a requested ``r``: at most ``n // 2``, as ToMe clamps it."""
    return max(0, min(int(r), n // 2))


def block_r(r: float, index: int) -> int:
    """Tokens block ``index`` merges for a rate of ``r`` per block: ``r`` itself when it is whole; a fractional
    ``r`` (e.g. 4.5) spreads its tokens over the blocks, ``floor((l + 1) r) - floor(l r)`` in block ``l`` (4, 5, 4,
    5, ...), so that train FLOPs can be matched finer than one token per block. The ``1e-4`` absorbs the rounding
    of ``r`` to 6 decimals."""
    return math.floor((index + 1) * r + 1e-4) - math.floor(index * r + 1e-4)


@dataclass(frozen=True)
class Matching:
    """One bipartite soft matching of ``total = p + n + s`` tokens.

    - unmerged ``[B, |A| - r]``: indices into A of the tokens that stay, highest score first
    - merged ``[B, r]``: indices into A of the tokens merged away
    - into ``[B, r]``: for each merged token, the index into B of its partner
    """

    num_prefix_tokens: int
    total: int
    unmerged: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor
    num_suffix_tokens: int = 0

    @property
    def num_patches(self) -> int:
        return self.total - self.num_prefix_tokens - self.num_suffix_tokens

    @property
    def r(self) -> int:
        return self.merged.shape[1]

    @property
    def num_b(self) -> int:
        return self.num_patches // 2

    @property
    def output_tokens(self) -> int:
        return self.total - self.r


@torch.no_grad()
def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_prefix_tokens: int = 1, num_suffix_tokens: int = 0
) -> Matching:
    """Match the patch tokens of ``metric`` ``[B, p + n + s, C]`` and choose the ``r`` (clamped by
    :func:`merge_count`) tokens of A to merge. Ties in the score keep the earlier token of A first (a stable
    sort)."""
    p, end = num_prefix_tokens, metric.shape[1] - num_suffix_tokens
    normed = metric[:, p:end] / metric[:, p:end].norm(dim=-1, keepdim=True)
    r = merge_count(normed.shape[1], r)
    a, b = normed[:, 0::2], normed[:, 1::2]
    best, partner = (a @ b.transpose(-1, -2)).max(dim=-1)  # [B, |A|]
    order = torch.argsort(best, dim=-1, descending=True, stable=True)
    merged, unmerged = order[:, :r], order[:, r:]
    return Matching(p, metric.shape[1], unmerged, merged, partner.gather(1, merged), num_suffix_tokens)


def _merge_sum(t: torch.Tensor, matching: Matching) -> torch.Tensor:
    """Prefix, A's staying tokens, B with each merged token of A added to its partner, suffix:
    ``[B, p + n - r + s, C]``."""
    p, batch, dim = matching.num_prefix_tokens, t.shape[0], t.shape[2]
    t = t.contiguous()
    num_b = matching.num_b
    b_positions = torch.arange(num_b, device=t.device) * 2 + (p + 1)
    b = gather_tokens(t, b_positions).reshape(batch * num_b, dim)
    moved = gather_tokens(t, matching.merged * 2 + p).reshape(-1, dim)
    b = b.index_add(0, flat_rows(matching.into, num_b), moved).view(batch, num_b, dim)
    parts = [t[:, :p], gather_tokens(t, matching.unmerged * 2 + p), b]
    if matching.num_suffix_tokens:
        parts.append(t[:, matching.total - matching.num_suffix_tokens :])
    return torch.cat(parts, dim=1)


def merge_tokens(
    x: torch.Tensor, matching: Matching, size: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply ``matching`` to ``x`` ``[B, p + n, D]`` by a size-weighted mean; ``size`` ``[B, p + n, 1]`` (``None``:
    every token holds one patch). Returns the merged tokens ``[B, p + n - r, D]`` and their sizes."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    with torch.no_grad():
        merged_size = _merge_sum(size, matching)
    return _merge_sum(x * size, matching) / merged_size, merged_size


@torch.no_grad()
def merge_destinations(matching: Matching) -> torch.Tensor:
    """For every input token, the index of the output token that holds it: ``[B, p + n]``. Composed over blocks
    (``dest.gather(1, source)``) it maps each original position to its token, for :func:`unmerge`."""
    p, total, s = matching.num_prefix_tokens, matching.total, matching.num_suffix_tokens
    batch, device = matching.merged.shape[0], matching.merged.device
    num_a, num_b, stay = (matching.num_patches + 1) // 2, matching.num_b, matching.unmerged.shape[1]
    dest_a = torch.empty(batch, num_a, dtype=torch.long, device=device)
    dest_a.scatter_(1, matching.unmerged, (torch.arange(stay, device=device) + p).expand(batch, -1))
    dest_a.scatter_(1, matching.merged, matching.into + p + stay)
    dest = torch.empty(batch, total, dtype=torch.long, device=device)
    dest[:, :p] = torch.arange(p, device=device)
    dest[:, p : total - s : 2] = dest_a
    dest[:, p + 1 : total - s : 2] = torch.arange(num_b, device=device) + p + stay
    if s:
        dest[:, total - s :] = torch.arange(s, device=device) + p + stay + num_b
    return dest


@torch.no_grad()
def merged_positions(positions: torch.Tensor, matching: Matching) -> torch.Tensor:
    """Token-space positions ``[B, p + n - r]`` (:mod:`toe.ops.positions`) of the merged tokens, in the order
    :func:`merge_tokens` returns them, from those of its input ``positions [B, p + n]``: a merged token keeps its
    destination's position (ToMe merges A into B), every other token its own."""
    p, end = matching.num_prefix_tokens, matching.total - matching.num_suffix_tokens
    positions = positions.contiguous()
    staying = positions.gather(1, matching.unmerged * 2 + p)
    return torch.cat([positions[:, :p], staying, positions[:, p + 1 : end : 2], positions[:, end:]], dim=1)


def unmerge(x: torch.Tensor, source: Optional[torch.Tensor]) -> torch.Tensor:
    """Tokens back at every original position: position ``i`` gets the token ``source[:, i]`` that holds it
    (ToMe's ``unmerge``, for dense heads); ``source`` ``None`` means nothing was merged."""
    return x if source is None else gather_tokens(x, source)


def merging_block_tokens(num_patches: int, depth: int, r: float, num_prefix_tokens: int = 1) -> BlockTokens:
    """(tokens into the attention, tokens into the MLP) of each block when every block merges its share of ``r``,
    the tokens kept aside (``num_prefix_tokens``: prefix and suffix) included."""
    p, n, counts = num_prefix_tokens, num_patches, []
    for index in range(depth):
        merged = merge_count(n, block_r(r, index))
        counts.append((p + n, p + n - merged))
        n -= merged
    return counts


class TokenMerging(nn.Module):
    """Parameter-free ToMe operator shared by every block of a host; ``r`` per stage comes from :meth:`set_epoch`.

    Merges only in training, unless ``sparse_eval``. ``prop_attn`` weights each key's attention by its token's
    size (the paper's proportional attention). ``sizes`` holds, per block index, the sizes of that block's input
    tokens in the current forward; each block writes its successor's, so a block re-run by gradient checkpointing
    reads the same sizes it read the first time.
    """

    def __init__(
        self,
        schedule: MergeSchedule,
        num_prefix_tokens: int = 1,
        prop_attn: bool = True,
        sparse_eval: bool = False,
        num_suffix_tokens: int = 0,
    ):
        super().__init__()
        self.schedule = schedule
        self.num_prefix_tokens = num_prefix_tokens
        self.num_suffix_tokens = num_suffix_tokens
        self.prop_attn = prop_attn
        self.sparse_eval = sparse_eval
        self.stage = 0
        self.sizes: Dict[int, Optional[torch.Tensor]] = {}

    def set_epoch(self, epoch: int) -> int:
        self.stage = self.schedule.stage_at(epoch)
        return self.stage

    @property
    def r(self) -> float:
        """Tokens merged per block now: the stage's ``r`` in training (or with ``sparse_eval``), else 0."""
        return self.schedule.r(self.stage) if (self.training or self.sparse_eval) else 0

    def block_tokens(self, num_patches: int, depth: int) -> BlockTokens:
        """(tokens into the attention, tokens into the MLP) of each block, prefix included, now."""
        return merging_block_tokens(num_patches, depth, self.r, self.num_prefix_tokens + self.num_suffix_tokens)

    def forward(
        self, x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor], index: int
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[Matching]]:
        """Merge block ``index``'s share of ``self.r`` (:func:`block_r`) tokens of ``x``, matched on ``metric``;
        returns ``(x, size, matching)`` (``matching`` ``None`` when nothing is merged)."""
        r = block_r(self.r, index)
        if r <= 0 or x.shape[1] - self.num_prefix_tokens - self.num_suffix_tokens < 2:
            return x, size, None
        matching = bipartite_soft_matching(metric, r, self.num_prefix_tokens, self.num_suffix_tokens)
        x, size = merge_tokens(x, matching, size)
        return x, size, matching

    def extra_repr(self) -> str:
        return (
            f"stage={self.stage}, r={self.r}, prop_attn={self.prop_attn}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, schedule={self.schedule}"
        )
