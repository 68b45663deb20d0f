"""DETR's set prediction loss (Carion et al., ECCV 2020), as YOLOS trains with it, and its post-processing.

Each image's ground-truth boxes are matched one-to-one to the detection tokens' predictions by the Hungarian
algorithm on a cost of ``cost_class * (-p(class)) + cost_bbox * L1 + cost_giou * (-GIoU)``; the matched predictions
learn their class and box (L1 and GIoU, summed over the boxes and divided by their count over all processes), every
other prediction learns "no object", whose cross-entropy weight is ``eos_coef``. YOLOS's defaults: costs 1, 5, 2;
loss weights 1, 5, 2; ``eos_coef`` 0.1.

The assignment is scipy's ``linear_sum_assignment`` (what DETR and YOLOS call), the box arithmetic torchvision's
``box_convert`` and ``generalized_box_iou``: nothing here re-implements them. The matching reads the cost matrix
back to the host once per batch, as DETR does: a Hungarian solver on the device would be the only way around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

Target = Dict[str, torch.Tensor]  # "labels" [K] (category ids), "boxes" [K, 4] (cx, cy, w, h in [0, 1])


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_convert

    return box_convert(boxes, "cxcywh", "xyxy")


@dataclass(frozen=True)
class LossWeights:
    """YOLOS's (and DETR's) matching costs and loss weights (main.py: set_cost_*, *_loss_coef, eos_coef)."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    loss_ce: float = 1.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    eos_coef: float = 0.1


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[Target], weights: LossWeights
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per image, ``(prediction indices, target indices)`` of the optimal one-to-one matching."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import generalized_box_iou

    batch, queries = logits.shape[:2]
    sizes = [len(t["boxes"]) for t in targets]
    if sum(sizes) == 0:
        empty = torch.empty(0, dtype=torch.long)
        return [(empty, empty) for _ in targets]
    prob = logits.flatten(0, 1).float().softmax(-1)
    out_boxes = boxes.flatten(0, 1).float()
    labels = torch.cat([t["labels"] for t in targets])
    tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
    cost = (
        weights.cost_bbox * torch.cdist(out_boxes, tgt_boxes, p=1)
        - weights.cost_class * prob[:, labels]
        - weights.cost_giou * generalized_box_iou(cxcywh_to_xyxy(out_boxes), cxcywh_to_xyxy(tgt_boxes))
    )
    cost = cost.view(batch, queries, -1).cpu()
    matches = []
    for index, part in enumerate(cost.split(sizes, -1)):
        rows, cols = linear_sum_assignment(part[index].numpy())
        matches.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return matches


class SetCriterion(nn.Module):
    """DETR's loss on ``{"pred_logits", "pred_boxes"}`` against a list of :data:`Target`; returns the weighted total.

    The parts of the last call are kept in :attr:`parts` (``loss_ce``, ``loss_bbox``, ``loss_giou``, detached) for
    the record. ``reduce`` sums a tensor over processes (DDP), so that the box count that normalises the box losses
    is the mean over processes, as DETR's is.
    """

    def __init__(
        self,
        num_classes: int,
        weights: LossWeights = LossWeights(),
        reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
        world_size: int = 1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.weights = weights
        self.reduce = reduce
        self.world_size = world_size
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = weights.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        self.parts: Dict[str, torch.Tensor] = {}

    def forward(self, outputs: Dict[str, torch.Tensor], targets: Sequence[Target]) -> torch.Tensor:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        matches = hungarian_match(logits, boxes, targets, self.weights)
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matches)]).to(device)
        src_idx = torch.cat([src for src, _ in matches]).to(device)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=device)
        classes[batch_idx, src_idx] = torch.cat([t["labels"][tgt.to(device)] for t, (_, tgt) in zip(targets, matches)])
        loss_ce = F.cross_entropy(logits.transpose(1, 2).float(), classes, self.empty_weight.to(device))
        num_boxes = self.reduce(torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device))
        num_boxes = torch.clamp(num_boxes / self.world_size, min=1.0)
        matched = boxes[batch_idx, src_idx].float()
        target_boxes = torch.cat([t["boxes"][tgt.to(device)] for t, (_, tgt) in zip(targets, matches)]).float()
        loss_bbox = F.l1_loss(matched, target_boxes, reduction="sum") / num_boxes
        loss_giou = self._giou_loss(matched, target_boxes) / num_boxes
        w = self.weights
        self.parts = {"loss_ce": loss_ce.detach(), "loss_bbox": loss_bbox.detach(), "loss_giou": loss_giou.detach()}
        return w.loss_ce * loss_ce + w.loss_bbox * loss_bbox + w.loss_giou * loss_giou

    @staticmethod
    def _giou_loss(boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import generalized_box_iou_loss

        if boxes.shape[0] == 0:
            return boxes.sum()
        return generalized_box_iou_loss(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(targets), reduction="sum")


@torch.no_grad()
def postprocess(outputs: Dict[str, torch.Tensor], sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """DETR's ``PostProcess``: per image, every detection token's best real class and its probability, and its box
    in pixels ``(x0, y0, x1, y1)`` of the image's original ``sizes`` ``[B, 2]`` (height, width)."""
    prob = outputs["pred_logits"].float().softmax(-1)
    scores, labels = prob[..., :-1].max(-1)
    boxes = cxcywh_to_xyxy(outputs["pred_boxes"].float())
    height, width = sizes.unbind(1)
    boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :].to(boxes)
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
