"""Against a real SLURM (CI starts one with scripts/local-slurm.sh; so can you). Skipped, saying why, without one."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toe.sweep.status import sweep_runs

ROOT = Path(__file__).resolve().parents[1]


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mixed", "alloc"))


REQUIRED = os.environ.get("TOE_REQUIRE_SLURM") == "1"  # set by .ci/run: there a missing cluster is a failure
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        not REQUIRED and not _slurm_up(),
        reason="no SLURM cluster reachable: start one with `scripts/local-slurm.sh start` (CI does)",
    ),
]


@pytest.fixture(autouse=True)
def _cluster_is_up():
    if not _slurm_up():
        pytest.fail("TOE_REQUIRE_SLURM=1 but no SLURM cluster answers `sinfo`")


LAUNCH = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=60",
    "hydra.launcher.signal_delay_s=30",
]


@pytest.fixture
def env():
    # The sacct shim: this cluster has no accounting database.
    return dict(os.environ, PATH=f"{ROOT / 'scripts' / 'slurm'}:{os.environ['PATH']}", OMP_NUM_THREADS="1")


def _toe_train(*args):
    return [sys.executable, "-m", "toe.cli.train", *args]


def test_budgeted_search_runs_its_trials_as_slurm_jobs(tmp_path, env):
    from toe.sweep.search import load_trials

    proc = subprocess.run(
        _toe_train(
            "hparams_search=toe_budget",
            "smoke=on",
            "hydra.sweeper.smoke_trials=2",
            *LAUNCH,
            f"hydra.sweep.dir={tmp_path}",
        ),
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    trials = load_trials(tmp_path)
    complete = trials[trials["state"] == "COMPLETE"]
    assert len(complete) == 2 and complete["top1"].notna().all()
    assert all((tmp_path / str(int(n)) / "summary.json").exists() for n in complete["trial"])


def test_smoke_experiment_runs_through_the_slurm_launcher(tmp_path, env):
    proc = subprocess.run(
        _toe_train("experiments=ablation_merge", "smoke=on", *LAUNCH, f"hydra.sweep.dir={tmp_path}"),
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = sweep_runs(tmp_path)
    assert len(runs) == 2 and all(r.state == "completed" and len(r.history) == 3 for r in runs), runs
    assert list((tmp_path / ".submitit").glob("*/*_log.out")), "submitit wrote no job logs"
    for run in runs:
        rows = (run.path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == [0, 1, 2]


def _job_id(sweep_dir: Path, timeout: float = 120) -> str:
    """The SLURM id of this sweep's (single) job, from submitit's folder ``<sweep>/.submitit/<job id>/``; never
    another test's job that is still finishing."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        folders = [p.name for p in (sweep_dir / ".submitit").glob("*") if p.is_dir() and p.name[0].isdigit()]
        if folders:
            return folders[0]
        time.sleep(0.2)
    raise AssertionError(f"no submitit job folder under {sweep_dir}")


def _state(job: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip()


def _wait_for_epoch(run_dir: Path, epoch: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ckpt = run_dir / "checkpoint.pth"
        if ckpt.exists():
            try:
                if torch.load(ckpt, weights_only=True)["epoch"] >= epoch:
                    return
            except Exception:  # noqa: BLE001 - being replaced at this moment
                pass
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} never reached epoch {epoch}")


@pytest.mark.parametrize("interrupt", ["usr2", "scontrol_requeue"])
def test_a_requeued_job_resumes_from_its_checkpoint(tmp_path, env, interrupt):
    """USR2 is what SLURM sends before a time limit or a preemption (submitit checkpoints and requeues); a plain
    `scontrol requeue` kills the job and reruns it. Either way the run must continue, not start over."""
    epochs = 12
    proc = subprocess.Popen(
        _toe_train(
            "-m",
            "logger=none",
            f"schedule.epochs={epochs}",
            "model.kwargs.depth=2",
            *LAUNCH,
            f"hydra.sweep.dir={tmp_path}",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    job = None
    try:
        job = _job_id(tmp_path)
        _wait_for_epoch(tmp_path / "0", 2)
        assert _state(job) == "RUNNING", f"job {job} is {_state(job)} before it could be interrupted"
        if interrupt == "usr2":
            subprocess.run(["scancel", "--signal=USR2", job], check=True)
        else:
            subprocess.run(["scontrol", "requeue", job], check=True)
        output, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
        if job is not None and proc.returncode != 0:
            subprocess.run(["scancel", job])  # leave no job behind for the next test
    assert proc.returncode == 0, output[-3000:]
    run_dir = tmp_path / "0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == epochs
    assert len(summary["resumed_at"]) == 1 and 2 <= summary["resumed_at"][0] < epochs, summary
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(epochs))
    assert [r["stage"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4  # 0/100/200 of 300 over 12 epochs: 0/4/8
    log = next(tmp_path.glob("*.log"), None) or next(run_dir.glob("*.log"))
    assert "Resuming" in log.read_text()


def test_one_run_over_two_slurm_tasks_trains_with_ddp(tmp_path, env):
    """tasks_per_node=2: submitit starts two processes of the same job; they join one gloo process group."""
    proc = subprocess.run(
        _toe_train(
            "-m",
            "logger=none",
            "schedule.epochs=3",
            "model.kwargs.depth=2",
            *LAUNCH,
            "hydra.launcher.tasks_per_node=2",
            f"hydra.sweep.dir={tmp_path}",
        ),
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "0" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    rows = [json.loads(r) for r in (tmp_path / "0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # written once, by rank 0


def test_sweep_retry_finishes_a_slurm_sweep_with_a_cancelled_and_a_failed_job(tmp_path, env):
    """Job 0 is cancelled mid-run (scancel: the node kills it), job 1 fails (its run dir is held by a live process).
    toe-sweep tells them apart, and `toe-sweep retry` reruns both on SLURM with the sweep's launcher settings."""
    import socket

    from toe.cli.sweep import main as sweep_main
    from toe.train.lock import LOCK_FILE

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)"])
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": holder.pid, "slurm_job_id": None, "since": "then"})
    )
    proc = subprocess.Popen(
        _toe_train(
            "-m",
            "logger=none",
            "method=baseline,toe",
            "schedule.epochs=8",
            "model.kwargs.depth=2",
            *LAUNCH,
            f"hydra.sweep.dir={tmp_path}",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        _wait_for_epoch(tmp_path / "0", 2)
        assert {run.path.name: run.slurm for run in sweep_runs(tmp_path)}["0"] == "RUNNING"
        array = _job_id(tmp_path).split("_")[0]
        subprocess.run(["scancel", f"{array}_0"], check=True)
        output, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
        holder.kill()
        holder.wait()
    assert proc.returncode != 0, output[-2000:]
    states = {run.path.name: run.state for run in sweep_runs(tmp_path)}
    assert states == {"0": "died", "1": "failed"}, (states, output[-2000:])

    old_path = os.environ["PATH"]
    os.environ["PATH"] = env["PATH"]  # the sacct shim, for the submitit launcher inside the retried toe-train
    try:
        assert sweep_main(["retry", str(tmp_path)]) == 0
    finally:
        os.environ["PATH"] = old_path
    runs = {run.path.name: run for run in sweep_runs(tmp_path)}
    assert all(run.state == "completed" and len(run.history) == 8 for run in runs.values()), runs
    assert 2 <= runs["0"].summary.resumed_at[0] < 8  # it went on from its checkpoint
    assert list((tmp_path / "0" / ".submitit").glob("*/*_log.out")), "the retry did not go through SLURM"
