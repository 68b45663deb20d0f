"""Writing token-labeling maps from a teacher (``toe-label-maps``): its classifier applied at every position, top-k
logits and indices saved per image in the official format of TokenLabeling's ``generate_label.py`` (see
:mod:`toe.data.token_label`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from toe.data.token_label import sample_names


def dense_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A classifier's logits at every spatial position, ``[B, H, W, classes]``: its classifier applied to the
    unpooled features (the official ``TokenLabelHead``), for CNN feature maps and for ViT tokens alike."""
    features = model.forward_features(images)
    head = getattr(model, "aux_head", None) or model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}: its classifier is {type(head).__name__}, not a Linear layer")
    if features.dim() == 4:  # CNN: [B, C, H, W]
        return head(features.permute(0, 2, 3, 1))
    tokens = features[:, getattr(model, "num_prefix_tokens", 0) :]
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not form a square grid")
    fc_norm = getattr(model, "fc_norm", None)
    if isinstance(fc_norm, nn.Module):
        tokens = fc_norm(tokens)
    return head(tokens).reshape(tokens.shape[0], side, side, -1)


@torch.no_grad()
def write_label_maps(
    model: nn.Module,
    dataset: Dataset,
    out: Path,
    topk: int = 5,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> int:
    """Write one ``[2, topk, H, W]`` float16 map per image of ``dataset`` (with an eval transform) under ``out``;
    returns the number written."""
    from tqdm import tqdm

    names = sample_names(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval().to(device)
    written = 0
    for images, _ in tqdm(loader, desc="label maps", disable=not progress):
        logits = dense_logits(model, images.to(device))
        values, indices = logits.topk(min(topk, logits.shape[-1]), dim=-1)
        maps = torch.stack([values.half(), indices.half()]).permute(1, 0, 4, 2, 3).cpu()  # [B, 2, k, H, W]
        for label_map in maps:
            path = out / f"{names[written]}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(label_map.clone(), path)  # a view would save the whole batch's storage
            written += 1
    return written
