"""The ``hydra/sweeper=toe_optuna`` node (Hydra imports this module when it scans its plugins)."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ToeOptunaSweeperConf:
    _target_: str = "hydra_plugins.toe_optuna_sweeper.sweeper.ToeOptunaSweeper"
    study_name: str = "search"
    direction: str = "maximize"  # the task's return value: toe-train returns the final val top-1
    n_trials: int = 20  # trials that train (complete or failed; pruned ones are free), over reruns of the search
    smoke_trials: int = 4  # n_trials under smoke=on
    n_jobs: int = 1  # trials asked and launched together (one launcher batch)
    budget: Optional[float] = None  # a train-FLOP speed-up: trials below it are pruned before they train
    seed: Optional[int] = 0  # the TPE sampler's seed
    params: Dict[str, Any] = field(default_factory=dict)  # toe.sweep.search: fixed values and distributions


ConfigStore.instance().store(group="hydra/sweeper", name="toe_optuna", node=ToeOptunaSweeperConf, provider="toe")
