"""A refused start leaves every file of an existing run as it was (Hydra's .hydra/ and the job log included), and
says why in one line; a refused single run in a new dir leaves no dir behind."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import toe_train_cli


def _cli(run_dir: Path, *extra):
    return toe_train_cli(run_dir, *extra, epochs=1, length=1)


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


@pytest.mark.parametrize("where", ["empty", "a file", "read-only"])
def test_a_run_dir_that_cannot_be_one_is_refused_in_one_line(tmp_path, where):
    if where == "empty":
        args, says = _cli(tmp_path)[:-1] + ["hydra.run.dir="], "hydra.run.dir is empty"
    elif where == "a file":
        (tmp_path / "taken").write_text("not a dir")
        args, says = _cli(tmp_path / "taken"), "File exists"
    else:
        if os.geteuid() != 0:
            pytest.skip("mounting a read-only tmpfs needs root; CI runs as root")
        (tmp_path / "ro").mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(tmp_path / "ro")]).returncode:
            pytest.skip("this machine does not allow mounting a tmpfs")
        args, says = _cli(tmp_path / "ro" / "run"), "Read-only file system"
    try:
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1")
        )
    finally:
        if where == "read-only":
            subprocess.run(["umount", "-l", str(tmp_path / "ro")], check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and says in output and "Traceback" not in output, output[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == {"empty": [], "a file": ["taken"], "read-only": ["ro"]}[where]


def _refused(main, argv, capsys):
    with pytest.raises(SystemExit) as refused:
        main(argv)
    return refused.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--speedup", "0.5"], "--speedup 0.5: a train-FLOP speed-up of 0.5x cannot be planned"),
        (["--speedup", "inf"], "inf is not a finite number"),
        (["--speedup", "100"], "a train-FLOP speed-up of 100x cannot be reached"),
        (["--budget", "1e30"], "--budget 1e+30: a train-FLOP speed-up of"),
        (["--img-size", "100"], "--img-size 100: the patch size 16 of deit_small_patch16_224 does not divide it"),
        (["--epochs", "1"], "give more --epochs or --stage-starts"),
        (["--json", "/nonexistent/folder/plan.json"], "the folder /nonexistent/folder does not exist"),
    ],
)
def test_toe_plan_refuses_what_it_cannot_plan_in_one_line(argv, says, capsys):
    from toe.cli.plan import main

    code, err = _refused(main, argv, capsys)
    assert code == 2 and says in err


def test_the_other_commands_refuse_bad_paths_and_files_in_one_line(finished_run, tmp_path, capsys):
    from toe.cli.bench import main as bench_main
    from toe.cli.label_maps import main as label_maps_main
    from toe.cli.report import main as report_main
    from toe.cli.sweep import main as sweep_main
    from toe.cli.vis import main as vis_main

    a_file = tmp_path / "a_file"
    a_file.write_text("garbage")
    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    cases = [
        (report_main, [str(finished_run), "-o", str(a_file)], "a file, not a directory"),
        (bench_main, ["flops", "--table", str(a_file)], "not a FLOP table like conf/bench/flops_table.yaml"),
        (bench_main, ["capacity", "--gpu-img-per-s", "nan"], "nan is not a finite number"),
        (label_maps_main, [str(finished_run), str(a_file)], "a file, not a directory for the label maps"),
        (label_maps_main, [str(finished_run / "nope"), str(tmp_path / "maps")], "nope does not exist"),
        (vis_main, [str(finished_run), "--images", str(tmp_path / "images")], "cannot identify image file"),
        (vis_main, ["--config", "nokey=3"], "nokey=3: Key 'nokey' not in 'RunConfig'"),
    ]
    for main, argv, says in cases:
        code, err = _refused(main, argv, capsys)
        assert code == 2 and says in err and "Traceback" not in err, (argv, err)
    assert sweep_main(["retry", str(tmp_path / "empty")]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists() and a_file.read_text() == "garbage"
