"""What the schedule keys mean, computed in one place: the run's epochs, the ToE stage start epochs scaled to
``schedule.epochs``, the EfficientTrain phases, and the ToE schedule built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from toe.config.schema import ConfigError, plain, show_value
from toe.ops.methods import REDUCTION_NODES
from toe.ops.schedule import scale_epoch


# --- what the schedule keys mean, computed in one place ------------------------------------------------------------
@dataclass(frozen=True)
class SchedulePlan:
    """The run's epochs, the ToE stage start epochs (scaled to ``schedule.epochs``) and the EfficientTrain phases."""

    epochs: int
    stage_starts: List[int]
    phases: List[Any]  # toe.data.curriculum.Phase, empty without a curriculum
    toe_enabled: bool = False  # a token-reduction method with stages runs (ToE or PatchDropout)

    @property
    def unreached_stages(self) -> List[int]:
        """Stages (1-based) that start at or after the last epoch, so they never run (e.g. 0/100/400 of 300)."""
        if not self.toe_enabled:
            return []
        return [stage for stage, start in enumerate(self.stage_starts, 1) if start >= self.epochs]


def stage_start_epochs(cfg: Any, check: bool = True) -> List[int]:
    """``schedule.stage_starts`` are epochs of a ``schedule.length``-epoch run, scaled to ``schedule.epochs`` and
    rounded half up (the official 0/100/200 of 300 gives 0/10/20 over 30 epochs); ``check``: refuse starts that
    are not strictly increasing after the scaling."""
    epochs, length = int(cfg.schedule.epochs), float(cfg.schedule.length)
    starts = [scale_epoch(s, epochs, length) for s in cfg.schedule.stage_starts]
    if check and any(b <= a for a, b in zip(starts, starts[1:])):
        raise ConfigError(
            f"schedule.stage_starts={show_value(list(cfg.schedule.stage_starts))}: a {length:g}-epoch split gives "
            f"start epochs {starts} over schedule.epochs={epochs}, which are not strictly increasing: run more epochs"
        )
    return starts


def plan_schedule(cfg: Any) -> SchedulePlan:
    """The schedule of a run, with the ToE schedule and curriculum checked; raises :class:`ConfigError`. ``cfg``:
    the composed config or its typed form (the two read alike here)."""
    from toe.data.curriculum import build_phases

    staged = any(getattr(cfg, node).enabled for node in REDUCTION_NODES)
    # a run without stages (baseline, EfficientTrain alone) has no stage split that could fail to fit its epochs
    starts = stage_start_epochs(cfg, check=staged)
    if cfg.toe.enabled:
        build_expansion_schedule(cfg, starts)
    phases: List[Any] = []
    if cfg.curriculum.enabled:
        try:
            phases = build_phases(
                cfg.curriculum, int(cfg.schedule.epochs), int(cfg.model.img_size), int(cfg.model.patch_size)
            )
        except ValueError as err:
            raise ConfigError(f"curriculum.phases: {err}") from None
    if (cfg.patch_dropout.enabled and cfg.patch_dropout.keep_rates is None) or (
        cfg.tome.enabled and cfg.tome.r is None
    ):
        build_expansion_schedule(cfg, starts, matching=True)  # the settings they are matched to must work
    return SchedulePlan(int(cfg.schedule.epochs), starts, phases, staged)


def build_expansion_schedule(cfg: Any, starts: Optional[List[int]] = None, matching: bool = False):
    """The run's :class:`toe.ExpansionSchedule`, or ``None`` with ToE off; with ``matching``, the schedule of the
    ``toe:`` node even with ToE off (PatchDropout and Token Merging match its train FLOPs)."""
    from toe.ops.schedule import ExpansionSchedule

    if not (cfg.toe.enabled or matching):
        return None
    node = cfg.toe
    try:
        return ExpansionSchedule(
            stage_starts=starts if starts is not None else stage_start_epochs(cfg),
            keep_rates=list(node.keep_rates),
            init_keep_rate=node.init_keep_rate,
            repeats=node.repeats,
            distance=node.distance,
            init=node.init,
            expand=node.expand,
            merge=node.merge,
        )
    except ValueError as err:
        if "stage_starts" in str(err):
            raise ConfigError(f"schedule.stage_starts={show_value(list(cfg.schedule.stage_starts))}: {err}") from None
        key = next((k for k in ("init_keep_rate", "keep_rates", "repeats") if k in str(err)), "keep_rates")
        raise ConfigError(f"toe.{key}={show_value(plain(node)[key])}: {err}") from None
