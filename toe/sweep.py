"""Sweeps: the check that runs before a multirun starts, and ``toe-sweep status``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd
import yaml

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .record import SUMMARY_FILE

log = logging.getLogger("toe.sweep")


class ExperimentError(ValueError):
    """An experiment file or a sweep that cannot run; the message names the file and the key."""


def _sweep_jobs(config: DictConfig) -> List[List[str]]:
    """The override list of every job of the multirun, expanded as Hydra's basic sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


class ValidateSweep(Callback):
    """Compose and check every job of a multirun before any starts: unknown groups, options and keys, missing
    values (``data.root``) and impossible ToE schedules stop the sweep at once, naming the experiment file.

    Hydra turns exceptions raised in callbacks into warnings and goes on, so the error is logged here and the
    process ends with ``SystemExit(2)``.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self.check(config)
        except ExperimentError as err:
            log.error("%s", err)
            raise SystemExit(2) from None

    def check(self, config: DictConfig) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from .curriculum import build_phases
        from .run import ConfigError, build_schedule

        experiment = config.hydra.runtime.choices.get("experiments")
        source = f"experiments/{experiment}.yaml" if experiment else "the command line"
        loader = GlobalHydra.instance().config_loader()
        jobs = _sweep_jobs(config)
        for job in jobs:
            try:
                job_cfg = loader.load_sweep_config(config, list(job))
            except Exception as err:  # noqa: BLE001 - Hydra raises several types for bad overrides
                raise ExperimentError(f"{source}: job {' '.join(job)}: {err}".strip()) from None
            job_values = OmegaConf.masked_copy(job_cfg, [k for k in job_cfg if k != "hydra"])
            try:  # interpolations too: finetune.path: ${pretrained.baseline} with pretrained.baseline: ???
                missing = sorted(OmegaConf.missing_keys(job_values))
                if not missing:
                    OmegaConf.to_container(job_values, resolve=True, throw_on_missing=True)
            except OmegaConfBaseException as err:
                raise ExperimentError(f"{source}: job {' '.join(job)}: {str(err).splitlines()[0]}") from None
            if missing:
                raise ExperimentError(
                    f"{source}: job {' '.join(job)}: missing value for {', '.join(missing)} "
                    f"(add e.g. {missing[0]}=<value> to the command)"
                )
            try:
                build_schedule(job_cfg)
                if job_cfg.get("curriculum") and job_cfg.curriculum.enabled:
                    build_phases(job_cfg.curriculum, int(job_cfg.schedule.epochs), int(job_cfg.model.img_size),
                                 int(job_cfg.model.kwargs.get("patch_size", 16)))
            except (ConfigError, ValueError) as err:
                raise ExperimentError(f"{source}: job {' '.join(job)}: {err}") from None


# --- toe-sweep status ---------------------------------------------------------------------------------------------
def _last_error_line(log_file: Path) -> Optional[str]:
    if not log_file.exists():
        return None
    errors = [line for line in log_file.read_text(errors="replace").splitlines() if "[ERROR]" in line]
    return errors[-1].split("[ERROR] - ", 1)[-1] if errors else None


def run_state(run_dir: Path) -> Dict[str, Any]:
    """State of one run dir of a sweep, from its run record (never from training internals)."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    summary_file = run_dir / SUMMARY_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    status = summary.get("status")
    error = summary.get("error") or _last_error_line(run_dir / f"{run_dir.parent.name}.log")
    if status is None:
        state = "failed" if error else "not started"
    elif status == "completed":
        state = "done"
    else:
        state = status
    if summary.get("resumed_at"):
        state += f" (resumed at epoch {', '.join(str(e) for e in summary['resumed_at'])})"
    return {"run": str(run_dir), "overrides": " ".join(overrides), "state": state, "epochs": summary.get("epochs"),
            "final_top1": summary.get("final_top1"), "error": error if state.startswith("failed") else None,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary_file.stat().st_mtime))
            if summary_file.exists() else None}


def sweep_runs(sweep_dir: Path) -> List[Dict[str, Any]]:
    """Every run under ``sweep_dir`` (recursively: Hydra multirun dirs, SLURM output dirs)."""
    run_dirs = sorted({p.parent.parent for p in Path(sweep_dir).rglob(".hydra/overrides.yaml")})
    return [run_state(d) for d in run_dirs]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="toe-sweep", description="Inspect the runs of a sweep.")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="every run with its overrides and state; exits 1 if any failed")
    status.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"toe-sweep: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    rows = sweep_runs(args.sweep_dir)
    if not rows:
        print(f"toe-sweep: no runs under {args.sweep_dir} (no .hydra/overrides.yaml found)", file=sys.stderr)
        return 2
    table = pd.DataFrame(rows)
    table["run"] = [str(Path(r).relative_to(args.sweep_dir)) for r in table["run"]]
    print(table[["run", "overrides", "state", "epochs", "final_top1", "updated"]].to_markdown(index=False))
    failed = [r for r in rows if r["state"].startswith("failed")]
    for row in failed:
        print(f"\nFAILED {row['run']}: {row['error']}")
    counts = pd.Series([r["state"].split(" (")[0] for r in rows]).value_counts()
    print("\n" + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
