"""A wheel, installed into a new environment, works from an empty directory: the configs travel inside it."""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A virtual environment with toe installed from a freshly built wheel (not editable). The heavy dependencies
    (torch, timm, ...) come from this interpreter's site-packages, so the test builds and installs only toe."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy, so that no build/ folder of the checkout (stale or not) goes into it or is left behind.
    source = root / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "runs", "multirun", ".venv*"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((root / "dist").glob("toe-*.whl"))
    venv.create(root / "env", system_site_packages=True, with_pip=False)
    python = root / "env" / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    empty = root / "empty"
    empty.mkdir()
    return root / "env" / "bin", empty


def _run(env, *command, timeout=600):
    bin_dir, cwd = env
    environ = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    environ.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(bin_dir / command[0]), *command[1:]], cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_the_wheel_carries_its_configs_and_runs_from_an_empty_directory(wheel_env):
    bin_dir, empty = wheel_env
    where = _run(wheel_env, "python", "-c", "import toe, toe.conf, toe.analysis; print(toe.__file__)")
    assert where.returncode == 0 and str(bin_dir.parent) in where.stdout, where.stdout + where.stderr
    # no top-level package of a generic name: analysis/ is toe.analysis in the wheel
    generic = _run(wheel_env, "python", "-c", "import importlib.util as u; print(u.find_spec('analysis'))")
    assert generic.stdout.strip() == "None", generic.stdout + generic.stderr

    run = _run(wheel_env, "toe-train", "logger=none", "schedule.epochs=3", "model.kwargs.depth=2", "hydra.run.dir=run")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (empty / "run" / "summary.json").exists() and (empty / "run" / "config.yaml").exists()

    sweep = _run(wheel_env, "toe-train", "experiments=ablation_merge", "smoke=on", "hydra.sweep.dir=sweep")
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    status = _run(wheel_env, "toe-sweep", "status", "sweep")
    assert status.returncode == 0 and "2 completed" in status.stdout, status.stdout + status.stderr

    report = _run(wheel_env, "toe-report", "sweep", "-o", "report")
    assert report.returncode == 0 and (empty / "report" / "report.md").exists(), report.stderr[-2000:]
    flops = _run(wheel_env, "toe-bench", "flops")
    assert flops.returncode == 0 and "DeiT-Small, Hyper split" in flops.stdout, flops.stderr[-2000:]
    # the Optuna sweeper is found as a Hydra plugin of the wheel; toe-plan and toe-vis run from it too
    search = _run(
        wheel_env,
        "toe-train",
        "hparams_search=toe_budget",
        "smoke=on",
        "hydra.sweeper.smoke_trials=1",
        "hydra.sweep.dir=search",
    )
    assert search.returncode == 0 and (empty / "search" / "optuna.db").exists(), search.stderr[-2000:]
    plan = _run(wheel_env, "toe-plan", "--speedup", "1.31")
    assert plan.returncode == 0 and "method=tome" in plan.stdout, plan.stderr[-2000:]
    vis = _run(wheel_env, "toe-vis", "run", "-n", "1")
    assert vis.returncode == 0 and (empty / "run" / "token_vis.png").exists(), vis.stderr[-2000:]
    refused = _run(wheel_env, "toe-train", "recipe.lr=-1", "hydra.run.dir=bad")
    assert refused.returncode == 2 and "recipe.lr=-1.0: must be > 0" in refused.stdout + refused.stderr
    assert not (empty / "multirun").exists() and not (empty / "outputs").exists()


def test_every_config_group_and_python_package_is_a_package_of_the_wheel():
    import tomllib

    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    groups = {
        "toe." + ".".join(d.relative_to(ROOT).parts)
        for d in [ROOT / "conf", *(ROOT / "conf").rglob("*")]
        if d.is_dir() and "__pycache__" not in d.parts and "local" not in d.parts
    }
    modules = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("toe", "hydra_plugins")
        for p in (ROOT / top).rglob("__init__.py")
    } | {"toe.analysis"}  # analysis/ installs as toe.analysis (pyproject's package-dir)
    assert groups | modules <= packages, f"add to pyproject.toml's packages: {sorted((groups | modules) - packages)}"
