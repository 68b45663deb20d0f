"""YOLOS (Fang et al., NeurIPS 2021): a DeiT that detects, built on timm's ``VisionTransformer``.

YOLOS appends ``det_tokens`` learned detection tokens after the patch tokens (``[CLS, patches, DET]``), adds a
position embedding that covers all three (the patch part resampled, bicubic, to each batch's patch grid, since
images come at many sizes), optionally adds a "mid" position embedding after every block but the last (YOLOS-S's
``--mid_pe_size``), and reads boxes and classes off the DET tokens after the final norm with two three-layer MLPs
(DETR's heads; ``num_classes + 1`` logits, the last meaning "no object"). As hustvl/YOLOS's ``finetune_det`` does it,
the detection position embedding starts from the classification one resampled to the ``init_pe_size`` grid, the DET
tokens and their embeddings from a truncated normal (std 0.02).

The backbone is timm's ViT (its patch embedding, blocks and norm as they are), so a toe-train or timm DeiT
checkpoint loads into it unchanged (``--pre_trained``); the parameter names follow YOLOS's (``backbone.det_token``,
``backbone.pos_embed``, ``backbone.mid_pos_embed``, ``class_embed``, ``bbox_embed``). The model knows nothing of token
reduction: what runs after each block is :meth:`Yolos.after_block`, where :mod:`toe.hosts.yolos` puts ToE.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """DETR's feed-forward head: ``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def resample_grid(table: torch.Tensor, old: Tuple[int, int], new: Tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings ``[..., old_h * old_w, D]`` resampled (bicubic, as YOLOS) to
    ``[..., new_h * new_w, D]``."""
    if tuple(old) == tuple(new):
        return table
    lead, dim = table.shape[:-2], table.shape[-1]
    grid = table.reshape(-1, old[0], old[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(*lead, new[0] * new[1], dim)


class Yolos(nn.Module):
    """YOLOS on ``backbone``, a timm ``VisionTransformer`` with one class token (DeiT).

    Args:
     - num_classes: DETR's count, the largest category id + 1 (COCO: 91); one more logit means "no object".
     - det_tokens: detection tokens (YOLOS: 100).
     - init_pe_size: ``(H, W)`` in pixels of the grid the detection position embedding is kept at.
     - mid_pe_size: ``(H, W)`` of the mid position embeddings, or ``None`` for none (YOLOS-Ti).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        det_tokens: int = 100,
        init_pe_size: Sequence[int] = (800, 1344),
        mid_pe_size: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        check_backbone(backbone)
        self.backbone = backbone
        self.num_classes = num_classes
        self.det_token_num = det_tokens
        self.patch_size = int(backbone.patch_embed.patch_size[0])
        dim = backbone.embed_dim
        old_grid = tuple(backbone.patch_embed.grid_size)
        self.pe_grid = self._grid(init_pe_size)
        pos = backbone.pos_embed.detach()
        det_pos = nn.init.trunc_normal_(torch.zeros(1, det_tokens, dim), std=0.02)
        patch_pos = resample_grid(pos[:, 1:], old_grid, self.pe_grid)
        backbone.pos_embed = nn.Parameter(torch.cat([pos[:, :1], patch_pos, det_pos], dim=1))
        backbone.det_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, det_tokens, dim), std=0.02))
        self.mid_grid: Optional[Tuple[int, int]] = None
        if mid_pe_size is not None:
            self.mid_grid = self._grid(mid_pe_size)
            tokens = 1 + self.mid_grid[0] * self.mid_grid[1] + det_tokens
            table = torch.zeros(len(backbone.blocks) - 1, 1, tokens, dim)
            backbone.mid_pos_embed = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))
        self.class_embed = MLP(dim, dim, num_classes + 1, 3)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        self.num_prefix_tokens = 1
        self.num_suffix_tokens = det_tokens  # what a token reducer keeps aside after the patches

    def _grid(self, size: Sequence[int]) -> Tuple[int, int]:
        return int(size[0]) // self.patch_size, int(size[1]) // self.patch_size

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def patch_embed(self) -> nn.Module:
        return self.backbone.patch_embed

    @torch.jit.ignore
    def no_weight_decay(self):
        """YOLOS's backbone keeps these out of weight decay (with every bias and norm weight)."""
        return {"backbone.pos_embed", "backbone.cls_token", "backbone.det_token"}

    def position_embedding(self, grid: Tuple[int, int]) -> torch.Tensor:
        """``[1, 1 + h * w + det, D]`` for a ``grid`` of ``h x w`` patches."""
        pos = self.backbone.pos_embed
        d = self.det_token_num
        patches = resample_grid(pos[:, 1:-d], self.pe_grid, grid)
        return torch.cat([pos[:, :1], patches, pos[:, -d:]], dim=1)

    def mid_position_embeddings(self, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
        """``[depth - 1, 1, 1 + h * w + det, D]``, or ``None`` without mid position embeddings."""
        if self.mid_grid is None:
            return None
        table, d = self.backbone.mid_pos_embed, self.det_token_num
        patches = resample_grid(table[:, :, 1:-d], self.mid_grid, grid)
        return torch.cat([table[:, :, :1], patches, table[:, :, -d:]], dim=2)

    def after_block(self, index: int, x: torch.Tensor, mid: Optional[torch.Tensor]) -> torch.Tensor:
        """What follows block ``index``: its mid position embedding ``mid`` ``[1, T, D]`` added (``None``: nothing)."""
        return x if mid is None else x + mid

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The DET tokens after the final norm, ``[B, det, D]``."""
        backbone = self.backbone
        p = self.patch_size
        # YOLOS's patch convolution drops the last rows and columns that do not fill a patch; timm's patch
        # embedding asserts a whole number of patches instead: cut them off first, the same result
        images = images[..., : images.shape[-2] // p * p, : images.shape[-1] // p * p]
        x = backbone.patch_embed(images)
        if x.dim() == 4:  # timm's dynamic_img_size keeps the grid: [B, h, w, D]
            grid = (x.shape[1], x.shape[2])
            x = x.flatten(1, 2)
        else:
            grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        batch = x.shape[0]
        x = torch.cat([backbone.cls_token.expand(batch, -1, -1), x, backbone.det_token.expand(batch, -1, -1)], dim=1)
        x = backbone.pos_drop(x + self.position_embedding(grid))
        mids = self.mid_position_embeddings(grid)
        last = len(backbone.blocks) - 1
        for index, block in enumerate(backbone.blocks):
            x = block(x)
            x = self.after_block(index, x, mids[index] if mids is not None and index < last else None)
        return backbone.norm(x)[:, -self.det_token_num :]

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``pred_logits`` ``[B, det, num_classes + 1]`` and ``pred_boxes`` ``[B, det, 4]`` (cx, cy, w, h in [0, 1] of
        the image), DETR's output."""
        x = self.forward_features(images)
        return {"pred_logits": self.class_embed(x), "pred_boxes": self.bbox_embed(x).sigmoid()}


def check_backbone(backbone: nn.Module) -> None:
    """Refuse, in one line, a backbone YOLOS cannot be built on: it needs a timm ``VisionTransformer`` with one class
    token and a position embedding that covers it (DeiT, timm's plain ViTs)."""
    needed = ("patch_embed", "pos_embed", "cls_token", "blocks", "norm")
    missing = [name for name in needed if getattr(backbone, name, None) is None]
    if missing:
        raise TypeError(
            f"YOLOS needs a timm VisionTransformer with a class token (DeiT); {type(backbone).__name__} has no "
            f"{', '.join(missing)}"
        )
    if int(getattr(backbone, "num_prefix_tokens", 1)) != 1 or getattr(backbone, "no_embed_class", False):
        raise TypeError(
            f"YOLOS needs a ViT with one class token inside its position embedding; "
            f"{type(backbone).__name__} has {backbone.num_prefix_tokens} prefix tokens"
            f"{' and no class position embedding' if getattr(backbone, 'no_embed_class', False) else ''}"
        )
    grid = tuple(backbone.patch_embed.grid_size)
    if backbone.pos_embed.shape[1] != 1 + math.prod(grid):
        raise TypeError(f"the backbone's position embedding has {backbone.pos_embed.shape[1]} rows, not 1 + {grid}")


def create_yolos(
    backbone_name: str,
    num_classes: int,
    det_tokens: int = 100,
    init_pe_size: Sequence[int] = (800, 1344),
    mid_pe_size: Optional[Sequence[int]] = None,
    **backbone_kwargs,
) -> Yolos:
    """YOLOS on timm's ``backbone_name`` (e.g. ``deit_tiny_patch16_224``: YOLOS-Ti; ``deit_small_patch16_224``:
    YOLOS-S), built without a classifier and taking images of any size (timm's ``dynamic_img_size``)."""
    import timm

    backbone = timm.create_model(backbone_name, num_classes=0, dynamic_img_size=True, **backbone_kwargs)
    return Yolos(backbone, num_classes, det_tokens, init_pe_size, mid_pe_size)
