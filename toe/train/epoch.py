"""What the epoch loop of :mod:`toe.train.task` calls at each epoch's start and end, one small object per concern:

- :class:`EpochSetup` (start of an epoch): the ToE stage of the model and its EMA, the EfficientTrain phase (its
  loader, resolution and gradient accumulation), and the tokens and train FLOPs per image that follow from them;
- :class:`Evaluator` (end of an epoch): val top-1/top-5 of the model and of its EMA on full tokens (a detector:
  COCO box AP, AP50, AP75), when due;
- :func:`epoch_row`: the epoch's line of the run record from the above and the step's result;
- :func:`train_epoch`: the three in order around one :func:`toe.train.step.train_one_epoch`.

The checkpoint is :class:`toe.train.checkpoint.TrainState`'s and the record :class:`toe.train.record.RunRecord`'s.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Tuple

import torch

from toe.cost.flops import ViTShape
from toe.data.curriculum import Phase, fourier_crop, phase_at
from toe.hosts import reduction_op, set_epoch
from toe.ops.tokens import BlockTokens, tokens_after_first_block
from toe.train.record import EpochRow
from toe.train.step import EpochResult, evaluate, train_one_epoch

log = logging.getLogger("toe.train.task")


@dataclass
class EpochSetting:
    """How one epoch trains: what :func:`toe.train.step.train_one_epoch` needs beyond the run, and what it costs."""

    epoch: int
    stage: int  # ToE stage (0: full tokens)
    img_size: int
    accumulation: int  # micro-batches per optimizer step
    loader: Any
    batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]]  # the curriculum's Fourier crop, or None
    tokens_after_first_block: int  # prefix tokens included
    macs_per_image: float  # analytic train MACs (forward + backward) of one image
    macs_per_image_linear: float  # the same without the attention matmuls


class EpochSetup:
    """The ToE stage and the curriculum phase of each epoch, set on the run at the epoch's start."""

    def __init__(self, run: Any):
        self.run = run
        self._phase: Optional[Phase] = None

    def start(self, epoch: int) -> EpochSetting:
        run = self.run
        run.model.train()  # the op's token count is that of training mode (evaluation uses all tokens)
        stage = set_epoch(run.model, epoch)
        if run.ema is not None:
            set_epoch(run.ema.module, epoch)
        img_size, accumulation, loader, crop = run.img_size, 1, run.train_loader, None
        if run.plan.phases:
            phase = phase_at(run.plan.phases, epoch)
            if phase != self._phase:
                log.info(
                    "curriculum phase %d from epoch %d: %d px, RandAugment m%d, %d micro-batches of %d per step",
                    phase.index,
                    epoch,
                    phase.img_size,
                    phase.magnitude,
                    phase.accumulation,
                    run.local_batch // phase.accumulation,
                )
                self._phase = phase
            img_size, accumulation = phase.img_size, phase.accumulation
            loader = run.train_loaders.get(run.local_batch // accumulation, phase.magnitude)
            crop = functools.partial(fourier_crop, size=img_size) if img_size < run.img_size else None
        run.sampler.set_epoch(epoch)
        grid = run.patch_grid or (img_size // run.patch_size, img_size // run.patch_size)
        shape = replace(run.shape, num_patches=grid[0] * grid[1])
        tokens = block_tokens(run.model, shape)
        return EpochSetting(
            epoch,
            stage,
            img_size,
            accumulation,
            loader,
            crop,
            tokens_after_first_block(tokens),
            shape.train_macs_blocks(tokens),
            shape.train_macs_blocks(tokens, attention=False),
        )


def block_tokens(model: torch.nn.Module, shape: ViTShape) -> BlockTokens:
    """(attention, MLP) tokens of each block of ``model`` as its token-reduction op and mode leave them."""
    op = reduction_op(model)
    return op.block_tokens(shape.num_patches, shape.depth) if op is not None else shape.full_block_tokens()


@dataclass
class Scores:
    """An epoch's evaluation; every figure ``None`` when the epoch is not evaluated (or not of the run's task)."""

    top1: Optional[float] = None
    top5: Optional[float] = None
    ema_top1: Optional[float] = None
    box_ap: Optional[float] = None
    box_ap50: Optional[float] = None
    box_ap75: Optional[float] = None
    ema_box_ap: Optional[float] = None
    seconds: float = 0.0


class Evaluator:
    """Top-1/top-5 of the model and top-1 of its EMA on the val set (full tokens), every ``every`` epochs and after
    the last; evaluated at the epoch's resolution (the curriculum's crop). A detector (``run.task``): COCO box AP,
    AP50 and AP75 of the model and AP of its EMA."""

    def __init__(self, run: Any, every: int, progress: bool):
        self.run, self.every, self.progress = run, every, progress

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch + 1 == self.run.plan.epochs

    def after(self, setting: EpochSetting) -> Scores:
        if not self.due(setting.epoch):
            return Scores()
        run, start = self.run, time.perf_counter()
        if getattr(run, "task", "classification") == "detection":
            return self._detection(start)
        measure = functools.partial(
            evaluate,
            loader=run.val_loader,
            device=run.device,
            autocast=run.autocast,
            progress=self.progress,
            reduce=run.reduce,
            batch_transform=setting.batch_transform,
        )
        top1, top5 = measure(run.net)
        ema_top1 = measure(run.ema.module)[0] if run.ema is not None else None
        return Scores(top1, top5, ema_top1, seconds=time.perf_counter() - start)

    def _detection(self, start: float) -> Scores:
        from toe.train.detection import evaluate_detection
        from toe.train.distributed import gather_objects

        run = self.run
        measure = functools.partial(
            evaluate_detection,
            loader=run.val_loader,
            coco=run.val_coco,
            device=run.device,
            autocast=run.autocast,
            progress=self.progress,
            gather=(lambda results: gather_objects(results, run.dist)) if run.dist.enabled else None,
        )
        found = measure(run.net)
        ema = measure(run.ema.module).ap if run.ema is not None else None
        return Scores(
            box_ap=found.ap,
            box_ap50=found.ap50,
            box_ap75=found.ap75,
            ema_box_ap=ema,
            seconds=time.perf_counter() - start,
        )


def epoch_row(
    setting: EpochSetting, result: EpochResult, scores: Scores, lr: float, last: Optional[EpochRow]
) -> EpochRow:
    """The epoch's line of the record; ``last`` (the previous epoch's) carries the running totals."""
    last = last or EpochRow(epoch=-1)
    return EpochRow(
        epoch=setting.epoch,
        stage=setting.stage,
        img_size=setting.img_size,
        tokens_after_first_block=setting.tokens_after_first_block,
        train_loss=result.loss,
        train_img_per_s=result.images / result.seconds,
        epoch_seconds=result.seconds,
        data_wait_seconds=result.data_seconds,
        train_seconds_total=last.train_seconds_total + result.seconds,
        train_flops_total=last.train_flops_total + result.images * setting.macs_per_image,
        train_flops_linear_total=last.train_flops_linear_total + result.images * setting.macs_per_image_linear,
        images_seen=last.images_seen + result.images,
        val_top1=scores.top1,
        val_top5=scores.top5,
        ema_top1=scores.ema_top1,
        val_box_ap=scores.box_ap,
        val_box_ap50=scores.box_ap50,
        val_box_ap75=scores.box_ap75,
        ema_box_ap=scores.ema_box_ap,
        eval_seconds=scores.seconds,
        lr=lr,
        activation_mib=result.activation_mib,
        cuda_peak_mib=result.cuda_peak_mib,
    )


def train_epoch(
    run: Any,
    setup: EpochSetup,
    evaluator: Evaluator,
    epoch: int,
    num_updates: int,
    last: Optional[EpochRow],
    progress: bool = False,
) -> Tuple[EpochRow, int]:
    """Epoch ``epoch`` of ``run``: its stage and phase set, trained, the LR scheduler stepped, evaluated when due.
    Returns the record's row (``last``: the previous epoch's, for the running totals) and the optimizer updates
    made so far."""
    setting = setup.start(epoch)
    step = run.step_config(setting.accumulation, setting.batch_transform)
    result = train_one_epoch(
        run.net, setting.loader, step, num_updates, progress, desc=f"epoch {epoch + 1}/{run.plan.epochs}"
    )
    run.scheduler.step(epoch + 1)
    row = epoch_row(setting, result, evaluator.after(setting), run.optimizer.param_groups[0]["lr"], last)
    return row, result.num_updates
