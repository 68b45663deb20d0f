"""The run record: the contract between training and analysis.

Every run dir holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one :class:`EpochRow` per line) and
``summary.json`` (a :class:`Summary`). The same figures go to W&B when it is on; a W&B failure is logged and never
stops training. The two dataclasses are the record's schema: training writes them, and ``toe-sweep`` and the
analysis read them back through :func:`read_run_dir`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

if TYPE_CHECKING:
    from toe.config.schema import WandbConfig

log = logging.getLogger(__name__)

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINT_FILE = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "checkpoint.pth",
)


class StartRefused(RuntimeError):
    """The run dir cannot be (re)started as asked, and nothing was written to it; one line says why and what to do
    (another process holds it, its checkpoint is unreadable, the config differs from the checkpoint's)."""


@dataclass
class EpochRow:
    """One line of ``metrics.jsonl``: an epoch of training and its evaluation. Times are seconds, FLOPs analytic
    MACs (:mod:`toe.cost.flops`), ``*_total`` fields cumulative over the run."""

    epoch: int  # 0-based
    stage: int = 0  # ToE stage (0 = full tokens before the first stage, or ToE off)
    img_size: Optional[int] = None  # training resolution of the epoch (EfficientTrain phases change it)
    tokens_after_first_block: Optional[int] = None  # tokens blocks 2..L see in training, prefix tokens included
    train_loss: Optional[float] = None
    train_img_per_s: Optional[float] = None
    epoch_seconds: float = 0.0  # training time of this epoch, evaluation excluded
    # of epoch_seconds, the training loop waiting for its batches: a large share is an input-bound run, whose
    # wall clock a faster step (ToE's) does not shorten
    data_wait_seconds: float = 0.0
    train_seconds_total: float = 0.0
    train_flops_total: float = 0.0
    train_flops_linear_total: float = 0.0  # without the attention matmuls (what thop-style counters report)
    images_seen: int = 0
    val_top1: Optional[float] = None
    val_top5: Optional[float] = None
    ema_top1: Optional[float] = None  # null without EMA
    # task=detection: COCO box AP (IoU 0.50:0.95), AP50, AP75 on the val set (pycocotools), and the EMA's AP
    val_box_ap: Optional[float] = None
    val_box_ap50: Optional[float] = None
    val_box_ap75: Optional[float] = None
    ema_box_ap: Optional[float] = None
    eval_seconds: float = 0.0  # evaluating the model (and its EMA) after this epoch; 0 when not evaluated
    # writing this epoch's checkpoint (known only after it is written: the checkpoint itself holds 0 here, so the
    # last epoch before a resume reads 0)
    checkpoint_seconds: float = 0.0
    lr: Optional[float] = None
    # MiB of activations saved for backward in one train step of this epoch (its first; toe.cost.memory), and the
    # CUDA allocator's peak over the epoch (parameters and optimizer state included; null off CUDA)
    activation_mib: Optional[float] = None
    cuda_peak_mib: Optional[float] = None

    @property
    def data_wait_share(self) -> float:
        """Of the epoch's training time, the share the loop waited for its batches (0 for an untimed row)."""
        return self.data_wait_seconds / self.epoch_seconds if self.epoch_seconds else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Dict[str, Any], problems: Optional[List[str]] = None, where: str = "") -> "EpochRow":
        """Tolerant of records written by other versions: unknown keys are dropped, missing ones take defaults. A
        value of the wrong type or out of its range (a string top-1, NaN) is dropped too and named in
        ``problems`` (``where``: the file and line); without ``epoch`` the row is refused (``ValueError``)."""
        values = checked_fields(cls, row, problems, where or METRICS_FILE)
        if "epoch" not in values:
            raise ValueError("no epoch")
        return cls(**values)


@dataclass
class Summary:
    """``summary.json``: how the run stands or ended, and its totals."""

    status: Optional[str] = None  # one of RUN_STATES (written: running, completed, interrupted, failed)
    method: Optional[str] = None
    model: Optional[str] = None
    data: Optional[str] = None
    epochs: int = 0  # epochs trained
    best_top1: Optional[float] = None
    final_top1: Optional[float] = None
    best_ema_top1: Optional[float] = None
    final_ema_top1: Optional[float] = None
    # task=detection: COCO box AP, AP50 and AP75 (fractions) of the last evaluation, and the best AP
    best_box_ap: Optional[float] = None
    final_box_ap: Optional[float] = None
    final_box_ap50: Optional[float] = None
    final_box_ap75: Optional[float] = None
    final_ema_box_ap: Optional[float] = None
    total_train_seconds: float = 0.0
    # of total_train_seconds, the share the training loop waited for its batches (a large one: input-bound)
    data_wait_share: Optional[float] = None
    total_eval_seconds: float = 0.0  # evaluation, kept apart from training time
    total_checkpoint_seconds: float = 0.0
    startup_seconds: float = 0.0  # from the command's start to the first epoch (imports, data, model), every start
    wall_seconds: float = 0.0  # the command from its start to its last epoch, every start (resumes) summed
    other_seconds: float = 0.0  # wall - startup - train - eval - checkpoint: record, W&B, logging, loader start
    world_size: Optional[int] = None  # processes (GPUs) of the run
    device_hours: float = 0.0  # train seconds x devices / 3600: GPU-hours on GPUs, CPU-hours on CPU
    peak_activation_mib: Optional[float] = None  # the most activation memory of an epoch's train step
    mean_activation_mib: Optional[float] = None  # the same, averaged over the epochs (ToE's stages lower it)
    peak_cuda_mib: Optional[float] = None  # the most CUDA memory an epoch held (null off CUDA)
    total_train_flops: float = 0.0
    train_flops_per_image: Optional[float] = None  # schedule-averaged analytic train MACs per image
    train_flops_per_image_linear: Optional[float] = None  # the same without the attention matmuls
    images_seen: int = 0
    device: Optional[str] = None
    lr: Optional[float] = None  # the peak LR after batch scaling
    resumed_at: List[int] = field(default_factory=list)  # epochs at which the run resumed from its checkpoint
    config_changes: List[Dict[str, Any]] = field(default_factory=list)  # [{"epoch", "changes": {key: [old, new]}}]
    unreached_stages: List[int] = field(default_factory=list)  # ToE stages that start after the run's last epoch
    error: Optional[str] = None  # why a failed or interrupted run ended

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, summary: Dict[str, Any], problems: Optional[List[str]] = None) -> "Summary":
        """As :meth:`EpochRow.from_dict`: unknown keys and values that are not what the field holds are dropped,
        the latter named in ``problems``."""
        known = checked_fields(cls, summary, problems, SUMMARY_FILE)
        return cls(**{key: value for key, value in known.items() if value is not None or key not in _LISTS})


def known_mean(values: Iterator[Optional[float]]) -> Optional[float]:
    """The mean of the values that are not ``None`` (a figure some epochs' rows lack), ``None`` if none is."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


_LISTS = ("resumed_at", "config_changes", "unreached_stages")
# Beyond this a figure of the record (seconds, FLOPs, images) is not one a run can have written: a sum of two
# would overflow to inf in the tables.
IMPLAUSIBLE = 1e30


def _wrong(hint: Any, value: Any, key: str) -> Optional[str]:
    """Why ``value`` is not a value of the field ``key`` of type ``hint``, or None if it is."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return None
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        return _wrong(next(a for a in args if a is not type(None)), value, key)
    if origin in (list, List):
        if not isinstance(value, list):
            return "is not a list"
        return next(
            (f"holds {item!r}, which {why}" for item in value for why in [_wrong(args[0], item, key)] if why), None
        )
    if origin in (dict, Dict):
        return None if isinstance(value, dict) else "is not a mapping"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "is not a number"
        if not math.isfinite(value) or abs(value) > IMPLAUSIBLE:
            return "is not a finite number a run can have written"
        if ("top1" in key or "top5" in key) and not 0.0 <= value <= 1.0:
            return "is not an accuracy (0 to 1)"
        return None
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "is not an integer"
    if hint is str:
        return None if isinstance(value, str) else "is not a string"
    return None


def checked_fields(cls: type, values: Dict[str, Any], problems: Optional[List[str]], where: str) -> Dict[str, Any]:
    """The entries of ``values`` that are fields of the dataclass ``cls`` and hold a value of the field's type;
    each entry dropped for its value is named in ``problems``."""
    hints = typing.get_type_hints(cls)
    kept = {}
    for key, value in values.items():
        if key not in hints:
            continue
        why = _wrong(hints[key], value, key)
        if why is None:
            kept[key] = value
        elif problems is not None:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            problems.append(f"{where}: {key}={shown} {why} (ignored)")
    return kept


METRIC_FIELDS = tuple(f.name for f in fields(EpochRow))
SUMMARY_FIELDS = tuple(f.name for f in fields(Summary))


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


HYDRA_DIR = ".hydra"


def write_hydra_files(run_dir: Path, hydra_files: Optional[Dict[str, str]]) -> None:
    """Write ``{file name: text}`` into the run dir's ``.hydra/``, each file atomically."""
    if not hydra_files:
        return
    folder = Path(run_dir) / HYDRA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in hydra_files.items():
        write_text_atomic(folder / name, text)


class RunRecord:
    """Local files of one run, plus an optional W&B run that mirrors them."""

    def __init__(self, run_dir: Path, wandb: Optional[WandbConfig] = None, enabled: bool = True):
        """``enabled=False`` (processes other than rank 0 of a DDP run) makes every method a no-op."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.wandb_settings = wandb  # the logger.wandb node; None: W&B off
        self._wandb = None

    def write_config(self, yaml_text: str, hydra_files: Optional[Dict[str, str]] = None) -> None:
        """``config.yaml``, and Hydra's own record of the job (``.hydra/{config,hydra,overrides}.yaml``, which
        toe-train writes itself once a start is accepted: see ``output_subdir`` in ``conf/train.yaml``)."""
        if not self.enabled:
            return
        write_hydra_files(self.run_dir, hydra_files)
        write_text_atomic(self.run_dir / CONFIG_FILE, yaml_text)

    def rewrite_metrics(self, history: List[EpochRow]) -> None:
        """Make ``metrics.jsonl`` hold exactly ``history`` (used on resume, so no epoch is logged twice)."""
        if not self.enabled:
            return
        write_text_atomic(self.run_dir / METRICS_FILE, "".join(json.dumps(row.to_dict()) + "\n" for row in history))

    def log_epoch(self, row: EpochRow) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row.to_dict()) + "\n")
        self._wandb_call("log", {k: v for k, v in row.to_dict().items() if v is not None}, step=row.epoch)

    def write_summary(self, summary: Summary) -> None:
        if not self.enabled:
            return
        write_json_atomic(self.run_dir / SUMMARY_FILE, summary.to_dict())
        if self._wandb is not None:
            try:
                self._wandb.summary.update(summary.to_dict())
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                log.warning("W&B summary update failed (training goes on): %s", err)

    # --- W&B ------------------------------------------------------------------------------------------------
    def start_wandb(self, config: Dict[str, Any], run_id: Optional[str], name: str) -> Optional[str]:
        """Start (or resume, with ``run_id``) the W&B run; returns its id, or ``None`` when W&B is off or failed."""
        mode = self.wandb_settings.mode if self.wandb_settings is not None else "disabled"
        if mode == "disabled" or not self.enabled:
            return None
        try:
            import wandb

            self._wandb = wandb.init(
                project=self.wandb_settings.project,
                entity=self.wandb_settings.entity,
                group=self.wandb_settings.group,
                tags=list(self.wandb_settings.tags),
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
HYDRA_OVERRIDES = Path(HYDRA_DIR) / "overrides.yaml"


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
    summary: Summary = field(default_factory=Summary)  # empty (status None) when there is none
    history: List[EpochRow] = field(default_factory=list)
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
    if not (run.path / CONFIG_FILE).exists():  # a job refused before its record: the config Hydra composed for it
        run.config = read(Path(HYDRA_DIR) / CONFIG_FILE, yaml.safe_load, {})
    if not isinstance(run.config, dict):
        run.problems.append(f"{CONFIG_FILE}: not a mapping of settings (a {type(run.config).__name__})")
        run.config = {}
    overrides = read(HYDRA_OVERRIDES, yaml.safe_load, [])
    try:
        if not isinstance(overrides, list):
            raise ValueError(f"not a list (a {type(overrides).__name__})")
        run.overrides = [str(o) for o in overrides]
        parse_overrides(run.overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's parser raises its own error types
        run.problems.append(f"{HYDRA_OVERRIDES}: not Hydra overrides ({str(err).splitlines()[0]}; ignored)")
        run.overrides = []
    run.history = read(METRICS_FILE, lambda text: _read_metric_lines(text, run.problems), [])
    summary = read(SUMMARY_FILE, json.loads, {})
    if not isinstance(summary, dict):
        run.problems.append(f"{SUMMARY_FILE}: not a JSON object")
        summary = {}
    run.summary = Summary.from_dict(summary, run.problems)
    status = run.summary.status
    run.error = run.summary.error or _last_error_line(run.path)
    if status in RUN_STATES:
        run.state = status
    elif (run.path / SUMMARY_FILE).exists():
        run.state = "unreadable"
    else:
        run.state = "failed" if run.error else "not started"
    return run


def _read_metric_lines(text: str, problems: List[str]) -> List[EpochRow]:
    rows, lines = [], text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(EpochRow.from_dict(json.loads(line), problems, f"{METRICS_FILE} line {number}"))
        except (ValueError, TypeError, AttributeError):  # not JSON, not an object, no epoch
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
