"""One training epoch and one evaluation pass; no knowledge of configs, records or ToE stages."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from timm.utils import NativeScaler, dispatch_clip_grad
from tqdm import tqdm

from toe.cost.memory import SavedActivations, cuda_peak_mib, reset_cuda_peak


@dataclass
class EpochResult:
    loss: float
    images: int
    seconds: float
    num_updates: int
    activation_mib: Optional[float] = None  # saved for backward in the epoch's first step (toe.cost.memory)
    cuda_peak_mib: Optional[float] = None  # the CUDA allocator's peak over the epoch; None off CUDA
    data_seconds: float = 0.0  # of ``seconds``, the loop waiting for its batches (Waited)


class Waited:
    """An iterable's items, with the seconds spent waiting for them (``seconds``): where the loop waits for its
    input, the step is not what bounds the epoch. On CUDA the step's kernels run asynchronously, so this is the
    loader's shortfall, not its work (as timm's ``data_time``)."""

    def __init__(self, iterable):
        self.iterable, self.seconds = iterable, 0.0

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self):
        start = time.perf_counter()
        iterator = iter(self.iterable)  # a DataLoader's workers start here, DALI's epoch is reset here
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                self.seconds += time.perf_counter() - start
                return
            self.seconds += time.perf_counter() - start
            yield item
            start = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_device(target, device: torch.device):
    """Class indices, a dict of tensors (token labeling's label maps and crop boxes), or a list of them (DETR's
    targets, one dict per image)."""
    if isinstance(target, (list, tuple)):
        return [_to_device(item, device) for item in target]
    if isinstance(target, dict):
        return {key: value.to(device, non_blocking=True) for key, value in target.items()}
    return target.to(device, non_blocking=True)


@dataclass
class StepConfig:
    """How one training step runs: the loss, the optimizer and its LR schedule, mixed precision, EMA, Mixup."""

    criterion: Callable
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler: step_update(num_updates=...) after every optimizer step
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    loss_scaler: Optional[NativeScaler] = None  # fp16 only: timm's NativeScaler (scale, unscale, clip, step)
    ema: Any = None
    mixup: Optional[Callable] = None
    clip_grad: Optional[float] = None
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # sum over processes (DDP)
    accumulation: int = 1  # micro-batches per optimizer step (EfficientTrain's update_freq)
    batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # on the device, before Mixup


def train_one_epoch(
    model: torch.nn.Module, loader, step: StepConfig, num_updates: int, progress: bool = False, desc: str = "train"
) -> EpochResult:
    """One pass over ``loader``; loss and images are summed over processes.

    Gradient accumulation as timm's train.py does it: each micro-batch's loss is divided by the size of its window,
    a trailing window shorter than ``accumulation`` (an odd batch count) is stepped too, with its own size, and
    DDP skips the all-reduce (``no_sync``) on every micro-batch but the last of a window.

    The activations saved for backward are counted in the first micro-batch only
    (:class:`toe.cost.memory.SavedActivations`: one step's count, and the other steps run without the hook's
    per-tensor call); the CUDA peak is the allocator's over the epoch.
    """
    model.train()
    batches, accumulation = len(loader), step.accumulation
    trailing_start = batches - batches % accumulation  # the first batch of a trailing partial window
    can_skip_sync = hasattr(model, "no_sync")
    loss_sum, images = torch.zeros((), device=step.device), 0
    step.optimizer.zero_grad(set_to_none=True)
    saved: Optional[SavedActivations] = None
    reset_cuda_peak(step.device)
    _sync(step.device)
    start, waited = time.perf_counter(), Waited(loader)
    for index, (inputs, targets) in enumerate(tqdm(waited, desc=desc, disable=not progress, leave=False)):
        window = accumulation if index < trailing_start else batches - trailing_start
        need_update = index == batches - 1 or (index + 1) % accumulation == 0
        inputs = inputs.to(step.device, non_blocking=True)
        targets = _to_device(targets, step.device)
        if step.batch_transform is not None:
            inputs = step.batch_transform(inputs)
        if step.mixup is not None:
            inputs, targets = step.mixup(inputs, targets)
        with contextlib.nullcontext() if need_update or not can_skip_sync else model.no_sync():
            with contextlib.nullcontext() if index else SavedActivations(model.parameters()) as counted:
                with step.autocast():
                    loss = step.criterion(model(inputs), targets)
            saved = counted if index == 0 else saved
            if step.loss_scaler is not None:
                step.loss_scaler(
                    loss / window,
                    step.optimizer,
                    clip_grad=step.clip_grad,
                    parameters=model.parameters(),
                    need_update=need_update,
                )
            else:
                (loss / window).backward()
                if need_update:
                    if step.clip_grad:
                        dispatch_clip_grad(model.parameters(), step.clip_grad)
                    step.optimizer.step()
        if need_update:
            step.optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            step.scheduler.step_update(num_updates=num_updates)
            if step.ema is not None:
                step.ema.update(model, step=num_updates)
        loss_sum += loss.detach() * inputs.shape[0]
        images += inputs.shape[0]
    _sync(step.device)
    seconds = time.perf_counter() - start
    totals = step.reduce(torch.stack([loss_sum.float(), torch.tensor(float(images), device=step.device)]))
    mean_loss, images = float(totals[0]) / max(float(totals[1]), 1.0), int(totals[1])  # one sync per epoch
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"training loss is {mean_loss} in {desc}: lower recipe.lr, set recipe.clip_grad, or check the data"
        )
    return EpochResult(
        mean_loss,
        images,
        seconds,
        num_updates,
        saved.mib if saved else None,
        cuda_peak_mib(step.device),
        waited.seconds,
    )


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
    """Top-1 and top-5 accuracy as fractions in [0, 1], over the shards of all processes (``reduce``).

    Hits are counted on the device and read back once at the end (timm's ``accuracy`` gives per-batch percentages
    that would be read back, a host-device sync, every batch).
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images
    for inputs, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if batch_transform is not None:
            inputs = batch_transform(inputs)
        with autocast():
            logits = model(inputs)
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.eq(targets[:, None])
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), hits.new_tensor(len(targets), dtype=torch.long)])
    sums = reduce(sums)
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])
