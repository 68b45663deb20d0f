"""``toe-train``: one Hydra task function for a local run, a multirun job, a SLURM job and its requeued restart.

The run is built from timm's pieces by :mod:`toe.run`. Every epoch sets the ToE stage (and the EfficientTrain
phase) before training, evaluates on full tokens and writes the run record and an atomic checkpoint; rerunning the
same command in the same run dir resumes from it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf

import toe
from toe.checkpoint import capture_rng, load_checkpoint, save_checkpoint
from toe.curriculum import fourier_crop, phase_at
from toe.distributed import DistInfo, cleanup, gather_objects, init_distributed
from toe.engine import StepConfig, evaluate, train_one_epoch
from toe.lock import locked
from toe.record import CHECKPOINT_FILE, SUMMARY_FILE, RunRecord, StartRefused, read_run_dir, write_json_atomic
from toe.run import Progress, Run, build_run, resolve_device, restore
from toe.schema import ConfigError, config_changes, plan_schedule, validate

log = logging.getLogger("toe.train")


class Terminated(SystemExit):
    """SIGTERM, what schedulers send before they kill a job: the run ends as ``interrupted``."""

    def __str__(self) -> str:
        return "SIGTERM"


class DiskFull(RuntimeError):
    """The disk filled up while the run wrote its checkpoint or record; the previous ones are intact."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the block, unless someone else handles it already (submitit does
    in its jobs: USR2 and TERM are its own)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: DictConfig, run_dir: Path, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train one run into ``run_dir`` (resuming from its checkpoint if there is one); returns the summary.

    A run's life as the record sees it: the config is checked (:func:`toe.schema.validate`), the run dir is locked
    (:mod:`toe.lock`), the checkpoint is loaded and its config compared with this one, and only then is anything
    written. A refusal at any of these steps leaves an existing record untouched; in a new run dir a config that
    cannot work still leaves a ``failed`` summary, so that a sweep's status shows it. From then on every ending is
    written: ``completed``, ``failed`` with the error, ``interrupted`` (Ctrl-C, SIGTERM, submitit's preemption and
    requeue), after which a rerun resumes. A full disk ends the run with one line and leaves the previous
    checkpoint and summary intact. ``overrides`` (Hydra's task overrides) go to W&B with the config.
    """
    run_dir = Path(run_dir)
    try:
        plan = validate(cfg)
    except ConfigError as err:
        _note_refused_start(cfg, run_dir, err)
        raise
    if plan.unreached_stages:
        log.warning("ToE stage(s) %s start at or after epoch %d, the end of this run: they never run, and the "
                    "summary says so (unreached_stages)", plan.unreached_stages, plan.epochs)
    info = init_distributed(use_cuda=resolve_device(cfg.train.device).type == "cuda")
    if info.enabled:  # every process works in rank 0's run dir (Hydra's ${now:} may differ by a second)
        run_dir = Path(gather_objects(str(run_dir), info)[0])
    try:
        with locked(run_dir, enabled=info.is_main):
            plain_cfg = OmegaConf.to_container(cfg, resolve=True)
            checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
            progress = Progress.from_checkpoint(checkpoint)
            if checkpoint is not None:
                _check_resume(cfg, plain_cfg, checkpoint, progress, run_dir)
                if progress.epoch >= plan.epochs:
                    log.info("%s has completed all %d epochs; nothing to do", run_dir, progress.epoch)
                    return read_run_dir(run_dir).summary or summarize(cfg, progress, status="completed")
            record = RunRecord(run_dir, plain_cfg["logger"]["wandb"], enabled=info.is_main)
            record.write_config(OmegaConf.to_yaml(cfg, resolve=True))
            try:
                with _sigterm_interrupts():
                    summary = _fit(cfg, plain_cfg, run_dir, record, progress, checkpoint, overrides or [], info)
            except BaseException as err:
                _record_ending(cfg, run_dir, record, progress, err)
                raise
            record.finish(0)
            return summary
    finally:
        cleanup(info)


def _check_resume(cfg: DictConfig, plain_cfg: Dict[str, Any], checkpoint: Dict[str, Any], progress: Progress,
                  run_dir: Path) -> None:
    """Refuse a resume whose config differs from the checkpoint's in anything that changes the training, unless
    ``resume.allow_changes``; then note the change at this epoch."""
    changes = config_changes(checkpoint.get("config") or {}, plain_cfg)
    if not changes:
        return
    said = ", ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())
    if not cfg.resume.allow_changes:
        raise StartRefused(f"{run_dir} was trained (to epoch {checkpoint['epoch']}) with another config ({said}): "
                           "rerun with its config to resume, use a new run dir, or add resume.allow_changes=true "
                           "to go on with the change (the record notes it)")
    log.warning("resuming %s at epoch %d with a changed config (resume.allow_changes): %s", run_dir,
                checkpoint["epoch"], said)
    progress.config_changes.append({"epoch": checkpoint["epoch"], "changes": changes})


def _note_refused_start(cfg: DictConfig, run_dir: Path, err: BaseException) -> None:
    """A config refused in a run dir that has no record yet still leaves a ``failed`` summary (a sweep's status
    then shows the job as failed); an existing record is never touched."""
    if not run_dir.is_dir() or (run_dir / SUMMARY_FILE).exists() or (run_dir / CHECKPOINT_FILE).exists():
        return
    summary = {"status": "failed", "error": f"{type(err).__name__}: {err}", "epochs": 0}
    with contextlib.suppress(Exception):  # a config too broken to summarise still gets its error written
        summary = dict(summarize(cfg, Progress(), status="failed"), error=summary["error"])
    with contextlib.suppress(OSError):
        write_json_atomic(run_dir / SUMMARY_FILE, summary)


def _record_ending(cfg: DictConfig, run_dir: Path, record: RunRecord, progress: Progress,
                   err: BaseException) -> None:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        record.finish(1)
        raise DiskFull(f"out of disk space in {run_dir} ({err.filename or err}): the checkpoint of epoch "
                       f"{_checkpoint_epoch(run_dir)} and the record up to it are intact; free space and rerun "
                       "the same command to resume") from None
    interrupted = isinstance(err, (SystemExit, KeyboardInterrupt))
    summary = summarize(cfg, progress, status="interrupted" if interrupted else "failed")
    summary["error"] = f"{type(err).__name__}: {err}"
    record.write_summary(summary)
    record.finish(1)


def _checkpoint_epoch(run_dir: Path) -> Any:
    with contextlib.suppress(Exception):
        return load_checkpoint(run_dir / CHECKPOINT_FILE)["epoch"]
    return "none"


def _fit(cfg: DictConfig, plain_cfg: Dict[str, Any], run_dir: Path, record: RunRecord, progress: Progress,
         checkpoint: Optional[Dict[str, Any]], overrides: List[str], info: DistInfo) -> Dict[str, Any]:
    run = build_run(cfg, info)
    if checkpoint is not None:
        restore(run, checkpoint)
        log.info("Resuming %s from epoch %d (%s)", run_dir, progress.epoch, CHECKPOINT_FILE)
    record.rewrite_metrics(progress.history)
    progress.wandb_id = record.start_wandb(dict(plain_cfg, overrides=overrides), progress.wandb_id,
                                           name=f"{cfg.method_name}-{cfg.model.name}-s{cfg.seed}")
    bar = info.is_main and (sys.stderr.isatty() if cfg.train.progress == "auto" else bool(cfg.train.progress))
    epochs, phase = run.plan.epochs, None
    for epoch in range(progress.epoch, epochs):
        stage = toe.set_epoch(run.model, epoch)
        if run.ema is not None:
            toe.set_epoch(run.ema.module, epoch)
        run.model.train()
        img_size, crop, accumulation = run.img_size, None, 1
        if run.plan.phases:
            if phase != phase_at(run.plan.phases, epoch):
                phase = phase_at(run.plan.phases, epoch)
                run.train_loader = run.make_train_loader(run.local_batch // phase.accumulation,
                                                         cfg.curriculum.auto_augment.format(magnitude=phase.magnitude))
                log.info("curriculum phase %d from epoch %d: %d px, RandAugment m%d, %d micro-batches of %d per step",
                         phase.index, epoch, phase.img_size, phase.magnitude, phase.accumulation,
                         run.local_batch // phase.accumulation)
            img_size, accumulation = phase.img_size, phase.accumulation
            crop = functools.partial(fourier_crop, size=img_size) if img_size < run.img_size else None
        shape = replace(run.shape, num_patches=(img_size // run.patch_size) ** 2)
        op = toe.expansion_op(run.model)
        kept = op.kept_tokens(shape.num_patches) if op is not None else shape.num_patches
        run.sampler.set_epoch(epoch)
        step = StepConfig(run.criterion, run.optimizer, run.scheduler, run.device, autocast=run.autocast,
                          loss_scaler=run.scaler, ema=run.ema, mixup=run.mixup, clip_grad=cfg.recipe.clip_grad,
                          reduce=run.reduce, accumulation=accumulation, batch_transform=crop)
        result = train_one_epoch(run.net, run.train_loader, step, progress.num_updates, bar,
                                 desc=f"epoch {epoch + 1}/{epochs}")
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
            "val_top1": None, "val_top5": None, "ema_top1": None, "eval_seconds": 0.0,
            "lr": run.optimizer.param_groups[0]["lr"],
        }
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
            eval_start = time.perf_counter()
            row["val_top1"], row["val_top5"] = evaluate(run.net, run.val_loader, run.device, run.autocast, bar,
                                                        reduce=run.reduce, batch_transform=crop)
            if run.ema is not None:
                row["ema_top1"] = evaluate(run.ema.module, run.val_loader, run.device, run.autocast, bar,
                                           reduce=run.reduce, batch_transform=crop)[0]
            row["eval_seconds"] = time.perf_counter() - eval_start
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
                "config_changes": progress.config_changes, "config": plain_cfg})
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
    eval_seconds = sum(row.get("eval_seconds") or 0.0 for row in history)
    return {
        "status": status, "method": cfg.method_name, "model": cfg.model.name, "data": cfg.data.name,
        "epochs": len(history), "best_top1": max(top1, default=None), "final_top1": top1[-1] if top1 else None,
        "best_ema_top1": max(ema, default=None), "final_ema_top1": ema[-1] if ema else None,
        "total_train_seconds": seconds, "total_eval_seconds": eval_seconds,
        "world_size": run.dist.world_size if run else None,
        "device_hours": seconds * (run.dist.world_size if run else 1) / 3600.0,
        "total_train_flops": last.get("train_flops_total", 0.0),
        "train_flops_per_image": last.get("train_flops_total", 0.0) / images if images else None,
        "train_flops_per_image_linear": last.get("train_flops_linear_total", 0.0) / images if images else None,
        "images_seen": images, "device": str(run.device) if run else None, "lr": run.lr if run else None,
        "resumed_at": progress.resumed_at, "config_changes": progress.config_changes,
        "unreached_stages": (run.plan if run else plan_schedule(cfg)).unreached_stages,
    }
