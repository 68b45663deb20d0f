"""Budgeted searches of a run's settings with Optuna (``hparams_search=...``): what the ``toe_optuna`` Hydra sweeper
(``hydra_plugins/toe_optuna_sweeper``) asks, prunes, launches and tells.

Why a sweeper of our own rather than ``hydra-optuna-sweeper``: that plugin (1.3.0, the newest) requires optuna < 3,
so it brings optuna 2.10, whose SQLite storage fails under today's SQLAlchemy 2 unless SQLAlchemy and alembic are
pinned below their current majors in every environment toe is installed into. A sweeper on a current Optuna is a
small ask/tell loop (this module) behind Hydra's public ``Sweeper`` interface, and its study lives in
Optuna's RDB storage (an SQLite file in the sweep dir) with current SQLAlchemy.

A search's ``params`` map a toe-train override key to either a fixed value (a plain override, as the basic sweeper
takes it) or a distribution: ``{low: 0.3, high: 0.7, step: 0.05}`` (float; ``log: true`` allowed), ``{low: 5,
high: 15, type: int}``, or ``{choices: [a, b]}``. List elements are keys too (``toe.keep_rates.0``).

Each trial is a normal run in ``<sweep dir>/<trial number>``. Before it trains, its config is composed and checked
(:func:`toe.config.validate.validate`) and its train-FLOP speed-up computed (:func:`toe.cost.plan.toe_flop_ratio`); a
config that cannot work, or one slower than ``budget``, is pruned without training. A killed search, rerun with the
same command (the same sweep dir), loads its study: finished trials stay, trials the kill cut short are failed and
their settings asked again, and it goes on until ``n_trials`` trials have trained.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

log = logging.getLogger("toe.sweep.search")
STUDY_FILE = "optuna.db"
MAX_ASKED_PER_TRIAL = 25


class SearchSpaceError(ValueError):
    """A ``params`` entry that is neither a value nor a distribution this sweeper knows."""


def parse_params(params: Mapping[str, Any]) -> Tuple[List[str], Dict[str, Any]]:
    """``(fixed overrides, {key: optuna distribution})`` from a search's ``params``."""
    import optuna.distributions as dist

    fixed, space = [], {}
    for key, spec in (params or {}).items():
        if not isinstance(spec, Mapping):
            fixed.append(f"{key}={spec}")
            continue
        spec = dict(spec)
        if "choices" in spec:
            space[key] = dist.CategoricalDistribution(list(spec["choices"]))
        elif {"low", "high"} <= set(spec):
            kind = spec.get("type", "float")
            if kind == "int":
                space[key] = dist.IntDistribution(int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)))
            elif kind == "float":
                space[key] = dist.FloatDistribution(
                    float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")), step=spec.get("step")
                )
            else:
                raise SearchSpaceError(f"params.{key}: type {kind!r}: expected float or int")
        else:
            raise SearchSpaceError(
                f"params.{key}={spec}: expected a value, {{low, high[, step, type, log]}} or {{choices: [...]}}"
            )
    return fixed, space


def trial_overrides(params: Mapping[str, Any]) -> List[str]:
    return [f"{key}={_value(value)}" for key, value in params.items()]


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{round(value, 10):g}" if abs(value) >= 1e-4 or value == 0 else repr(value)
    return str(value)


def flop_ratio(cfg: Any) -> float:
    """The run's train-FLOP speed-up over full tokens (1.0 for a run without token reduction), from its model's
    shape and its schedule (:func:`toe.cost.plan.toe_flop_ratio`; PatchDropout and ToMe match ToE's, see
    toe.cost.plan)."""
    from toe.config.schema import typed_config
    from toe.config.stages import build_expansion_schedule, plan_schedule
    from toe.cost.flops import ViTShape
    from toe.cost.plan import toe_flop_ratio
    from toe.ops.methods import REDUCTION_NODES
    from toe.train.build import create_model

    plan, cfg = plan_schedule(cfg), typed_config(cfg)
    if not any(getattr(cfg, node).enabled for node in REDUCTION_NODES):
        return 1.0
    from toe.data.datasets import class_count

    # the head the run will train (its FLOPs count): the data's class count, as toe-train sizes it
    shape = ViTShape.from_model(create_model(cfg, class_count(cfg)))
    schedule = build_expansion_schedule(cfg, plan.stage_starts, matching=True)
    return toe_flop_ratio(shape, schedule, plan.epochs)


@dataclass
class Search:
    """One Optuna study in ``sweep_dir``: ``n_trials`` finished trials (complete, pruned or failed) maximising the
    objective, with trials below ``budget`` (a train-FLOP speed-up) pruned before they train."""

    sweep_dir: Path
    study_name: str
    space: Dict[str, Any]
    n_trials: int
    direction: str = "maximize"
    budget: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.storage = f"sqlite:///{(self.sweep_dir / STUDY_FILE).resolve()}"
        self.study = optuna.create_study(
            study_name=self.study_name, storage=self.storage, load_if_exists=True, direction=self.direction
        )
        # a rerun's sampler draws a new stream: the same seed would ask the first run's settings again
        seed = None if self.seed is None else self.seed + len(self.study.trials)
        self.study.sampler = optuna.samplers.TPESampler(seed=seed)
        self._retry_cut_short()

    def _retry_cut_short(self) -> None:
        """Trials a killed search left running are failed and asked again with the same settings into the same run
        dir, where the run resumes from its checkpoint; the retry names the trial it replaces (``retry_of``), so
        the failed one is not counted.

        Not Optuna's ``RetryFailedTrialCallback``: it retries trials whose heartbeat went stale, and trials asked
        and told by a sweeper (not run by ``study.optimize``) record no heartbeat. The sweeper is the study's only
        writer, so every trial still running when it starts was cut short by a stop."""
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(trial.number, state=TrialState.FAIL)
            run = trial.user_attrs.get("run", trial.number)
            self.study.enqueue_trial(
                trial.params, user_attrs={"run": run, "retry_of": trial.number}, skip_if_exists=False
            )
            log.warning(
                "trial %d was cut short by a stop of the search: asked again, resuming in run dir %s", trial.number, run
            )

    def finished(self) -> int:
        """Trials that trained to an end (complete or failed); pruned ones cost nothing and trials cut short by a
        stop are trained again, so neither counts."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
        return len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL) and t.number not in retried])

    def remaining(self) -> int:
        """Trials still to train; 0 also once ``MAX_ASKED_PER_TRIAL`` times ``n_trials`` have been asked (a space
        whose settings are nearly all pruned would otherwise never end)."""
        if len(self.study.trials) >= MAX_ASKED_PER_TRIAL * self.n_trials:
            log.warning(
                "%d trials asked, nearly all pruned: the search stops (widen the space or lower the budget)",
                len(self.study.trials),
            )
            return 0
        return max(0, self.n_trials - self.finished())

    def ask(self):
        """The next trial; its ``run`` user attribute names its run dir (its own number, or that of the trial it
        retries)."""
        trial = self.study.ask(self.space)
        if "run" not in trial.user_attrs:
            trial.set_user_attr("run", trial.number)
        return trial

    def trained_before(self, params: Mapping[str, Any]) -> Optional[int]:
        """The number of a trial that already trained these settings, if any."""
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if trial.params == dict(params):
                return trial.number
        return None

    def prune(self, trial: Any, reason: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("pruned", reason)
        self.study.tell(trial, state=TrialState.PRUNED)
        log.info("trial %d pruned before training: %s", trial.number, reason)

    def tell(self, trial: Any, value: Optional[float], error: Optional[str] = None) -> None:
        from optuna.trial import TrialState

        if value is None or (isinstance(value, float) and math.isnan(value)):
            trial.set_user_attr("error", error or "no objective value")
            self.study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, error or "no objective value")
        else:
            self.study.tell(trial, float(value))
            log.info(
                "trial %d: %s = %.4f (best %.4f, trial %d)",
                trial.number,
                "objective",
                value,
                self.study.best_value,
                self.study.best_trial.number,
            )


def load_trials(sweep_dir: Path) -> Optional["Any"]:
    """Every trial of the study in ``sweep_dir`` as a pandas DataFrame (number, state, value, params, FLOP ratio,
    why pruned), or ``None`` when the dir holds no study."""
    path = Path(sweep_dir) / STUDY_FILE
    if not path.is_file():
        return None
    import optuna
    import pandas as pd

    storage = f"sqlite:///{path.resolve()}"
    rows = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.get_trials(deepcopy=False):
            row = {
                "study": summary.study_name,
                "trial": trial.number,
                "state": trial.state.name,
                "top1": trial.value,
                "flop_ratio": trial.user_attrs.get("flop_ratio"),
                "note": trial.user_attrs.get("pruned") or trial.user_attrs.get("error"),
            }
            row.update({f"param {k}": v for k, v in trial.params.items()})
            rows.append(row)
    return pd.DataFrame(rows)
