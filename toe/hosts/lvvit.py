"""Token reduction on LV-ViT (:mod:`toe.models.lvvit`), whose dense head of token labeling needs every position.

ToE: the operator after the first block, and after the final norm the reduced tokens are put back at their
positions (:func:`toe.ops.expansion.unexpand`, zeros where tokens were merged away), as the official ToE code does.
Token Merging: merges inside every block, and every position gets the token that holds it (ToMe's unmerge).
PatchDropout: the kept tokens go back to their positions after the norm, zeros where tokens were dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from toe.hosts.merge import check_attention, merge_block
from toe.hosts.swap import add_mixin
from toe.ops.expansion import TokenExpansion, unexpand
from toe.ops.merging import TokenMerging, merge_destinations, unmerge
from toe.ops.patch_dropout import ScheduledPatchDropout


def host_type() -> type:
    from toe.models.lvvit import LVViT

    return LVViT


class ExpandLVViT(nn.Module):
    """Mixin for ``LVViT``.

    Modifications:
     - ``forward_tokens`` runs ``self.token_expansion`` on the first block's output, the other blocks on the
       reduced tokens, and restores every position after the norm.
    """

    token_expansion: TokenExpansion

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        positions = x.shape[1]
        x, index = self.token_expansion(self.blocks[0](x))
        for block in self.blocks[1:]:
            x = block(x)
        return unexpand(self.norm(x), index, positions)


def apply(model: nn.Module, op: TokenExpansion) -> None:
    add_mixin(model, ExpandLVViT)
    model.token_expansion = op


class MergeLVViT(nn.Module):
    """Mixin for ``LVViT``: Token Merging between the attention and the MLP of every block.

    Modifications:
     - ``forward_tokens`` runs each block with :func:`toe.hosts.merge.merge_block` (its residual branches divided
       by ``skip_lam``, as LV-ViT's), carries the token sizes from block to block, and after the norm gives every
       position the token that holds it (ToMe's unmerge), so the dense head sees every position.
    """

    token_merging: TokenMerging

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        size = source = None
        for index, block in enumerate(self.blocks):
            x, size, matching = merge_block(
                block,
                index,
                self.token_merging,
                x,
                size,
                lambda y, b=block: b.drop_path(y) / b.skip_lam,
                lambda y, b=block: b.drop_path(b.mlp(b.norm2(y))) / b.skip_lam,
            )
            if matching is not None:
                dest = merge_destinations(matching)
                source = dest if source is None else dest.gather(1, source)
        return unmerge(self.norm(x), source)


def apply_merging(model: nn.Module, op: TokenMerging) -> None:
    for block in model.blocks:
        check_attention(block.attn)
    add_mixin(model, MergeLVViT)
    model.token_merging = op


class DropLVViT(nn.Module):
    """Mixin for ``LVViT``: scheduled PatchDropout before the first block.

    Modifications:
     - ``forward_tokens`` drops tokens with ``self.patch_drop`` (timm's PatchDropout), runs the blocks on the kept
       ones and after the norm puts them back at their positions, zeros where tokens were dropped.
    """

    patch_drop: ScheduledPatchDropout

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        positions, prefix = x.shape[1], self.num_prefix_tokens
        x, kept = self.patch_drop.forward_with_indices(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if kept is None:
            return x
        index = torch.cat([torch.arange(prefix, device=x.device).expand(x.shape[0], -1), kept + prefix], dim=1)
        return unexpand(x, index, positions)


def apply_patch_dropout(model: nn.Module, op: ScheduledPatchDropout) -> None:
    add_mixin(model, DropLVViT)
    model.patch_drop = op
