import json

import pytest

from toe import ExpansionSchedule
from toe.cli.plan import main
from toe.cost.flops import ViTShape
from toe.cost.plan import plan_keep_rates, plan_stage_split, rates_from_first, toe_flop_ratio

DEIT_S = ViTShape.deit(384)
OFFICIAL = ExpansionSchedule((0, 100, 200), (0.5, 0.75, 1.0), 0.25)
HYPER = ExpansionSchedule((0, 130, 260), (0.5, 0.75, 1.0), 0.25)


def test_flop_ratios_of_the_official_deit_s_and_hyper_schedules():
    # the reference FLOP table derived from the official token schedule: 1.29 / 1.31 and 1.41 / 1.44
    assert toe_flop_ratio(DEIT_S, OFFICIAL, 300) == pytest.approx(1.31, abs=0.01)
    assert toe_flop_ratio(DEIT_S, OFFICIAL, 300, attention=False) == pytest.approx(1.29, abs=0.01)
    assert toe_flop_ratio(DEIT_S, HYPER, 300) == pytest.approx(1.44, abs=0.01)
    assert toe_flop_ratio(DEIT_S, HYPER, 300, attention=False) == pytest.approx(1.41, abs=0.01)


def test_epochs_before_the_first_stage_count_at_full_tokens_in_either_flop_convention():
    late = ExpansionSchedule((100, 200), (0.5, 1.0), 0.25)
    for attention in (True, False):
        full = DEIT_S.train_macs(attention=attention)
        stage1 = DEIT_S.train_macs(98, attention=attention)
        expected = full * 300 / (full * 100 + stage1 * 100 + full * 100)
        assert toe_flop_ratio(DEIT_S, late, 300, attention=attention) == pytest.approx(expected)


def test_the_planner_finds_the_papers_settings_from_their_flop_ratios():
    schedule, ratio = plan_keep_rates(DEIT_S, (0, 100, 200), 300, target=1.31)
    assert (schedule.init_keep_rate, schedule.keep_rates) == (0.25, (0.5, 0.75, 1.0))
    schedule, _ = plan_stage_split(DEIT_S, (0.5, 0.75, 1.0), 0.25, 300, target=1.44)
    assert schedule.stage_starts == (0, 130, 260)
    # the LV-ViT-S script's 0.2; 0.4/0.7/1.0 and the EfficientTrain one's 0.3; 0.6/0.8/1.0 are of the same family
    assert rates_from_first(0.4, 3) == (0.2, (0.4, 0.7, 1.0)) and rates_from_first(0.6, 3) == (0.3, (0.6, 0.8, 1.0))
    lvvit_like = ExpansionSchedule((0, 100, 200), (0.4, 0.7, 1.0), 0.2)
    schedule, _ = plan_keep_rates(DEIT_S, (0, 100, 200), 300, target=toe_flop_ratio(DEIT_S, lvvit_like, 300))
    assert schedule.keep_rates == (0.4, 0.7, 1.0)


def test_toe_plan_prints_toe_patchdropout_and_tome_settings_of_the_same_flops(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--speedup", "1.31", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["keep_rates"] == [0.5, 0.75, 1.0] and plan["init_keep_rate"] == 0.25
    assert plan["flop_ratio"] == pytest.approx(1.31, abs=0.01)
    assert [s["tokens_after_first_block"] for s in plan["stages"]] == [99, 148, 197]
    for stage in plan["stages"]:
        assert stage["patchdropout_gflops"] == pytest.approx(stage["train_gflops_per_img"], rel=0.02)
        assert stage["tome_gflops"] == pytest.approx(stage["train_gflops_per_img"], rel=0.02)
    printed = capsys.readouterr().out
    assert "method=tome 'tome.r=[" in printed and "method=patchdropout 'patch_dropout.keep_rates=[" in printed
    # a FLOP budget is the same target said in GFLOPs per image
    assert main(["--budget", str(plan["full_train_gflops_per_img"] / 1.31), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["keep_rates"] == [0.5, 0.75, 1.0]


def test_toe_plan_measure_puts_measured_beside_predicted(tmp_path):
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "--model",
                "deit_tiny_patch16_224",
                "--img-size",
                "64",
                "--epochs",
                "30",
                "--measure",
                "--batch",
                "2",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    measured = json.loads(out.read_text())["measured"]
    assert {row["method"] for row in measured} == {"toe", "patchdropout", "tome"}
    assert all(row["speedup"] > 0 and row["flop_ratio"] >= 1.0 for row in measured)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--speedup", "1.3", "--keep-rates", "0.5", "1.0", "--stage-starts", "0", "10"], "plans one of them"),
        (["--speedup", "0"], "must be > 0"),
        (["--speedup", "1.3", "--budget", "2"], "not allowed with"),
        (["--model", "resnet18"], "--model resnet18"),
        (["--model", "xcit_nano_12_p16_224"], "toe-plan cannot reduce the tokens of xcit_nano_12_p16_224 (Xcit)"),
        (["--keep-rates", "0.5", "1.0", "--stage-starts", "0", "400"], "after --epochs"),
    ],
)
def test_toe_plan_refuses_what_cannot_be_planned_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
