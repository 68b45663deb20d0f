"""Host integration: put ToE on the output of a vision transformer's first block, in place.

Like ToMe's ``patch.timm``, the first block's class is swapped for a subclass, so no parameter is added and the
``state_dict`` keys stay those of the unpatched model. The subclass calls the original ``forward`` (no copied
body, so LayerScale, drop-path and fused attention are whatever the host has) and then the operator.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Type

import torch
from torch import nn

from .expansion import TokenExpansion
from .schedule import ExpansionSchedule

_BLOCK_CLASSES: Dict[type, type] = {}


def _toe_block_class(base: Type[nn.Module]) -> Type[nn.Module]:
    if base in _BLOCK_CLASSES.values():
        return base
    if base not in _BLOCK_CLASSES:

        class ToEBlock(base):  # type: ignore[misc, valid-type]
            """The host's block, followed by Token Expansion on its output tokens.

            Modifications:
             - after the original forward, ``self.token_expansion`` reduces the tokens ``[B, p + n, D]`` to
               ``[B, p + m, D]``; the blocks after it see the reduced set.
            """

            def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                x = super().forward(x, *args, **kwargs)
                return self.token_expansion(x)[0]

        ToEBlock.__name__ = ToEBlock.__qualname__ = f"ToE{base.__name__}"
        _BLOCK_CLASSES[base] = ToEBlock
    return _BLOCK_CLASSES[base]


def patch(model: nn.Module, schedule: ExpansionSchedule, sparse_eval: bool = False) -> nn.Module:
    """Make ``model`` a ToE model in place and return it.

    ``model`` is a timm ``VisionTransformer`` (or any model with ``blocks`` and ``num_prefix_tokens``). Patching
    twice replaces the schedule. Drive the stage with :func:`set_epoch`; evaluation uses all tokens unless
    ``sparse_eval``.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) < 2:
        raise TypeError(
            f"toe.patch needs a vision transformer with at least two `blocks`; got {type(model).__name__}"
        )
    op = TokenExpansion(schedule, num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
                        sparse_eval=sparse_eval)
    if hasattr(model, "token_expansion"):
        # Hosts that apply the op themselves after the first block and need its indices (LV-ViT scatters the
        # reduced tokens back to their positions for its dense head) expose a `token_expansion` slot.
        model.token_expansion = op
        return model
    first = blocks[0]
    first.__class__ = _toe_block_class(first.__class__)
    first.token_expansion = op
    return model


def expansion_ops(model: nn.Module) -> Iterator[TokenExpansion]:
    return (m for m in model.modules() if isinstance(m, TokenExpansion))


def set_epoch(model: nn.Module, epoch: int) -> int:
    """Set the ToE stage of every operator in ``model`` from the global epoch; returns the stage (0 if unpatched)."""
    stage = 0
    for op in expansion_ops(model):
        stage = op.set_epoch(epoch)
    return stage


def expansion_op(model: nn.Module) -> Optional[TokenExpansion]:
    return next(expansion_ops(model), None)
