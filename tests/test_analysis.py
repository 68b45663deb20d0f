import json
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from toe.analysis.collect import collect, collect_wandb, load_run_dir
from toe.analysis.tables import TABLES, TIME_PARTS, build_table, spec_for, time_split, write_table
from toe.cli.report import main as report_main


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real small sweep: baseline and ToE, two seeds each, plus one run that fails."""
    root = tmp_path_factory.mktemp("runs")
    common = ["logger=none", "schedule.epochs=3", "model.kwargs.depth=2"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "toe.cli.train",
            "-m",
            "method=baseline,toe",
            "seed=0,1",
            *common,
            f"hydra.sweep.dir={root / 'sweep'}",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    # a job of a multirun whose batch is larger than the training set: refused once its data is read (the sweep's
    # pre-check cannot know the data), its new dir left with a failed summary
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "toe.cli.train",
            "-m",
            *common,
            "recipe.batch_size=4096",
            f"hydra.sweep.dir={root / 'failed'}",
        ],
        capture_output=True,
        timeout=300,
    )
    assert failed.returncode != 0
    return root


def _summaries(root: Path):
    out = {}
    for path in (root / "sweep").glob("*/summary.json"):
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
        out[(config["method_name"], config["seed"])] = json.loads(path.read_text())
    return out


def test_collect_keeps_every_run_and_flags_the_failed_one(sweep, tmp_path):
    collected = collect(sweep)
    runs = collected.runs
    assert len(runs) == 5
    assert sorted(runs["method"]) == ["baseline", "baseline", "toe", "toe", "toe"]
    failed = runs[runs["run"] == "failed/0"].iloc[0]
    assert failed["status"] == "failed" and "larger than the training set" in failed["flag"]
    assert runs[runs["run"] != "failed/0"]["flag"].isna().all()
    assert len(collected.epochs) == 4 * 3
    toe_epochs = collected.epochs.merge(runs[["run", "method"]], on="run").query("method == 'toe'")
    assert sorted(set(toe_epochs["tokens_after_first_block"])) == [33, 49, 65]
    with pytest.raises(FileNotFoundError, match="no run records"):
        collect(tmp_path)


def test_table_holds_exactly_the_numbers_of_the_run_records(sweep):
    runs = collect(sweep).runs
    table = build_table(runs, spec_for("train", runs)).set_index("method")
    summaries = _summaries(sweep)
    for method in ("baseline", "toe"):
        finals = [summaries[(method, seed)]["final_top1"] * 100 for seed in (0, 1)]
        row = table.loc[method]
        assert row["n"] == 2
        assert row["top1_mean"] == pytest.approx(statistics.mean(finals))
        assert row["top1_std"] == pytest.approx(statistics.stdev(finals))
        flops = [summaries[(method, seed)]["train_flops_per_image"] / 3e9 for seed in (0, 1)]
        assert row["gflops_attn"] == pytest.approx(statistics.mean(flops))
        hours = [summaries[(method, seed)]["device_hours"] for seed in (0, 1)]
        assert row["hours"] == pytest.approx(statistics.mean(hours))
    assert table.loc["toe", "speedup"] == pytest.approx(table.loc["baseline", "hours"] / table.loc["toe", "hours"])
    assert table.loc["toe", "top1_delta"] == pytest.approx(
        table.loc["toe", "top1_mean"] - table.loc["baseline", "top1_mean"]
    )
    assert table.loc["toe", "gflops_linear"] < table.loc["baseline", "gflops_linear"]
    assert table.loc["baseline", "is_reference"] and not table.loc["toe", "is_reference"]


def test_time_split_holds_the_mean_seconds_of_each_part_of_the_command(sweep):
    runs = collect(sweep).runs
    split = time_split(runs, spec_for("train", runs)).set_index("method")
    summaries = _summaries(sweep)
    for method in ("baseline", "toe"):
        for part, label in TIME_PARTS.items():
            seconds = [summaries[(method, seed)][part] for seed in (0, 1)]
            assert split.loc[method, f"{label} (s)"] == pytest.approx(statistics.mean(seconds))
        # the first job of the multirun counts the process start-up (imports), the second starts when it starts
        assert split.loc[method, "start-up (s)"] > 0
        shares = [100 * summaries[(method, seed)]["data_wait_share"] for seed in (0, 1)]
        assert split.loc[method, "train waiting for input (%)"] == pytest.approx(statistics.mean(shares))
    assert (split["whole command (s)"] > split["train (s)"] + split["eval (s)"]).all()


def test_tables_are_written_as_markdown_csv_and_latex_with_reference_columns(sweep, tmp_path):
    runs = collect(sweep).runs
    reference = pd.DataFrame({"model": ["vit_cpu"], "method": ["toe"], "top1": [72.5]})
    table = build_table(runs, spec_for("train", runs), reference)
    paths = write_table(table, tmp_path, "table1")
    markdown = paths["md"].read_text()
    assert "± " in markdown and "(n=2)" in markdown and "ref." in markdown
    assert "72.5" in markdown and "not given" in markdown  # the baseline row has no reference number
    assert pd.read_csv(paths["csv"])["top1_mean"].tolist() == pytest.approx(table["top1_mean"].tolist())
    assert "\\begin{tabular}" in paths["tex"].read_text()


def test_report_writes_tables_plots_verdicts_and_flagged_runs(sweep, tmp_path, capsys):
    assert report_main([str(sweep), "-o", str(tmp_path / "report"), "--html"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Runs of train" in report and "## Flagged runs" in report
    assert "`failed/0`: failed: ConfigError" in report
    table = build_table(collect(sweep).runs, spec_for("train", collect(sweep).runs)).set_index("method")
    speedup = table.loc["toe", "speedup"]
    said = f"faster by {speedup:.2f}x" if speedup >= 1 else f"slower by {1 / speedup:.2f}x"
    saving = table.loc["toe", "activation_saving"]
    assert 0.05 < saving < 0.8  # ToE's reduced stages, averaged with its full-token one
    memory = f"{100 * saving:.0f} % less activation memory"
    assert f"toe: {said}, {memory}, top-1 {table.loc['toe', 'top1_delta']:+.2f} points" in report
    assert "Activations (MiB/step, mean / peak)" in report
    assert "seed spread" in report
    assert "**Where the time went**" in report and "whole command (s)" in report
    for name in ("top1_vs_epoch", "top1_vs_time", "tokens_vs_epoch"):
        png = tmp_path / "report" / "train" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"train/{name}.png" in report
    # toe-vis's grid of one ToE run with a checkpoint (the baseline has nothing to draw)
    tokens = tmp_path / "report" / "train" / "tokens_vit_cpu_toe.png"
    assert tokens.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "train/tokens_vit_cpu_toe.png" in report
    assert "tokens_vit_cpu_baseline" not in report
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "1 flagged" in capsys.readouterr().out
    assert report_main([str(tmp_path / "empty"), "-o", str(tmp_path / "x")]) == 2


def test_wandb_and_disk_records_map_to_the_same_row(sweep):
    run_dir = next((sweep / "sweep").glob("*/summary.json")).parent
    row, epochs = load_run_dir(run_dir, sweep)
    # What W&B returns for the same run: the logged config (with the overrides), its summary and its history.
    config = dict(
        yaml.safe_load((run_dir / "config.yaml").read_text()),
        overrides=yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()),
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [
        dict(json.loads(line), _step=i, _runtime=1.0)  # W&B adds its own keys to every logged row
        for i, line in enumerate((run_dir / "metrics.jsonl").read_text().splitlines())
    ]

    class WandbRun:  # the things collect_wandb reads of a wandb.apis.public.Run, offline
        def __init__(self):
            self.id, self.summary, self.config = row["run"], summary, dict(config, _wandb={"runtime": 3})

        def scan_history(self):
            return iter(history)

    class Api:
        def runs(self, project):
            assert project == "me/toe"
            return [WandbRun()]

    from_wandb = collect_wandb("me/toe", api=Api())
    assert from_wandb.runs.to_dict("records") == [row]
    assert from_wandb.epochs.to_dict("records") == epochs


def test_known_experiments_get_the_paper_layout_and_others_their_varied_keys(sweep):
    runs = collect(sweep).runs
    assert spec_for("table1_deit", runs) is TABLES["table1_deit"]
    assert TABLES["ablation_merge"].reference == {"toe.merge": "mean"}
    assert spec_for("train", runs).rows == ["model", "method"]


def test_report_reads_reference_numbers_from_a_csv_file_and_refuses_a_bad_one(sweep, tmp_path, capsys):
    paper = tmp_path / "paper.csv"
    paper.write_text("model,method,top1\nvit_cpu,toe,72.5\nvit_cpu,baseline,72.2\n")
    assert report_main([str(sweep), "-o", str(tmp_path / "report"), "--reference", str(paper)]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "reference: top1" in report and "72.5" in report and "72.2" in report
    bad = tmp_path / "bad.csv"
    bad.write_text("model,method,top1\nvit_cpu,toe,about 72\n")
    with pytest.raises(SystemExit) as refused:
        report_main([str(sweep), "-o", str(tmp_path / "bad_report"), "--reference", str(bad)])
    assert refused.value.code == 2 and "column top1" in capsys.readouterr().err


def test_an_unreadable_record_is_flagged_and_every_good_run_still_reported(sweep, tmp_path, capsys):
    import shutil

    from toe.cli.sweep import main as sweep_main

    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    summaries = sorted((copy / "sweep").glob("*/summary.json"))
    summaries[0].write_text('{"status": "compl')  # cut short
    metrics = summaries[1].parent / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "train_lo')  # a half-written last line
    assert report_main([str(copy), "-o", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"`sweep/{summaries[0].parent.name}`: summary.json: unreadable" in report
    assert "line 4 is half-written (ignored)" in report
    runs = collect(copy).runs
    assert (runs["status"] == "completed").sum() == 3 and (runs["status"] == "unreadable").sum() == 1
    assert sweep_main(["status", str(copy / "sweep")]) == 1
    out = capsys.readouterr().out
    assert "UNREADABLE" in out and "3 completed, 1 unreadable" in out


@pytest.mark.parametrize("holder_alive", [False, True])
def test_a_job_in_its_first_epoch_is_running_and_killed_there_it_died_not_not_started(
    sweep, tmp_path, capsys, holder_alive
):
    import shutil
    import socket

    from toe.cli.sweep import main as sweep_main
    from toe.train.lock import LOCK_FILE

    copy = tmp_path / "copy"
    shutil.copytree(sweep / "sweep", copy)
    job = sorted(p for p in copy.iterdir() if (p / "summary.json").is_file())[0]
    for name in ("summary.json", "metrics.jsonl"):  # what a job has before its first epoch ends: no record yet
        (job / name).unlink()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if not holder_alive:  # the job was killed: its lock names a process that is gone
        holder.kill()
        holder.wait()
    try:
        (job / LOCK_FILE).write_text(
            json.dumps({"host": socket.gethostname(), "pid": holder.pid, "slurm_job_id": None, "since": "then"})
        )
        assert sweep_main(["status", str(copy)]) == (0 if holder_alive else 1)
        out = capsys.readouterr().out
        assert ("3 completed, 1 running" if holder_alive else "3 completed, 1 died") in out, out
        assert "not started" not in out
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "file, content, says",
    [
        (
            "summary.json",
            lambda text: text.replace('"resumed_at": []', '"resumed_at": 5'),
            "summary.json: resumed_at=5 is not a list",
        ),
        (
            "summary.json",
            lambda text: text.replace('"final_top1": ', '"final_top1": "high", "x": '),
            "summary.json: final_top1='high' is not a number",
        ),
        (
            "summary.json",
            lambda text: text.replace('"final_top1": ', '"final_top1": NaN, "x": '),
            "summary.json: final_top1=nan is not a finite number",
        ),
        (
            "summary.json",
            lambda text: text.replace('"total_train_seconds": ', '"total_train_seconds": 1e308, "x": '),
            "summary.json: total_train_seconds=1e+308 is not a finite number",
        ),
        ("config.yaml", lambda text: "- a\n- list\n", "config.yaml: not a mapping of settings"),
        (".hydra/overrides.yaml", lambda text: "- 'seed=[1,'\n", ".hydra/overrides.yaml: not Hydra overrides"),
        (
            "metrics.jsonl",
            lambda text: text.replace('"val_top1": ', '"val_top1": "0.9", "x": ', 1),
            "metrics.jsonl line 1: val_top1='0.9' is not a number",
        ),
        (".toe.lock", lambda text: '{"pid": "abc", "host": "h"}', None),
    ],
)
def test_one_bad_file_flags_its_run_and_the_readers_report_the_rest(sweep, tmp_path, capsys, file, content, says):
    import shutil

    from toe.cli.sweep import main as sweep_main

    copy = tmp_path / "copy"
    shutil.copytree(sweep / "sweep", copy)
    bad = sorted(p for p in copy.iterdir() if (p / "summary.json").is_file())[0]
    path = bad / file
    path.write_text(content(path.read_text() if path.exists() else ""))
    if file == ".toe.lock":  # a lock that names no process, on a run that says it is running
        summary = bad / "summary.json"
        summary.write_text(summary.read_text().replace('"status": "completed"', '"status": "running"'))
    assert report_main([str(copy), "-o", str(tmp_path / "report")]) == 0
    runs = collect(copy).runs.set_index("run")
    others = runs.drop(index=bad.name)
    assert len(runs) == 4 and others["flag"].isna().all() and (others["status"] == "completed").all()
    if says is not None:
        assert says in runs.loc[bad.name, "flag"]
        assert says in (tmp_path / "report" / "report.md").read_text()
    table = build_table(runs.reset_index(), spec_for("train", runs.reset_index()))
    assert table["top1_mean"].map(lambda v: pd.isna(v) or 0 <= v <= 100).all()
    assert table["time_mean"].map(lambda v: pd.isna(v) or v < 1e6).all() if "time_mean" in table else True
    code = sweep_main(["status", str(copy)])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert ("3 completed" in out and "1 died" in out) if file == ".toe.lock" else "4 completed" in out


def test_verdicts_say_faster_or_slower_and_judge_the_top1_change_by_the_seed_spread():
    from toe.analysis.report import verdicts

    table = pd.DataFrame(
        {
            "method": ["baseline", "toe", "slow"],
            "model": ["m"] * 3,
            "is_reference": [True, False, False],
            "speedup": [1.0, 1.27, 0.8],
            "top1_std": [0.15, 0.1, None],
            "top1_delta": [0.0, -0.1, -2.0],
        }
    )
    table.attrs["rows"] = ["model", "method"]
    assert verdicts(table) == [
        "m, toe: faster by 1.27x, top-1 -0.10 points (within the seed spread of 0.15)",
        "m, slow: slower by 1.25x, top-1 -2.00 points (outside the seed spread of 0.15)",
    ]
    # with the records' activation memory (per step, averaged over the epochs), beside the speed
    table["activation_saving"] = [0.0, 0.312, -0.05]
    assert verdicts(table) == [
        "m, toe: faster by 1.27x, 31 % less activation memory, top-1 -0.10 points (within the seed spread of 0.15)",
        "m, slow: slower by 1.25x, 5 % more activation memory, top-1 -2.00 points (outside the seed spread of 0.15)",
    ]


def test_a_detection_table_reports_box_ap_and_ap50_in_place_of_top1():
    from toe.analysis.report import verdicts
    from toe.analysis.tables import TableSpec, format_table

    runs = pd.DataFrame(
        {
            "status": ["completed"] * 4,
            "model": ["vit_tiny_patch16_224"] * 4,
            "method": ["baseline", "baseline", "toe", "toe"],
            "final_top1": [None] * 4,
            "final_box_ap": [0.50, 0.52, 0.48, 0.49],
            "final_box_ap50": [0.64, 0.66, 0.62, 0.63],
            "train_flops_per_image": [3e9, 3e9, 2e9, 2e9],
            "train_flops_per_image_linear": [2e9, 2e9, 1.5e9, 1.5e9],
            "device_hours": [0.2, 0.2, 0.16, 0.16],
        }
    )
    table = build_table(runs, TableSpec("detection", ["model", "method"])).set_index("method")
    assert table.loc["toe", "top1_mean"] == pytest.approx(48.5) and table.loc["baseline", "n"] == 2
    assert table.loc["toe", "ap50_mean"] == pytest.approx(62.5)
    assert table.loc["toe", "top1_delta"] == pytest.approx(-2.5) and table.loc["toe", "speedup"] == pytest.approx(1.25)
    shown = format_table(table.reset_index())
    assert "Box AP (%)" in shown.columns and "AP50 (%)" in shown.columns and "Δ box AP" in shown.columns
    assert verdicts(table.reset_index())[0].startswith("vit_tiny_patch16_224, toe: faster by 1.25x, box AP -2.50")
