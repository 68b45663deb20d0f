"""``toe-train``: one Hydra task function for a local run, a multirun job, a SLURM job and its requeued restart.

The run is built from timm's pieces by :mod:`toe.run`. Every epoch sets the ToE stage (and the EfficientTrain
phase) before training, evaluates on full tokens and writes the run record and an atomic checkpoint; rerunning the
same command in the same run dir resumes from it.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

import toe
from toe.checkpoint import capture_rng, load_checkpoint, save_checkpoint
from toe.curriculum import fourier_crop, phase_at
from toe.distributed import DistInfo, cleanup, gather_objects, init_distributed
from toe.engine import evaluate, train_one_epoch
from toe.record import CHECKPOINT_FILE, RunRecord
from toe.run import Progress, Run, build_run, resolve_device, restore
from toe.schema import validate

log = logging.getLogger("toe.train")


def train(cfg: DictConfig, run_dir: Path, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train one run into ``run_dir`` (resuming from its checkpoint if there is one); returns the summary.

    Whatever happens, ``summary.json`` ends up saying so: ``completed``, ``failed`` with the error, or
    ``interrupted`` (SystemExit or Ctrl-C: submitit's preemption/requeue handler, a scheduler's signal), after which
    a rerun resumes.
    ``overrides`` (Hydra's task overrides) go to W&B with the config, so the analysis can read them from there.
    The config is checked (:func:`toe.schema.validate`) before anything is written: a bad value raises
    :class:`ConfigError` and leaves the run dir as it was.
    """
    validate(cfg)
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
    epochs, phase = run.epochs, None
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
        shape = replace(run.shape, num_patches=(img_size // run.patch_size) ** 2)
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
