"""Token Merging inside a host's blocks (:mod:`toe.ops.merging`): what the timm and LV-ViT patches share.

ToMe merges between a block's attention and its MLP, matching on the attention keys, and weights attention by
token size. Both need the inside of the attention, so :func:`attend` computes it from the host attention's own
layers (qkv, q/k norms, dropouts, output norm, proj) with PyTorch's ``scaled_dot_product_attention``, adding
``log(size)`` to the logits; :func:`check_attention` refuses an attention it does not know how to run. The block's
residual branches stay the host's (LayerScale, drop-path, LV-ViT's ``skip_lam``), passed in by each host module.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from toe.ops.merging import Matching, TokenMerging

_IDENTITY = nn.Identity()


def check_attention(attn: nn.Module) -> None:
    """Raise ``TypeError`` for an attention :func:`attend` cannot run (it must have one ``qkv`` projection)."""
    qkv = getattr(attn, "qkv", None)
    heads, head_dim = getattr(attn, "num_heads", None), getattr(attn, "head_dim", None)
    if not isinstance(qkv, nn.Linear) or heads is None or head_dim is None or qkv.out_features != 3 * heads * head_dim:
        raise TypeError(
            f"Token Merging needs an attention with one qkv projection, num_heads and head_dim; got "
            f"{type(attn).__name__}"
        )
    if getattr(attn, "gate", None) is not None:
        raise TypeError(f"Token Merging does not run gated attention ({type(attn).__name__}.gate)")


def attend(attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The attention of ``x`` ``[B, N, D]`` with the host's layers, each key's logit raised by ``log(size)``
    (proportional attention; ``size`` ``None``: plain attention), and the keys averaged over heads ``[B, N, d]``,
    ToMe's matching metric."""
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = getattr(attn, "q_norm", _IDENTITY)(q), getattr(attn, "k_norm", _IDENTITY)(k)
    bias = None if size is None else size.log().transpose(1, 2).unsqueeze(1).to(q.dtype)  # [B, 1, 1, N]
    dropout = getattr(attn, "attn_drop", None)
    p = dropout.p if dropout is not None and attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    out = getattr(attn, "norm", _IDENTITY)(out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))
    out = getattr(attn, "proj_drop", _IDENTITY)(attn.proj(out))
    return out, k.mean(dim=1)


def merge_block(
    block: nn.Module,
    index: int,
    op: TokenMerging,
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    attn_branch: Callable[[torch.Tensor], torch.Tensor],
    mlp_branch: Callable[[torch.Tensor], torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[Matching]]:
    """Block ``index``, pre-norm, with ToMe between its branches: ``x + attn_branch(attn(norm1 x))``, merge,
    ``+ mlp_branch(x)``. Returns ``(x, size, matching)``."""
    out, keys = attend(block.attn, block.norm1(x), size if op.prop_attn else None)
    x, size, matching = op(x + attn_branch(out), keys, size, index)
    return x + mlp_branch(x), size, matching
