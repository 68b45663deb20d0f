"""LV-ViT (Jiang et al., NeurIPS 2021, "All Tokens Matter"), written from TokenLabeling's ``tlt/models/lvvit.py`` and
registered with timm (``timm.create_model("lvvit_s")``).

Convolutional 4_2 patch stem, pre-LN blocks whose residual branches are divided by ``skip_lam``, a class head on
the CLS token and an auxiliary dense head on every patch token, MixToken on the stem's feature map in training.
Training returns ``(cls_logits, dense_logits [B, N, C], mix_box)`` (``dense_logits`` is None once the dense head
is dropped, for training without label maps); evaluation returns ``cls_logits + 0.5 * dense_logits.max(1)``.
The model knows nothing of ToE: :mod:`toe.hosts.lvvit` adds it.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import register_model
from torch import nn


class ConvStem(nn.Module):
    """``PatchEmbed4_2``: three conv-BN-ReLU layers (7x7 stride 2, 3x3, 3x3) then a ``patch/2`` stride projection."""

    def __init__(
        self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384, stem_dim: int = 64
    ):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, stem_dim, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_dim),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(stem_dim, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x))  # [B, D, H, W]: MixToken works on this map


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as (q * scale) @ k^T
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float, skip_lam: float, drop_path: float = 0.0
    ):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)  # eps 1e-5, as LV-ViT
        self.attn = Attention(dim, num_heads, head_dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


def _mix_box(height: int, width: int, lam: float) -> Tuple[int, int, int, int]:
    """A random box covering about ``1 - lam`` of the grid, as TokenLabeling's ``rand_bbox``: kept rather than
    timm's ``rand_bbox``, whose upper edge is ``(cut + 1) // 2`` from the centre where the official one is
    ``cut // 2``. Drawn from the global ``np.random``, like timm's Mixup: seeded per process by ``random_seed`` and
    saved in the checkpoint's RNG state."""
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = np.random.randint(height), np.random.randint(width)
    return (
        int(np.clip(cy - ch // 2, 0, height)),
        int(np.clip(cx - cw // 2, 0, width)),
        int(np.clip(cy + ch // 2, 0, height)),
        int(np.clip(cx + cw // 2, 0, width)),
    )


class LVViT(nn.Module):
    """LV-ViT with the attributes ``toe.patch`` and ``toe.cost.flops`` read (``blocks``, ``num_prefix_tokens``,
    ``embed_dim``, ``patch_embed``)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 6,
        head_dim: int = 64,
        mlp_ratio: float = 3.0,
        skip_lam: float = 2.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mix_token: bool = True,
        return_dense: bool = True,
    ):
        super().__init__()
        self.num_classes, self.embed_dim, self.num_prefix_tokens = num_classes, embed_dim, 1
        self.mix_token, self.return_dense = mix_token, return_dense
        self.patch_embed = ConvStem(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, head_dim, mlp_ratio, skip_lam, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.aux_head = nn.Linear(embed_dim, num_classes) if return_dense else None
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def drop_dense_head(self) -> None:
        """Train without token labels: no auxiliary head (it would get no gradient and only add noise at eval)."""
        self.aux_head, self.return_dense = None, False

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + N, D]`` tokens after pos-embed -> normed tokens at all ``1 + N`` positions."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _encode(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The stem's ``[B, D, H, W]`` map -> normed ``[B, 1 + N, D]`` tokens (CLS, position embedding, blocks)."""
        x = feature_map.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.forward_tokens(self.pos_drop(x + self.pos_embed))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normed ``[B, 1 + N, D]`` tokens, without MixToken (teachers writing label maps use this)."""
        return self._encode(self.patch_embed(images))

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, images: torch.Tensor):
        feature_map = self.patch_embed(images)  # [B, D, H, W]
        box = (0, 0, 0, 0)
        if self.training and self.mix_token:
            lam = float(np.random.beta(1.0, 1.0))
            box = _mix_box(feature_map.shape[2], feature_map.shape[3], lam)
            y1, x1, y2, x2 = box
            mixed = feature_map.clone()
            mixed[:, :, y1:y2, x1:x2] = feature_map.flip(0)[:, :, y1:y2, x1:x2]
            feature_map = mixed
        height, width = feature_map.shape[2], feature_map.shape[3]
        x = self._encode(feature_map)
        cls_logits = self.head(x[:, 0])
        if self.aux_head is None:
            return (cls_logits, None, box) if self.training else cls_logits
        dense = self.aux_head(x[:, 1:])
        if not self.training:
            return cls_logits + 0.5 * dense.max(1)[0]
        y1, x1, y2, x2 = box
        if y2 > y1 and x2 > x1:  # un-mix, so each image's dense predictions line up with its own label map
            grid = dense.reshape(dense.shape[0], height, width, -1)
            unmixed = grid.clone()
            unmixed[:, y1:y2, x1:x2] = grid.flip(0)[:, y1:y2, x1:x2]
            dense = unmixed.reshape(dense.shape[0], height * width, -1)
        return cls_logits, dense, box


def _create(variant: str, pretrained: bool = False, **kwargs) -> LVViT:
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights ship with toe; use finetune.path=<checkpoint>")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # what timm.create_model adds
        kwargs.pop(key, None)
    return LVViT(**kwargs)


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-T: width 240, depth 12, 4 heads of 60, MLP x3, skip_lam 1.0 (8.53M parameters)."""
    args = dict(embed_dim=240, depth=12, num_heads=4, head_dim=60, mlp_ratio=3.0, skip_lam=1.0)
    return _create("lvvit_t", pretrained, **{**args, **kwargs})


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-S: width 384, depth 16, 6 heads of 64, MLP x3, skip_lam 2.0 (26.15M parameters)."""
    args = dict(embed_dim=384, depth=16, num_heads=6, head_dim=64, mlp_ratio=3.0, skip_lam=2.0)
    return _create("lvvit_s", pretrained, **{**args, **kwargs})
