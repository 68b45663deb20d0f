"""A refused start leaves every file of an existing run as it was (Hydra's .hydra/ and the job log included), and
says why in one line; a refused single run in a new dir leaves no dir behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def _cli(run_dir: Path, *extra):
    return [
        sys.executable,
        "-m",
        "toe.cli.train",
        "logger=none",
        "schedule.epochs=1",
        "schedule.length=1",
        "schedule.stage_starts=[0,1,2]",
        "model.kwargs.depth=2",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _tree(run_dir: Path):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _run(args, env=None):
    return subprocess.run(
        args, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("refusals") / "run"
    proc = _run(_cli(run_dir, "seed=3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def test_the_job_record_of_hydra_is_written_by_an_accepted_start(finished_run):
    overrides = yaml.safe_load((finished_run / ".hydra" / "overrides.yaml").read_text())
    assert "seed=3" in overrides and f"hydra.run.dir={finished_run}" not in overrides
    assert yaml.safe_load((finished_run / ".hydra" / "config.yaml").read_text())["seed"] == 3
    assert "hydra" in yaml.safe_load((finished_run / ".hydra" / "hydra.yaml").read_text())
    assert "epoch 1/1" in (finished_run / "train.log").read_text()


@pytest.mark.parametrize(
    "extra, says",
    [
        (("seed=3", "recipe.lr=1e-2"), "recipe.lr: 0.002 -> 0.01"),  # a resume with another config
        (("seed=3", "recipe.lr=-1"), "recipe.lr=-1"),  # a value out of range
        (("seed=3", "model.img_size=30"), "model.img_size=30"),
    ],
)
def test_a_refused_rerun_of_a_finished_run_leaves_its_dir_byte_identical(finished_run, extra, says):
    before = _tree(finished_run)
    proc = _run(_cli(finished_run, *extra))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and says in output and "Traceback" not in output
    assert _tree(finished_run) == before


def test_a_refused_single_run_in_a_new_dir_leaves_nothing(tmp_path):
    run_dir = tmp_path / "new"
    proc = _run(_cli(run_dir, "recipe.lr=-1"))
    assert proc.returncode == 2 and "recipe.lr=-1" in proc.stdout + proc.stderr
    assert not run_dir.exists()
