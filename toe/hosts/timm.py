"""Token reduction on timm's vision transformers: ``VisionTransformer`` (DeiT, DeiT III, CaiT, FlexiViT, SigLIP,
register and GAP variants), and the families whose blocks read token positions: ``Eva`` (EVA-02, PE, the
``vit_*_rope_*`` models; rotary embeddings), ``Beit`` (BEiT, BEiTv2) and ``VisionTransformerRelPos`` (relative
position biases).

ToE works on any model whose ``blocks[0]`` maps ``[B, p + n, D]`` tokens to tokens of the same shape: the first
block's class gets a subclass that calls the original ``forward`` (no copied body, so LayerScale, drop-path and
fused attention are whatever the host has), then the operator. Token Merging works inside every block, between
the attention and the MLP, so its block subclass runs the block's own layers in that order. PatchDropout goes in
timm's own ``patch_drop`` slot, or on the first block's input for the position-dependent families. For those,
:mod:`toe.hosts.positions` hands every later part the kept tokens' positions.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from toe.hosts.merge import check_attention, merge_block, position_bias
from toe.hosts.positions import TokenPositions, carry_positions, gather_block_kwargs
from toe.hosts.swap import add_mixin
from toe.ops.expansion import TokenExpansion
from toe.ops.merging import TokenMerging, merged_positions
from toe.ops.patch_dropout import ScheduledPatchDropout


def grid_part(model: nn.Module) -> Optional[str]:
    """What in ``model``'s blocks needs the whole token grid, in words (``None`` when nothing does): XCiT's local
    patch interaction, a convolution over the grid that no kept subset of tokens can feed. Rotary embeddings and
    relative position biases are not such parts: :mod:`toe.hosts.positions` hands them the kept tokens'
    positions."""
    if any(hasattr(b, "local_mp") for b in getattr(model, "blocks", [])):  # XCiT
        return "local patch interaction (a depth-wise convolution over the H x W token grid) in every block"
    return None


class ExpandAfterBlock(nn.Module):
    """Mixin for the host's block: Token Expansion on its output tokens.

    Modifications:
     - after the original forward, ``self.token_expansion`` reduces the tokens ``[B, p + n, D]`` to
       ``[B, p + m, D]``; the blocks after it see the reduced set;
     - in a host whose blocks read token positions (``_toe_positions`` not ``None``), the kept tokens' positions go
       to the later blocks; a merged token keeps the position of the kept token it was merged into.
    """

    token_expansion: TokenExpansion
    _toe_positions: Optional[TokenPositions]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        positions = self._toe_positions
        if positions is not None:
            positions.clear()  # this block sees every token
        x = super().forward(x, *args, **kwargs)
        reduced, kept = self.token_expansion(x)
        if positions is not None and reduced.shape[1] != x.shape[1]:
            positions.update(1, kept)
        return reduced


def apply(model: nn.Module, op: TokenExpansion) -> None:
    positions = carry_positions(model)
    first = model.blocks[0]
    add_mixin(first, ExpandAfterBlock)
    first.token_expansion = op
    object.__setattr__(first, "_toe_positions", positions)


_BLOCK_PARTS = ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2")
# the residual branches' scales: timm's LayerScale modules, or Eva's and BEiT's gamma parameters (None: no scale)
_SCALE_PARTS = (("ls1", "ls2"), ("gamma_1", "gamma_2"))


def _scaled(block: nn.Module, name: str, y: torch.Tensor) -> torch.Tensor:
    scale = getattr(block, name)
    if isinstance(scale, nn.Module):
        return scale(y)
    return y if scale is None else scale * y


class MergeInBlock(nn.Module):
    """Mixin for a pre-norm block (timm's ``Block``, Eva's, BEiT's, the relpos ViTs'): Token Merging between its
    attention and its MLP.

    Modifications:
     - the attention runs through :func:`toe.hosts.merge.attend` (the block's own layers, with the rotary
       embedding or relative position bias the host gives it, at the tokens' positions; size-weighted, and it
       gives the keys ToMe matches on);
     - the ``r`` best-matched tokens are merged before the MLP. The sizes of the merged tokens go to the next block
       through the shared op (``op.sizes``, by block index), since timm calls each block with ``x`` alone; in a
       position-dependent host the merged tokens' positions (a merged token: its destination's) go through the
       model's :class:`toe.hosts.positions.TokenPositions` the same way.
    """

    _tome_op: TokenMerging
    _tome_index: int
    _tome_scales: Tuple[str, str]
    _toe_positions: Optional[TokenPositions]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise NotImplementedError("Token Merging does not take attention masks")
        op, index, state = self._tome_op, self._tome_index, self._toe_positions
        positions = None
        if state is not None:
            if index == 0:
                state.clear()
            positions = state.at(index)
            kwargs = gather_block_kwargs(positions, state.num_prefix_tokens, kwargs)
        shared = kwargs.get("shared_rel_pos_bias", kwargs.get("shared_rel_pos"))
        size = op.sizes.get(index) if index else None
        attn_scale, mlp_scale = self._tome_scales
        x_in = x
        x, size, matching = merge_block(
            self,
            index,
            op,
            x,
            size,
            lambda y: self.drop_path1(_scaled(self, attn_scale, y)),
            lambda y: self.drop_path2(_scaled(self, mlp_scale, self.mlp(self.norm2(y)))),
            rope=kwargs.get("rope"),
            bias=position_bias(self.attn, shared),
        )
        op.sizes[index + 1] = size
        if state is not None and matching is not None:
            if positions is None:
                positions = torch.arange(x_in.shape[1], device=x.device).expand(x.shape[0], -1)
            state.update(index + 1, merged_positions(positions, matching))
        return x


def apply_merging(model: nn.Module, op: TokenMerging) -> None:
    scales = []  # every block checked before any is patched
    for block in model.blocks:
        missing = [part for part in _BLOCK_PARTS if not hasattr(block, part)]
        pair = next((pair for pair in _SCALE_PARTS if all(hasattr(block, name) for name in pair)), None)
        if missing or pair is None:
            missing += [] if pair else ["ls1/ls2 (or gamma_1/gamma_2)"]
            raise TypeError(
                f"Token Merging on timm models needs pre-norm blocks like timm's Block; "
                f"{type(block).__name__} has no {', '.join(missing)}"
            )
        check_attention(block.attn)
        scales.append(pair)
    positions = carry_positions(model)
    model.token_merging = op
    for index, (block, pair) in enumerate(zip(model.blocks, scales)):
        add_mixin(block, MergeInBlock)
        # plain attributes, not submodules: the op is registered once, on the model
        object.__setattr__(block, "_tome_op", op)
        object.__setattr__(block, "_tome_index", index)
        object.__setattr__(block, "_tome_scales", pair)
        object.__setattr__(block, "_toe_positions", positions)


class DropPatchesBeforeBlock(nn.Module):
    """Mixin for the first block of a host whose blocks read token positions: PatchDropout on its input tokens,
    where timm's ViT has its ``patch_drop`` slot (after the position embedding, before the blocks; BEiT and the
    relpos ViTs have no slot, and Eva's would hand its rotary embeddings to timm's own gather), and the kept
    tokens' positions to every block."""

    patch_dropout: ScheduledPatchDropout
    _toe_positions: TokenPositions

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._toe_positions.clear()
        x, kept = self.patch_dropout.forward_with_indices(x)
        if kept is not None:
            self._toe_positions.update_patches(0, kept)
        return super().forward(x, *args, **kwargs)


def apply_patch_dropout(model: nn.Module, op: ScheduledPatchDropout) -> None:
    positions = carry_positions(model)
    if positions is not None:
        first = model.blocks[0]
        add_mixin(first, DropPatchesBeforeBlock)
        first.patch_dropout = op
        object.__setattr__(first, "_toe_positions", positions)
        return
    if not isinstance(getattr(model, "patch_drop", None), nn.Module):
        raise TypeError(
            f"PatchDropout needs a timm vision transformer (its patch_drop slot, which timm calls after "
            f"the position embedding); got {type(model).__name__}"
        )
    model.patch_drop = op
