"""The in-memory image pipeline: decoded uint8 images kept as one tensor, augmented a whole batch at a time.

For data that fits in memory (the digits set, CIFAR) the per-image PIL path costs more than the ToE-reduced step it
feeds on a small model: about 100 us an image for a crop, a resize and a tensor conversion. Here the loader only
indexes a uint8 tensor, and :class:`BatchAugment` runs on the training device, on the whole batch, with the
recipe's per-sample randomness: each image gets its own RandomResizedCrop box (torchvision's sampling, 10 tries then
a centre crop, vectorised over the batch) and its own flip, then the model's normalisation.

Why not torchvision's v2 transforms or kornia: v2 transforms draw one set of parameters per call, so a batch would
share one crop; per-sample calls bring back the per-image overhead. kornia does per-sample batches but is one more
dependency for two operations. The crop and resize is one ``grid_sample`` with a per-sample axis-aligned grid (what
kornia does too), bicubic or bilinear as the recipe asks; bilinear equals torchvision's crop-then-resize. It differs
from timm's PIL path in the bicubic kernel (PyTorch's a = -0.75, PIL's -0.5; its outer taps at the box's edge read
the pixels beyond it) and in not antialiasing a downscale; ``train.pipeline=pil`` keeps timm's exact path.
RandAugment, colour jitter and random erasing have no batched form here: recipes that use them run on the PIL path
(``train.pipeline=auto`` chooses it).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear"}


class InMemoryImages(Dataset):
    """Images ``[N, C, H, W]`` and their labels in memory, served a batch at a time (``__getitems__``: the
    DataLoader hands it a batch's indices and :func:`as_batch` passes the result through)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: Optional[List[str]]):
        self.images, self.targets, self.classes = images, torch.as_tensor(targets, dtype=torch.long), classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]

    def __getitems__(self, indices: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.targets[index]


class TensorImages(InMemoryImages):
    """Decoded training images ``[N, 3, H, W]`` uint8, for :class:`BatchAugment` to augment on the device."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: List[str]):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        super().__init__(images, targets, classes)


def cached_images(dataset: Dataset) -> InMemoryImages:
    """``dataset`` with its transform applied once, for a transform that is deterministic (evaluation's resize,
    centre crop, normalisation): the same tensors as the per-epoch path, without its per-epoch cost."""
    items = [dataset[i] for i in range(len(dataset))]
    return InMemoryImages(
        torch.stack([image for image, _ in items]),
        [int(target) for _, target in items],
        getattr(dataset, "classes", None),
    )


def as_batch(batch: Any) -> Any:
    """The DataLoader's collate for :class:`TensorImages`: its ``__getitems__`` already returns a batch."""
    return batch


def random_resized_crop_boxes(
    batch: int, height: int, width: int, scale: Tuple[float, float], ratio: Tuple[float, float], attempts: int = 10
) -> torch.Tensor:
    """``[batch, 4]`` crop boxes ``(top, left, h, w)`` in pixels, drawn per image as torchvision's
    ``RandomResizedCrop.get_params``: up to ``attempts`` tries of an area in ``scale`` and a log-uniform aspect
    ratio in ``ratio``, the first that fits; a centre crop of the clamped aspect ratio where none does. Drawn from
    torch's global RNG on the CPU (seeded per process, saved in the checkpoint)."""
    area = float(height * width)
    target_area = area * torch.empty(batch, attempts).uniform_(scale[0], scale[1])
    log_ratio = torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1)  # the first try that fits (0 where none does; masked below)
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    any_fits = fits.any(dim=1)
    # torchvision's fallback: the whole image at an aspect ratio clamped to `ratio`, centred
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(any_fits, w, torch.tensor(float(fallback_w)))
    h = torch.where(any_fits, h, torch.tensor(float(fallback_h)))
    top = torch.floor(torch.rand(batch) * (height - h + 1))
    left = torch.floor(torch.rand(batch) * (width - w + 1))
    top = torch.where(any_fits, top, torch.tensor(float((height - fallback_h) // 2)))
    left = torch.where(any_fits, left, torch.tensor(float((width - fallback_w) // 2)))
    return torch.stack([top, left, h, w], dim=1)


class BatchAugment(nn.Module):
    """A batch of uint8 images ``[B, 3, H, W]`` on the device -> normalised float images ``[B, 3, S, S]``: a
    per-image random resized crop to ``size``, a per-image horizontal flip with probability ``hflip``, then
    ``(x / 255 - mean) / std``. The values are rounded to whole 8-bit levels before normalising, as the PIL path's
    uint8 images are."""

    def __init__(
        self,
        size: int,
        scale: Tuple[float, float],
        ratio: Tuple[float, float],
        hflip: float,
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r}: the tensor pipeline has {sorted(INTERPOLATIONS)}")
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.mode = INTERPOLATIONS[interpolation]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        top, left, h, w = random_resized_crop_boxes(batch, height, width, self.scale, self.ratio).unbind(1)
        # The map from the output's [-1, 1] square to the box, in grid_sample's align_corners=False units: a scale
        # and a shift per axis, so the sampling grid is the outer combination of one x and one y coordinate vector
        # per image (what F.affine_grid would give for this diagonal map, without its batched matmul)
        scale_x, shift_x = w / width, (2 * left + w) / width - 1
        scale_y, shift_y = h / height, (2 * top + h) / height - 1
        if self.hflip > 0:  # a flip after the crop is the crop's x axis reversed
            scale_x = torch.where(torch.rand(batch) < self.hflip, -scale_x, scale_x)
        # Crop, then resize: sampling stays within the box's pixel centres, as a resize of the cropped image does
        low_x, high_x = (2 * left + 1) / width - 1, (2 * (left + w) - 1) / width - 1
        low_y, high_y = (2 * top + 1) / height - 1, (2 * (top + h) - 1) / height - 1
        centres = (torch.arange(self.size, dtype=torch.float32) * 2 + 1) / self.size - 1  # output pixel centres
        x = torch.minimum(torch.maximum(scale_x[:, None] * centres + shift_x[:, None], low_x[:, None]), high_x[:, None])
        y = torch.minimum(torch.maximum(scale_y[:, None] * centres + shift_y[:, None], low_y[:, None]), high_y[:, None])
        x, y = (t.to(images.device, non_blocking=True) for t in (x, y))
        grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)  # [B, S, S, (x, y)]
        out = F.grid_sample(images.float(), grid, mode=self.mode, padding_mode="border", align_corners=False)
        return (out.round_().clamp_(0, 255) - self.mean) / self.std

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, interpolation={self.mode}"
        )


def uint8_images(dataset: Dataset) -> Optional[torch.Tensor]:
    """The decoded images of an in-memory dataset as ``[N, 3, H, W]`` uint8 (digits, torchvision's CIFAR), or
    ``None`` for datasets read from files."""
    import numpy as np

    if hasattr(dataset, "images") and isinstance(dataset.images, list):  # DigitsDataset: PIL images
        return torch.from_numpy(np.stack([np.asarray(image) for image in dataset.images])).permute(0, 3, 1, 2)
    data = getattr(dataset, "data", None)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4 and data.shape[-1] == 3:
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()  # CIFAR: [N, 32, 32, 3]
    return None


IN_MEMORY_DATASETS = ("digits", "cifar10", "cifar100")  # decoded images at hand (uint8_images), not read from files


def tensor_pipeline_reasons(
    recipe: Any, train_interpolation: str, data_name: str, in_memory: bool, curriculum: bool, token_labels: bool
) -> List[str]:
    """Why the batched tensor pipeline cannot run a run (empty when it can): the recipe settings it lacks, images
    read from files, the curriculum's RandAugment per phase, token labels cropped with each image."""
    reasons = [f"{key}={value}" for key, value in tensor_pipeline_blockers(recipe, train_interpolation).items()]
    if not in_memory:
        reasons.append(f"data={data_name} is read from files (the tensor pipeline holds digits and CIFAR in memory)")
    if curriculum:
        reasons.append("the EfficientTrain curriculum changes RandAugment per phase")
    if token_labels:
        reasons.append("token labeling crops each image's label map with it")
    return reasons


def tensor_refusal(reasons: List[str]) -> str:
    return (
        f"train.pipeline=tensor cannot run this run: {'; '.join(reasons)} (train.pipeline=pil or auto runs it on "
        "timm's PIL path)"
    )


def tensor_pipeline_blockers(recipe: Any, train_interpolation: str) -> Dict[str, Any]:
    """The recipe settings the batched tensor pipeline cannot run (empty when it can run the recipe)."""
    blockers = {}
    if recipe.auto_augment:
        blockers["recipe.auto_augment"] = recipe.auto_augment
    if recipe.color_jitter:
        blockers["recipe.color_jitter"] = recipe.color_jitter
    if recipe.reprob:
        blockers["recipe.reprob"] = recipe.reprob
    if train_interpolation not in INTERPOLATIONS:
        blockers["recipe.train_interpolation"] = train_interpolation
    return blockers
