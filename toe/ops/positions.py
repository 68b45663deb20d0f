"""Where the reduced tokens sit on the patch grid: pure tensor functions for hosts whose blocks depend on each
token's position (rotary embeddings, relative position biases). No host knowledge here.

Positions are *token-space*: ``positions [B, K]`` gives, for each of the ``K`` tokens a block sees, its index in the
full sequence ``[prefix, patches]`` that the first block saw (``0..p-1`` the prefix tokens, ``p + i`` patch ``i``).
Every reducer reports them in that space: ToE's kept indices (a merged token keeps the position of the kept token
it was merged into), PatchDropout's kept patches, ToMe's destinations.
"""

from __future__ import annotations

from typing import Optional

import torch


def prefixed_positions(patch_positions: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Token-space positions ``[B, p + m]`` of the prefix tokens and the kept patches ``patch_positions [B, m]``
    (indices into the patches alone, as timm's PatchDropout returns them)."""
    batch = patch_positions.shape[0]
    prefix = torch.arange(num_prefix_tokens, device=patch_positions.device).expand(batch, -1)
    return torch.cat([prefix, patch_positions + num_prefix_tokens], dim=1)


def gather_pair_bias(bias: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """The rows and columns of an attention bias over all tokens that belong to the tokens at ``positions``.

    ``bias`` is ``[T, T]``, ``[H, T, T]`` or ``[1 | B, H, T, T]`` over the full token sequence (BEiT's relative
    position bias, the relpos ViTs' ``get_bias()``); the result is ``[B, H, K, K]``, which both a fused attention's
    ``attn_mask`` and an unfused ``attn + bias`` take. ``positions`` ``None`` (nothing reduced) returns ``bias``
    unchanged, so full-token forwards compute exactly what the host does.
    """
    if positions is None:
        return bias
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    rows, cols = positions.unsqueeze(-1), positions.unsqueeze(-2)  # [B, K, 1], [B, 1, K]
    if bias.shape[0] == 1:  # one bias for the batch: index its [H, T, T] once, [H, B, K, K] -> [B, H, K, K]
        return bias[0][:, rows, cols].transpose(0, 1)
    batch = torch.arange(positions.shape[0], device=positions.device).view(-1, 1, 1)
    return bias[batch, :, rows, cols].permute(0, 3, 1, 2)  # [B, K, K, H] -> [B, H, K, K]


def gather_rope(rope: torch.Tensor, patch_positions: Optional[torch.Tensor]) -> torch.Tensor:
    """Rotary embeddings of the kept patches, ``[B, 1 | H, m, dim]`` (the batched layout timm's Eva blocks take).

    ``rope`` is ``[N, dim]`` (timm's ``RotaryEmbeddingCat``), ``[H, N, dim]`` (one block's slice of mixed RoPE) or
    already batched ``[B, 1 | H, N, dim]`` (after the host's own patch dropout); ``patch_positions [B, m]`` index its
    ``N`` patches. Written here rather than with timm's ``apply_keep_indices_nlc``, whose signature and output
    layout changed within the timm versions toe supports (1.0.15 returns ``[B, m, dim]`` without a head axis).
    """
    if patch_positions is None:
        return rope
    batch, kept = patch_positions.shape
    while rope.dim() < 4:
        rope = rope.unsqueeze(0)
    rope = rope.expand(batch, -1, -1, -1)
    index = patch_positions.view(batch, 1, kept, 1).expand(-1, rope.shape[1], -1, rope.shape[-1])
    return rope.gather(2, index)
