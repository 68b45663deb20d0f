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


def _head_dim(attn: nn.Module) -> Optional[int]:
    head_dim = getattr(attn, "head_dim", None)  # timm 1.0.15's Eva attention has none: read it from qkv
    qkv, heads = getattr(attn, "qkv", None), getattr(attn, "num_heads", None)
    if head_dim is None and isinstance(qkv, nn.Linear) and heads:
        head_dim = qkv.out_features // (3 * heads)
    return head_dim


def check_attention(attn: nn.Module) -> None:
    """Raise ``TypeError`` for an attention :func:`attend` cannot run (it must have one ``qkv`` projection, and
    as many key and value heads as query heads)."""
    qkv = getattr(attn, "qkv", None)
    heads, head_dim = getattr(attn, "num_heads", None), _head_dim(attn)
    if not isinstance(qkv, nn.Linear) or heads is None or head_dim is None or qkv.out_features != 3 * heads * head_dim:
        raise TypeError(
            f"Token Merging needs an attention with one qkv projection, num_heads and head_dim; got "
            f"{type(attn).__name__}"
        )
    if getattr(attn, "gate", None) is not None:
        raise TypeError(f"Token Merging does not run gated attention ({type(attn).__name__}.gate)")
    if getattr(attn, "num_kv_heads", heads) != heads:
        raise TypeError(f"Token Merging does not run grouped-query attention ({type(attn).__name__}.num_kv_heads)")


def position_bias(attn: nn.Module, shared: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The additive attention bias the host's attention adds to its logits, as the host combines it: BEiT's own
    relative position bias plus the shared one, a relpos attention's ``rel_pos`` bias or else the shared one.
    The readers of :mod:`toe.hosts.positions` have already gathered both at the block's token positions."""
    if getattr(attn, "relative_position_bias_table", None) is not None:  # BEiT: its own, then the shared one added
        own = attn._get_rel_pos_bias()
        return own if shared is None else own + shared
    if getattr(attn, "rel_pos", None) is not None:  # relpos ViTs: a block's own bias replaces the shared one
        return attn.rel_pos.get_bias()
    return shared


def _qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The host's qkv projection, with the separate q/k/v biases of Eva and BEiT (k's is zeros) where it has them."""
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is None:
        return attn.qkv(x)
    bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
    if getattr(attn, "qkv_bias_separate", False):
        return attn.qkv(x) + bias
    return F.linear(x, weight=attn.qkv.weight, bias=bias)


def attend(
    attn: nn.Module,
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    rope: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The attention of ``x`` ``[B, N, D]`` with the host's layers, each key's logit raised by ``log(size)``
    (proportional attention; ``size`` ``None``: plain attention), and the keys averaged over heads ``[B, N, d]``,
    ToMe's matching metric (taken before the rotary embedding, so that tokens match on content).

    ``rope`` (timm's Eva) rotates the patch tokens' queries and keys, the prefix left as it is, as Eva's attention
    does; ``bias`` is an additive position bias ``[1 | B, H, N, N]`` (:func:`position_bias`)."""
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, _head_dim(attn)
    q, k, v = _qkv(attn, x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = getattr(attn, "q_norm", _IDENTITY)(q), getattr(attn, "k_norm", _IDENTITY)(k)
    keys = k.mean(dim=1)
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        p = attn.num_prefix_tokens
        half = {"half": True} if getattr(attn, "rotate_half", False) else {}  # the keyword came after timm 1.0.15
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, **half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, **half)], dim=2).type_as(v)
    if size is not None:
        size_bias = size.log().transpose(1, 2).unsqueeze(1).to(q.dtype)  # [B, 1, 1, N]
        bias = size_bias if bias is None else bias + size_bias
    dropout = getattr(attn, "attn_drop", None)
    p = dropout.p if dropout is not None and attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    out = getattr(attn, "norm", _IDENTITY)(out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))
    out = getattr(attn, "proj_drop", _IDENTITY)(attn.proj(out))
    return out, keys


def merge_block(
    block: nn.Module,
    index: int,
    op: TokenMerging,
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    attn_branch: Callable[[torch.Tensor], torch.Tensor],
    mlp_branch: Callable[[torch.Tensor], torch.Tensor],
    rope: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[Matching]]:
    """Block ``index``, pre-norm, with ToMe between its branches: ``x + attn_branch(attn(norm1 x))``, merge,
    ``+ mlp_branch(x)``; ``rope`` and ``bias`` as :func:`attend` takes them. Returns ``(x, size, matching)``."""
    out, keys = attend(block.attn, block.norm1(x), size if op.prop_attn else None, rope, bias)
    x, size, matching = op(x + attn_branch(out), keys, size, index)
    return x + mlp_branch(x), size, matching
