"""``toe-train``: one Hydra task function for a local run, a multirun job, a SLURM job and its requeued restart.

The run is built from timm's pieces by :mod:`toe.train.build`. Every epoch sets the ToE stage (and the EfficientTrain
phase) before training, evaluates on full tokens and writes the run record and an atomic checkpoint; rerunning the
same command in the same run dir resumes from it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf

from toe.config.changes import config_changes
from toe.config.schema import ConfigError, RunConfig, typed_config
from toe.config.stages import SchedulePlan, plan_schedule
from toe.config.validate import validate
from toe.data.datasets import DataRootError
from toe.train.checkpoint import Progress, TrainState, load_checkpoint
from toe.train.distributed import cleanup, gather_objects, init_distributed
from toe.train.lock import locked
from toe.train.record import (
    CHECKPOINT_FILE,
    SUMMARY_FILE,
    EpochRow,
    RunRecord,
    StartRefused,
    Summary,
    known_mean,
    read_run_dir,
    write_hydra_files,
    write_json_atomic,
)

if TYPE_CHECKING:
    from toe.train.build import Run

log = logging.getLogger("toe.train.task")


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
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(
    cfg: DictConfig,
    run_dir: Path,
    overrides: Optional[List[str]] = None,
    started_at: Optional[float] = None,
    hydra_files: Optional[Dict[str, str]] = None,
) -> Summary:
    """Train one run into ``run_dir`` (resuming from its checkpoint if there is one); returns the summary.

    A run's life as the record sees it: the config is checked (:func:`toe.config.validate.validate`), the run dir is
    locked (:mod:`toe.train.lock`), the checkpoint is loaded and its config compared with this one, and only then is
    anything written. A refusal at any of these steps leaves an existing record untouched; in a new run dir a config
    that cannot work still leaves a ``failed`` summary, so that a sweep's status shows it. From then on every ending is
    written: ``completed``, ``failed`` with the error, ``interrupted`` (Ctrl-C, SIGTERM, submitit's preemption and
    requeue), after which a rerun resumes. A full disk ends the run with one line and leaves the previous
    checkpoint and summary intact. ``overrides`` (Hydra's task overrides) go to W&B with the config;
    ``started_at`` (``time.time()`` when the command started; now if not given) counts start-up in the record;
    ``hydra_files`` (``{name: text}``, Hydra's ``.hydra/`` files of the job) are written when the start is accepted.
    """
    started_at = time.time() if started_at is None else started_at
    run_dir = Path(run_dir)
    try:
        plan = validate(cfg)
    except ConfigError as err:
        _note_refused_start(cfg, run_dir, err, hydra_files)
        raise
    # the run's build imports timm and torchvision (seconds): only once the config is known to work, so that a
    # refused one is said at once
    from toe.train.build import build_run, resolve_device

    # the composed config's three uses: the record's YAML and plain dict (as written, as compared on a resume), and
    # the schema's typed objects, which is all that the run reads from here on
    config_yaml, plain_cfg, cfg = (
        OmegaConf.to_yaml(cfg, resolve=True),
        OmegaConf.to_container(cfg, resolve=True),
        typed_config(cfg),
    )
    if plan.unreached_stages:
        log.warning(
            "ToE stage(s) %s start at or after epoch %d, the end of this run: they never run, and the "
            "summary says so (unreached_stages)",
            plan.unreached_stages,
            plan.epochs,
        )
    info = init_distributed(use_cuda=resolve_device(cfg.train.device).type == "cuda")
    if info.enabled:  # every process works in rank 0's run dir (Hydra's ${now:} may differ by a second)
        run_dir = Path(gather_objects(str(run_dir), info)[0])
    try:
        with locked(run_dir, enabled=info.is_main):
            checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
            progress = Progress.from_checkpoint(checkpoint)
            if checkpoint is not None:
                _check_resume(cfg, plain_cfg, checkpoint, progress, run_dir)
                if progress.epoch >= plan.epochs:
                    log.info("%s has completed all %d epochs; nothing to do", run_dir, progress.epoch)
                    summary = read_run_dir(run_dir).summary
                    return summary if summary.status else summarize(cfg, plan, progress, status="completed")
            try:  # reads the data and builds the model: what cannot work with them is refused here, unwritten
                run = build_run(cfg, plan, info)
            except (ConfigError, DataRootError) as err:
                _note_refused_start(cfg, run_dir, err, hydra_files, plan)
                raise
            record = RunRecord(run_dir, cfg.logger.wandb, enabled=info.is_main)
            record.write_config(config_yaml, hydra_files)
            try:
                with _sigterm_interrupts():
                    summary = _fit(
                        cfg, plain_cfg, run, run_dir, record, progress, checkpoint, overrides or [], started_at
                    )
            except BaseException as err:
                _record_ending(cfg, plan, run_dir, record, progress, err)
                raise
            record.finish(0)
            return summary
    finally:
        cleanup(info)


def _fit(
    cfg: RunConfig,
    plain_cfg: Dict[str, Any],
    run: "Run",
    run_dir: Path,
    record: RunRecord,
    progress: Progress,
    checkpoint: Optional[Dict[str, Any]],
    overrides: List[str],
    started_at: float,
) -> Summary:
    from toe.train.epoch import EpochSetup, Evaluator, train_epoch

    info = run.dist
    state = TrainState(run.model, run.optimizer, run.scheduler, run.ema, run.scaler, progress, plain_cfg, info)
    if checkpoint is not None:
        state.load_state_dict(checkpoint)
        log.info("Resuming %s from epoch %d (%s)", run_dir, progress.epoch, CHECKPOINT_FILE)
    record.rewrite_metrics(progress.history)
    progress.wandb_id = record.start_wandb(
        dict(plain_cfg, overrides=overrides), progress.wandb_id, name=f"{cfg.method_name}-{cfg.model.name}-s{cfg.seed}"
    )
    bar = info.is_main and (sys.stderr.isatty() if cfg.train.progress == "auto" else bool(cfg.train.progress))
    setup, evaluator, epochs = EpochSetup(run), Evaluator(run, cfg.train.eval_every, bar), run.plan.epochs
    wall_before = progress.wall_seconds
    progress.startup_seconds += time.time() - started_at
    first_epoch, warned = progress.epoch, False
    for epoch in range(progress.epoch, epochs):
        row, num_updates = train_epoch(run, setup, evaluator, epoch, progress.num_updates, progress.last, bar)
        progress.history.append(row)
        progress.epoch, progress.num_updates = epoch + 1, num_updates
        progress.wall_seconds = wall_before + time.time() - started_at
        row.checkpoint_seconds = state.save(run_dir / CHECKPOINT_FILE)
        progress.wall_seconds = wall_before + time.time() - started_at  # the record's, with the write counted
        record.log_epoch(row)
        _log_epoch(row, epochs, cfg.task)
        if not warned and epoch > first_epoch:  # a process's first epoch also starts its loader's workers
            warned = _warn_input_bound(row, run)
        record.write_summary(summarize(cfg, run.plan, progress, status="running", run=run))
    summary = summarize(cfg, run.plan, progress, status="completed", run=run)
    record.write_summary(summary)
    return summary


def _log_epoch(row: EpochRow, epochs: int, task: str = "classification") -> None:
    def pct(value: Optional[float]) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    scores = ("AP", row.val_box_ap, "AP50", row.val_box_ap50) if task == "detection" else None
    scores = scores or ("top1", row.val_top1, "ema", row.ema_top1)
    log.info(
        "epoch %d/%d stage %d tokens %d loss %.4f %s %s %s %s %.0f img/s %.1fs%s%s",
        row.epoch + 1,
        epochs,
        row.stage,
        row.tokens_after_first_block,
        row.train_loss,
        scores[0],
        pct(scores[1]),
        scores[2],
        pct(scores[3]),
        row.train_img_per_s,
        row.epoch_seconds,
        f" activations {row.activation_mib:.1f} MiB" if row.activation_mib is not None else "",
        f" data wait {row.data_wait_share:.0%}" if row.epoch_seconds else "",
    )


# The share of an epoch spent waiting for batches above which a CUDA run is called input-bound
INPUT_BOUND_SHARE = 0.2


def _warn_input_bound(row: EpochRow, run: Any) -> bool:
    """Say once, on CUDA, when the training loop waited for its batches for a large share of an epoch: then the
    loader, not the step, sets the pace, and ToE's faster step does not reach the wall clock. Returns whether it
    said so."""
    from toe.train.loaders import available_cores

    share = row.data_wait_share
    if run.device.type != "cuda" or share < INPUT_BOUND_SHARE:
        return False
    if run.pipeline == "dali":
        feeding = f"{run.train_loader.threads} DALI thread(s)"
        advice = "give DALI more threads (train.workers)" + (
            ", or decode on the GPU (train.dali_decode=gpu)" if not run.train_loader.decode_on_gpu else ""
        )
    else:
        feeding = f"{getattr(run.train_loader, 'num_workers', 0)} loader worker(s)"
        advice = "give the loader more cores (train.workers)" + (
            ", or for an image folder use train.pipeline=dali" if run.pipeline == "pil" else ""
        )
    log.warning(
        "epoch %d waited for its training batches %.0f%% of its %.1f s (train.pipeline=%s, %s, %d cores): the run is "
        "input-bound, so a faster step (ToE's) does not shorten it; %s (toe-bench capacity: what each pipeline "
        "costs a core)",
        row.epoch + 1,
        100 * share,
        row.epoch_seconds,
        run.pipeline,
        feeding,
        available_cores(),
        advice,
    )
    return True


def _check_resume(
    cfg: RunConfig, plain_cfg: Dict[str, Any], checkpoint: Dict[str, Any], progress: Progress, run_dir: Path
) -> None:
    """Refuse a resume whose config differs from the checkpoint's in anything that changes the training, unless
    ``resume.allow_changes``; then note the change at this epoch."""
    changes = config_changes(checkpoint.get("config") or {}, plain_cfg)
    if not changes:
        return
    said = ", ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())
    if not cfg.resume.allow_changes:
        raise StartRefused(
            f"{run_dir} was trained (to epoch {progress.epoch}) with another config ({said}): "
            "rerun with its config to resume, use a new run dir, or add resume.allow_changes=true "
            "to go on with the change (the record notes it)"
        )
    log.warning(
        "resuming %s at epoch %d with a changed config (resume.allow_changes): %s", run_dir, progress.epoch, said
    )
    progress.config_changes.append({"epoch": progress.epoch, "changes": changes})


def _note_refused_start(
    cfg: Any,
    run_dir: Path,
    err: BaseException,
    hydra_files: Optional[Dict[str, str]] = None,
    plan: Optional[SchedulePlan] = None,
) -> None:
    """A config refused in a run dir that has no record yet still leaves a ``failed`` summary and the job's
    overrides (a sweep's status then shows the job as failed, ``toe-sweep retry`` can rerun it); an existing
    record is never touched."""
    if not run_dir.is_dir() or (run_dir / SUMMARY_FILE).exists() or (run_dir / CHECKPOINT_FILE).exists():
        return
    with contextlib.suppress(OSError):
        write_hydra_files(run_dir, hydra_files)
    summary = Summary(status="failed")
    with contextlib.suppress(Exception):  # a config too broken to summarise still gets its error written
        summary = summarize(cfg, plan or plan_schedule(cfg), Progress(), status="failed")
    summary.error = f"{type(err).__name__}: {err}"
    with contextlib.suppress(OSError):
        write_json_atomic(run_dir / SUMMARY_FILE, summary.to_dict())


def _record_ending(
    cfg: RunConfig, plan: SchedulePlan, run_dir: Path, record: RunRecord, progress: Progress, err: BaseException
) -> None:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        record.finish(1)
        epoch = _checkpoint_epoch(run_dir)
        disk_full = DiskFull(
            f"out of disk space in {run_dir} ({err.filename or err}): the checkpoint of epoch "
            f"{epoch} and the record up to it are intact; free space and rerun the same command to "
            "resume"
        )
        # the failed write's partial file is gone, so the small summary usually fits: it says how the run ended,
        # at the epoch of the checkpoint that a rerun resumes from (else it stays as the last epoch left it)
        with contextlib.suppress(Exception):
            saved = Progress.from_checkpoint(load_checkpoint(run_dir / CHECKPOINT_FILE))
            summary = summarize(cfg, plan, saved, status="interrupted")
            summary.error = f"DiskFull: {disk_full}"
            summary.resumed_at = saved.resumed_at[:-1]  # from_checkpoint counts a resume that this is not
            record.write_summary(summary)
        raise disk_full from None
    interrupted = isinstance(err, (SystemExit, KeyboardInterrupt))
    summary = summarize(cfg, plan, progress, status="interrupted" if interrupted else "failed")
    summary.error = f"{type(err).__name__}: {err}"
    record.write_summary(summary)
    record.finish(1)


def _checkpoint_epoch(run_dir: Path) -> Any:
    with contextlib.suppress(Exception):
        return Progress.from_checkpoint(load_checkpoint(run_dir / CHECKPOINT_FILE)).epoch
    return "none"


def _peak(values: Iterator[Optional[float]]) -> Optional[float]:
    return max((v for v in values if v is not None), default=None)


def summarize(cfg: Any, plan: SchedulePlan, progress: Progress, status: str, run: Optional["Run"] = None) -> Summary:
    """The run's summary from its progress; ``cfg`` is the typed config, or the composed one of a refused start."""
    history, last = progress.history, progress.last or EpochRow(epoch=-1)
    top1 = [row.val_top1 for row in history if row.val_top1 is not None]
    ema = [row.ema_top1 for row in history if row.ema_top1 is not None]
    boxes = [row for row in history if row.val_box_ap is not None]
    ema_boxes = [row.ema_box_ap for row in history if row.ema_box_ap is not None]
    train_seconds, images = last.train_seconds_total, last.images_seen
    eval_seconds = sum(row.eval_seconds for row in history)
    checkpoint_seconds = sum(row.checkpoint_seconds for row in history)
    world_size = run.dist.world_size if run else None
    return Summary(
        status=status,
        method=cfg.method_name,
        model=cfg.model.name,
        data=cfg.data.name,
        epochs=len(history),
        best_top1=max(top1, default=None),
        final_top1=top1[-1] if top1 else None,
        best_ema_top1=max(ema, default=None),
        final_ema_top1=ema[-1] if ema else None,
        best_box_ap=max((row.val_box_ap for row in boxes), default=None),
        final_box_ap=boxes[-1].val_box_ap if boxes else None,
        final_box_ap50=boxes[-1].val_box_ap50 if boxes else None,
        final_box_ap75=boxes[-1].val_box_ap75 if boxes else None,
        final_ema_box_ap=ema_boxes[-1] if ema_boxes else None,
        total_train_seconds=train_seconds,
        data_wait_share=sum(row.data_wait_seconds for row in history) / train_seconds if train_seconds else None,
        total_eval_seconds=eval_seconds,
        total_checkpoint_seconds=checkpoint_seconds,
        startup_seconds=progress.startup_seconds,
        wall_seconds=progress.wall_seconds,
        other_seconds=max(
            0.0, progress.wall_seconds - progress.startup_seconds - train_seconds - eval_seconds - checkpoint_seconds
        ),
        world_size=world_size,
        device_hours=train_seconds * (world_size or 1) / 3600.0,
        peak_activation_mib=_peak(row.activation_mib for row in history),
        mean_activation_mib=known_mean(row.activation_mib for row in history),
        peak_cuda_mib=_peak(row.cuda_peak_mib for row in history),
        total_train_flops=last.train_flops_total,
        train_flops_per_image=last.train_flops_total / images if images else None,
        train_flops_per_image_linear=last.train_flops_linear_total / images if images else None,
        images_seen=images,
        device=str(run.device) if run else None,
        lr=run.lr if run else None,
        resumed_at=progress.resumed_at,
        config_changes=progress.config_changes,
        unreached_stages=plan.unreached_stages,
    )
