"""One training epoch and one evaluation pass; no knowledge of configs, records or ToE stages."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from timm.utils import accuracy, dispatch_clip_grad
from tqdm import tqdm


@dataclass
class EpochResult:
    loss: float
    images: int
    seconds: float
    num_updates: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_device(target, device: torch.device):
    """Class indices, or a dict of tensors (token labeling's label maps and crop boxes)."""
    if isinstance(target, dict):
        return {key: value.to(device, non_blocking=True) for key, value in target.items()}
    return target.to(device, non_blocking=True)


def train_one_epoch(
    model: torch.nn.Module,
    loader,
    criterion: Callable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    num_updates: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: Optional[torch.amp.GradScaler] = None,
    ema=None,
    mixup: Optional[Callable] = None,
    clip_grad: Optional[float] = None,
    progress: bool = False,
    desc: str = "train",
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    accumulation: int = 1,
    batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> EpochResult:
    """One pass over ``loader``. ``reduce`` sums a tensor over processes (DDP), so loss and images are global.

    ``accumulation`` micro-batches make one optimiser step (EfficientTrain's update_freq); ``batch_transform``
    changes each input batch on the device before Mixup (EfficientTrain's Fourier crop).
    """
    model.train()
    loss_sum, images = torch.zeros((), device=device), 0
    _sync(device)
    start = time.perf_counter()
    for step, (inputs, targets) in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False)):
        inputs = inputs.to(device, non_blocking=True)
        targets = _to_device(targets, device)
        if batch_transform is not None:
            inputs = batch_transform(inputs)
        if mixup is not None:
            inputs, targets = mixup(inputs, targets)
        with autocast():
            loss = criterion(model(inputs), targets)
        if step % accumulation == 0:
            optimizer.zero_grad(set_to_none=True)
        update = (step + 1) % accumulation == 0
        if scaler is not None:
            scaler.scale(loss / accumulation).backward()
            if update:
                if clip_grad:
                    scaler.unscale_(optimizer)
                    dispatch_clip_grad(model.parameters(), clip_grad)
                scaler.step(optimizer)
                scaler.update()
        else:
            (loss / accumulation).backward()
            if update:
                if clip_grad:
                    dispatch_clip_grad(model.parameters(), clip_grad)
                optimizer.step()
        if update:
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)
        loss_sum += loss.detach() * inputs.shape[0]
        images += inputs.shape[0]
    _sync(device)
    seconds = time.perf_counter() - start
    totals = reduce(torch.stack([loss_sum.float(), torch.tensor(float(images), device=device)]))
    mean_loss, images = float(totals[0]) / max(float(totals[1]), 1.0), int(totals[1])  # one sync per epoch
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"training loss is {mean_loss} in {desc}: lower recipe.lr, set recipe.clip_grad, or check the data"
        )
    return EpochResult(mean_loss, images, seconds, num_updates)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Tuple[float, float]:
    """Top-1 and top-5 accuracy as fractions in [0, 1], over the shards of all processes (``reduce``)."""
    model.eval()
    correct1 = correct5 = total = 0.0
    for inputs, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if batch_transform is not None:
            inputs = batch_transform(inputs)
        with autocast():
            logits = model(inputs)
        top1, top5 = accuracy(logits.float(), targets, topk=(1, min(5, logits.shape[-1])))
        correct1 += float(top1) * inputs.shape[0] / 100.0
        correct5 += float(top5) * inputs.shape[0] / 100.0
        total += inputs.shape[0]
    sums = reduce(torch.tensor([correct1, correct5, total], dtype=torch.float64, device=device))
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])
