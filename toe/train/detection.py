"""Box AP of a detector on a COCO-indexed val set: pycocotools' ``COCOeval``, as DETR's and YOLOS's evaluation.

Every detection token's best class and box go to ``COCOeval`` (DETR submits all of them, ranked by score; COCO
keeps the best 100 per image). Each process predicts its own shard; the predictions are gathered and every process
computes the same AP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from toe.models.detr import postprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoxAP:
    """COCO's box AP (IoU 0.50:0.95), AP50 and AP75 as fractions; ``small``/``medium``/``large`` as COCO sizes them
    (-1 where the val set has no object of that size, as pycocotools says it)."""

    ap: float
    ap50: float
    ap75: float
    small: float = -1.0
    medium: float = -1.0
    large: float = -1.0


def coco_results(outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> List[Dict[str, Any]]:
    """COCO's result format for one batch: ``image_id``, ``category_id``, ``bbox`` (x, y, w, h in the original
    image's pixels) and ``score`` of every detection token."""
    sizes = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_boxes"].device)
    results = []
    for target, found in zip(targets, postprocess(outputs, sizes)):
        boxes = found["boxes"].cpu()
        boxes[:, 2:] -= boxes[:, :2]
        image_id = int(target["image_id"])
        for score, label, box in zip(found["scores"].tolist(), found["labels"].tolist(), boxes.tolist()):
            results.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
    return results


def box_ap(coco: Any, results: List[Dict[str, Any]]) -> BoxAP:
    """``COCOeval`` of ``results`` against the ground truth index ``coco`` (pycocotools' ``COCO``), quietly."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return BoxAP(0.0, 0.0, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        found = coco.loadRes(results)
        evaluation = COCOeval(coco, found, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(float(v), 0.0) if i < 3 else float(v) for i, v in enumerate(evaluation.stats[:6])]
    return BoxAP(*stats)


@torch.no_grad()
def evaluate_detection(
    model: torch.nn.Module,
    loader,
    coco: Any,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = False,
    gather: Optional[Callable[[Any], List[Any]]] = None,
) -> BoxAP:
    """Box AP of ``model`` (full tokens: eval mode) over ``loader``; ``gather`` collects each process's
    predictions (``None``: one process)."""
    model.eval()
    results: List[Dict[str, Any]] = []
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        with autocast():
            outputs = model(images.to(device, non_blocking=True))
        results.extend(coco_results(outputs, targets))
    if gather is not None:
        results = [r for part in gather(results) for r in part]
    return box_ap(coco, results)


# --- building a detection run ------------------------------------------------------------------------------


class CachedSamples(torch.utils.data.Dataset):
    """A detection set with its transform applied once: for a transform that is deterministic (evaluation's
    resize; training at one scale without flips or crops, the embedded set's), the same samples without their
    per-epoch cost."""

    def __init__(self, dataset):
        self.samples = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


def detection_datasets(cfg: Any):
    """The run's train and val :class:`toe.data.detection.CocoDetectionSet`."""
    from toe.data.detection import DigitsDetection, coco_sets, digits_detection_sets

    data = cfg.data
    if data.name == "coco":
        return coco_sets(data.root, data.train_split or "train2017", data.val_split or "val2017")
    images = data.images or [DigitsDetection.train_images, DigitsDetection.val_images]
    spec = DigitsDetection(
        train_images=int(images[0]),
        val_images=int(images[1]),
        canvas=int(data.canvas or DigitsDetection.canvas),
        min_digits=int((data.digits_per_image or [1, 2])[0]),
        max_digits=int((data.digits_per_image or [1, 2])[1]),
        digit_sizes=tuple(int(v) for v in (data.digit_sizes or DigitsDetection.digit_sizes)),
        seed=int(data.split_seed or 0),
    )
    return digits_detection_sets(spec)


def deterministic_train_transform(cfg: Any) -> bool:
    node = cfg.detection
    return len(set(node.scales)) == 1 and not node.crop and cfg.recipe.hflip == 0


def nominal_patch_grid(cfg: Any, patch_size: int) -> Tuple[int, int]:
    """The patch grid the record's FLOPs count a training image at: the embedded set's canvas, or for COCO the
    middle training scale at COCO's typical 4:3 (its longest side capped at ``max_size``); the token count of a
    multi-scale run varies from batch to batch around it."""
    node = cfg.detection
    if cfg.data.name == "digits_detection":
        side = min(node.scales[0], node.max_size)
        return side // patch_size, side // patch_size
    short = sorted(node.scales)[len(node.scales) // 2]
    long = min(node.max_size, round(short * 4 / 3))
    return short // patch_size, long // patch_size


def build_detection_run(cfg: Any, plan: Any, info: Any):
    """The :class:`toe.train.build.Run` of a ``task=detection`` config: YOLOS on its backbone (``finetune.path``,
    or the digits backbone :func:`toe.train.backbone.digits_backbone` trains), ToE (or PatchDropout) patched in,
    DETR's loss, COCO box AP for evaluation; optimizer, scheduler, EMA, compile and DDP as for classification."""
    from timm.data import resolve_model_data_config
    from timm.utils import random_seed

    from toe.config.schema import ConfigError
    from toe.cost.flops import ViTShape
    from toe.data.datasets import SeededSamples, SeededTransforms
    from toe.data.detection import collate_detection, detection_transforms
    from toe.models.detr import LossWeights, SetCriterion
    from toe.models.pretrained import CheckpointMismatchError, load_pretrained
    from toe.models.yolos import Yolos
    from toe.train.backbone import digits_backbone
    from toe.train.build import (
        CACHE_BYTES,
        Run,
        apply_token_reduction,
        create_model,
        optimization,
        resolve_amp,
        resolve_device,
        schedule_and_scaler,
    )
    from toe.train.distributed import all_reduce_sum
    from toe.train.loaders import loader_settings, own_generator, processes_per_node, train_sampler

    device = resolve_device(cfg.train.device, info.local_rank)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext
    path = cfg.finetune.path
    if path is None:  # the embedded set's backbone (validate refuses COCO without one)
        path = str(digits_backbone(cfg, info))
    random_seed(cfg.seed, info.rank)
    train_set, val_set = detection_datasets(cfg)
    num_classes = cfg.data.num_classes or train_set.num_classes
    if num_classes < train_set.num_classes:
        raise ConfigError(
            f"data.num_classes={num_classes}: the categories of data={cfg.data.name} go up to id "
            f"{train_set.num_classes - 1}, and DETR's head needs the largest id + 1 (leave it null to count them)"
        )
    backbone = create_model(cfg, 0, dynamic_img_size=True)
    try:
        load_pretrained(backbone, Path(path).expanduser(), use_ema=cfg.finetune.use_ema)
    except (FileNotFoundError, CheckpointMismatchError) as err:
        raise ConfigError(f"{err} (YOLOS's backbone is model.name={cfg.model.name})") from None
    node = cfg.detection
    model = Yolos(backbone, num_classes, node.det_tokens, node.init_pe_size, node.mid_pe_size)
    apply_token_reduction(model, cfg, plan)
    data_config = resolve_model_data_config(backbone)
    train_t, eval_t = detection_transforms(
        node.scales, node.max_size, node.eval_size, cfg.recipe.hflip, node.crop, data_config["mean"], data_config["std"]
    )
    train_set.transform, val_set.transform = train_t, eval_t
    cached = deterministic_train_transform(cfg) and len(train_set) * 3 * node.max_size**2 * 4 <= CACHE_BYTES
    log.info(
        "detection: YOLOS on %s, %d detection tokens, mid position embeddings %s; %d train / %d val images of %s "
        "(%d categories); training transform %s%s",
        cfg.model.name,
        node.det_tokens,
        node.mid_pe_size or "none",
        len(train_set),
        len(val_set),
        cfg.data.name,
        len(train_set.categories),
        train_t,
        " (deterministic: applied once)" if cached else "",
    )
    val_coco = val_set.coco
    if len(val_set) * 3 * node.eval_size**2 * 4 <= CACHE_BYTES:
        val_set = CachedSamples(val_set)
    if cached:
        train_set = CachedSamples(train_set)
    model.to(device)
    batch_size, local_batch, lr, optimizer, ema, net = optimization(model, cfg, info, device)
    sampler = train_sampler(train_set, cfg, info)
    if not cached:  # the transforms' draws seeded per sample, as the PIL pipeline's (toe.data.datasets)
        sampler = SeededSamples(sampler, cfg.seed, info.rank)
        train_set = SeededTransforms(train_set)
    loader_kwargs = loader_settings(cfg.train.workers, "tensor" if cached else "pil", device, processes_per_node(info))
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=local_batch,
        drop_last=True,
        sampler=sampler,
        collate_fn=collate_detection,
        generator=own_generator(),
        **loader_kwargs,
    )
    if len(train_loader) == 0:
        raise ConfigError(f"recipe.batch_size={batch_size} is larger than the training set ({len(train_set)} images)")
    val_shard = torch.utils.data.Subset(val_set, range(info.rank, len(val_set), info.world_size))
    val_loader = torch.utils.data.DataLoader(
        val_shard, batch_size=local_batch, shuffle=False, collate_fn=collate_detection, **loader_kwargs
    )
    scheduler, scaler = schedule_and_scaler(optimizer, cfg, plan, len(train_loader), device, amp_dtype)
    weights = LossWeights(
        node.cost_class, node.cost_bbox, node.cost_giou, node.loss_ce, node.loss_bbox, node.loss_giou, node.eos_coef
    )
    criterion = SetCriterion(
        num_classes, weights, reduce=functools.partial(all_reduce_sum, info=info), world_size=info.world_size
    )
    grid = nominal_patch_grid(cfg, cfg.model.patch_size)
    shape = dataclasses.replace(ViTShape.from_model(model), num_patches=grid[0] * grid[1])
    return Run(
        model,
        net,
        ema,
        optimizer,
        scheduler,
        scaler,
        criterion,
        None,
        train_loader,
        val_loader,
        sampler,
        None,
        shape,
        device,
        autocast,
        lr,
        info,
        plan,
        local_batch,
        grid[0] * cfg.model.patch_size,
        cfg.model.patch_size,
        cfg.recipe.clip_grad,
        "detection",
        None,
        task="detection",
        val_coco=val_coco,
        patch_grid=grid,
    )
