"""Hydra's ``Sweeper`` interface around :class:`toe.sweep.search.Search`: ask trials, check and prune them, launch them
on the configured launcher (basic, submitit_local, slurm), tell their results."""

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

# the config node must be registered whenever the sweeper is
from hydra_plugins.toe_optuna_sweeper.config import ToeOptunaSweeperConf  # noqa: F401

log = logging.getLogger("toe.sweep.search")


class ToeOptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name: str,
        direction: str,
        n_trials: int,
        smoke_trials: int,
        n_jobs: int,
        budget: Optional[float],
        seed: Optional[int],
        params: Dict[str, Any],
    ) -> None:
        self.study_name, self.direction = study_name, direction
        self.n_trials, self.smoke_trials = n_trials, smoke_trials
        self.n_jobs, self.budget, self.seed = max(1, n_jobs), budget, seed
        self.params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else params
        self.config: Optional[DictConfig] = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _trial_config(self, overrides: List[str]) -> DictConfig:
        """The trial's run config, as its job will compose it (the ``hydra`` node left out)."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])

    def sweep(self, arguments: List[str]) -> Any:
        from toe.config.compose import config_error_message
        from toe.config.validate import validate
        from toe.sweep.search import Search, flop_ratio, parse_params, trial_overrides

        fixed, space = parse_params(self.params)
        arguments = [o.input_line for o in OverridesParser.create().parse_overrides(list(arguments))]
        smoke = self.config.hydra.runtime.choices.get("smoke") == "on"
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        search = Search(
            sweep_dir,
            self.study_name,
            space,
            self.smoke_trials if smoke else self.n_trials,
            self.direction,
            self.budget,
            self.seed,
        )
        log.info(
            "search %s in %s: %d of %d trials finished%s",
            self.study_name,
            sweep_dir,
            search.finished(),
            search.n_trials,
            f"; budget {self.budget:g}x train-FLOP speed-up" if self.budget else "",
        )
        returns = []
        while search.remaining() > 0:
            batch, trials = [], []
            while len(trials) < min(self.n_jobs, search.remaining()):
                trial = search.ask()
                earlier = search.trained_before(trial.params)
                if earlier is not None:
                    search.prune(trial, f"the settings of trial {earlier}, trained already")
                    continue
                overrides = fixed + arguments + trial_overrides(trial.params)
                try:
                    cfg = self._trial_config(overrides)
                    validate(
                        cfg,
                        devices=self.config.hydra.runtime.choices.get("hydra/launcher") in ("basic", "submitit_local"),
                    )
                    ratio = flop_ratio(cfg)
                except Exception as err:  # noqa: BLE001 - a bad override, said as toe-train says it
                    message = config_error_message(err)
                    if message is None:
                        raise
                    search.prune(trial, f"config cannot work: {message}")
                    continue
                trial.set_user_attr("flop_ratio", ratio)
                trial.set_user_attr("overrides", overrides)
                if self.budget is not None and ratio < self.budget:
                    search.prune(trial, f"train-FLOP speed-up {ratio:.3f}x below the budget {self.budget:g}x")
                    continue
                batch.append(overrides)
                trials.append(trial)
            if not batch:
                continue
            # each trial's run dir is named by its trial number (a retried trial's: the first try's, where it
            # resumes), whatever the launcher numbers its jobs
            results = self.launcher.launch(
                [o + [f"hydra.sweep.subdir={t.user_attrs['run']}"] for o, t in zip(batch, trials)],
                initial_job_idx=trials[0].number,
            )
            for trial, result in zip(trials, results):
                try:
                    value = result.return_value  # re-raises the job's exception
                except Exception as err:  # noqa: BLE001 - one failed trial does not end the search
                    search.tell(trial, None, f"{type(err).__name__}: {err}")
                else:
                    search.tell(trial, value)
            returns.append(results)
        if any(t.value is not None for t in search.study.trials):
            best = search.study.best_trial
            log.info("best trial %d: %.4f with %s", best.number, best.value, best.params)
        elif not returns and search.finished() == 0:
            # every trial asked was pruned: a search that trained nothing has no result to report
            reasons = sorted({str(t.user_attrs.get("pruned", "")) for t in search.study.trials} - {""})
            log.error(
                "search %s trained no trial: every one was pruned (%s)",
                self.study_name,
                "; ".join(reasons[:3]) or "no reason recorded",
            )
            raise SystemExit(2)
        return returns
