"""Token reduction on timm's ``VisionTransformer`` (DeiT-T/S/B).

ToE works on any model whose ``blocks[0]`` maps ``[B, p + n, D]`` tokens to tokens of the same shape: the first
block's class gets a subclass that calls the original ``forward`` (no copied body, so LayerScale, drop-path and
fused attention are whatever the host has), then the operator. Token Merging works inside every block, between
the attention and the MLP, so its block subclass runs the block's own layers in that order. PatchDropout goes in
timm's own ``patch_drop`` slot.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from toe.hosts.merge import check_attention, merge_block
from toe.hosts.swap import add_mixin
from toe.ops.expansion import TokenExpansion
from toe.ops.merging import TokenMerging
from toe.ops.patch_dropout import ScheduledPatchDropout


def position_parts(model: nn.Module) -> Optional[str]:
    """What in ``model``'s blocks depends on where each token sits on the patch grid, in words (``None`` for a plain
    ViT, whose position embedding is added before the first block): a token reducer that keeps a subset after the
    first block must hand those parts the kept tokens' positions, or the whole grid."""
    blocks = list(getattr(model, "blocks", []))
    if getattr(model, "rope", None) is not None:  # timm's Eva: EVA-02, PE; rotary embeddings passed to every block
        return "rotary position embeddings (model.rope), applied in every block's attention"
    if getattr(model, "rel_pos_bias", None) is not None or any(
        getattr(getattr(b, "attn", None), "relative_position_bias_table", None) is not None for b in blocks
    ):  # BEiT, BEiTv2
        return "a relative position bias over the whole patch grid in every block's attention"
    if getattr(model, "shared_rel_pos", None) is not None or any(
        getattr(getattr(b, "attn", None), "rel_pos", None) is not None for b in blocks
    ):  # vit_relpos_*, vit_srelpos_*
        return "a relative position bias (rel_pos) over the whole patch grid in every block's attention"
    if any(hasattr(b, "local_mp") for b in blocks):  # XCiT
        return "local patch interaction (a depth-wise convolution over the H x W token grid) in every block"
    return None


class ExpandAfterBlock(nn.Module):
    """Mixin for the host's block: Token Expansion on its output tokens.

    Modifications:
     - after the original forward, ``self.token_expansion`` reduces the tokens ``[B, p + n, D]`` to
       ``[B, p + m, D]``; the blocks after it see the reduced set.
    """

    token_expansion: TokenExpansion

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = super().forward(x, *args, **kwargs)
        return self.token_expansion(x)[0]


def apply(model: nn.Module, op: TokenExpansion) -> None:
    first = model.blocks[0]
    add_mixin(first, ExpandAfterBlock)
    first.token_expansion = op


_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class MergeInBlock(nn.Module):
    """Mixin for timm's pre-norm ``Block``: Token Merging between its attention and its MLP.

    Modifications:
     - the attention runs through :func:`toe.hosts.merge.attend` (the block's own layers; size-weighted, and it
       gives the keys ToMe matches on);
     - the ``r`` best-matched tokens are merged before the MLP. The sizes of the merged tokens go to the next block
       through the shared op (``op.sizes``, by block index), since timm calls each block with ``x`` alone.
    """

    _tome_op: TokenMerging
    _tome_index: int

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("Token Merging does not take attention masks")
        op, index = self._tome_op, self._tome_index
        size = op.sizes.get(index) if index else None
        x, size, _ = merge_block(
            self,
            index,
            op,
            x,
            size,
            lambda y: self.drop_path1(self.ls1(y)),
            lambda y: self.drop_path2(self.ls2(self.mlp(self.norm2(y)))),
        )
        op.sizes[index + 1] = size
        return x


def apply_merging(model: nn.Module, op: TokenMerging) -> None:
    for block in model.blocks:
        missing = [part for part in _BLOCK_PARTS if not hasattr(block, part)]
        if missing:
            raise TypeError(
                f"Token Merging on timm models needs pre-norm blocks like timm's Block; "
                f"{type(block).__name__} has no {', '.join(missing)}"
            )
        check_attention(block.attn)
    model.token_merging = op
    for index, block in enumerate(model.blocks):
        add_mixin(block, MergeInBlock)
        # plain attributes, not submodules: the op is registered once, on the model
        object.__setattr__(block, "_tome_op", op)
        object.__setattr__(block, "_tome_index", index)


def apply_patch_dropout(model: nn.Module, op: ScheduledPatchDropout) -> None:
    if not isinstance(getattr(model, "patch_drop", None), nn.Module):
        raise TypeError(
            f"PatchDropout needs a timm vision transformer (its patch_drop slot, which timm calls after "
            f"the position embedding); got {type(model).__name__}"
        )
    model.patch_drop = op
