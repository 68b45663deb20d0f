"""Analytic FLOPs of a plain ViT under a token schedule (ToE, Token Merging, PatchDropout).

Convention (the paper's and thop's): one FLOP is one multiply-accumulate. Per
block with ``t`` tokens, width ``D`` and MLP hidden width ``H``: ``t * (4 D^2 + 2 D H)`` for the linear layers
(``12 t D^2`` at MLP ratio 4) plus ``2 t^2 D`` for the attention matmuls. Patch embedding (with a conv stem such
as LV-ViT's) and heads (with LV-ViT's dense head on every position) are included; norms and softmax are not. A
training step costs 3x the forward pass.

The same count holds for the position-dependent families toe reduces (Eva, BEiT, the relpos ViTs). A gated MLP
(EVA-02's SwiGLU, timm's ``GluMlp``) counts its own linear layers: ``H`` is then the width of a plain MLP with
the same MACs. Left out, like norms and softmax, because each is elementwise or does not grow with the batch:
rotary embeddings (a few multiplies per query and key element), adding a relative position bias to the logits,
the relpos ViTs' bias MLP (run once per forward on the ``(2h - 1)(2w - 1)`` relative offsets, not per image), and
an attention-pooling head (PE's ``map``: one query over the last block's tokens, about 1 % of a ViT's MACs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

from torch import nn

from toe.ops.schedule import ExpansionSchedule
from toe.ops.tokens import BlockTokens, prefix_tokens, reduced_block_tokens

TRAIN_TO_FORWARD = 3


@dataclass(frozen=True)
class ViTShape:
    embed_dim: int
    depth: int
    mlp_hidden: int
    num_patches: int
    num_prefix_tokens: int
    patch_macs: int  # multiply-accumulates per patch: patch embedding (conv stem included), dense head
    num_classes: int

    @classmethod
    def from_model(cls, model: nn.Module) -> "ViTShape":
        """Read the shape of a timm ``VisionTransformer`` (or a host with the same attributes)."""
        proj = model.patch_embed.proj
        kernel = proj.kernel_size[0] * proj.kernel_size[1] if hasattr(proj, "kernel_size") else 1
        in_chans = proj.in_channels if hasattr(proj, "in_channels") else proj.in_features
        num_patches = model.patch_embed.num_patches
        per_patch = in_chans * kernel * model.embed_dim + _stem_macs(model.patch_embed, proj) / num_patches
        dense_head = getattr(model, "aux_head", None)
        if isinstance(dense_head, nn.Linear):
            per_patch += dense_head.in_features * dense_head.out_features
        return cls(
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            mlp_hidden=_mlp_width(model.blocks[0].mlp, model.embed_dim),
            num_patches=num_patches,
            # every token a reducer keeps aside: VPT's prompts included, and YOLOS's detection tokens (suffix)
            num_prefix_tokens=prefix_tokens(model) + int(getattr(model, "num_suffix_tokens", 0)),
            patch_macs=per_patch,
            num_classes=getattr(model, "num_classes", 0),
        )

    @classmethod
    def deit(cls, embed_dim: int, num_patches: int = 196, depth: int = 12, num_classes: int = 1000) -> "ViTShape":
        return cls(embed_dim, depth, 4 * embed_dim, num_patches, 1, 3 * 16 * 16 * embed_dim, num_classes)

    def block_macs(self, tokens: int, attention: bool = True) -> float:
        return self.attention_macs(tokens, attention) + self.mlp_macs(tokens)

    def attention_macs(self, tokens: int, attention: bool = True) -> float:
        """qkv and output projections, and (with ``attention``) the two attention matmuls, on ``tokens`` tokens."""
        d = self.embed_dim
        return tokens * 4 * d * d + (2 * tokens * tokens * d if attention else 0)

    def mlp_macs(self, tokens: int) -> float:
        return tokens * 2 * self.embed_dim * self.mlp_hidden

    def forward_macs_blocks(self, block_tokens: Sequence[Tuple[int, int]], attention: bool = True) -> float:
        """Forward MACs per image when block ``l``'s attention sees ``block_tokens[l][0]`` tokens and its MLP
        ``block_tokens[l][1]`` (prefix included), as each token-reduction op's ``block_tokens`` gives them (Token
        Merging merges between the two)."""
        if len(block_tokens) != self.depth:
            raise ValueError(f"{len(block_tokens)} blocks of token counts for a depth of {self.depth}")
        blocks = sum(self.attention_macs(t_attn, attention) + self.mlp_macs(t_mlp) for t_attn, t_mlp in block_tokens)
        return self.num_patches * self.patch_macs + blocks + self.embed_dim * self.num_classes

    def train_macs_blocks(self, block_tokens: Sequence[Tuple[int, int]], attention: bool = True) -> float:
        return TRAIN_TO_FORWARD * self.forward_macs_blocks(block_tokens, attention)

    def full_block_tokens(self) -> BlockTokens:
        return reduced_block_tokens(self.num_prefix_tokens, self.num_patches, self.num_patches, self.depth)

    def forward_macs(
        self, kept_patches: int | None = None, attention: bool = True, first_block_reduced: bool = False
    ) -> float:
        """Forward MACs per image when blocks 2..L (all blocks with ``first_block_reduced``, as under
        PatchDropout) see ``kept_patches`` patch tokens (all if ``None``)."""
        kept = self.num_patches if kept_patches is None else kept_patches
        return self.forward_macs_blocks(
            reduced_block_tokens(self.num_prefix_tokens, self.num_patches, kept, self.depth, first_block_reduced),
            attention,
        )

    def train_macs(
        self, kept_patches: int | None = None, attention: bool = True, first_block_reduced: bool = False
    ) -> float:
        return TRAIN_TO_FORWARD * self.forward_macs(kept_patches, attention, first_block_reduced)


def _mlp_width(mlp: nn.Module, embed_dim: int) -> int:
    """The hidden width of a plain two-layer MLP with ``mlp``'s MACs per token: ``fc1.out_features`` for timm's
    ``Mlp``; for a gated one (``GluMlp``, ``SwiGLU``: two input projections, one half as wide output) its linear
    layers' MACs over ``2 D``."""
    macs = sum(m.in_features * m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))
    return round(macs / (2 * embed_dim))


def _stem_macs(patch_embed: nn.Module, proj: nn.Module) -> float:
    """MACs per image of the convolutions before ``proj`` (LV-ViT's conv stem), applied in module order to the
    patch embedding's input size; 0 for a plain ViT."""
    convs = [m for m in patch_embed.modules() if isinstance(m, nn.Conv2d) and m is not proj]
    if not convs:
        return 0.0
    patch = patch_embed.patch_size[0] if isinstance(patch_embed.patch_size, (tuple, list)) else patch_embed.patch_size
    height, width = (g * patch for g in patch_embed.grid_size)
    macs = 0.0
    for conv in convs:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        height = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        width = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        macs += height * width * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    return macs


def schedule_average_macs(
    shape: ViTShape,
    phases: Sequence[Tuple[int, int]],
    schedule: Optional[ExpansionSchedule] = None,
    patch_size: int = 16,
    attention: bool = True,
) -> float:
    """Forward MACs per image averaged over every epoch of a run.

    ``phases`` are ``(epochs, img_size)`` in order (one phase for a plain run; EfficientTrain's resolution phases
    otherwise). The ToE stage of each epoch is ``bisect_right`` over the global epoch, as in the official code.
    """
    total, epoch = 0.0, 0
    for epochs, img_size in phases:
        n = (img_size // patch_size) ** 2
        at_size = replace(shape, num_patches=n)
        for _ in range(epochs):
            kept = schedule.kept_tokens(n, schedule.stage_at(epoch)) if schedule is not None else n
            total += at_size.forward_macs(kept, attention)
            epoch += 1
    if epoch == 0:
        raise ValueError("phases hold no epochs")
    return total / epoch
