"""Token reduction on YOLOS (:mod:`toe.models.yolos`), whose detection tokens come after the patch tokens.

ToE as the official code applies it (Osilly/TokenExpansion, ``ToE/YOLOS/models/backbone_expansion.py``): after the
first block and its mid position embedding, ``[CLS, patches]`` are reduced and the DET tokens are kept whole after
them (the operator's suffix tokens); every later mid position embedding is gathered at the kept tokens' positions
(its DET part unchanged), so each kept token gets its own position's embedding.

PatchDropout: before the first block (after the position embedding), patches dropped and the DET tokens kept, the
mid position embeddings gathered at the kept positions from the first block on.

Token Merging is refused on YOLOS: merged tokens would need their mid position embeddings merged too, which no
published code does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from toe.hosts.swap import add_mixin
from toe.ops.expansion import TokenExpansion, gather_tokens
from toe.ops.merging import TokenMerging
from toe.ops.patch_dropout import ScheduledPatchDropout


def host_type() -> type:
    from toe.models.yolos import Yolos

    return Yolos


def _gathered(mid: Optional[torch.Tensor], kept: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    if mid is None or kept is None:
        return mid
    return gather_tokens(mid.expand(batch, -1, -1), kept)


class ExpandInYolos(nn.Module):
    """Mixin for ``Yolos``.

    Modifications:
     - after the first block (and its mid position embedding) ``self.token_expansion`` reduces the tokens, the DET
       tokens kept aside as suffix tokens;
     - the later mid position embeddings are gathered at the kept tokens' positions.
    """

    token_expansion: TokenExpansion
    _toe_kept: Optional[torch.Tensor]

    def after_block(self, index: int, x: torch.Tensor, mid: Optional[torch.Tensor]) -> torch.Tensor:
        if index == 0:
            object.__setattr__(self, "_toe_kept", None)  # a new forward: every token until the op says otherwise
        x = super().after_block(index, x, _gathered(mid, self._toe_kept, x.shape[0]))
        if index == 0:
            reduced, kept = self.token_expansion(x)
            if reduced.shape[1] != x.shape[1]:
                object.__setattr__(self, "_toe_kept", kept)
            x = reduced
        return x


def apply(model: nn.Module, op: TokenExpansion) -> None:
    op.num_suffix_tokens = model.num_suffix_tokens
    add_mixin(model, ExpandInYolos)
    model.token_expansion = op
    object.__setattr__(model, "_toe_kept", None)


class DropPatchesInYolos(nn.Module):
    """Mixin for ``Yolos``: PatchDropout on the first block's input (DET tokens kept), and the mid position
    embeddings gathered at the kept tokens' positions."""

    patch_dropout: ScheduledPatchDropout
    _toe_kept: Optional[torch.Tensor]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        object.__setattr__(self, "_toe_kept", None)
        return super().forward_features(images)

    def after_block(self, index: int, x: torch.Tensor, mid: Optional[torch.Tensor]) -> torch.Tensor:
        return super().after_block(index, x, _gathered(mid, self._toe_kept, x.shape[0]))


class _DropBeforeFirstBlock(nn.Module):
    """Mixin for YOLOS's first block: the model's PatchDropout on its input."""

    _toe_model: nn.Module

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        model = self._toe_model
        total, batch = x.shape[1], x.shape[0]
        x, kept = model.patch_dropout.forward_with_indices(x)
        if kept is not None:  # token-space positions: the class token, the kept patches, the DET tokens
            suffix = model.num_suffix_tokens
            positions = [
                torch.zeros(batch, 1, dtype=torch.long, device=x.device),
                kept + 1,
                torch.arange(total - suffix, total, device=x.device).expand(batch, -1),
            ]
            object.__setattr__(model, "_toe_kept", torch.cat(positions, dim=1))
        return super().forward(x, *args, **kwargs)


def apply_patch_dropout(model: nn.Module, op: ScheduledPatchDropout) -> None:
    op.num_suffix_tokens = model.num_suffix_tokens
    add_mixin(model, DropPatchesInYolos)
    model.patch_dropout = op
    object.__setattr__(model, "_toe_kept", None)
    first = model.blocks[0]
    add_mixin(first, _DropBeforeFirstBlock)
    object.__setattr__(first, "_toe_model", model)


def apply_merging(model: nn.Module, op: TokenMerging) -> None:
    raise TypeError(
        "Token Merging is not supported on YOLOS: its mid position embeddings would have to be merged with the "
        "tokens; ToE and PatchDropout are"
    )
