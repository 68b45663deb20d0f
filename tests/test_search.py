import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest

from toe.cli.report import main as report_main
from toe.sweep.search import STUDY_FILE, SearchSpaceError, load_trials, parse_params, trial_overrides
from toe.train.record import read_run_dir

SEARCH = ["hparams_search=toe_budget", "smoke=on"]


def _toe_train(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "toe.cli.train", *args], capture_output=True, text=True, timeout=timeout
    )


def test_params_are_fixed_overrides_or_distributions():
    fixed, space = parse_params(
        {
            "model": "vit_cpu",
            "toe.keep_rates.0": {"low": 0.3, "high": 0.7, "step": 0.05},
            "schedule.stage_starts.1": {"low": 60, "high": 140, "step": 10, "type": "int"},
            "toe.distance": {"choices": ["cosine", "euclidean"]},
        }
    )
    assert fixed == ["model=vit_cpu"]
    assert isinstance(space["toe.keep_rates.0"], optuna.distributions.FloatDistribution)
    assert space["schedule.stage_starts.1"].step == 10 and space["toe.distance"].choices == ("cosine", "euclidean")
    assert trial_overrides({"toe.keep_rates.0": 0.35000000000000003, "schedule.stage_starts.1": 60}) == [
        "toe.keep_rates.0=0.35",
        "schedule.stage_starts.1=60",
    ]
    with pytest.raises(SearchSpaceError, match="params.x"):
        parse_params({"x": {"low": 1}})
    with pytest.raises(SearchSpaceError, match="type 'str'"):
        parse_params({"x": {"low": 1, "high": 2, "type": "str"}})


def _trials(sweep_dir):
    trials = load_trials(sweep_dir)
    return trials, trials[trials["state"] == "COMPLETE"]


@pytest.mark.slow
def test_smoke_search_trains_normal_runs_prunes_over_budget_and_reports_its_front(tmp_path):
    proc = _toe_train(*SEARCH, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials, complete = _trials(tmp_path)
    assert len(complete) == 4  # smoke_trials; pruned trials are free
    budget = 1.2
    assert (complete["flop_ratio"] >= budget).all()
    pruned = trials[trials["state"] == "PRUNED"]
    assert (pruned["flop_ratio"].dropna() < budget).all()
    for _, trial in complete.iterrows():  # each trial is a normal run with a normal record, in <sweep>/<trial>
        run = read_run_dir(tmp_path / str(int(trial["trial"])))
        assert run.state == "completed" and run.summary.final_top1 == pytest.approx(trial["top1"])
        assert len(run.history) == 3
    assert report_main([str(tmp_path), "-o", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Search: trials" in report and "**Best**: trial" in report
    assert (tmp_path / "report" / "search" / "top1_vs_flop_ratio.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_killed_search_rerun_continues_the_same_study(tmp_path):
    command = [
        sys.executable,
        "-m",
        "toe.cli.train",
        *SEARCH,
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweeper.smoke_trials=3",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # kill it while the second trained trial trains
            time.sleep(0.5)
            if (tmp_path / STUDY_FILE).exists():
                with sqlite3.connect(tmp_path / STUDY_FILE) as db:
                    states = list(db.execute("select number, state from trials"))
                running = [number for number, state in states if state == "RUNNING"]
                done = [number for number, state in states if state == "COMPLETE"]
                if len(done) == 1 and running and (tmp_path / str(running[0]) / "checkpoint.pth").exists():
                    break
        else:
            pytest.fail("the search never got to its second trial")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before, complete_before = _trials(tmp_path)
    best_before = complete_before["top1"].max()
    cut = before[before["state"] == "RUNNING"]
    assert len(complete_before) == 1 and len(cut) == 1
    proc = _toe_train(*SEARCH, f"hydra.sweep.dir={tmp_path}", "hydra.sweeper.smoke_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after, complete = _trials(tmp_path)
    assert len(complete) == 3  # the trial count carried over: one before the kill, two after
    assert complete["top1"].max() >= best_before
    assert int(complete_before["trial"].iloc[0]) in set(complete["trial"].astype(int))
    assert "cut short" in proc.stdout + proc.stderr
    # the cut trial's settings ran again in its run dir, resuming from the epoch it had finished
    cut_run = read_run_dir(tmp_path / str(int(cut["trial"].iloc[0])))
    assert cut_run.state == "completed" and cut_run.summary.resumed_at
    params = [c for c in complete.columns if c.startswith("param ")]
    assert not complete.duplicated(subset=params).any()  # no settings trained twice


@pytest.mark.slow
def test_search_runs_on_the_submitit_local_launcher(tmp_path):
    proc = _toe_train(
        *SEARCH, f"hydra.sweep.dir={tmp_path}", "hydra/launcher=submitit_local", "hydra.sweeper.smoke_trials=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_trials(tmp_path)[1]) == 2


def test_a_search_whose_fixed_settings_cannot_work_stops_before_any_trial(tmp_path):
    proc = _toe_train(*SEARCH, "data=imagenet", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2 and "missing value for data.root" in proc.stdout + proc.stderr
    assert not (tmp_path / STUDY_FILE).exists()


@pytest.mark.slow
def test_a_search_whose_every_trial_is_pruned_says_so_and_fails(tmp_path):
    proc = _toe_train("-m", *SEARCH, "budget=100", "logger=none", f"hydra.sweep.dir={tmp_path}", timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "trained no trial: every one was pruned" in output, output[-2000:]
    assert "below the budget 100x" in output and "Traceback" not in output
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and (p / "summary.json").exists()]
