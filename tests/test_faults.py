"""Faults on real runs: a resume with another config, a cut checkpoint, two processes on one run dir, signals, a
full disk. Each ends with no good result lost, every record true, and one line saying what happened."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import interrupt_after_first_checkpoint, toe_train_cli

from toe.train.checkpoint import CheckpointUnreadable
from toe.train.lock import LOCK_FILE, RunDirBusy
from toe.train.record import StartRefused
from toe.train.task import train


def _files(run_dir: Path):
    return {
        name: (run_dir / name).read_bytes()
        for name in ("summary.json", "config.yaml", "metrics.jsonl", "checkpoint.pth")
    }


def _summary(run_dir: Path):
    return json.loads((run_dir / "summary.json").read_text())


def _rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _epochs(run_dir: Path):
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resume_with_another_config_is_refused_and_the_record_is_untouched(tiny_cfg, tmp_path):
    train(tiny_cfg(), tmp_path)
    before = _files(tmp_path)
    with pytest.raises(StartRefused, match=r"recipe.lr: 0.002 -> 0.01, toe.repeats: 2 -> 4"):
        train(tiny_cfg("toe.repeats=4", "recipe.lr=1e-2"), tmp_path)
    assert _files(tmp_path) == before
    # what may change on a resume (logging, workers, evaluation cadence) does not stop it
    assert train(tiny_cfg("logger=none", "train.workers=0", "train.eval_every=2"), tmp_path).epochs == 2


def test_a_resume_allowed_to_change_goes_on_and_the_record_says_where(tiny_cfg, tmp_path):
    train(tiny_cfg("schedule.epochs=1"), tmp_path)
    summary = train(tiny_cfg("schedule.epochs=2", "recipe.lr=1e-3", "resume.allow_changes=true"), tmp_path)
    assert summary.status == "completed" and summary.epochs == 2 and _epochs(tmp_path) == [0, 1]
    assert summary.config_changes == [
        {"epoch": 1, "changes": {"recipe.lr": [0.002, 0.001], "schedule.epochs": [1, 2], "schedule.length": [1, 2]}}
    ]


def test_rerunning_a_completed_run_changes_nothing(tiny_cfg, tmp_path):
    first = train(tiny_cfg(), tmp_path)
    before = _files(tmp_path)
    assert train(tiny_cfg(), tmp_path) == first
    assert _files(tmp_path) == before


def test_a_cut_checkpoint_falls_back_to_the_previous_one_and_the_run_finishes(tiny_cfg, tmp_path, caplog):
    train(tiny_cfg(), tmp_path)
    checkpoint = tmp_path / "checkpoint.pth"
    assert torch.load(tmp_path / "checkpoint.prev.pth", weights_only=True)["epoch"] == 1
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    summary = train(tiny_cfg("schedule.epochs=3", "schedule.length=3", "resume.allow_changes=true"), tmp_path)
    assert (
        "checkpoint.pth is unreadable" in caplog.text and "resuming from checkpoint.prev.pth (epoch 1)" in caplog.text
    )
    assert summary.status == "completed" and _epochs(tmp_path) == [0, 1, 2] and summary.resumed_at == [1]


def test_a_stop_between_the_checkpoints_two_renames_resumes_from_the_previous_one(tiny_cfg, tmp_path, caplog):
    train(tiny_cfg(), tmp_path)
    os.replace(tmp_path / "checkpoint.pth", tmp_path / "checkpoint.prev.pth")  # save_checkpoint's first rename
    summary = train(tiny_cfg("schedule.epochs=3", "schedule.length=3", "resume.allow_changes=true"), tmp_path)
    assert "checkpoint.pth is missing" in caplog.text and "resuming from checkpoint.prev.pth (epoch 2)" in caplog.text
    assert summary.status == "completed" and _epochs(tmp_path) == [0, 1, 2] and summary.resumed_at == [2]


def test_a_checkpoint_without_the_runs_progress_is_refused_in_one_line(tiny_cfg, tmp_path):
    train(tiny_cfg("schedule.epochs=1"), tmp_path)
    torch.save({"epoch": 1}, tmp_path / "checkpoint.pth")
    before = _files(tmp_path)
    with pytest.raises(CheckpointUnreadable, match=r"not a toe-train checkpoint \(no history, model, optimizer"):
        train(tiny_cfg("schedule.epochs=1"), tmp_path)
    assert _files(tmp_path) == before


def test_two_cut_checkpoints_are_named_in_one_line_and_the_record_is_untouched(tiny_cfg, tmp_path):
    train(tiny_cfg(), tmp_path)
    for name in ("checkpoint.pth", "checkpoint.prev.pth"):
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:1000])
    before = _files(tmp_path)
    with pytest.raises(
        CheckpointUnreadable, match="checkpoint.pth cannot be resumed from .*move it aside to start over"
    ):
        train(tiny_cfg(), tmp_path)
    assert _files(tmp_path) == before


def test_a_run_dir_held_by_a_live_process_is_refused_naming_it(tiny_cfg, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / LOCK_FILE).write_text(
            json.dumps({"host": socket.gethostname(), "pid": holder.pid, "slurm_job_id": None, "since": "then"})
        )
        with pytest.raises(RunDirBusy, match=f"in use by PID {holder.pid} on {socket.gethostname()}"):
            train(tiny_cfg(), tmp_path)
        assert not (tmp_path / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_said(tiny_cfg, tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": gone.pid, "slurm_job_id": None, "since": "then"})
    )
    assert train(tiny_cfg(), tmp_path).status == "completed"
    assert f"PID {gone.pid} on {socket.gethostname()}, which is no longer running" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end


@pytest.fixture
def small_disk(tmp_path):
    """A real 5 MiB file system (tmpfs): room for two checkpoints of the tiny run, not for a third beside them."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); CI runs as root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_the_run_in_one_line_with_true_records_and_a_rerun_resumes(small_disk):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_dir = small_disk / "run"
    proc = subprocess.run(_cli(run_dir), capture_output=True, text=True, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "out of disk space" in output and "the checkpoint of epoch 2 and the record up to it are intact" in output
    summary = _summary(run_dir)
    assert summary["status"] == "interrupted" and summary["epochs"] == 2 and "DiskFull" in summary["error"]
    assert summary["resumed_at"] == [] and _epochs(run_dir) == [0, 1]
    assert torch.load(run_dir / "checkpoint.pth", weights_only=True)["epoch"] == 2
    assert not list(run_dir.glob("*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)  # space freed
    proc = subprocess.run(_cli(run_dir), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert _summary(run_dir)["status"] == "completed" and _epochs(run_dir) == [0, 1, 2]
    assert _summary(run_dir)["resumed_at"] == [2]


def _cli(run_dir: Path, *extra):
    return toe_train_cli(run_dir, *extra)


def _wait_for(path: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_run_says_interrupted_and_a_rerun_finishes_it(tmp_path, sig):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # 8 epochs: the signal must find the run still training after its first checkpoint (3 could all end first)
    longer = ("schedule.epochs=8", "schedule.length=8")
    # SIGINT as a terminal's Ctrl-C gives it: a pytest started in the background of a script inherits SIGINT
    # ignored, and Python then keeps it ignored in the child, which would finish its run untouched
    proc = subprocess.Popen(
        _cli(tmp_path, *longer),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for(tmp_path / "checkpoint.pth")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err[-2000:]
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "toe-train: interrupted (Ctrl-C)" in err
    summary = _summary(tmp_path)
    assert summary["status"] == "interrupted" and summary["epochs"] >= 1, err[-2000:]
    assert not (tmp_path / LOCK_FILE).exists()
    subprocess.run(_cli(tmp_path, *longer), check=True, capture_output=True, env=env, timeout=300)
    assert _summary(tmp_path)["status"] == "completed" and _epochs(tmp_path) == list(range(8))


@pytest.mark.slow
def test_a_second_process_on_a_running_dir_is_refused_and_the_record_stays_whole(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    longer = ("schedule.epochs=8", "schedule.length=8")
    first = subprocess.Popen(_cli(tmp_path, *longer), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _wait_for(tmp_path / LOCK_FILE)
    second = subprocess.run(_cli(tmp_path, *longer), capture_output=True, text=True, env=env, timeout=300)
    assert first.wait(timeout=300) == 0
    output = second.stdout + second.stderr
    assert second.returncode == 2 and f"in use by PID {first.pid}" in output and "Traceback" not in output
    assert _epochs(tmp_path) == list(range(8)) and _summary(tmp_path)["status"] == "completed"


def _sweep(sweep_dir: Path, env):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "toe.cli.train",
            "-m",
            "logger=none",
            "seed=0,1,2",
            "schedule.epochs=2",
            "schedule.length=2",
            "schedule.stage_starts=[0,1,2]",
            "model.kwargs.depth=2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


@pytest.mark.slow
def test_sweep_retry_finishes_a_sweep_with_a_killed_and_a_failed_job_into_the_clean_sweeps_table(tmp_path, capsys):
    from toe.analysis.collect import collect
    from toe.analysis.tables import build_table, spec_for
    from toe.cli.sweep import main as sweep_main

    env = dict(os.environ, OMP_NUM_THREADS="1")
    assert _sweep(tmp_path / "clean", env).wait(timeout=600) == 0

    broken = tmp_path / "broken"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # job 1's dir is held: it fails
    (broken / "1").mkdir(parents=True)
    (broken / "1" / LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": holder.pid, "slurm_job_id": None, "since": "then"})
    )
    sweep = _sweep(broken, env)
    _wait_for(broken / "2" / "checkpoint.pth")
    sweep.kill()  # job 2 is killed mid-run
    sweep.wait()
    holder.kill()
    holder.wait()
    assert sweep_main(["status", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "1 completed" in out and "1 failed" in out and "1 died" in out and "in use by PID" in out

    assert sweep_main(["retry", str(broken), "--dry-run"]) == 0
    assert "would retry 1 (failed)" in capsys.readouterr().out
    assert sweep_main(["retry", str(broken)]) == 0
    assert sweep_main(["status", str(broken)]) == 0
    assert "3 completed" in capsys.readouterr().out

    tables = []
    for root in ("clean", "broken"):
        runs = collect(tmp_path / root).runs
        table = build_table(runs, spec_for("train", runs))
        tables.append(table)
    clean, retried = tables
    assert list(retried["method"]) == list(clean["method"]) and list(retried["n"]) == list(clean["n"]) == [3]
    for column in ("top1_mean", "top1_std", "gflops_linear", "gflops_attn"):
        assert retried[column].tolist() == pytest.approx(clean[column].tolist(), abs=1e-9), column
    resumed = json.loads((broken / "2" / "summary.json").read_text())["resumed_at"]
    assert resumed == [1]  # the killed job went on from its checkpoint, it did not start over


def test_a_schedule_whose_last_stage_never_starts_says_so_in_the_record(tiny_cfg, tmp_path, caplog):
    from toe.analysis.collect import collect

    summary = train(
        tiny_cfg("schedule.epochs=3", "schedule.length=300", "schedule.stage_starts=[0,100,400]"), tmp_path / "run"
    )
    assert summary.status == "completed" and summary.unreached_stages == [3]
    assert "never run" in caplog.text
    assert "stage(s) [3] never ran" in collect(tmp_path).runs.iloc[0]["flag"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["step", "--repeats", "0"], "argument --repeats: 0 must be >= 1"),
        (["step", "--keep-rates", "0.5", "1.5"], "argument --keep-rates: 1.5 must be > 0 and <= 1"),
        (["step", "--keep-rates", "0.75", "0.5", "1.0"], "keep_rates must be strictly increasing"),
        (["step", "--stage-starts", "0", "100", "400", "--epochs", "300"], "the last stage starts after --epochs"),
        (["--device", "cuda:99", "flops"], "argument --device: "),
        (["--device", "tpu", "flops"], "argument --device: "),
        (["op", "--batch", "-4"], "argument --batch: -4 must be >= 1"),
        (["flops", "--table", "/nonexistent.yaml"], "--table /nonexistent.yaml: no such file"),
    ],
)
def test_toe_bench_refuses_bad_flags_in_one_line(argv, message, capsys):
    from toe.cli.bench import main

    with pytest.raises(SystemExit) as refused:
        main(argv)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and message in err and "Traceback" not in err


def test_toe_label_maps_refuses_bad_flags_and_a_cut_checkpoint_in_one_line(tiny_cfg, tmp_path, capsys):
    from toe.cli.label_maps import main

    train(tiny_cfg("method=baseline", "schedule.epochs=1"), tmp_path / "teacher")
    cases = [
        ([str(tmp_path / "teacher"), str(tmp_path / "maps"), "--batch-size", "0"], "argument --batch-size"),
        ([str(tmp_path / "teacher"), str(tmp_path / "maps"), "--topk", "20"], "--topk 20: the run's data has only 10"),
        ([str(tmp_path / "nothing"), str(tmp_path / "maps")], "nothing does not exist"),
    ]
    checkpoint = tmp_path / "teacher" / "checkpoint.pth"
    for argv, message in cases:
        with pytest.raises(SystemExit) as refused:
            main(argv)
        err = capsys.readouterr().err
        assert refused.value.code == 2 and message in err, err
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "teacher"), str(tmp_path / "maps")])
    assert refused.value.code == 2 and "checkpoint.pth is unreadable" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()


def test_a_run_of_an_earlier_toe_resumes_despite_keys_added_since(tiny_cfg, tmp_path):
    """A checkpoint written before `tome` and `budget` existed, and when patch_dropout.keep_rates defaulted to ToE's
    rates, resumes: neither difference changes what the run trains."""
    import torch

    from toe.config.changes import config_changes

    train(tiny_cfg(), tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoint.prev.pth", weights_only=True)  # the checkpoint after epoch 1
    config = checkpoint["config"]
    del config["tome"], config["budget"]
    config["patch_dropout"]["keep_rates"] = [0.5, 0.75, 1.0]
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    summary = train(tiny_cfg(), tmp_path)
    assert summary.status == "completed" and summary.epochs == 2 and summary.config_changes == []
    assert summary.resumed_at == [1]
    # a switched-on method still counts
    assert "patch_dropout.enabled" in config_changes(
        config, dict(config, patch_dropout={"enabled": True, "keep_rates": None})
    )


def test_a_model_keyword_the_checkpoint_lacks_is_a_change(tiny_cfg, tmp_path):
    train(tiny_cfg("schedule.epochs=1"), tmp_path)
    with pytest.raises(StartRefused, match=r"model.kwargs.proj_drop_rate: None -> 0.5"):
        train(tiny_cfg("schedule.epochs=1", "+model.kwargs.proj_drop_rate=0.5"), tmp_path)


@pytest.mark.parametrize(
    "pipeline, resumed_with",
    [
        ("tensor", ["train.eval_every=3", "train.workers=1", "train.progress=true"]),
        ("pil", ["train.eval_every=2", "train.workers=2"]),
    ],
)
def test_a_resume_with_other_resumable_keys_trains_exactly_as_the_uninterrupted_run(
    tiny_cfg, tmp_path, pipeline, resumed_with
):
    from toe.train.task import Terminated

    run = ("schedule.epochs=4", "schedule.length=4", f"train.pipeline={pipeline}", "data.val_fraction=0.5")
    straight = train(tiny_cfg(*run), tmp_path / "straight")
    resumed_dir = tmp_path / "resumed"
    watcher = interrupt_after_first_checkpoint(resumed_dir)
    with pytest.raises(Terminated):
        train(tiny_cfg(*run), resumed_dir)
    watcher.join()
    assert _summary(resumed_dir)["status"] == "interrupted" and _summary(resumed_dir)["epochs"] < 4
    resumed = train(tiny_cfg(*run, *resumed_with), resumed_dir)
    assert resumed.status == "completed" and resumed.config_changes == [] and len(resumed.resumed_at) == 1
    a, b = _rows(tmp_path / "straight"), _rows(resumed_dir)
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert straight.final_top1 == resumed.final_top1 and straight.final_ema_top1 == resumed.final_ema_top1
