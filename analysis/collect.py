"""Collect runs into tidy pandas tables, from run dirs on disk or from a W&B project.

Only the run record is read, through :func:`toe.train.record.read_run_dir` (the reader ``toe-sweep`` uses too):
``config.yaml``, ``metrics.jsonl``, ``summary.json`` and Hydra's ``overrides.yaml``, the contract between training
and analysis. Runs that failed, are still running, have no summary or an unreadable file are kept and flagged,
never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import pandas as pd

from toe.train.record import EpochRow, Summary, find_run_dirs, parse_overrides, read_run_dir


@dataclass
class Runs:
    runs: pd.DataFrame  # one row per run: what it was (config, overrides) and how it ended (summary, flag)
    epochs: pd.DataFrame  # one row per run and epoch: the metrics.jsonl lines, with the run id


def record_to_row(
    run_id: str,
    config: Dict[str, Any],
    summary: Summary,
    overrides: Iterable[str],
    history: List[EpochRow],
    problems: Iterable[str] = (),
    state: Optional[str] = None,
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """One run's row and epoch rows from its record; the same mapping serves run dirs and W&B runs. ``state`` is
    the reader's (:data:`toe.train.record.RUN_STATES`); W&B runs give none and their summary's status is used."""
    config = config or {}
    toe_cfg, schedule = config.get("toe") or {}, config.get("schedule") or {}
    row: Dict[str, Any] = {
        "run": run_id,
        "experiment": config.get("task_name"),
        "method": config.get("method_name") or summary.method,
        # the model= option (vit_cpu) where the record has it: timm's name of the default CPU model
        # (vit_tiny_patch16_224) is the base class of another, much smaller model
        "model": (config.get("model") or {}).get("label") or (config.get("model") or {}).get("name") or summary.model,
        "data": (config.get("data") or {}).get("name") or summary.data,
        "seed": config.get("seed"),
        "toe_enabled": toe_cfg.get("enabled"),
        "keep_rates": str(toe_cfg.get("keep_rates")) if toe_cfg.get("enabled") else None,
        "init_keep_rate": toe_cfg.get("init_keep_rate") if toe_cfg.get("enabled") else None,
        "epochs_planned": schedule.get("epochs"),
        "stage_starts": schedule.get("stage_starts"),
        "schedule_length": schedule.get("length"),
    }
    # Override columns add what the sweep varied; they never replace what the record says (model=deit_small is
    # recorded as deit_small_patch16_224).
    row.update({k: v for k, v in parse_overrides(list(overrides)).items() if k not in row})
    for key, value in summary.to_dict().items():
        if key not in ("method", "model", "data", "error"):
            row[key] = value
    status = state or summary.status or "not started"
    row["status"] = status
    flags = list(problems)
    if status == "failed":
        flags.append(f"failed: {summary.error or 'unknown error'}")
    elif status == "interrupted":
        flags.append(f"interrupted after epoch {summary.epochs} (preempted or stopped; a rerun resumes)")
    elif status == "running":
        flags.append(f"running or stopped (last epoch {summary.epochs} of {schedule.get('epochs', '?')})")
    elif status == "not started":
        flags.append("not started (no summary: the job never ran or died before writing one)")
    elif status == "completed" and not history:
        flags.append("completed without a single epoch in metrics.jsonl: not counted")
        row["status"] = "no epochs"
    if summary.unreached_stages:
        flags.append(f"ToE stage(s) {summary.unreached_stages} never ran: they start after the run's last epoch")
    row["flag"] = "; ".join(flags) or None
    epoch_rows = [dict(line.to_dict(), run=run_id) for line in history]
    return row, epoch_rows


def load_run_dir(run_dir: Path, root: Path) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    run = read_run_dir(run_dir)
    run_id = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    summary = replace(run.summary, error=run.error)  # the log's error where the summary has none
    return record_to_row(run_id, run.config, summary, run.overrides, run.history, run.problems, run.state)


def _frame(rows: List[Dict[str, Any]], epoch_rows: List[Dict[str, Any]]) -> Runs:
    return Runs(pd.DataFrame(rows), pd.DataFrame(epoch_rows))


def collect(root: Path) -> Runs:
    """All runs under ``root``; raises ``FileNotFoundError`` when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    rows, epoch_rows = [], []
    for run_dir in find_run_dirs(root):
        row, epochs = load_run_dir(run_dir, root)
        rows.append(row)
        epoch_rows += epochs
    if not rows:
        raise FileNotFoundError(f"no run records (config.yaml, metrics.jsonl, summary.json) under {root}")
    return _frame(rows, epoch_rows)


def collect_wandb(project: str, api: Optional[Any] = None) -> Runs:
    """The same tables from a W&B project ``entity/project`` (needs network access and a login)."""
    import wandb

    api = api or wandb.Api()
    rows, epoch_rows = [], []
    for run in api.runs(project):
        config = {k: v for k, v in run.config.items() if not k.startswith("_")}
        history = [EpochRow.from_dict(r) for r in run.scan_history() if "epoch" in r]
        row, epochs = record_to_row(
            run.id, config, Summary.from_dict(dict(run.summary)), config.get("overrides") or [], history
        )
        rows.append(row)
        epoch_rows += epochs
    if not rows:
        raise FileNotFoundError(f"no runs in the W&B project {project}")
    return _frame(rows, epoch_rows)
