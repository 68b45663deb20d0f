"""Token labeling (LV-ViT, Jiang et al. 2021): per-image label maps, their crop-aligned dense targets and the loss.

The label-map format is the official one (``generate_label.py`` of TokenLabeling): one ``.pt`` file per training
image at ``<label_root>/<class folder>/<image stem>.pt``, a float16 tensor ``[2, 5, H, W]`` holding a teacher's
top-5 dense logits (``[0]``) and their class indices (``[1]``). ``toe-label-maps`` (:mod:`toe.data.label_maps`) writes
such maps from a toe-train checkpoint (or any timm model) for any data set toe reads.

Data flow, as in the official code:
1. :class:`LabelMapDataset` loads an image and its map, flips both, and draws the RandomResizedCrop of the
   image; the map is not cropped, the crop box travels with the sample (``box``: top, left, bottom, right as
   fractions of the image).
2. :func:`token_label_targets` (on the device) scatters the top-5 logits into a dense ``[B, classes, H, W]`` map,
   ``roi_align``-s the crop box to the model's token grid (and to 1x1 for the class-token target), softmaxes over
   classes (the non-top-5 classes keep logit 0) and smooths with ``t * on + off``.
3. :class:`TokenLabelLoss`: soft-target CE of the class token against the 1x1 target, mixed by MixToken's
   ``lam = 1 - box_area / N``, plus soft-target CE of every position's dense logits against its dense target.

Where the official code is odd it is followed by default, with a switch: ``box_order="official"`` hands
``roi_align`` the box as (top, left, bottom, right) although it reads (x1, y1, x2, y2), so the label crop is the
image crop mirrored about the diagonal; ``box_order="xy"`` aligns them. The official joint transform also applies
RandAugment's geometric ops (rotate, shear, translate) to the map; here RandAugment acts on the image only.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import Dataset

BOX_ORDERS = ("official", "xy")


class LabelMapError(FileNotFoundError):
    """A label map is missing or malformed; the message names the file and the expected layout."""


def sample_names(dataset: Dataset) -> List[str]:
    """``<class folder>/<image stem>`` of every sample, the key of its label map."""
    if hasattr(dataset, "names"):  # DigitsDataset
        return list(dataset.names)
    if hasattr(dataset, "filename"):  # timm ImageDataset: paths relative to the split folder
        paths = [Path(dataset.filename(i)) for i in range(len(dataset))]
    elif hasattr(dataset, "samples"):  # torchvision ImageFolder
        paths = [Path(p) for p, _ in dataset.samples]
    else:
        raise LabelMapError(
            f"{type(dataset).__name__} has no per-image file names; token labeling needs an image "
            "folder (data=imagefolder or imagenet) or the digits set"
        )
    return [f"{p.parent.name}/{p.stem}" for p in paths]


def load_label_map(path: Path) -> torch.Tensor:
    try:
        label_map = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LabelMapError(
            f"no label map {path} (expected <label_root>/<class>/<image stem>.pt, as written by "
            "TokenLabeling's generate_label.py or toe-label-maps)"
        ) from None
    if not isinstance(label_map, torch.Tensor) or label_map.dim() != 4 or label_map.shape[0] != 2:
        shape = tuple(label_map.shape) if isinstance(label_map, torch.Tensor) else type(label_map).__name__
        raise LabelMapError(f"label map {path} has shape {shape}; expected [2, k, H, W] (top-k logits, indices)")
    return label_map.float()


def _split_train_transform(transform: Callable):
    """timm's train transform is ``Compose([RandomResizedCropAndInterpolation, RandomHorizontalFlip?, ...])``:
    the crop and flip move to :class:`LabelMapDataset`, which applies them to the map too; the rest stays."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", [transform]))
    if not steps or not isinstance(steps[0], RandomResizedCropAndInterpolation):
        raise ValueError(
            f"token labeling needs a timm train transform that starts with a random resized crop, got {transform}"
        )
    crop, steps = steps[0], steps[1:]
    flip = 0.0
    if steps and isinstance(steps[0], T.RandomHorizontalFlip):
        flip, steps = steps[0].p, steps[1:]
    return crop, flip, T.Compose(steps)


class LabelMapDataset(Dataset):
    """Wraps a training set (its images untransformed) and adds each image's label map and crop box to its target:
    ``(image, {"label", "scores", "classes", "box"})``. Set ``transform`` to a timm train transform.

    Maps naming a class beyond ``num_classes`` are refused here, on the loader's CPU side, so the training step
    needs no device sync to check them."""

    def __init__(self, base: Dataset, label_root: Path, num_classes: int, check: int = 16):
        self.base, self.label_root, self.num_classes = base, Path(label_root), num_classes
        self.base.transform = None
        self.classes = getattr(base, "classes", None)
        self.names = sample_names(base)
        if not self.label_root.is_dir():
            raise LabelMapError(f"token_label.root={label_root} is not a directory")
        # Fail before training, not at the first missing file hours in: check a spread of samples up front.
        step = max(1, len(self.names) // max(check, 1))
        for name in self.names[::step]:
            if not (self.label_root / f"{name}.pt").is_file():
                raise LabelMapError(
                    f"token_label.root={label_root} has no label map for training image {name} "
                    f"(expected {self.label_root / name}.pt)"
                )
        self.transform = None

    @property
    def transform(self) -> Optional[Callable]:
        return self._transform

    @transform.setter
    def transform(self, transform: Optional[Callable]) -> None:
        self._transform = transform
        self._crop, self._flip, self._rest = (
            _split_train_transform(transform) if transform is not None else (None, 0.0, None)
        )

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Tuple[Any, Dict[str, torch.Tensor]]:
        from torchvision.transforms import functional as TF

        if self._crop is None:
            raise RuntimeError("LabelMapDataset.transform is not set")
        image, label = self.base[index]
        path = self.label_root / f"{self.names[index]}.pt"
        label_map = load_label_map(path)
        if int(label_map[1].max()) >= self.num_classes:
            raise LabelMapError(
                f"label map {path} names class {int(label_map[1].max())}, but the model has {self.num_classes} classes"
            )
        if self._flip and random.random() < self._flip:  # flip first, then crop in the flipped frame (official)
            image, label_map = TF.hflip(image), label_map.flip(-1)
        width, height = image.size
        crop = self._crop
        top, left, h, w = crop.get_params(image, crop.scale, crop.ratio)
        interpolation = (
            random.choice(crop.interpolation) if isinstance(crop.interpolation, (list, tuple)) else crop.interpolation
        )
        image = TF.resized_crop(image, top, left, h, w, list(crop.size), interpolation)
        box = torch.tensor([top / height, left / width, (top + h) / height, (left + w) / width])
        target = {"label": torch.tensor(int(label)), "scores": label_map[0], "classes": label_map[1].long(), "box": box}
        return self._rest(image), target


def smoothing_values(smoothing: float, num_classes: int) -> Tuple[float, float]:
    """The official ``on``/``off`` values: ``off = s / C``, ``on = 1 - s + off`` (so smoothed soft targets sum to
    ``1 + s / C``, as in TokenLabeling)."""
    off = smoothing / num_classes
    return 1.0 - smoothing + off, off


def token_label_targets(
    target: Dict[str, torch.Tensor],
    num_classes: int,
    grid: Tuple[int, int],
    smoothing: float = 0.1,
    box_order: str = "official",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground truth ``[B, C]`` (smoothed one-hot), class-token target ``[B, C]`` and dense targets
    ``[B, N, C]`` (row-major over ``grid``) from a batch of label maps and crop boxes."""
    from timm.data.mixup import mixup_target
    from torchvision.ops import roi_align

    if box_order not in BOX_ORDERS:
        raise ValueError(f"box_order={box_order!r}: expected one of {BOX_ORDERS}")
    scores, classes, box = target["scores"], target["classes"], target["box"].float()
    batch, _, height, width = scores.shape
    dense_map = scores.new_zeros(batch, num_classes, height, width).scatter_(1, classes, scores)
    if box_order == "xy":
        box = box[:, [1, 0, 3, 2]]  # (left, top, right, bottom) = roi_align's (x1, y1, x2, y2)
    # Official: boxes = coords * W - 0.5 (pixel centres), with W the map's width for both axes.
    rois = torch.cat([torch.arange(batch, device=box.device, dtype=box.dtype)[:, None], box * width - 0.5], 1)
    on, off = smoothing_values(smoothing, num_classes)
    cls_target = roi_align(dense_map, rois, output_size=(1, 1)).flatten(1).softmax(1) * on + off
    dense = roi_align(dense_map, rois, output_size=tuple(grid)).softmax(1) * on + off
    ground_truth = mixup_target(target["label"], num_classes, lam=1.0, smoothing=smoothing)
    return ground_truth, cls_target, dense.flatten(2).transpose(1, 2)


class TokenLabelLoss(nn.Module):
    """LV-ViT's loss on ``(cls_logits, dense_logits | None, mix_box)``.

    With label maps (dict targets): ``cls_weight * CE(cls, mixed cls target) + dense_weight * CE(dense, dense
    targets)`` over all ``B * N`` positions, zero-padded ToE positions included (no mask, as the official code).
    Without them (class indices or Mixup's soft targets): the class-token term alone.
    """

    def __init__(
        self,
        num_classes: int,
        grid: Tuple[int, int],
        smoothing: float = 0.1,
        dense_weight: float = 1.0,
        cls_weight: float = 1.0,
        ground_truth: bool = False,
        box_order: str = "official",
    ):
        super().__init__()
        if box_order not in BOX_ORDERS:
            raise ValueError(f"token_label.box_order={box_order!r}: expected one of {BOX_ORDERS}")
        self.num_classes, self.grid, self.smoothing = num_classes, tuple(grid), smoothing
        self.dense_weight, self.cls_weight = dense_weight, cls_weight
        self.ground_truth, self.box_order = ground_truth, box_order
        self.soft_cross_entropy = SoftTargetCrossEntropy()

    def forward(self, outputs, target) -> torch.Tensor:
        from timm.data.mixup import mixup_target

        if not isinstance(outputs, (tuple, list)):
            raise TypeError("TokenLabelLoss expects the LV-ViT training output (cls_logits, dense_logits, box)")
        cls_logits, dense, (y1, x1, y2, x2) = outputs
        # MixToken pasted the flipped batch into the box: the class-token target mixes alike, with lam the share of
        # positions left unmixed
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (self.grid[0] * self.grid[1])
        dense_target = None
        if isinstance(target, dict):
            ground_truth, cls_target, dense_target = token_label_targets(
                target, self.num_classes, self.grid, self.smoothing, self.box_order
            )
            if self.ground_truth:  # official --ground-truth: lean on the label where the teacher disagrees
                agree = (ground_truth.argmax(-1) == cls_target.argmax(-1)).float()
                ratio = (0.9 - 0.4 * agree).unsqueeze(-1)
                cls_target = cls_target * ratio + ground_truth * (1 - ratio)
        elif target.dim() == 1:  # class indices: smoothing, one-hot and lam mixing are timm's mixup_target
            cls_target = mixup_target(target, self.num_classes, lam=lam, smoothing=self.smoothing)
            lam = 1.0
        else:
            cls_target = target  # already soft (Mixup/CutMix)
        if lam < 1.0:  # soft targets: timm has no mixing for them, so it is written here
            cls_target = lam * cls_target + (1.0 - lam) * cls_target.flip(0)
        loss = self.cls_weight * self.soft_cross_entropy(cls_logits, cls_target)
        if dense_target is not None and dense is not None:
            loss = loss + self.dense_weight * self.soft_cross_entropy(
                dense.reshape(-1, dense.shape[-1]), dense_target.reshape(-1, dense_target.shape[-1])
            )
        return loss
