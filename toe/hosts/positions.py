"""The kept tokens' own positions, for hosts whose blocks depend on where each token sits on the patch grid.

timm's Eva (EVA-02, PE, the ``vit_*_rope_*`` models) passes rotary embeddings to every block, BEiT and the relpos
ViTs add a relative position bias in every attention; each is computed over the whole grid. After a reducer keeps a
subset of the tokens, each of those parts must see the kept tokens' positions. The reducer writes them into the
model's :class:`TokenPositions` (token-space positions, :mod:`toe.ops.positions`; ToE after the first block,
PatchDropout before it), and readers installed on the host's parts gather at those positions what the host computed
over the grid:

- rotary embeddings, the ``rope`` every Eva block is called with: the kept patches' rows;
- per-block relative position biases (BEiT's ``attn._get_rel_pos_bias()``, the relpos ``attn.rel_pos.get_bias()``):
  the kept tokens' rows and columns;
- shared biases that the model computes once and passes to every block (BEiT's ``shared_rel_pos_bias``, relpos
  ``shared_rel_pos``): the same.

The readers are mixins that call the host's own method with the gathered tensors, so the blocks' bodies stay the
host's. With every token (evaluation, an identity stage) nothing is written and nothing is gathered: the model
computes exactly what the unpatched one does.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from toe.hosts.swap import add_mixin
from toe.ops.positions import gather_pair_bias, gather_rope, prefixed_positions

# the block keywords through which timm hands every block a tensor over the whole grid
_SHARED_BIAS_KWARGS = ("shared_rel_pos_bias", "shared_rel_pos")  # BEiT, the relpos ViTs


class TokenPositions:
    """Token-space positions ``[B, K]`` of the tokens each block sees in the current forward, by block index;
    ``None`` (or no entry) means all tokens, in order. Per block, like ToMe's sizes, so that a block re-run by
    gradient checkpointing reads what it read the first time. A plain object, not a module: nothing of it is in
    the ``state_dict``."""

    def __init__(self, num_prefix_tokens: int, depth: int):
        self.num_prefix_tokens = num_prefix_tokens
        self.depth = depth
        self.by_block: Dict[int, Optional[torch.Tensor]] = {}

    def clear(self) -> None:
        """A new forward: every block sees all tokens until a reducer says otherwise."""
        self.by_block = {}

    def update(self, index: int, positions: torch.Tensor) -> None:
        """Block ``index`` and every later one see the tokens at ``positions``."""
        for later in range(index, self.depth):
            self.by_block[later] = positions

    def at(self, index: int) -> Optional[torch.Tensor]:
        return self.by_block.get(index)

    def update_patches(self, index: int, patch_positions: torch.Tensor) -> None:
        """As :meth:`update`, from the kept patches' indices among the patches ``[B, m]`` (timm's PatchDropout)."""
        self.update(index, prefixed_positions(patch_positions, self.num_prefix_tokens))


def _positions(module: nn.Module) -> Optional[torch.Tensor]:
    return module._toe_positions.at(module._toe_block_index)


def gather_block_kwargs(
    positions: Optional[torch.Tensor], num_prefix_tokens: int, kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    """A block's keyword arguments with the tensors over the whole grid that the model passes it (``rope``, a
    shared relative position bias) gathered at ``positions`` (``None``: unchanged)."""
    if positions is None:
        return kwargs
    if kwargs.get("attn_mask") is not None:
        raise NotImplementedError("an attention mask over all tokens cannot follow reduced tokens")
    kwargs = dict(kwargs)
    if kwargs.get("rope") is not None:
        p = num_prefix_tokens
        kwargs["rope"] = gather_rope(kwargs["rope"], positions[:, p:] - p)
    for name in _SHARED_BIAS_KWARGS:
        if kwargs.get(name) is not None:
            kwargs[name] = gather_pair_bias(kwargs[name], positions)
    return kwargs


class PositionsInBlock(nn.Module):
    """Mixin for a block of a position-dependent host: the tensors over the whole grid that the model passes it
    (``rope``, a shared relative position bias) are gathered at the positions of the tokens it sees. timm's hosts
    pass them by keyword (``blk(x, rope=...)``), as this reads them."""

    _toe_positions: TokenPositions
    _toe_block_index: int

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = self._toe_positions
        kwargs = gather_block_kwargs(state.at(self._toe_block_index), state.num_prefix_tokens, kwargs)
        return super().forward(x, *args, **kwargs)


class PositionsInBeitAttention(nn.Module):
    """Mixin for BEiT's attention: its relative position bias at the rows and columns of the tokens it sees."""

    _toe_positions: TokenPositions
    _toe_block_index: int

    def _get_rel_pos_bias(self) -> torch.Tensor:
        return gather_pair_bias(super()._get_rel_pos_bias(), _positions(self))


class PositionsInRelPos(nn.Module):
    """Mixin for a relpos ViT's ``attn.rel_pos`` (timm's ``RelPosMlp``/``RelPosBias``): ``get_bias()``, which both
    its fused and its unfused attention read, at the rows and columns of the tokens the block sees."""

    _toe_positions: TokenPositions
    _toe_block_index: int

    def get_bias(self) -> torch.Tensor:
        return gather_pair_bias(super().get_bias(), _positions(self))


def _attach(module: nn.Module, mixin: type, positions: TokenPositions, index: int) -> None:
    add_mixin(module, mixin)
    # plain attributes, not submodules or buffers: the state_dict keys stay the host's
    object.__setattr__(module, "_toe_positions", positions)
    object.__setattr__(module, "_toe_block_index", index)


def needs_positions(model: nn.Module) -> bool:
    """Whether any part of ``model``'s blocks reads token positions that :func:`carry_positions` can hand it."""
    blocks = list(getattr(model, "blocks", []))
    if getattr(model, "rope", None) is not None:
        return True
    if getattr(model, "rel_pos_bias", None) is not None or getattr(model, "shared_rel_pos", None) is not None:
        return True
    return any(
        getattr(b.attn, "relative_position_bias_table", None) is not None
        or getattr(b.attn, "rel_pos", None) is not None
        for b in blocks
        if hasattr(b, "attn")
    )


def carry_positions(model: nn.Module) -> Optional[TokenPositions]:
    """Install the readers on ``model``'s position-dependent parts once and return its :class:`TokenPositions`,
    for the reducer to write; ``None`` for a model that needs none (a plain ViT adds its positions before the first
    block). Call it before the reducer's own mixin goes on the first block, so that the reducer runs first."""
    existing = getattr(model, "_toe_positions", None)
    if existing is not None or not needs_positions(model):
        return existing
    positions = TokenPositions(int(getattr(model, "num_prefix_tokens", 1)), len(model.blocks))
    for index, block in enumerate(model.blocks):
        _attach(block, PositionsInBlock, positions, index)
        attn = block.attn
        if getattr(attn, "relative_position_bias_table", None) is not None:
            _attach(attn, PositionsInBeitAttention, positions, index)
        if getattr(attn, "rel_pos", None) is not None:
            _attach(attn.rel_pos, PositionsInRelPos, positions, index)
    object.__setattr__(model, "_toe_positions", positions)
    return positions
