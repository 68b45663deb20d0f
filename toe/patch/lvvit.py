"""ToE on LV-ViT (:mod:`toe.models.lvvit`): the operator after the first block, and after the final norm the reduced
tokens are put back at their positions (:func:`toe.expansion.unexpand`, zeros where tokens were merged away), as
the official ToE code does, so the dense head of token labeling sees every position."""

from __future__ import annotations

import torch
from torch import nn

from ..expansion import TokenExpansion, unexpand
from .swap import add_mixin


def host_type() -> type:
    from ..models.lvvit import LVViT

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
