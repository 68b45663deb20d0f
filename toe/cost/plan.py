"""Token schedules planned from analytic train FLOPs (:mod:`toe.cost.flops`): the tokens each method's stage leaves in
each block, their FLOP ratios against full tokens, and the PatchDropout kept rates and Token Merging ``r`` whose
train FLOPs match a ToE stage's, so that the methods are compared at the same compute. ``toe-plan`` prints them;
``toe-train`` uses them where ``tome.r`` or ``patch_dropout.keep_rates`` is null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from toe.cost.flops import ViTShape
from toe.ops.merging import merging_block_tokens
from toe.ops.patch_dropout import KeptRateSchedule
from toe.ops.schedule import ExpansionSchedule
from toe.ops.tokens import BlockTokens, reduced_block_tokens, tokens_after_first_block


def toe_block_tokens(shape: ViTShape, schedule: ExpansionSchedule, stage: int) -> BlockTokens:
    """ToE: the first block sees every token, the others the stage's kept tokens (prefix included)."""
    return reduced_block_tokens(
        shape.num_prefix_tokens, shape.num_patches, schedule.kept_tokens(shape.num_patches, stage), shape.depth
    )


def merge_block_tokens(shape: ViTShape, r: float) -> BlockTokens:
    """Token Merging: each block's attention sees its input tokens, its MLP its share of ``r`` fewer."""
    return merging_block_tokens(shape.num_patches, shape.depth, r, shape.num_prefix_tokens)


def dropout_block_tokens(shape: ViTShape, kept_patches: int) -> BlockTokens:
    """PatchDropout: every block sees the kept tokens."""
    return reduced_block_tokens(
        shape.num_prefix_tokens, shape.num_patches, kept_patches, shape.depth, first_block_reduced=True
    )


def matched_merge_r(shape: ViTShape, target_macs: float, attention: bool = True, whole: bool = False) -> float:
    """The ``r`` whose train FLOPs are nearest ``target_macs`` (per image, as :meth:`ViTShape.train_macs_blocks`):
    a multiple of ``1 / depth`` (one more token merged over the whole model per step), or a whole number with
    ``whole``; the smallest of equals. FLOPs fall as ``r`` grows, until the clamp stops them."""
    steps = 1 if whole else shape.depth
    candidates = [k if whole else round(k / steps, 6) for k in range(0, shape.num_patches // 2 * steps + 1)]
    return min(
        candidates, key=lambda r: abs(shape.train_macs_blocks(merge_block_tokens(shape, r), attention) - target_macs)
    )


def kept_rate_for(n: int, kept: int) -> float:
    """The smallest kept rate (to 4 decimals) for which timm's PatchDropout keeps ``kept`` of ``n`` tokens."""
    rate = round(kept / n, 4)
    while KeptRateSchedule((0,), (rate,)).kept_tokens(n, 1) < kept:
        rate = round(rate + 1e-4, 4)
    return min(rate, 1.0)


def matched_kept_rate(shape: ViTShape, target_macs: float, attention: bool = True) -> float:
    """The PatchDropout kept rate whose train FLOPs are nearest ``target_macs``."""
    kept = min(
        range(1, shape.num_patches + 1),
        key=lambda k: abs(shape.train_macs_blocks(dropout_block_tokens(shape, k), attention) - target_macs),
    )
    return kept_rate_for(shape.num_patches, kept)


@dataclass(frozen=True)
class StageMatch:
    """One ToE stage and the other methods' settings that match its train FLOPs."""

    stage: int
    toe_tokens: int  # tokens after the first block, prefix included
    toe_macs: float  # train MACs per image
    merge_r: float
    merge_macs: float
    kept_rate: float
    dropout_macs: float


def match_stages(shape: ViTShape, schedule: ExpansionSchedule, attention: bool = True) -> List[StageMatch]:
    """For each stage of ``schedule``, the Token Merging ``r`` and the PatchDropout kept rate of equal train FLOPs
    (the nearest the integer token counts allow)."""
    matches = []
    for stage in range(1, schedule.num_stages + 1):
        tokens = toe_block_tokens(shape, schedule, stage)
        target = shape.train_macs_blocks(tokens, attention)
        r = matched_merge_r(shape, target, attention)
        rate = matched_kept_rate(shape, target, attention)
        kept = KeptRateSchedule((0,), (rate,)).kept_tokens(shape.num_patches, 1)
        matches.append(
            StageMatch(
                stage,
                tokens_after_first_block(tokens),
                target,
                r,
                shape.train_macs_blocks(merge_block_tokens(shape, r), attention),
                rate,
                shape.train_macs_blocks(dropout_block_tokens(shape, kept), attention),
            )
        )
    return matches


def rates_from_first(first: float, num_stages: int) -> Tuple[float, Tuple[float, ...]]:
    """The paper's family ToE_r1 (Tab. 2, the official scripts): r_0 = r_1 / 2, then kept rates rising evenly from
    r_1 to 1.0 over the stages (for three stages r_2 = (1 + r_1) / 2). Returns ``(r_0, (r_1, ..., 1.0))``."""
    if num_stages == 1:
        return round(first / 2, 6), (1.0,)
    step = (1.0 - first) / (num_stages - 1)
    return round(first / 2, 6), tuple(round(first + i * step, 6) for i in range(num_stages))


def stage_epochs(starts: Sequence[int], epochs: int) -> List[int]:
    """Epochs spent in each stage (before the first start: full tokens, not counted here)."""
    ends = list(starts[1:]) + [epochs]
    return [max(0, min(end, epochs) - min(start, epochs)) for start, end in zip(starts, ends)]


def toe_flop_ratio(shape: ViTShape, schedule: ExpansionSchedule, epochs: int, attention: bool = True) -> float:
    """Full-token train FLOPs of a run over its train FLOPs under ``schedule`` (epochs before the first stage start
    at full tokens), as ``toe-bench flops`` and the paper's speed-up count them."""
    full = shape.train_macs_blocks(shape.full_block_tokens(), attention)
    spent = stage_epochs(schedule.stage_starts, epochs)
    stage_macs = [
        shape.train_macs_blocks(toe_block_tokens(shape, schedule, s), attention)
        for s in range(1, schedule.num_stages + 1)
    ]
    before = min(schedule.stage_starts[0], epochs)  # epochs at full tokens
    spent_macs = full * before + sum(e * m for e, m in zip(spent, stage_macs))
    return full * epochs / spent_macs if epochs else 1.0


def _nearest(
    schedules: Iterable[ExpansionSchedule], shape: ViTShape, epochs: int, target: float, attention: bool
) -> Optional[Tuple[ExpansionSchedule, float]]:
    """The schedule whose FLOP ratio is nearest ``target`` (the first of equals), with its ratio."""
    rated = ((schedule, toe_flop_ratio(shape, schedule, epochs, attention)) for schedule in schedules)
    return min(rated, key=lambda pair: abs(pair[1] - target), default=None)


def plan_keep_rates(
    shape: ViTShape,
    starts: Sequence[int],
    epochs: int,
    target: float,
    rate_step: float = 0.05,
    repeats: int = 2,
    attention: bool = True,
) -> Tuple[ExpansionSchedule, float]:
    """The ToE_r1 schedule (:func:`rates_from_first`, r_1 on a grid of ``rate_step``) for the stage split
    ``starts`` whose FLOP ratio is nearest ``target``; returns it and its ratio."""

    def candidates() -> Iterator[ExpansionSchedule]:
        for k in range(1, int(round(1 / rate_step))):
            r0, rates = rates_from_first(round(k * rate_step, 6), len(starts))
            try:
                yield ExpansionSchedule(tuple(starts), rates, r0, repeats=repeats)
            except ValueError:  # e.g. too few seed tokens for r_0
                continue

    best = _nearest(candidates(), shape, epochs, target, attention)
    if best is None:
        raise ValueError(f"no kept rates on a grid of {rate_step} give {shape.num_patches} patches a seed token")
    return best


def plan_stage_split(
    shape: ViTShape,
    keep_rates: Sequence[float],
    init_keep_rate: float,
    epochs: int,
    target: float,
    repeats: int = 2,
    attention: bool = True,
) -> Tuple[ExpansionSchedule, float]:
    """The stage split ``0, s, 2s, ...`` (the reduced stages of equal length, the last stage taking the rest, as the
    official 100/100/100 and Hyper 130/130/40 splits are) whose FLOP ratio for fixed kept rates is nearest
    ``target``; returns the schedule and its ratio."""
    stages = len(keep_rates)
    longest = (epochs - 1) // max(1, stages - 1) if stages > 1 else epochs
    splits = (
        ExpansionSchedule(tuple(i * length for i in range(stages)), tuple(keep_rates), init_keep_rate, repeats=repeats)
        for length in range(1, longest + 1)
    )
    best = _nearest(splits, shape, epochs, target, attention)
    if best is None:
        raise ValueError(f"{epochs} epochs cannot hold {stages} stages")
    return best
