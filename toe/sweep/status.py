"""Sweeps: the check that runs before a multirun starts, and the state of a sweep's runs (``toe-sweep status``).

The check composes every job the sweep can know before launch with Hydra's public ``compose`` API and runs
:func:`toe.config.validate.validate` on it; a job it cannot know in advance (a sweeper that draws values as it goes) is
checked when it starts, since :func:`toe.train.task.train` validates its config before writing anything.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from toe.train.record import RunDir, find_run_dirs, read_run_dir

log = logging.getLogger("toe.sweep.status")
LOCAL_LAUNCHERS = ("basic", "submitit_local")  # jobs run on this machine, so its devices are the jobs' devices


class ExperimentError(ValueError):
    """An experiment file or a sweep that cannot run; the message names the file, the job and the key."""


def sweep_jobs(config: DictConfig) -> Optional[List[List[str]]]:
    """The override list of every job of the multirun, as Hydra's basic sweeper expands it (the sweeper's
    ``params`` first, the command line's overrides after, a later value of a key replacing an earlier one), or
    ``None`` when a value is not a list of choices (a range or interval that another sweeper samples)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "BasicSweeper")):
        return None  # another sweeper (an Optuna search) draws its jobs as it goes
    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    choices: Dict[str, List[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                return None
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


def _is_sweep(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override).is_sweep_override()


def check_jobs(config: DictConfig) -> int:
    """Compose and validate every job of the multirun ``config``; returns how many were checked, raises
    :class:`ExperimentError` naming the first job that cannot run."""
    from hydra import compose

    from toe.config.compose import config_error_message
    from toe.config.validate import validate

    experiment = config.hydra.runtime.choices.get("experiments")
    search = config.hydra.runtime.choices.get("hparams_search")
    source = (
        f"experiments/{experiment}.yaml"
        if experiment
        else f"hparams_search/{search}.yaml"
        if search
        else "the command line"
    )
    launcher = config.hydra.runtime.choices.get("hydra/launcher")
    jobs = sweep_jobs(config)
    if jobs is None:  # the values are drawn as the sweep goes: check what is fixed now, each job when it starts
        log.info("%s: the sweeper samples its values; each job is checked when it starts", source)
        fixed = [o for o in config.hydra.overrides.task if not _is_sweep(o)]
        jobs, source = [fixed], f"{source} (its fixed settings)"
    for number, job in enumerate(jobs):
        where = f"{source}: job {number} ({' '.join(job)})"
        try:
            validate(compose(config_name="train", overrides=job), devices=launcher in LOCAL_LAUNCHERS)
        except Exception as err:  # noqa: BLE001 - Hydra and OmegaConf raise several types for a bad job
            message = config_error_message(err)
            if message is None:
                raise
            raise ExperimentError(f"{where}: {message}") from None
    return len(jobs)


class ValidateSweep(Callback):
    """Check every job of a multirun before the first starts: unknown groups, options and keys, wrong types,
    values out of range, missing values (``data.root``) and impossible schedules stop the sweep at once.

    Hydra turns exceptions raised in callbacks into warnings and goes on, so the error is logged here and the
    process ends with ``SystemExit(2)``.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            checked = check_jobs(config)
        except ExperimentError as err:
            log.error("%s", err)
            raise SystemExit(2) from None
        if checked:
            log.info("checked the configs of all %d jobs", checked)


# --- the state of a sweep ---------------------------------------------------------------------------------------
PLAN_FILE = "multirun.yaml"  # what Hydra saves in the sweep dir: the sweep's config, hydra node included
RETRY_STATES = ("failed", "interrupted", "died", "not started", "unreadable")


def planned_jobs(sweep_dir: Path) -> Optional[Dict[int, List[str]]]:
    """``{job number: overrides}`` of every job the sweep in ``sweep_dir`` planned (from Hydra's
    ``multirun.yaml``), or None when it cannot be known (no plan, a sampling sweeper, another subdir layout)."""
    plan = Path(sweep_dir) / PLAN_FILE
    if not plan.is_file():
        return None
    try:
        config = OmegaConf.load(plan)
        if OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") != "${hydra.job.num}":
            return None
        jobs = sweep_jobs(config)
    except Exception:  # noqa: BLE001 - a plan that cannot be read again is no plan
        return None
    return None if jobs is None else dict(enumerate(jobs))


def _slurm_state(job_id: Optional[str]) -> Optional[str]:
    """What ``squeue`` says of a SLURM job (PENDING, RUNNING, REQUEUED, ...), if it answers."""
    import shutil
    import subprocess

    if not job_id or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = out.stdout.split()
    return states[0] if out.returncode == 0 and states else None


def _submitted_job(sweep_dir: Path, number: int) -> Optional[str]:
    """The SLURM id of job ``number`` of a sweep launched by hydra-submitit-launcher (its ``.submitit/<id>``
    folders; an array's task index is the job number)."""
    folders = sorted(Path(sweep_dir).glob(f".submitit/*_{number}"))
    return folders[-1].name if folders else None


def _settle(run: RunDir, sweep_dir: Path) -> RunDir:
    """Make ``running`` say what is known: ``died`` when the process that held the run dir is gone, the SLURM state
    where squeue answers. A job that holds its run dir's lock but wrote no summary yet is in its first epoch:
    ``running`` too, not ``not started``, and ``died`` if it was killed there."""
    from toe.train.lock import holder, holder_is_gone

    if run.state == "not started" and holder(run.path) is not None:
        run.state = "running"  # it holds its run dir: it started, and no epoch has ended yet (none wrote a summary)
    if run.state == "running":
        held = holder(run.path)
        if held is None or holder_is_gone(run.path):
            run.state = "died"
            run.error = run.error or "the process stopped without writing an ending (killed, or its node died)"
        elif held.get("slurm_job_id"):
            run.slurm = _slurm_state(held["slurm_job_id"])
    elif run.state == "not started" and run.path.name.isdigit():
        run.slurm = _slurm_state(_submitted_job(sweep_dir, int(run.path.name)))
    return run


def sweep_runs(sweep_dir: Path) -> List[RunDir]:
    """Every run under ``sweep_dir`` (recursively: Hydra multirun dirs, SLURM output dirs), each read on its own,
    plus the jobs the sweep planned that never made a run dir (``not started``)."""
    sweep_dir = Path(sweep_dir)
    runs = [read_run_dir(d) for d in find_run_dirs(sweep_dir)]
    seen = {run.path.resolve() for run in runs}
    for number, overrides in (planned_jobs(sweep_dir) or {}).items():
        path = sweep_dir / str(number)
        if path.resolve() not in seen:
            runs.append(RunDir(path, overrides=overrides, state="not started"))
    runs.sort(key=lambda run: (len(run.path.name), str(run.path)))
    return [_settle(run, sweep_dir) for run in runs]


def retry_command(run: RunDir, sweep_dir: Path, launcher: Optional[str]) -> List[str]:
    """``toe-train`` for one job again, with its own overrides, into its own run dir (so it resumes from its
    checkpoint), on the sweep's launcher and its settings or on ``launcher``. The job is a multirun of one whose
    sweep dir is the run dir itself, so the sweep's own ``multirun.yaml`` (its plan) is never replaced."""
    import sys

    hydra_overrides: List[str] = []
    plan = Path(sweep_dir) / PLAN_FILE
    if plan.is_file():
        saved = OmegaConf.load(plan).hydra.overrides.hydra
        hydra_overrides = [o for o in saved if not o.startswith(("hydra.sweep.", "hydra.mode", "hydra.run."))]
    if launcher:
        hydra_overrides = [o for o in hydra_overrides if not o.startswith(("hydra/launcher=", "hydra.launcher."))]
        hydra_overrides.append(f"hydra/launcher={launcher}")
    return [
        sys.executable,
        "-m",
        "toe.cli.train",
        "-m",
        *run.overrides,
        *hydra_overrides,
        f"hydra.sweep.dir={run.path.resolve()}",
        "hydra.sweep.subdir=.",
    ]
