import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toe.cli.sweep import main as sweep_main
from toe.sweep.status import sweep_runs

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
SMOKE_COLLAPSED = {"model", "recipe", "data", "logger", "seed"}  # smoke=on sweeps one value of each


def _toe_train(*args, env=None, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "toe.cli.train", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _smoke_jobs(name: str) -> int:
    """Runs of ``name`` under smoke=on: one value of each collapsed key, but every model of the experiment's own
    ``smoke_model`` list (universality: one CPU-sized model per family)."""
    spec = yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text())
    models = len(str(spec.get("smoke_model", "one")).split(","))
    return math.prod(
        (models if key == "model" else 1) if key in SMOKE_COLLAPSED else len(str(value).split(","))
        for key, value in spec["hydra"]["sweeper"]["params"].items()
    )


def test_every_experiment_is_a_multirun_with_its_own_task_name():
    assert {
        "table1_deit",
        "table2_consistency",
        "table3_lvvit",
        "table4_efficienttrain",
        "finetune_cifar",
        "ablation_init",
        "ablation_expand",
        "ablation_merge",
        "ablation_distance",
        "ablation_repeats",
        "ablation_keep_rates",
        "ablation_stage_split",
        "compare_token_reduction",
        "universality",
        "vpt_vtab",
        "yolos_coco",
    } <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        spec = yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text())
        assert spec["task_name"] == name and spec["hydra"]["mode"] == "MULTIRUN"
        assert str(spec["hydra"]["sweeper"]["params"]["seed"]) == "0,1,2"


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_end_to_end_in_smoke_form(name, tmp_path, request):
    extra = []
    if name == "finetune_cifar":  # the session's one trained model stands in for both pre-trainings
        checkpoint = request.getfixturevalue("digits_teacher") / "checkpoint.pth"
        extra = [f"pretrained.baseline={checkpoint}", f"pretrained.toe={checkpoint}"]
    elif name == "table3_lvvit":
        extra = [f"label_maps={request.getfixturevalue('digits_label_maps')}"]
    elif name == "vpt_vtab":  # the prompts tuned on the session's digits model
        extra = [f"pretrained.vit={request.getfixturevalue('digits_teacher') / 'checkpoint.pth'}"]
    env = None
    if name == "yolos_coco":  # the digits backbone it trains first: a short one, cached in the test's own folder
        extra = ["detection.backbone_epochs=2", "data.images=[400,100]"]
        env = dict(os.environ, TOE_CACHE=str(tmp_path.parent / f"{tmp_path.name}_cache"))
    proc = _toe_train(f"experiments={name}", "smoke=on", *extra, f"hydra.sweep.dir={tmp_path}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sweep_runs(tmp_path)
    epochs = yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text()).get("smoke_epochs", 3)
    assert len(runs) == _smoke_jobs(name)
    assert all(r.state == "completed" and len(r.history) == epochs for r in runs), runs
    for run in runs:
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        score = "val_box_ap" if name == "yolos_coco" else "val_top1"  # a detector's is COCO box AP
        assert len(rows) == epochs and all(0 <= r[score] <= 1 for r in rows)
    if name == "universality":  # every family learns the digits with every reducer: 10 classes, chance is 0.1
        summaries = [json.loads((run.path / "summary.json").read_text()) for run in runs]
        assert len({s["model"] for s in summaries}) == 3 and len({s["method"] for s in summaries}) == 4
        assert all(s["final_top1"] > 0.25 for s in summaries), [
            (s["model"], s["method"], s["final_top1"]) for s in summaries
        ]
    assert sweep_main(["status", str(tmp_path)]) == 0


def test_a_sweep_missing_a_value_stops_before_any_job_and_names_the_file(tmp_path):
    proc = _toe_train("experiments=ablation_merge", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    assert "experiments/ablation_merge.yaml" in output and "missing value for data.root" in output
    assert not list(tmp_path.glob("*/summary.json"))


def test_a_typo_in_an_experiment_file_stops_before_any_job_and_names_file_and_key(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "typo.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      toe.mergee: mean,drop\n"
    )
    proc = _toe_train(
        "--config-dir", str(tmp_path), "experiments=typo", "smoke=on", f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert "experiments/typo.yaml" in output and "toe.mergee" in output
    assert not (tmp_path / "sweep" / "0").exists()


def test_finetune_experiment_without_checkpoints_names_the_missing_value(tmp_path):
    proc = _toe_train("experiments=finetune_cifar", "smoke=on", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2
    assert "experiments/finetune_cifar.yaml" in proc.stdout + proc.stderr
    assert "missing value for pretrained.baseline" in proc.stdout + proc.stderr


def test_lvvit_experiment_without_label_maps_names_the_missing_value(tmp_path):
    proc = _toe_train("experiments=table3_lvvit", "smoke=on", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2
    assert "experiments/table3_lvvit.yaml" in proc.stdout + proc.stderr
    assert "missing value for label_maps" in proc.stdout + proc.stderr


def test_a_schedule_that_cannot_work_stops_the_sweep_before_any_job(tmp_path):
    proc = _toe_train("experiments=ablation_repeats", "smoke=on", "schedule.epochs=2", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2
    assert "experiments/ablation_repeats.yaml" in proc.stdout + proc.stderr
    assert "not strictly increasing" in proc.stdout + proc.stderr


def test_a_plain_multirun_is_checked_before_it_starts_too(tmp_path):
    proc = _toe_train(
        "-m", "method=baseline,toe", "schedule=official", "schedule.epochs=2", f"hydra.sweep.dir={tmp_path}"
    )
    assert proc.returncode == 2
    assert "the command line" in proc.stdout + proc.stderr and "not strictly increasing" in proc.stdout + proc.stderr
    assert not (tmp_path / "0").exists()


@pytest.mark.slow
def test_sweep_status_lists_failed_runs_and_exits_non_zero(tmp_path, capsys):
    proc = _toe_train(
        "experiments=ablation_merge",
        "smoke=on",
        "toe.merge=mean",
        "recipe.batch_size=64,4096",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode != 0  # Hydra re-raises the failed job after running the others
    runs = {next(o for o in r.overrides if o.startswith("recipe.batch_size")): r for r in sweep_runs(tmp_path)}
    assert runs["recipe.batch_size=64"].state == "completed"
    assert runs["recipe.batch_size=4096"].state == "failed"
    assert "larger than the training set" in runs["recipe.batch_size=4096"].error
    assert sweep_main(["status", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "1 completed, 1 failed" in out and "FAILED" in out
    with pytest.raises(SystemExit) as refused:
        sweep_main(["status", str(tmp_path / "nothing")])
    assert refused.value.code == 2


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_smoke_experiment(tmp_path):
    proc = _toe_train(
        "experiments=ablation_merge",
        "smoke=on",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sweep_runs(tmp_path)
    assert len(runs) == 2 and all(r.state == "completed" for r in runs)
    assert list((tmp_path / ".submitit").glob("*/*_log.out"))
