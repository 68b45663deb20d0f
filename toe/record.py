"""The run record: the contract between training and analysis.

Every run dir holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON line per epoch) and ``summary.json``.
The same figures go to W&B when it is on; a W&B failure is logged and never stops training. Field names are
defined here once and read by the analysis.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

log = logging.getLogger(__name__)

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINT_FILE = "config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pth"


class StartRefused(RuntimeError):
    """The run dir cannot be (re)started as asked, and nothing was written to it; one line says why and what to do
    (another process holds it, its checkpoint is unreadable, the config differs from the checkpoint's)."""

METRIC_FIELDS = (
    "epoch",  # 0-based
    "stage",  # ToE stage (0 = full tokens before the first stage, or ToE off)
    "img_size",  # training resolution of the epoch (EfficientTrain phases change it)
    "tokens_after_first_block",  # tokens blocks 2..L see in training, prefix tokens included
    "train_loss",
    "train_img_per_s",
    "epoch_seconds",  # training time of this epoch, evaluation excluded
    "train_seconds_total",
    "train_flops_total",  # analytic, MACs (see toe.flops), cumulative
    "train_flops_linear_total",  # the same without the attention matmuls (what thop-style counters report)
    "images_seen",  # cumulative training images
    "val_top1",
    "val_top5",
    "ema_top1",  # null without EMA
    "eval_seconds",  # evaluating the model (and its EMA) after this epoch; 0 when the epoch was not evaluated
    "lr",
)
SUMMARY_FIELDS = (
    "status",
    "method",
    "model",
    "data",
    "epochs",
    "best_top1",
    "final_top1",
    "best_ema_top1",
    "final_ema_top1",
    "total_train_seconds",
    "total_eval_seconds",  # evaluation, kept apart from training time
    "world_size",  # processes (GPUs) of the run
    "device_hours",  # train seconds x devices / 3600: GPU-hours on GPUs, CPU-hours on CPU
    "total_train_flops",
    "train_flops_per_image",  # schedule-averaged analytic train MACs per image
    "train_flops_per_image_linear",  # the same without the attention matmuls
    "images_seen",
    "device",
    "lr",  # the peak LR after batch scaling
    "resumed_at",  # epochs at which the run resumed from its checkpoint (preemption, crash, requeue)
    "config_changes",  # [{"epoch", "changes": {key: [before, after]}}] a resume was allowed to make
    "unreached_stages",  # ToE stages that start after the run's last epoch and so never ran
)


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a ``.tmp`` path to write; when the block ends ``path`` is replaced by it in one step. On any failure
    (a crash, a full disk) ``path`` keeps its old content and no ``.tmp`` file is left."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


class RunRecord:
    """Local files of one run, plus an optional W&B run that mirrors them."""

    def __init__(self, run_dir: Path, wandb_cfg: Optional[Dict[str, Any]] = None, enabled: bool = True):
        """``enabled=False`` (processes other than rank 0 of a DDP run) makes every method a no-op."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.wandb_cfg = wandb_cfg or {}
        self._wandb = None

    def write_config(self, yaml_text: str) -> None:
        if not self.enabled:
            return
        write_text_atomic(self.run_dir / CONFIG_FILE, yaml_text)

    def rewrite_metrics(self, history: List[Dict[str, Any]]) -> None:
        """Make ``metrics.jsonl`` hold exactly ``history`` (used on resume, so no epoch is logged twice)."""
        if not self.enabled:
            return
        write_text_atomic(self.run_dir / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in history))

    def log_epoch(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._wandb_call("log", {k: v for k, v in row.items() if v is not None}, step=row["epoch"])

    def write_summary(self, summary: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
        if self._wandb is not None:
            try:
                self._wandb.summary.update(summary)
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                log.warning("W&B summary update failed (training goes on): %s", err)

    # --- W&B ------------------------------------------------------------------------------------------------
    def start_wandb(self, config: Dict[str, Any], run_id: Optional[str], name: str) -> Optional[str]:
        """Start (or resume, with ``run_id``) the W&B run; returns its id, or ``None`` when W&B is off or failed."""
        mode = self.wandb_cfg.get("mode", "disabled")
        if mode == "disabled" or not self.enabled:
            return None
        try:
            import wandb

            self._wandb = wandb.init(
                project=self.wandb_cfg.get("project", "toe"),
                entity=self.wandb_cfg.get("entity"),
                group=self.wandb_cfg.get("group"),
                tags=list(self.wandb_cfg.get("tags") or []),
                name=name,
                mode=mode,
                dir=str(self.run_dir),
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
                reinit="finish_previous",
            )
            return self._wandb.id
        except Exception as err:  # noqa: BLE001
            log.warning("W&B could not start (mode=%s); the local record goes on: %s", mode, err)
            self._wandb = None
            return None

    def _wandb_call(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._wandb is None:
            return
        try:
            getattr(self._wandb, method)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B %s failed, W&B is off for the rest of this run: %s", method, err)
            self._wandb = None

    def finish(self, exit_code: int = 0) -> None:
        self._wandb_call("finish", exit_code=exit_code)
        self._wandb = None


# --- reading run dirs: the one reader that toe-sweep and analysis share ---------------------------------------------
RUN_STATES = ("completed", "running", "interrupted", "failed", "not started", "unreadable", "died")
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"


@dataclass
class RunDir:
    """What one run dir says about its run, read without trusting any file to be whole.

    ``state`` is one of :data:`RUN_STATES`: the summary's status, ``not started`` for a job whose dir Hydra made
    but that wrote no summary, ``failed`` for one whose log names an error before its record existed, and
    ``unreadable`` when ``summary.json`` cannot be parsed (``toe-sweep`` also tells ``died``: ``running``, but the
    process that held the run dir is gone). ``problems`` names each file that could not be read.
    """

    path: Path
    config: Dict[str, Any] = field(default_factory=dict)
    summary: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)
    state: str = "not started"
    error: Optional[str] = None
    problems: List[str] = field(default_factory=list)
    slurm: Optional[str] = None  # SLURM's state of the job, where toe-sweep could ask squeue


def parse_overrides(overrides: List[str]) -> Dict[str, str]:
    """Hydra's own reading of override strings: ``{column: value}`` with the column the key or group without
    ``+``/``~`` and package (``+variant=toe_r0.4`` -> ``variant``, ``toe.merge=drop`` -> ``toe.merge``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed: Dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_delete():
            continue
        parsed[override.key_or_group] = override.get_value_element_as_str()
    return parsed


def _last_error_line(run_dir: Path) -> Optional[str]:
    """The last ``[ERROR]`` line of the run's Hydra log: what a job said when it died before its summary."""
    errors: List[str] = []
    for log_file in sorted(run_dir.glob("*.log")):
        errors += [line for line in log_file.read_text(errors="replace").splitlines() if "[ERROR]" in line]
    return errors[-1].split("[ERROR] - ", 1)[-1] if errors else None


def read_run_dir(run_dir: Path) -> RunDir:
    import yaml

    run = RunDir(Path(run_dir))

    def read(name: Any, parse: Any, default: Any) -> Any:
        path = run.path / name
        if not path.exists():
            return default
        try:
            value = parse(path.read_text())
        except (OSError, ValueError, yaml.YAMLError) as err:
            run.problems.append(f"{name}: unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
            return default
        return default if value is None else value

    run.config = read(CONFIG_FILE, yaml.safe_load, {})
    run.overrides = [str(o) for o in read(HYDRA_OVERRIDES, yaml.safe_load, [])]
    run.history = read(METRICS_FILE, lambda text: _read_metric_lines(text, run.problems), [])
    run.summary = read(SUMMARY_FILE, json.loads, {})
    if not isinstance(run.summary, dict):
        run.problems.append(f"{SUMMARY_FILE}: not a JSON object")
        run.summary = {}
    status = run.summary.get("status")
    run.error = run.summary.get("error") or _last_error_line(run.path)
    if status in RUN_STATES:
        run.state = status
    elif (run.path / SUMMARY_FILE).exists():
        run.state = "unreadable"
    else:
        run.state = "failed" if run.error else "not started"
    return run


def _read_metric_lines(text: str, problems: List[str]) -> List[Dict[str, Any]]:
    rows, lines = [], text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            last = number == len(lines)
            problems.append(f"{METRICS_FILE}: line {number} is {'half-written (ignored)' if last else 'unreadable'}")
    return rows


def find_run_dirs(root: Path) -> List[Path]:
    """Every run dir under ``root`` (itself included), recursively: a dir holding a run record or a Hydra job's
    ``.hydra/overrides.yaml``; hidden dirs (``.submitit``, ``.hydra``) are not runs."""
    root = Path(root)
    found = {p.parent for name in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE) for p in root.rglob(name)}
    found |= {p.parent.parent for p in root.rglob(str(HYDRA_OVERRIDES))}
    return sorted(d for d in found if not any(part.startswith(".") for part in d.relative_to(root).parts))
