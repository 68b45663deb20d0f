"""ToE on timm's ``VisionTransformer`` (DeiT-T/S/B) and any model whose ``blocks[0]`` maps ``[B, p + n, D]`` tokens
to tokens of the same shape: the first block's class gets a subclass that calls the original ``forward`` (no copied
body, so LayerScale, drop-path and fused attention are whatever the host has), then the operator."""

from __future__ import annotations

import torch
from torch import nn

from ..expansion import TokenExpansion
from .swap import add_mixin


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
