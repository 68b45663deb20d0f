"""The ToE stage schedule: when each stage starts, how many tokens it keeps, and the operator's switches.

Token counts follow the official code's integer and float arithmetic exactly (the official ``TokenSelect`` of
Osilly/TokenExpansion): the per-stage kept-rate increments are float differences, every stage but the last adds
``int(n * increment)`` tokens, the last adds what reaches ``int(n * r_last)`` from
``int(n * (r0 + sum(increments so far)))``, and the
seed stride is ``int(1 // r0)``, so ``1 // 0.2 == 4.0`` gives a stride of 4.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

DISTANCES = ("cosine", "manhattan", "euclidean")
INIT_MODES = ("spatial", "random")
EXPAND_MODES = ("widest", "random")
MERGE_MODES = ("mean", "drop")


def scale_epoch(epoch: float, epochs: int, length: float) -> int:
    """An epoch of a ``length``-epoch run (a stage or phase start) moved to a run of ``epochs`` epochs, rounded half
    up: 100 of 300 is 10 of 30 and 1 of 3. Stage starts, EfficientTrain phases and the analysis all scale this way."""
    return math.floor(float(epoch) * epochs / float(length) + 0.5)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ExpansionSchedule:
    """Stages of Token Expansion and the operator's ablation switches.

    Args:
     - stage_starts: epoch at which each stage starts (the official code's ``--expansion-step``); epochs before the
       first are stage 0.
     - keep_rates: kept rate r_1..r_Δ of each stage (``--keep-rate``); a last rate of 1.0 switches ToE off.
     - init_keep_rate: r_0, the share of patch tokens taken as spatial seeds (``--initialization-keep-rate``).
     - repeats: k, sub-steps per stage's expansion (``--expansion-multiple-stage``).
     - distance: ``cosine`` (official), or ``manhattan``/``euclidean`` with the official code's max/ascending
       logic applied to a distance (see :func:`toe.ops.expansion.pairwise_score`).
     - init / expand / merge: ablation switches; the defaults are the official pipeline.
    """

    stage_starts: Tuple[int, ...] = (0, 100, 200)
    keep_rates: Tuple[float, ...] = (0.5, 0.75, 1.0)
    init_keep_rate: float = 0.25
    repeats: int = 2
    distance: str = "cosine"
    init: str = "spatial"
    expand: str = "widest"
    merge: str = "mean"
    _increments: Tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        steps = tuple(int(s) for s in self.stage_starts)
        rates = tuple(float(r) for r in self.keep_rates)
        object.__setattr__(self, "stage_starts", steps)
        object.__setattr__(self, "keep_rates", rates)
        if not rates:
            raise ValueError("keep_rates is empty: give one kept rate per stage, e.g. [0.5, 0.75, 1.0]")
        if len(steps) != len(rates):
            raise ValueError(
                f"stage_starts has {len(steps)} entries but keep_rates has {len(rates)}: give one start epoch per stage"
            )
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"stage_starts must be strictly increasing, got {list(steps)}")
        if any(s < 0 for s in steps):
            raise ValueError(f"stage_starts must be non-negative epochs, got {list(steps)}")
        if any(not 0.0 < r <= 1.0 for r in rates):
            raise ValueError(f"keep_rates must lie in (0, 1], got {list(rates)}")
        if any(b <= a for a, b in zip(rates, rates[1:])):
            raise ValueError(f"keep_rates must be strictly increasing, got {list(rates)}")
        if not 0.0 < self.init_keep_rate < rates[0]:
            raise ValueError(
                f"init_keep_rate must lie in (0, {rates[0]}) (below the first keep rate), got {self.init_keep_rate}"
            )
        if int(self.repeats) != self.repeats or self.repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {self.repeats}")
        _check_choice("distance", self.distance, DISTANCES)
        _check_choice("init", self.init, INIT_MODES)
        _check_choice("expand", self.expand, EXPAND_MODES)
        _check_choice("merge", self.merge, MERGE_MODES)
        # Float differences, as the official constructor stores them (0.7 - 0.4 != 0.3).
        increments = [rates[0] - self.init_keep_rate] + [rates[i] - rates[i - 1] for i in range(1, len(rates))]
        object.__setattr__(self, "_increments", tuple(increments))

    @property
    def num_stages(self) -> int:
        return len(self.keep_rates)

    def stage_at(self, epoch: int) -> int:
        """Stage of an epoch, ``bisect_right`` over the start epochs as the official code does (0 = before ToE)."""
        return bisect.bisect_right(self.stage_starts, epoch)

    def is_identity(self, stage: int) -> bool:
        """Stage 0 and a last stage with kept rate 1.0 pass all tokens through."""
        return stage == 0 or (stage == self.num_stages and self.keep_rates[-1] == 1.0)

    def num_seeds(self, n: int) -> int:
        return int(n * self.init_keep_rate)

    def seed_stride(self) -> int:
        return int(1 // self.init_keep_rate)

    def stage_additions(self, n: int, stage: int) -> int:
        """Tokens that stage ``stage`` (1-based) adds to the selection of ``n`` patch tokens."""
        if stage == self.num_stages:
            reached = int(n * (self.init_keep_rate + sum(self._increments[: stage - 1])))
            return int(n * self.keep_rates[-1]) - reached
        return int(n * self._increments[stage - 1])

    def substeps(self, n: int, stage: int) -> List[int]:
        """Sizes of every expansion sub-step run at ``stage``, replaying stages 1..stage, k per stage."""
        sizes: List[int] = []
        k = self.repeats
        for s in range(1, stage + 1):
            add = self.stage_additions(n, s)
            sizes += [add // k] * (k - 1) + [add - (k - 1) * (add // k)]
        return sizes

    def kept_tokens(self, n: int, stage: int) -> int:
        """Patch tokens the blocks after the first see at ``stage`` (prefix tokens not counted)."""
        if self.is_identity(stage):
            return n
        return self.num_seeds(n) + sum(self.substeps(n, stage))

    def token_counts(self, n: int) -> List[int]:
        """Kept patch tokens for stages 1..Δ, e.g. ``[98, 147, 196]`` for the DeiT script at n=196."""
        return [self.kept_tokens(n, s) for s in range(1, self.num_stages + 1)]


@dataclass(frozen=True)
class StageValues:
    """One value per stage, stage ``s`` starting at epoch ``stage_starts[s - 1]``; epochs before the first start are
    stage 0, as in :class:`ExpansionSchedule`. The base of the schedules of PatchDropout and Token Merging."""

    stage_starts: Tuple[int, ...]
    values: Tuple[float, ...]
    name = "values"  # how errors name the values

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_starts", tuple(int(s) for s in self.stage_starts))
        object.__setattr__(
            self,
            "values",
            tuple(
                int(v) if float(v).is_integer() and self.whole_when_integral else round(float(v), 6)
                for v in self.values
            ),
        )
        if len(self.stage_starts) != len(self.values) or not self.values:
            raise ValueError(
                f"{self.name} {list(self.values)} need one stage start each, got {list(self.stage_starts)}"
            )
        if any(b <= a for a, b in zip(self.stage_starts, self.stage_starts[1:])):
            raise ValueError(f"stage_starts {list(self.stage_starts)} must increase")
        self.check(self.values)

    whole_when_integral = False

    def check(self, values: Tuple[float, ...]) -> None:
        """Raise ``ValueError`` for values the method cannot take."""

    @property
    def num_stages(self) -> int:
        return len(self.values)

    def stage_at(self, epoch: int) -> int:
        return bisect.bisect_right(self.stage_starts, epoch)

    def value(self, stage: int, before: float) -> float:
        """The value of ``stage``; ``before`` for stage 0."""
        return before if stage == 0 else self.values[stage - 1]


class MergeSchedule(StageValues):
    """Token Merging's stages (:mod:`toe.ops.merging`): ``r`` tokens merged in every block per stage (a fractional ``r``
    spreads over the blocks, :func:`toe.ops.merging.block_r`); stage 0 merges nothing, and an ``r`` of 0 is full-token
    training."""

    name = "r"
    whole_when_integral = True

    def check(self, values: Tuple[float, ...]) -> None:
        if any(r < 0 for r in values):
            raise ValueError(f"r {list(values)} must be >= 0")

    @property
    def rs(self) -> Tuple[float, ...]:
        return self.values

    def r(self, stage: int) -> float:
        return self.value(stage, 0)
