import json

import pytest
import torch

from toe.cli.bench import main

# FLOPs derived from the official token schedules: (full, stage 1, stage 2, epoch-avg) as
# "linear-only / incl. attn", forward GMACs.
REFERENCE_TABLE = [
    ((1.075, 1.254), (0.598, 0.654), (0.836, 0.944), (0.836, 0.951)),
    ((4.241, 4.599), (2.334, 2.446), (3.287, 3.502), (3.287, 3.516)),
    ((16.849, 17.564), (9.219, 9.444), (13.034, 13.463), (13.034, 13.490)),
    ((4.241, 4.599), (2.334, 2.446), (3.287, 3.502), (3.001, 3.191)),
    ((1.075, 1.254), None, None, (0.704, 0.787)),
    ((1.075, 1.254), None, None, (0.603, 0.671)),
    ((4.241, 4.599), None, None, (2.777, 2.944)),
    ((4.241, 4.599), None, None, (2.375, 2.511)),
    ((4.706, 5.183), (2.096, 2.198), (3.379, 3.625), (3.394, 3.669)),
]
REFERENCE_RATIOS = [
    (1.29, 1.32),
    (1.29, 1.31),
    (1.29, 1.30),
    (1.41, 1.44),
    (1.53, 1.59),
    (1.78, 1.87),
    (1.53, 1.56),
    (1.79, 1.83),
    (1.39, 1.41),
]


def test_flops_table_reproduces_the_reference_to_three_digits(tmp_path, capsys):
    out = tmp_path / "flops.json"
    main(["--json", str(out), "flops"])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(REFERENCE_TABLE) + 1
    lvvit = rows[-1]  # the real LV-ViT-S: the stem and dense head run on all tokens, so ToE saves a smaller share
    assert round(lvvit["full_attn"], 2) == 6.55 and 1.2 < lvvit["ratio_attn"] < rows[-2]["ratio_attn"]
    for row, expected, ratios in zip(rows, REFERENCE_TABLE, REFERENCE_RATIOS):
        for key, pair in zip(("full", "stage1", "stage2", "avg"), expected):
            if pair is None:
                continue
            assert (round(row[f"{key}_linear"], 3), round(row[f"{key}_attn"], 3)) == pair, (row["schedule"], key)
        assert (round(row["ratio_linear"], 2), round(row["ratio_attn"], 2)) == ratios
    assert "DeiT-Small, Hyper split" in capsys.readouterr().out


def test_op_bench_checks_selections_against_the_reference(tmp_path, capsys):
    out = tmp_path / "op.json"
    main(
        [
            "--json",
            str(out),
            "op",
            "--dims",
            "192",
            "--batch",
            "4",
            "--repeats-k",
            "1",
            "4",
            "--share-dims",
            "192",
            "--step-batch",
            "2",
            "--warmup",
            "0",
            "--repeats",
            "2",
            "--ref-repeats",
            "1",
            "--step-repeats",
            "1",
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["k"], r["stage"], r["tokens"]) for r in rows] == [
        (1, 1, 99),
        (1, 2, 148),
        (1, 3, 197),
        (4, 1, 99),
        (4, 2, 148),
        (4, 3, 197),
    ]
    assert all(r["same_selection"] for r in rows)
    assert all(r["op_ms"] > 0 and r["ref_ms"] > 0 for r in rows)
    assert all(0 < r["op_share_of_step"] < 1 for r in rows if r["stage"] < 3)
    assert "speedup_vs_ref" in capsys.readouterr().out


def test_step_bench_reports_flop_ratios_and_the_schedule_projection(tmp_path):
    out = tmp_path / "step.json"
    main(
        [
            "--json",
            str(out),
            "step",
            "--model",
            "deit_tiny_patch16_224",
            "--img-size",
            "64",
            "--batch",
            "2",
            "--warmup",
            "0",
            "--repeats",
            "1",
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["stage"] for r in rows] == [0, 1, 2, 3, "schedule"]
    assert [r["tokens"] for r in rows[:4]] == [17, 9, 13, 17]
    assert rows[0]["flop_ratio"] == rows[3]["flop_ratio"] == 1.0 and rows[0]["speedup"] == 1.0
    assert rows[1]["flop_ratio"] > rows[2]["flop_ratio"] > 1.0
    assert [r["epochs"] for r in rows[:4]] == [0, 100, 100, 100]
    expected = 300 * rows[0]["flops_per_img_G"] / sum(r["epochs"] * r["flops_per_img_G"] for r in rows[:4])
    assert rows[4]["flop_ratio"] == pytest.approx(expected)
    assert rows[4]["efficiency"] == pytest.approx(rows[4]["speedup"] / rows[4]["flop_ratio"])


def test_e2e_bench_times_loader_step_and_loop_of_a_real_run_per_stage(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    main(["--json", str(out), "e2e", "model.kwargs.depth=2", "--batches", "2", "--warmup", "0"])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["stage"], r["tokens"]) for r in rows] == [(0, 65), (1, 33), (2, 49), (3, 65)]
    for row in rows:
        assert row["loader_img_per_s"] > 0 and row["step_img_per_s"] > 0 and row["loop_img_per_s"] > 0
        assert row["deit_loop_img_per_s"] > 0 and row["step_vs_deit_loop"] == pytest.approx(
            row["step_img_per_s"] / row["deit_loop_img_per_s"]
        )
        # the tensor pipeline's loader only indexes memory: many times faster than the step, which bounds the loop
        assert row["loader_img_per_s"] > 3 * row["step_img_per_s"] and row["bound_by"] == "step"
    assert rows[1]["flop_ratio"] > rows[2]["flop_ratio"] > rows[3]["flop_ratio"] == 1.0
    assert "bound_by" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["e2e", "recipe.batch_size=0"])
    assert refused.value.code == 2 and "recipe.batch_size=0: must be >= 1" in capsys.readouterr().err


def test_capacity_bench_times_real_jpeg_decoding_and_augmentation_and_counts_cores(tmp_path, capsys):
    import math

    from toe.bench.capacity import PUBLISHED_DEIT_S_TRAIN_IMG_PER_S
    from toe.bench.flops import deit_s_stage1_flop_ratio

    out = tmp_path / "capacity.json"
    main(["--json", str(out), "capacity", "--images", "6", "--repeats", "1", "--pipeline", "pil"])
    rows = json.loads(out.read_text())["rows"]
    assert [(row["pipeline"], row["jpeg"]) for row in rows] == [("pil", "224x224"), ("pil", "400x350")]
    small, large = rows
    per_core = small["img_per_s_per_core"]
    assert 5 < per_core < 20_000  # a real decode of 224 px JPEGs plus RandAugment: neither free nor stuck
    assert large["img_per_s_per_core"] < per_core  # larger files cost more to decode
    assert small["gpu_img_per_s"] == PUBLISHED_DEIT_S_TRAIN_IMG_PER_S
    assert small["cores_full_tokens"] == math.ceil(PUBLISHED_DEIT_S_TRAIN_IMG_PER_S / per_core)
    speedup = small["stage1_speedup"]
    assert speedup == pytest.approx(deit_s_stage1_flop_ratio()) and 1.8 < speedup < 1.95
    assert small["cores_toe_stage1"] == math.ceil(PUBLISHED_DEIT_S_TRAIN_IMG_PER_S * speedup / per_core)
    assert "RandAugment" in small["transform"] and "RandomErasing" in small["transform"]
    main(["capacity", "--images", "2", "--repeats", "1", "--gpu-img-per-s", "100", "--stage1-speedup", "2"])
    printed = capsys.readouterr().out
    assert "ToE stage 1 (2.00x)" in printed and "| given" not in printed
    assert "pil (224x224 JPEGs, decode + augmentation on one CPU core" in printed
    with pytest.raises(SystemExit):
        main(["capacity", "--gpu-img-per-s", "-5"])


def test_capacity_bench_times_dalis_share_of_the_cpu_against_pils(tmp_path):
    """DALI's modes on the same JPEGs: decoding on the CPU with the augmentation left to the GPU costs the CPU
    less than PIL's whole path; decoding on the GPU needs one to be measured."""
    pytest.importorskip("nvidia.dali", reason='NVIDIA DALI is not installed (pip install "toe[dali]")')
    out = tmp_path / "capacity.json"
    main(["--json", str(out), "capacity", "--images", "16", "--repeats", "1", "--pipeline", "pil", "dali"])
    rows = {(row["pipeline"], row["jpeg"]): row for row in json.loads(out.read_text())["rows"]}
    assert {pipeline for pipeline, _ in rows} == {"pil", "dali/cpu", "dali/cpu-decode", "dali/feed", "dali/gpu-decode"}
    for jpeg in ("224x224", "400x350"):
        pil, decode = rows["pil", jpeg]["img_per_s_per_core"], rows["dali/cpu-decode", jpeg]["img_per_s_per_core"]
        assert decode > pil and rows["dali/cpu", jpeg]["img_per_s_per_core"] > 5
        assert rows["dali/feed", jpeg]["img_per_s_per_core"] > decode  # the source alone: no decoding
        if not torch.cuda.is_available():
            assert rows["dali/gpu-decode", jpeg]["img_per_s_per_core"] is None
            assert rows["dali/gpu-decode", jpeg]["cores_toe_stage1"] is None
    assert "RandAugment rand-m9-mstd0.5-inc1" in rows["dali/cpu", "224x224"]["transform"]


def test_step_bench_has_rows_for_patchdropout_and_tome_at_toes_flops(tmp_path):
    out = tmp_path / "step.json"
    methods = ("toe", "patchdropout", "tome", "tome-noprop")
    main(
        [
            "--json",
            str(out),
            "step",
            "--model",
            "deit_tiny_patch16_224",
            "--img-size",
            "128",
            "--batch",
            "2",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--methods",
            *methods,
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["stage"]) for r in rows] == [(m, s) for m in methods for s in (0, 1, 2, 3, "schedule")]
    by_method = {m: rows[5 * i : 5 * i + 5] for i, m in enumerate(methods)}
    toe_rows = by_method["toe"]
    assert [r["tokens"] for r in toe_rows[:4]] == [65, 33, 49, 65]  # ToE: 32 and 48 of 64 patches after block 1
    for method in methods[1:]:
        for ours, theirs in zip(by_method[method][:4], toe_rows[:4]):  # matched train FLOPs per stage
            assert ours["flops_per_img_G"] == pytest.approx(theirs["flops_per_img_G"], rel=0.02)
    # PatchDropout reduces the first block too, so it keeps more tokens for the same FLOPs; ToMe merges per block
    assert by_method["patchdropout"][1]["tokens"] > toe_rows[1]["tokens"]
    assert by_method["tome"][1]["tokens"] > toe_rows[1]["tokens"]


def test_train_bench_alternates_two_whole_runs_each_as_it_trains_alone(tiny_cfg, tmp_path, capsys):
    """Each run keeps its own RNG between its epochs: ToE and its baseline, trained an epoch of each in turn, end
    exactly where `toe-train` ends them alone (same loss, same top-1), and the bench says how much faster ToE was."""
    from conftest import TINY_RUN

    from toe.train.task import train

    out = tmp_path / "train.json"
    overrides = [o for o in TINY_RUN if o != "logger=none"] + ["train.eval_every=2"]
    main(["--json", str(out), "train", *overrides])
    result = json.loads(out.read_text())["rows"]
    alone = {}
    for name, extra in (("run", []), ("against", ["method=baseline"])):
        run_dir = tmp_path / name
        train(tiny_cfg("train.eval_every=2", *extra), run_dir)
        alone[name] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in result["runs"]:
        assert row["final_loss"] == alone[row["run"]][-1]["train_loss"]
        assert row["final_top1"] == alone[row["run"]][-1]["val_top1"]
        assert row["train_flops"] == alone[row["run"]][-1]["train_flops_total"]
    assert [(s["stage"], s["tokens"], s["epochs"]) for s in result["stages"]] == [(1, 33, 1), (2, 49, 1)]
    ratios = result["ratios"]
    assert ratios["flop_ratio"] == result["runs"][1]["train_flops"] / result["runs"][0]["train_flops"] > 1.1
    assert ratios["train_speedup"] == result["runs"][1]["train_seconds"] / result["runs"][0]["train_seconds"]
    printed = capsys.readouterr().out
    assert (
        "against the same with method=baseline" in printed
        and f"train speed-up {ratios['train_speedup']:.3f}x" in printed
    )


def test_train_bench_refuses_runs_of_different_lengths_in_one_line(capsys):
    with pytest.raises(SystemExit) as refused:
        main(["train", "schedule.epochs=3", "--against", "method=baseline", "schedule.epochs=4"])
    assert refused.value.code == 2 and "train 3 and 4 epochs: give both the same" in capsys.readouterr().err


def test_step_bench_times_yolos_with_its_detection_tokens_counted(tmp_path):
    out = tmp_path / "step.json"
    args = ["--json", str(out), "step", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--batch", "2"]
    args += ["--warmup", "0", "--repeats", "1", "--det-tokens", "5", "--mid-pe", "--stage-starts", "5", "50", "100"]
    main(args)
    rows = json.loads(out.read_text())["rows"]
    # 16 patches, the class token and 5 DET tokens; ToE keeps 8 and 12 patches in stages 1 and 2
    assert [r["tokens"] for r in rows[:4]] == [22, 14, 18, 22]
    assert rows[1]["flop_ratio"] > rows[2]["flop_ratio"] > 1.0 and rows[0]["epochs"] == 5
    assert all(r["activation_mib"] > 0 for r in rows[:4]) and rows[1]["activation_saving"] > 0


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_cpu_checks_and_says_why_the_gpu_ones_skip(tmp_path):
    """scripts/gpu-check.sh as CI runs it, on CPU: the CUDA checks skip with the reason, the CPU ones (PIL and
    DALI runs on a JPEG folder, toe-bench step and capacity) pass, and the figures are written."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        ["bash", str(script), "--out", str(out), "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    results = {check["name"]: check for check in json.loads(out.read_text())["checks"]}
    cuda = torch.cuda.is_available()
    for name in ("amp-bf16-fused-adamw", "amp-fp16-scaler", "torch-compile", "ddp-nccl", "dali-gpu-decode"):
        assert results[name]["status"] == ("ok" if cuda else "skip"), name
        if not cuda:
            assert f"[skip] {name}: no CUDA device" in lines
    for name in ("pil-image-folder", "bench-step", "bench-capacity"):
        assert results[name]["status"] == "ok" and any(line.startswith(f"[ok] {name}: ") for line in lines)
    assert results["bench-step"]["figures"]["rows"][0]["stage"] == 0
    capacity = {row["pipeline"] for row in results["bench-capacity"]["figures"]["rows"]}
    assert "pil" in capacity
    assert results["pil-image-folder"]["figures"]["final_top1"] is not None
    assert lines[-2].endswith(" s") and " failed, " in lines[-2]
