import pytest

from toe import ExpansionSchedule

DEIT = dict(stage_starts=[0, 100, 200], keep_rates=[0.5, 0.75, 1.0], init_keep_rate=0.25)
LVVIT = dict(stage_starts=[0, 100, 200], keep_rates=[0.4, 0.7, 1.0], init_keep_rate=0.2)
ET = dict(stage_starts=[0, 100, 200], keep_rates=[0.6, 0.8, 1.0], init_keep_rate=0.3)


@pytest.mark.parametrize(
    "recipe, n, seeds, stage1_substeps, counts",
    [
        # the official code's token counts, row by row
        (DEIT, 196, 49, [24, 25], [98, 147, 196]),
        (LVVIT, 196, 39, [19, 20], [78, 136, 196]),
        (ET, 196, 58, [29, 29], [116, 155, 196]),
        (ET, 100, 30, [15, 15], [60, 80, 100]),
        (ET, 144, 43, [21, 22], [86, 114, 144]),
    ],
)
def test_token_counts_match_reference_table(recipe, n, seeds, stage1_substeps, counts):
    sched = ExpansionSchedule(**recipe, repeats=2)
    assert sched.num_seeds(n) == seeds
    assert sched.substeps(n, 1) == stage1_substeps
    assert sched.token_counts(n) == counts


def test_later_stages_replay_earlier_expansions():
    sched = ExpansionSchedule(**LVVIT, repeats=2)
    assert sched.substeps(196, 2) == [19, 20, 29, 29]
    assert sched.stage_additions(196, 2) == 58  # int(196 * (0.7 - 0.4)) with 0.7 - 0.4 = 0.29999999999999993


def test_seed_stride_keeps_the_float_floor_division_quirk():
    assert ExpansionSchedule(**LVVIT).seed_stride() == 4  # 1 // 0.2 == 4.0, not 5
    assert ExpansionSchedule(**DEIT).seed_stride() == 4
    assert ExpansionSchedule(**ET).seed_stride() == 3


def test_final_stage_below_one_reaches_int_n_r_last():
    sched = ExpansionSchedule([0, 100, 200], [0.5, 0.75, 0.9], 0.25)
    assert sched.stage_additions(196, 3) == int(196 * 0.9) - 147
    assert sched.token_counts(196) == [98, 147, 176]
    assert not sched.is_identity(3)


def test_stage_at_uses_bisect_right():
    sched = ExpansionSchedule([5, 100, 200], [0.5, 0.75, 1.0], 0.25)
    assert [sched.stage_at(e) for e in (0, 4, 5, 99, 100, 199, 200, 299)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sched.is_identity(0) and sched.is_identity(3) and not sched.is_identity(1)
    assert sched.kept_tokens(196, 0) == 196 and sched.kept_tokens(196, 3) == 196


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep_rates=[0.5, 0.5, 1.0]), "strictly increasing"),
        (dict(keep_rates=[0.5, 0.75, 1.2]), r"\(0, 1\]"),
        (dict(keep_rates=[0.0, 0.75, 1.0]), r"\(0, 1\]"),
        (dict(init_keep_rate=0.5), "below the first keep rate"),
        (dict(init_keep_rate=0.0), "init_keep_rate"),
        (dict(stage_starts=[0, 200, 100]), "strictly increasing"),
        (dict(stage_starts=[0, 100]), "one start epoch per stage"),
        (dict(stage_starts=[-1, 100, 200]), "non-negative"),
        (dict(repeats=0), "repeats"),
        (dict(repeats=1.5), "repeats"),
        (dict(distance="chebyshev"), "unknown distance 'chebyshev'"),
        (dict(init="grid"), "unknown init"),
        (dict(expand="greedy"), "unknown expand"),
        (dict(merge="max"), "unknown merge"),
        (dict(keep_rates=[], stage_starts=[]), "empty"),
    ],
)
def test_invalid_schedules_raise_clear_errors(kwargs, message):
    args = dict(DEIT, repeats=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ExpansionSchedule(**args)
