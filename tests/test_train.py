import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose_cfg, toe_train_cli, write_image_folder

from toe.config.schema import ConfigError
from toe.config.stages import build_expansion_schedule as build_schedule
from toe.cost.flops import ViTShape
from toe.data.datasets import DataRootError
from toe.train.record import METRIC_FIELDS, SUMMARY_FIELDS
from toe.train.task import train


def _metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_loop_counts_the_seconds_it_waits_for_its_batches():
    """Waited (the training loop's view of its loader): a DataLoader whose items take 20 ms each to make is waited
    for that long, with one worker as with none; the time the loop spends on a batch is not counted."""
    from toe.train.step import Waited

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            time.sleep(0.02)
            return torch.tensor(index)

    for workers in (0, 1):
        waited = Waited(torch.utils.data.DataLoader(Slow(), batch_size=2, num_workers=workers))
        seen = []
        for batch in waited:
            time.sleep(0.05)  # the step: not waiting
            seen += batch.tolist()
        assert seen == list(range(10)) and len(waited) == 5
        if workers == 0:  # ten items of 20 ms waited for, five steps of 50 ms not
            assert 0.2 <= waited.seconds < 0.4
        else:  # the worker makes batches while the loop steps, but the first one is waited for whole
            assert 0.04 <= waited.seconds < 2.0


def test_a_cuda_run_that_waits_for_a_fifth_of_an_epoch_says_it_is_input_bound(caplog):
    """The warning's threshold and advice (a CUDA run cannot be made here: the run is its device, pipeline and
    loader, a real DataLoader)."""
    import logging
    from types import SimpleNamespace

    from toe.train.record import EpochRow
    from toe.train.task import _warn_input_bound

    loader = torch.utils.data.DataLoader(list(range(4)), num_workers=0)
    run = SimpleNamespace(device=torch.device("cuda"), pipeline="pil", train_loader=loader)
    busy = EpochRow(epoch=3, epoch_seconds=10.0, data_wait_seconds=1.5)
    starved = EpochRow(epoch=3, epoch_seconds=10.0, data_wait_seconds=4.0)
    with caplog.at_level(logging.WARNING):
        assert not _warn_input_bound(busy, run)
        assert not _warn_input_bound(starved, SimpleNamespace(**{**vars(run), "device": torch.device("cpu")}))
        assert caplog.text == ""
        assert _warn_input_bound(starved, run)
    assert "epoch 4 waited for its training batches 40% of its 10.0 s (train.pipeline=pil, 0 loader" in caplog.text
    assert "input-bound" in caplog.text and "train.pipeline=dali" in caplog.text


def test_two_epoch_digits_run_writes_a_complete_record(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    summary = train(cfg, tmp_path)
    rows = _metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(set(r) == set(METRIC_FIELDS) for r in rows)
    assert [r["stage"] for r in rows] == [1, 2]
    assert [r["tokens_after_first_block"] for r in rows] == [1 + 32, 1 + 48]  # 64 patches, r = 0.5 / 0.75
    shape = ViTShape(64, 2, 256, 64, 1, 3 * 4 * 4 * 64, 10)
    assert rows[0]["train_flops_total"] == pytest.approx(rows[0]["images_seen"] * 3 * shape.forward_macs(32))
    assert rows[1]["train_flops_total"] > rows[0]["train_flops_total"]
    assert rows[1]["images_seen"] == 2 * rows[0]["images_seen"] == 2 * (1437 // 64) * 64
    for r in rows:
        assert 0.0 <= r["val_top1"] <= r["val_top5"] <= 1.0 and 0.0 <= r["ema_top1"] <= 1.0
        assert r["train_loss"] > 0 and r["train_img_per_s"] > 0 and r["epoch_seconds"] > 0 and r["lr"] > 0
        assert 0 < r["data_wait_seconds"] < r["epoch_seconds"]  # the loop's wait for its batches is a part of it
    # the loss falls; two epochs (one of them warm-up) are too few for a val threshold that holds over seeds and torch
    # versions (0.14-0.28 measured): tests/test_augment.py checks that five epochs learn
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert rows[1]["train_seconds_total"] == pytest.approx(rows[0]["epoch_seconds"] + rows[1]["epoch_seconds"])
    # activations saved for backward in a step: more in the second stage's 48 kept patches than the first's 32;
    # no CUDA figure on CPU
    assert 0 < rows[0]["activation_mib"] < rows[1]["activation_mib"]
    assert rows[0]["cuda_peak_mib"] is None and rows[1]["cuda_peak_mib"] is None

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary.to_dict() and set(SUMMARY_FIELDS) == set(on_disk)
    # where the command's time went: start-up, training, evaluation, checkpoints and the rest add up to its wall time
    parts = ("startup_seconds", "total_train_seconds", "total_eval_seconds", "total_checkpoint_seconds")
    assert all(on_disk[part] > 0 for part in parts) and on_disk["other_seconds"] >= 0
    assert sum(on_disk[part] for part in parts) + on_disk["other_seconds"] == pytest.approx(on_disk["wall_seconds"])
    assert on_disk["total_checkpoint_seconds"] == pytest.approx(sum(r["checkpoint_seconds"] for r in rows))
    waits = sum(r["data_wait_seconds"] for r in rows)
    assert on_disk["data_wait_share"] == pytest.approx(waits / on_disk["total_train_seconds"])
    assert 0 < on_disk["data_wait_share"] < 1
    assert on_disk["status"] == "completed" and on_disk["epochs"] == 2 and on_disk["method"] == "toe"
    assert on_disk["final_top1"] == rows[-1]["val_top1"] and on_disk["best_top1"] == max(r["val_top1"] for r in rows)
    assert on_disk["train_flops_per_image"] < 3 * shape.forward_macs(64)
    assert on_disk["peak_activation_mib"] == rows[1]["activation_mib"] and on_disk["peak_cuda_mib"] is None
    assert on_disk["mean_activation_mib"] == pytest.approx((rows[0]["activation_mib"] + rows[1]["activation_mib"]) / 2)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["toe"]["keep_rates"] == [0.5, 0.75, 1.0] and config["schedule"]["epochs"] == 2
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2 and ckpt["config"]["method_name"] == "toe"
    assert ckpt["format"] == 2 and set(ckpt["model_ema"]) == {f"module.{key}" for key in ckpt["model"]}


def test_baseline_sees_all_tokens_and_costs_more_flops(tiny_cfg, tmp_path):
    toe_summary = train(tiny_cfg(), tmp_path / "toe")
    base_summary = train(tiny_cfg("method=baseline"), tmp_path / "base")
    assert [r["tokens_after_first_block"] for r in _metrics(tmp_path / "base")] == [65, 65]
    assert [r["stage"] for r in _metrics(tmp_path / "base")] == [0, 0]
    assert base_summary.train_flops_per_image > toe_summary.train_flops_per_image
    assert base_summary.peak_activation_mib > toe_summary.peak_activation_mib


def test_image_folder_data_trains_and_infers_the_class_count(tiny_cfg, tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    cfg = tiny_cfg("data=imagefolder", f"data.root={root}", "recipe.batch_size=4", "schedule.epochs=1")
    summary = train(cfg, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert ckpt["model"]["head.weight"].shape[0] == 2
    assert summary.images_seen == 12 and 0.0 <= summary.final_top1 <= 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["schedule.length=300", "schedule.stage_starts=[0,100,200]"],
            r"gives start epochs \[0, 1, 1\] over schedule.epochs=2",
        ),
        (["toe.keep_rates=[0.5,0.4,1.0]"], "keep_rates must be strictly increasing"),
        (["toe.init_keep_rate=0.6"], "below the first keep rate"),
    ],
)
def test_a_config_that_cannot_work_is_refused_before_anything_is_written(tiny_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_cfg(*overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["data=imagefolder", "data.root=/nonexistent/folder"], DataRootError, "does not exist"),
        (["data=cifar10", "data.root=/tmp"], DataRootError, "cifar-10-batches-py"),
        (["data=imagenet", "data.root=/tmp"], DataRootError, "no train/ folder"),
        (["recipe.batch_size=4096"], ConfigError, "larger than the training set"),
    ],
)
def test_data_that_does_not_fit_fails_the_run_with_a_summary(tiny_cfg, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        train(tiny_cfg(*overrides), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs"] == 0
    assert summary["error"].startswith(error.__name__)


def test_cli_reports_a_missing_data_root_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "toe.cli.train", "data=imagefolder", "logger=none", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "missing value for data.root" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


def test_official_and_hyper_schedules_give_the_papers_stage_epochs():
    official = build_schedule(compose_cfg(["schedule=official"]))
    hyper = build_schedule(compose_cfg(["schedule=hyper"]))
    short = build_schedule(compose_cfg(["schedule=short"]))
    assert official.stage_starts == (0, 100, 200)
    assert short.stage_starts == (0, 10, 20)
    assert hyper.stage_starts == (0, 130, 260)
    assert build_schedule(compose_cfg(["schedule=hyper", "schedule.epochs=3"])).stage_starts == (0, 1, 3)
    assert build_schedule(compose_cfg(["method=baseline"])) is None
    switched = build_schedule(compose_cfg(["toe.repeats=4", "toe.merge=drop", "toe.distance=manhattan"]))
    assert (switched.repeats, switched.merge, switched.distance) == (4, "drop", "manhattan")


def test_wandb_offline_run_is_written_and_a_broken_wandb_never_stops_training(tiny_cfg, tmp_path, monkeypatch):
    import wandb

    train(tiny_cfg("logger=wandb_offline", "schedule.epochs=1"), tmp_path / "offline")
    runs = list((tmp_path / "offline" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))

    def broken_init(**_):
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    summary = train(tiny_cfg("logger=wandb_offline", "schedule.epochs=1"), tmp_path / "broken")
    assert summary.status == "completed" and (tmp_path / "broken" / "metrics.jsonl").exists()


def _cli(run_dir: Path, epochs: int = 3):
    return toe_train_cli(run_dir, epochs=epochs)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics_as_an_uninterrupted_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(straight), check=True, capture_output=True, env=env, timeout=300)

    proc = subprocess.Popen(_cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoint.pth").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint.pth").exists(), "the run never reached the end of epoch 1"
    assert torch.load(killed / "checkpoint.pth", weights_only=True)["epoch"] < 3

    subprocess.run(_cli(killed), check=True, capture_output=True, env=env, timeout=300)
    a, b = _metrics(straight), _metrics(killed)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    for key in (
        "stage",
        "tokens_after_first_block",
        "train_loss",
        "val_top1",
        "val_top5",
        "ema_top1",
        "lr",
        "images_seen",
        "train_flops_total",
    ):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert "Resuming" in (killed / "train.log").read_text()
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["status"] == "completed" and len(resumed["resumed_at"]) == 1 and 1 <= resumed["resumed_at"][0] < 3
    assert json.loads((straight / "summary.json").read_text())["resumed_at"] == []


def test_schedule_min_lr_replaces_the_recipe_min_lr(tiny_cfg, tmp_path):
    train(tiny_cfg(), tmp_path / "recipe")
    train(tiny_cfg("+schedule.min_lr=5e-4"), tmp_path / "hyper")
    assert _metrics(tmp_path / "recipe")[-1]["lr"] == pytest.approx(1e-5)  # cosine ends at min_lr
    assert _metrics(tmp_path / "hyper")[-1]["lr"] == pytest.approx(5e-4)


@pytest.mark.slow
def test_two_gloo_processes_train_one_run_with_the_global_batch(tmp_path):
    """DDP on CPU: torchrun with 2 processes; recipe.batch_size stays the global batch and sets the LR."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "toe.cli.train",
        "logger=none",
        "schedule.epochs=2",
        "schedule.length=2",
        "schedule.stage_starts=[0,1,2]",
        "model.kwargs.depth=2",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = _metrics(tmp_path)
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert summary["lr"] == pytest.approx(2e-3)  # 2e-3 x 64 / 64: scaled by the global batch, not per process
    # DistributedSampler: 719 images per process, 22 batches of 32 each, two processes.
    assert [r["images_seen"] for r in rows] == [1408, 2816]
    assert [r["tokens_after_first_block"] for r in rows] == [33, 49]
    assert all(0 <= r["val_top1"] <= 1 for r in rows)
    assert summary["device_hours"] == pytest.approx(2 * summary["total_train_seconds"] / 3600)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
