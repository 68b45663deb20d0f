"""Sweeps: the check that runs before a multirun starts, and the state of a sweep's runs (``toe-sweep status``).

The check composes every job the sweep can know before launch with Hydra's public ``compose`` API and runs
:func:`toe.schema.validate` on it; a job it cannot know in advance (a sweeper that draws values as it goes) is
checked when it starts, since :func:`toe.train.train` validates its config before writing anything.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .record import RunDir, find_run_dirs, read_run_dir

log = logging.getLogger("toe.sweep")
LOCAL_LAUNCHERS = ("basic", "submitit_local")  # jobs run on this machine, so its devices are the jobs' devices


class ExperimentError(ValueError):
    """An experiment file or a sweep that cannot run; the message names the file, the job and the key."""


def sweep_jobs(config: DictConfig) -> Optional[List[List[str]]]:
    """The override list of every job of the multirun, as Hydra's basic sweeper expands it (the sweeper's
    ``params`` first, the command line's overrides after, a later value of a key replacing an earlier one), or
    ``None`` when a value is not a list of choices (a range or interval that another sweeper samples)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

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


def check_jobs(config: DictConfig) -> int:
    """Compose and validate every job of the multirun ``config``; returns how many were checked, raises
    :class:`ExperimentError` naming the first job that cannot run."""
    from hydra import compose

    from .schema import ConfigError, compose_error_line, is_compose_error, validate

    experiment = config.hydra.runtime.choices.get("experiments")
    source = f"experiments/{experiment}.yaml" if experiment else "the command line"
    launcher = config.hydra.runtime.choices.get("hydra/launcher")
    jobs = sweep_jobs(config)
    if jobs is None:
        log.info("%s: the sweeper samples its values; each job is checked when it starts", source)
        return 0
    for number, job in enumerate(jobs):
        where = f"{source}: job {number} ({' '.join(job)})"
        try:
            validate(compose(config_name="train", overrides=job), devices=launcher in LOCAL_LAUNCHERS)
        except ConfigError as err:
            raise ExperimentError(f"{where}: {err}") from None
        except Exception as err:  # noqa: BLE001 - Hydra and OmegaConf raise several types for a bad job
            if not is_compose_error(err):
                raise
            raise ExperimentError(f"{where}: {compose_error_line(err)}") from None
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
def sweep_runs(sweep_dir: Path) -> List[RunDir]:
    """Every run under ``sweep_dir`` (recursively: Hydra multirun dirs, SLURM output dirs), each read on its own."""
    return [read_run_dir(d) for d in find_run_dirs(Path(sweep_dir))]
