"""Sweeps: the check that runs before a multirun starts, and ``toe-sweep status``."""

from __future__ import annotations

import logging
from typing import Any, List

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("toe.sweep")


class ExperimentError(ValueError):
    """An experiment file or a sweep that cannot run; the message names the file and the key."""


def _sweep_jobs(config: DictConfig) -> List[List[str]]:
    """The override list of every job of the multirun, expanded as Hydra's basic sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.to_container(config.hydra.sweeper.get("params") or {}, resolve=True)
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

        from .train import ConfigError, build_schedule

        experiment = config.hydra.runtime.choices.get("experiments")
        source = f"experiments/{experiment}.yaml" if experiment else "the command line"
        loader = GlobalHydra.instance().config_loader()
        jobs = _sweep_jobs(config)
        for job in jobs:
            try:
                job_cfg = loader.load_sweep_config(config, list(job))
            except Exception as err:  # noqa: BLE001 - Hydra raises several types for bad overrides
                raise ExperimentError(f"{source}: job {' '.join(job)}: {err}".strip()) from None
            with_hydra = OmegaConf.masked_copy(job_cfg, [k for k in job_cfg if k != "hydra"])
            missing = sorted(OmegaConf.missing_keys(with_hydra))
            if missing:
                raise ExperimentError(
                    f"{source}: job {' '.join(job)}: missing value for {', '.join(missing)} "
                    f"(add e.g. {missing[0]}=<value> to the command)"
                )
            try:
                build_schedule(job_cfg)
            except ConfigError as err:
                raise ExperimentError(f"{source}: job {' '.join(job)}: {err}") from None
