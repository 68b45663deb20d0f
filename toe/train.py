"""``toe-train``: one Hydra task function for a local run, a multirun job, a SLURM job and its requeued restart.

Built from timm's pieces in timm's order: create_model -> toe.patch -> resolve_model_data_config ->
create_transform -> .to(device) -> create_optimizer_v2 -> ModelEmaV3 -> compile -> create_scheduler_v2. Every
epoch sets the ToE stage before training, evaluates on full tokens and writes the run record and an atomic
checkpoint; rerunning the same command in the same run dir resumes from it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

import toe
from toe.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from toe.curriculum import Phase, build_phases, fourier_crop, phase_at
from toe.data import DataRootError, build_datasets, build_transforms
from toe.distributed import DistInfo, all_reduce_sum, cleanup, gather_objects, init_distributed
from toe.engine import evaluate, train_one_epoch
from toe.finetune import CheckpointMismatchError, load_pretrained
from toe.flops import ViTShape
from toe.record import CHECKPOINT_FILE, RunRecord

log = logging.getLogger("toe.train")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def stage_starts(cfg: DictConfig) -> List[int]:
    """Stage start epochs: ``schedule.stage_starts`` are epochs of a ``schedule.length``-epoch run, scaled to
    ``schedule.epochs`` and rounded half up (the official 0/100/200 of 300 gives 0/10/20 over 30 epochs)."""
    epochs, length = int(cfg.schedule.epochs), float(cfg.schedule.length)
    if epochs < 1 or length <= 0:
        raise ConfigError(f"schedule.epochs={epochs} and schedule.length={length} must be positive")
    starts = [math.floor(float(s) * epochs / length + 0.5) for s in cfg.schedule.stage_starts]
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ConfigError(
            f"schedule.stage_starts {list(cfg.schedule.stage_starts)} of a {length:g}-epoch run give start epochs "
            f"{starts} over {epochs} epochs, which are not strictly increasing: run more epochs"
        )
    return starts


def build_schedule(cfg: DictConfig) -> Optional[toe.ExpansionSchedule]:
    if not cfg.toe.enabled:
        return None
    try:
        return toe.ExpansionSchedule(
            expansion_steps=stage_starts(cfg),
            keep_rates=list(cfg.toe.keep_rates),
            init_keep_rate=cfg.toe.init_keep_rate,
            repeats=cfg.toe.repeats,
            distance=cfg.toe.distance,
            init=cfg.toe.init,
            expand=cfg.toe.expand,
            merge=cfg.toe.merge,
        )
    except ValueError as err:
        raise ConfigError(f"toe/schedule config: {err}") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> Optional[torch.dtype]:
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_loss_and_mixup(recipe: DictConfig, num_classes: int):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                      switch_prob=recipe.mixup_switch_prob, label_smoothing=recipe.smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if recipe.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=recipe.smoothing), None
    return torch.nn.CrossEntropyLoss(), None


@dataclass
class Run:
    """Everything one run trains with, built in timm's order by :func:`build_run`."""

    model: torch.nn.Module
    net: torch.nn.Module  # the model as called in training (compiled or not)
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    criterion: Any
    mixup: Any
    train_loader: Any
    val_loader: Any
    sampler: Any  # set_epoch(epoch) before every epoch, so shuffles depend on the epoch only
    make_train_loader: Any  # (micro_batch, auto_augment) -> DataLoader, for curriculum phases
    shape: ViTShape
    device: torch.device
    autocast: Any
    lr: float
    dist: DistInfo
    phases: List[Phase]  # EfficientTrain curriculum phases; empty without a curriculum
    local_batch: int

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor, self.dist)


class _EpochSampler(torch.utils.data.RandomSampler):
    """A RandomSampler whose shuffle is a function of (seed, epoch), like DistributedSampler's: a resumed run
    draws the same batches as an uninterrupted one."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 100_003 + epoch)


def _train_sampler(dataset, cfg: DictConfig, info: DistInfo):
    if not info.enabled:
        return _EpochSampler(dataset, cfg.seed)
    if cfg.recipe.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        return RepeatAugSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True)
    return torch.utils.data.DistributedSampler(dataset, info.world_size, info.rank, shuffle=True, seed=cfg.seed,
                                               drop_last=True)


def build_run(cfg: DictConfig, info: DistInfo) -> Run:
    import timm
    from timm.data import resolve_model_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, random_seed

    device = resolve_device(cfg.train.device, info.local_rank)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    autocast = (functools.partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype
                else contextlib.nullcontext)
    random_seed(cfg.seed, info.rank)
    train_set, val_set = build_datasets(cfg)
    num_classes = cfg.data.num_classes or len(train_set.classes)
    curriculum = cfg.get("curriculum") or {}
    # Under the curriculum the resolution changes every phase: timm resamples the position embedding to the
    # input's grid on the fly (the official code re-creates the model per phase and interpolates the table).
    dynamic = {"dynamic_img_size": True} if curriculum.get("enabled") else {}
    model = timm.create_model(cfg.model.name, num_classes=num_classes, img_size=cfg.model.img_size,
                              drop_path_rate=cfg.model.drop_path, **cfg.model.kwargs, **dynamic)
    if cfg.finetune.path:
        try:
            load_pretrained(model, Path(cfg.finetune.path), use_ema=cfg.finetune.use_ema)
        except (FileNotFoundError, CheckpointMismatchError) as err:
            raise ConfigError(str(err)) from None
    schedule = build_schedule(cfg)
    if schedule is not None:
        toe.patch(model, schedule, sparse_eval=cfg.toe.sparse_eval)
    data_config = dict(resolve_model_data_config(model), input_size=(3, cfg.model.img_size, cfg.model.img_size))
    train_set.transform, val_set.transform = build_transforms(data_config, cfg.recipe)
    model.to(device)

    batch_size = int(cfg.recipe.batch_size)  # global, as the DeiT recipe counts it
    if batch_size % info.world_size:
        raise ConfigError(f"recipe.batch_size={batch_size} does not split over {info.world_size} processes")
    local_batch = batch_size // info.world_size
    lr = cfg.recipe.lr * batch_size / cfg.recipe.lr_base_batch
    optimizer = create_optimizer_v2(model, opt=cfg.recipe.opt, lr=lr, weight_decay=cfg.recipe.weight_decay,
                                    momentum=cfg.recipe.momentum, eps=cfg.recipe.opt_eps)
    ema = ModelEmaV3(model, decay=cfg.recipe.ema_decay) if cfg.recipe.ema else None
    net = torch.compile(model) if cfg.train.compile else model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    sampler = _train_sampler(train_set, cfg, info)
    loader_kwargs = dict(num_workers=cfg.train.workers, pin_memory=device.type == "cuda")

    def make_train_loader(micro_batch: int, auto_augment: Optional[str] = None):
        if auto_augment is not None:
            train_set.transform = build_transforms(data_config, OmegaConf.merge(
                cfg.recipe, {"auto_augment": auto_augment}))[0]
        return torch.utils.data.DataLoader(train_set, batch_size=micro_batch, drop_last=True, sampler=sampler,
                                           **loader_kwargs)

    train_loader = make_train_loader(local_batch)
    phases: List[Phase] = []
    if curriculum.get("enabled"):
        try:
            phases = build_phases(curriculum, int(cfg.schedule.epochs), cfg.model.img_size,
                                  model.patch_embed.patch_size[0])
        except ValueError as err:
            raise ConfigError(f"curriculum: {err}") from None
        if any(local_batch % p.accumulation for p in phases):
            raise ConfigError(f"recipe.batch_size={batch_size} per process ({local_batch}) does not split into "
                              f"the curriculum's accumulation steps {[p.accumulation for p in phases]}")
    # Every process evaluates its own slice of the val set; the counts are summed, so top-1 is exact.
    val_shard = torch.utils.data.Subset(val_set, range(info.rank, len(val_set), info.world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=local_batch, shuffle=False, **loader_kwargs)
    if len(train_loader) == 0:
        raise ConfigError(f"recipe.batch_size={batch_size} is larger than the training set ({len(train_set)} images)")
    min_lr = cfg.schedule.get("min_lr") if cfg.schedule.get("min_lr") is not None else cfg.recipe.min_lr
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.recipe.sched, num_epochs=int(cfg.schedule.epochs),
        warmup_epochs=cfg.recipe.warmup_epochs, warmup_lr=cfg.recipe.warmup_lr, min_lr=min_lr,
        step_on_epochs=not cfg.recipe.sched_on_updates, updates_per_epoch=len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    criterion, mixup = build_loss_and_mixup(cfg.recipe, num_classes)
    return Run(model, net, ema, optimizer, scheduler, scaler, criterion, mixup, train_loader, val_loader,
               sampler, make_train_loader, ViTShape.from_model(model), device, autocast, lr, info, phases,
               local_batch)


@dataclass
class Progress:
    """What a run has done so far; saved in the checkpoint and summarised in summary.json."""

    epoch: int = 0  # the next epoch to train
    num_updates: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    resumed_at: List[int] = field(default_factory=list)  # epochs at which the run resumed from its checkpoint
    wandb_id: Optional[str] = None


def restore(run: Run, checkpoint: Dict[str, Any]) -> Progress:
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(checkpoint["ema"])
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint["rng"]
    restore_rng(rng[run.dist.rank] if isinstance(rng, list) else rng)
    run.scheduler.step(checkpoint["epoch"])
    return Progress(checkpoint["epoch"], checkpoint["num_updates"], list(checkpoint["history"]),
                    list(checkpoint.get("resumed_at", [])) + [checkpoint["epoch"]], checkpoint.get("wandb_id"))


def train(cfg: DictConfig, run_dir: Path, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train one run into ``run_dir`` (resuming from its checkpoint if there is one); returns the summary.

    Whatever happens, ``summary.json`` ends up saying so: ``completed``, ``failed`` with the error, or
    ``interrupted`` (SystemExit or Ctrl-C: submitit's preemption/requeue handler, a scheduler's signal), after which
    a rerun resumes.
    ``overrides`` (Hydra's task overrides) go to W&B with the config, so the analysis can read them from there.
    """
    run_dir = Path(run_dir)
    info = init_distributed(use_cuda=resolve_device(cfg.train.device).type == "cuda")
    if info.enabled:  # every process works in rank 0's run dir (Hydra's ${now:} may differ by a second)
        run_dir = Path(gather_objects(str(run_dir), info)[0])
    record = RunRecord(run_dir, OmegaConf.to_container(cfg.logger.wandb, resolve=True), enabled=info.is_main)
    record.write_config(OmegaConf.to_yaml(cfg, resolve=True))
    progress = Progress()
    try:
        summary = _fit(cfg, run_dir, record, progress, overrides or [], info)
    except BaseException as err:
        interrupted = isinstance(err, (SystemExit, KeyboardInterrupt))
        summary = summarize(cfg, progress, status="interrupted" if interrupted else "failed")
        summary["error"] = f"{type(err).__name__}: {err}"
        record.write_summary(summary)
        record.finish(1)
        raise
    finally:
        cleanup(info)
    record.finish(0)
    return summary


def _fit(cfg: DictConfig, run_dir: Path, record: RunRecord, progress: Progress,
         overrides: List[str], info: DistInfo) -> Dict[str, Any]:
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    run = build_run(cfg, info)
    if checkpoint is not None:
        vars(progress).update(vars(restore(run, checkpoint)))
        log.info("Resuming %s from epoch %d (%s)", run_dir, progress.epoch, CHECKPOINT_FILE)
    record.rewrite_metrics(progress.history)
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    progress.wandb_id = record.start_wandb(dict(plain_cfg, overrides=overrides), progress.wandb_id,
                                           name=f"{cfg.method_name}-{cfg.model.name}-s{cfg.seed}")
    bar = info.is_main and (sys.stderr.isatty() if cfg.train.progress == "auto" else bool(cfg.train.progress))
    epochs, phase = int(cfg.schedule.epochs), None
    for epoch in range(progress.epoch, epochs):
        stage = toe.set_epoch(run.model, epoch)
        if run.ema is not None:
            toe.set_epoch(run.ema.module, epoch)
        run.model.train()
        img_size, crop, accumulation = cfg.model.img_size, None, 1
        if run.phases:
            if phase != phase_at(run.phases, epoch):
                phase = phase_at(run.phases, epoch)
                run.train_loader = run.make_train_loader(run.local_batch // phase.accumulation,
                                                         cfg.curriculum.auto_augment.format(magnitude=phase.magnitude))
                log.info("curriculum phase %d from epoch %d: %d px, RandAugment m%d, %d micro-batches of %d per step",
                         phase.index, epoch, phase.img_size, phase.magnitude, phase.accumulation,
                         run.local_batch // phase.accumulation)
            img_size, accumulation = phase.img_size, phase.accumulation
            crop = functools.partial(fourier_crop, size=img_size) if img_size < cfg.model.img_size else None
        patch = run.model.patch_embed.patch_size[0]
        shape = replace(run.shape, num_patches=(img_size // patch) ** 2)
        op = toe.expansion_op(run.model)
        kept = op.kept_tokens(shape.num_patches) if op is not None else shape.num_patches
        run.sampler.set_epoch(epoch)
        result = train_one_epoch(
            run.net, run.train_loader, run.criterion, run.optimizer, run.scheduler, run.device,
            progress.num_updates, run.autocast, run.scaler, run.ema, run.mixup, cfg.recipe.clip_grad, bar,
            desc=f"epoch {epoch + 1}/{epochs}", reduce=run.reduce, accumulation=accumulation, batch_transform=crop)
        run.scheduler.step(epoch + 1)
        last = progress.history[-1] if progress.history else {}
        row = {
            "epoch": epoch, "stage": stage, "img_size": img_size,
            "tokens_after_first_block": shape.num_prefix_tokens + kept,
            "train_loss": result.loss, "train_img_per_s": result.images / result.seconds,
            "epoch_seconds": result.seconds,
            "train_seconds_total": last.get("train_seconds_total", 0.0) + result.seconds,
            "train_flops_total": last.get("train_flops_total", 0.0) + result.images * shape.train_macs(kept),
            "train_flops_linear_total": last.get("train_flops_linear_total", 0.0)
            + result.images * shape.train_macs(kept, attention=False),
            "images_seen": last.get("images_seen", 0) + result.images,
            "val_top1": None, "val_top5": None, "ema_top1": None,
            "lr": run.optimizer.param_groups[0]["lr"],
        }
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
            row["val_top1"], row["val_top5"] = evaluate(run.net, run.val_loader, run.device, run.autocast, bar,
                                                        reduce=run.reduce, batch_transform=crop)
            if run.ema is not None:
                row["ema_top1"] = evaluate(run.ema.module, run.val_loader, run.device, run.autocast, bar,
                                           reduce=run.reduce, batch_transform=crop)[0]
        progress.history.append(row)
        progress.epoch, progress.num_updates = epoch + 1, result.num_updates
        rng_states = gather_objects(capture_rng(), info)  # every rank's, so a resumed DDP run is exact too
        if info.is_main:
            save_checkpoint(run_dir / CHECKPOINT_FILE, {
                "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "ema": run.ema.state_dict() if run.ema is not None else None,
                "scaler": run.scaler.state_dict() if run.scaler is not None else None, "epoch": progress.epoch,
                "num_updates": progress.num_updates, "rng": rng_states if info.enabled else rng_states[0],
                "wandb_id": progress.wandb_id, "history": progress.history, "resumed_at": progress.resumed_at,
                "config": plain_cfg})
        record.log_epoch(row)
        log.info("epoch %d/%d stage %d tokens %d loss %.4f top1 %s ema %s %.0f img/s %.1fs", epoch + 1, epochs,
                 stage, row["tokens_after_first_block"], row["train_loss"], _pct(row["val_top1"]),
                 _pct(row["ema_top1"]), row["train_img_per_s"], row["epoch_seconds"])
        record.write_summary(summarize(cfg, progress, status="running", run=run))
    summary = summarize(cfg, progress, status="completed", run=run)
    record.write_summary(summary)
    return summary


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def summarize(cfg: DictConfig, progress: Progress, status: str, run: Optional[Run] = None) -> Dict[str, Any]:
    history = progress.history

    def values(key):
        return [row[key] for row in history if row.get(key) is not None]

    last = history[-1] if history else {}
    top1, ema = values("val_top1"), values("ema_top1")
    seconds, images = last.get("train_seconds_total", 0.0), last.get("images_seen", 0)
    return {
        "status": status, "method": cfg.method_name, "model": cfg.model.name, "data": cfg.data.name,
        "epochs": len(history), "best_top1": max(top1, default=None), "final_top1": top1[-1] if top1 else None,
        "best_ema_top1": max(ema, default=None), "final_ema_top1": ema[-1] if ema else None,
        "total_train_seconds": seconds, "world_size": run.dist.world_size if run else None,
        "device_hours": seconds * (run.dist.world_size if run else 1) / 3600.0,
        "total_train_flops": last.get("train_flops_total", 0.0),
        "train_flops_per_image": last.get("train_flops_total", 0.0) / images if images else None,
        "train_flops_per_image_linear": last.get("train_flops_linear_total", 0.0) / images if images else None,
        "images_seen": images, "device": str(run.device) if run else None, "lr": run.lr if run else None,
        "resumed_at": progress.resumed_at,
    }


def _hydra_main(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    try:
        summary = train(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    except (ConfigError, DataRootError, MissingMandatoryValue, InterpolationResolutionError) as err:
        if isinstance(err, MissingMandatoryValue):
            message = f"missing value for {err.full_key}: set it on the command line, e.g. {err.full_key}=<value>"
        else:
            message = str(err).splitlines()[0]
        log.error("%s", message)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # this job fails and the sweep goes on with the others
        sys.exit(2)  # a single run: one clear line, no traceback
    return summary.get("final_top1")


def main() -> Optional[float]:
    import hydra

    # The repository root is on Hydra's search path (conf/train.yaml), which makes experiments/ a config group.
    os.environ.setdefault("TOE_ROOT", str(Path(__file__).resolve().parent.parent))
    config_dir = str(Path(__file__).resolve().parent.parent / "conf")
    return hydra.main(version_base="1.3", config_path=config_dir, config_name="train")(_hydra_main)()


if __name__ == "__main__":
    # Run the importable toe.train, not this __main__ copy: submitit pickles the task function by reference.
    from toe.train import main as _main

    _main()
