"""``toe-bench``: ToE's cost and speed-up, measured side by side in one process (the work is
:mod:`toe.bench`).

- ``toe-bench op``    the operator vs the plain loop-based reference (DeiT-T/S/B token shapes, every stage, k)
- ``toe-bench step``  train-step throughput of every ToE stage vs full tokens, next to the analytic FLOP ratio
- ``toe-bench flops`` the analytic per-image FLOPs table of the official schedules (``conf/bench/flops_table.yaml``)
- ``toe-bench e2e``   a real run's loader alone, train step alone and whole loop, per ToE stage, and which bounds it
- ``toe-bench train`` a whole run and its baseline trained in one process, an epoch of each in turn: the speed-up
- ``toe-bench capacity`` JPEG decode + DeiT augmentation img/s on one CPU core, and the cores that feed one GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

from toe.cli.args import kept_rate, non_negative_int, positive_float, positive_int, torch_device


def _parser() -> argparse.ArgumentParser:
    from toe.bench.step import DEIT, STEP_METHODS

    parser = argparse.ArgumentParser(prog="toe-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    sub = parser.add_subparsers(dest="command", required=True)
    cpu = not torch.cuda.is_available()

    op = sub.add_parser("op", help="the operator vs the loop reference")
    op.add_argument("--dims", type=int, nargs="+", default=[192, 384, 768], choices=sorted(DEIT))
    op.add_argument("--batch", type=positive_int, default=64)
    op.add_argument("--repeats-k", type=positive_int, nargs="+", default=[1, 2, 4])
    op.add_argument(
        "--share-dims",
        type=int,
        nargs="*",
        default=[384] if cpu else [192, 384, 768],
        choices=sorted(DEIT),
        help="widths whose op share of a DeiT train step is measured",
    )
    op.add_argument("--step-batch", type=positive_int, default=16 if cpu else 64)
    op.add_argument("--warmup", type=non_negative_int, default=3)
    op.add_argument("--repeats", type=positive_int, default=10)
    op.add_argument("--ref-repeats", type=positive_int, default=3)
    op.add_argument("--step-repeats", type=positive_int, default=3)
    op.add_argument("--amp", action="store_true", help="bf16 autocast for the train step (CUDA)")

    step = sub.add_parser("step", help="train-step img/s per ToE stage vs full tokens")
    step.add_argument("--model", default="deit_small_patch16_224")
    step.add_argument("--batch", type=positive_int, default=16 if cpu else 128)
    step.add_argument("--img-size", type=positive_int, default=224)
    step.add_argument("--keep-rates", type=kept_rate, nargs="+", default=[0.5, 0.75, 1.0])
    step.add_argument("--init-keep-rate", type=kept_rate, default=0.25)
    step.add_argument("--stage-starts", type=non_negative_int, nargs="+", default=[0, 100, 200])
    step.add_argument("--epochs", type=positive_int, default=300)
    step.add_argument("--k", type=positive_int, default=2)
    step.add_argument("--warmup", type=non_negative_int, default=2)
    step.add_argument("--repeats", type=positive_int, default=5)
    step.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    step.add_argument("--compile", action="store_true", help="torch.compile the model")
    step.add_argument(
        "--prompts",
        type=non_negative_int,
        default=0,
        help="visual prompt tuning: this many prompt tokens per set, the backbone frozen (default 0: no prompts)",
    )
    step.add_argument("--shallow", action="store_true", help="with --prompts: VPT-shallow (one set at the input)")
    step.add_argument(
        "--det-tokens",
        type=non_negative_int,
        default=0,
        help="YOLOS with this many detection tokens on --model as its backbone, DETR's loss, --img-size square "
        "images (YOLOS: 100; default 0: the classifier)",
    )
    step.add_argument("--mid-pe", action="store_true", help="with --det-tokens: mid position embeddings (YOLOS-S)")
    step.add_argument(
        "--methods",
        nargs="+",
        default=["toe"],
        choices=list(STEP_METHODS),
        help="token-reduction methods to time: toe, and patchdropout, tome (tome-noprop: without "
        "proportional attention) at the train FLOPs of ToE's stages",
    )

    e2e = sub.add_parser("e2e", help="a run's loader, step and whole loop per ToE stage (toe-train's config)")
    e2e.add_argument("overrides", nargs="*", help="toe-train overrides, e.g. model=deit_small recipe=deit")
    e2e.add_argument("--batches", type=positive_int, default=20, help="batches timed per measurement")
    e2e.add_argument("--warmup", type=non_negative_int, default=1, help="untimed passes before each measurement")
    e2e.add_argument(
        "--rounds", type=positive_int, default=3, help="alternations of toe's step loop and DeiT's engine loop"
    )

    train = sub.add_parser("train", help="a whole run and its baseline, epochs alternated: train speed-up and top-1")
    train.add_argument("overrides", nargs="*", help="toe-train overrides of the run, e.g. seed=1")
    train.add_argument(
        "--against",
        nargs="+",
        default=["method=baseline"],
        metavar="OVERRIDE",
        help="what the other run adds to the overrides (default: method=baseline)",
    )

    capacity = sub.add_parser("capacity", help="CPU cores to feed one GPU: decode + DeiT augmentation per core")
    capacity.add_argument(
        "--gpu-img-per-s",
        type=positive_float,
        default=None,
        help="the GPU's full-token DeiT-S training img/s (default: timm's published RTX 3090 figure, 1054)",
    )
    capacity.add_argument(
        "--stage1-speedup",
        type=positive_float,
        default=None,
        help="ToE stage 1's train speed-up (default: its analytic FLOP ratio for DeiT-S, 1.88)",
    )
    capacity.add_argument("--images", type=positive_int, default=64, help="JPEG files written and timed, per size")
    capacity.add_argument(
        "--pipeline",
        nargs="+",
        choices=("pil", "dali"),
        default=None,
        help="the pipelines timed (default: pil, and dali where it is installed)",
    )
    capacity.add_argument("--repeats", type=positive_int, default=3)

    flops = sub.add_parser("flops", help="analytic FLOPs of the official schedules")
    flops.add_argument("--table", type=Path, help="a table of rows like conf/bench/flops_table.yaml (the default)")
    return parser


def _run_reporting_config_errors(parser: argparse.ArgumentParser, work: Callable[[], Any]) -> Any:
    """``work()`` that builds toe-train runs from overrides: a config that cannot work is said in one line."""
    from toe.config.compose import config_error_message
    from toe.data.datasets import DataRootError

    try:
        return work()
    except DataRootError as err:
        parser.error(str(err).splitlines()[0])
    except Exception as err:  # noqa: BLE001 - a bad override, said as toe-train says it
        message = config_error_message(err)
        if message is None:
            raise
        parser.error(message.splitlines()[0])


def main(argv: Optional[List[str]] = None) -> int:
    from toe.bench.flops import bench_flops, default_flops_table, flops_markdown
    from toe.bench.step import OpSettings, StepSettings, bench_op, bench_step, settings_from
    from toe.bench.timing import markdown
    from toe.bench.train import bench_e2e, bench_train
    from toe.ops.schedule import ExpansionSchedule

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "step":
        try:
            ExpansionSchedule(args.stage_starts, args.keep_rates, args.init_keep_rate, repeats=args.k)
        except ValueError as err:
            parser.error(f"--stage-starts/--keep-rates/--init-keep-rate/--k: {err}")
        if args.stage_starts[-1] >= args.epochs:
            parser.error(f"--stage-starts {args.stage_starts}: the last stage starts after --epochs {args.epochs}")
    if args.command == "flops":
        args.table = args.table or default_flops_table()
        if not args.table.is_file():
            parser.error(f"--table {args.table}: no such file")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: the folder {args.json.parent} does not exist")
    device = torch.device(args.device)
    print(
        f"# toe-bench {args.command} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
        f" (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    if args.command == "op":
        rows = bench_op(settings_from(OpSettings, args), device)
        columns = ["dim", "k", "stage", "tokens", "op", "reference", "speedup_vs_ref", "same_selection"]
        columns += [c for c in ("step_ms", "op_share_of_step") if any(c in r for r in rows)]
        print("times in ms, median [min-max]")
        print(markdown(rows, columns))
    elif args.command == "step":
        try:
            rows = bench_step(settings_from(StepSettings, args), device)
        except (RuntimeError, TypeError) as err:  # timm: an unknown model, or a size its patch does not divide
            parser.error(f"--model {args.model} --img-size {args.img_size}: {str(err).splitlines()[0]}")
        vpt = f"VPT-{'shallow' if args.shallow else 'deep'} with {args.prompts} prompts, " if args.prompts else ""
        print(
            f"{args.model}, {vpt}batch {args.batch}, {args.img_size} px, amp={args.amp}, compile={args.compile}; "
            "stage 0 = full tokens; 'schedule' = time-weighted over the epochs of each stage (its activations: "
            "the largest stage's); activation_mib = saved for backward in one step"
        )
        print(
            markdown(
                rows,
                [
                    "method",
                    "stage",
                    "tokens",
                    "epochs",
                    "img_per_s",
                    "step_ms",
                    "flops_per_img_G",
                    "speedup",
                    "flop_ratio",
                    "efficiency",
                    "activation_mib",
                    "activation_saving",
                ],
            )
        )
    elif args.command == "e2e":
        rows = _run_reporting_config_errors(
            parser, lambda: bench_e2e(args.overrides, args.batches, args.warmup, args.rounds)
        )
        print(
            f"toe-train {' '.join(args.overrides) or '(its defaults)'}: {args.batches} batches per figure, img/s; "
            "stage 0 = full tokens; bound_by = the slower of loader and step; loop_vs_bound = how close the loop "
            "gets to it; step_vs_deit_loop = toe's step loop against DeiT's engine loop (the official trainer's) on "
            f"the same batches, model and optimizer, alternated {args.rounds} times (above 1: toe's is faster)"
        )
        print(
            markdown(
                rows,
                [
                    "stage",
                    "tokens",
                    "loader_img_per_s",
                    "step_img_per_s",
                    "deit_loop_img_per_s",
                    "step_vs_deit_loop",
                    "loop_img_per_s",
                    "bound_by",
                    "loop_vs_bound",
                    "step_speedup",
                    "loop_speedup",
                    "flop_ratio",
                ],
            )
        )
    elif args.command == "train":
        rows = _run_reporting_config_errors(parser, lambda: bench_train(args.overrides, args.against, progress=True))
        print(
            f"toe-train {' '.join(args.overrides) or '(its defaults)'} against the same with "
            f"{' '.join(args.against)}, trained whole in this process, an epoch of each in turn (seconds: "
            "summed over epochs)"
        )
        detection = any(run.get("final_box_ap") is not None for run in rows["runs"])
        scores = ["final_box_ap", "final_box_ap50"] if detection else ["final_top1", "final_ema_top1"]
        print(
            markdown(
                rows["runs"],
                ["run", "overrides", "train_seconds", "eval_seconds", *scores, "train_flops", "mean_activation_mib"],
            )
        )
        print("\nper stage of the run (the other run's seconds over the same epochs):")
        print(
            markdown(
                rows["stages"],
                [
                    "stage",
                    "tokens",
                    "epochs",
                    "seconds",
                    "against_seconds",
                    "speedup",
                    "flop_ratio",
                    "activation_mib",
                    "against_activation_mib",
                    "activation_saving",
                ],
            )
        )
        ratios = rows["ratios"]
        print(
            f"\ntrain speed-up {ratios['train_speedup']:.3f}x, train + eval {ratios['train_and_eval_speedup']:.3f}x,"
            f" train FLOP ratio {ratios['flop_ratio']:.3f}, activation memory per step (mean over epochs) "
            f"{100 * ratios['activation_saving']:.0f} % less"
        )
    elif args.command == "capacity":
        from toe.bench.capacity import PUBLISHED_DEIT_S_TRAIN_IMG_PER_S, bench_capacity
        from toe.bench.flops import deit_s_stage1_flop_ratio
        from toe.data.dali import dali_missing

        gpu = args.gpu_img_per_s or PUBLISHED_DEIT_S_TRAIN_IMG_PER_S
        if gpu <= 0 or (args.stage1_speedup is not None and args.stage1_speedup <= 0):
            parser.error("--gpu-img-per-s and --stage1-speedup must be positive")
        pipelines = args.pipeline or (["pil"] + ([] if dali_missing() else ["dali"]))
        if "dali" in pipelines and dali_missing():
            parser.error(f"--pipeline dali: {dali_missing()}")
        speedup = args.stage1_speedup or deit_s_stage1_flop_ratio()
        rows = bench_capacity(args.images, gpu, speedup, args.repeats, pipelines=pipelines)
        source = (
            "given"
            if args.gpu_img_per_s
            else "timm's published DeiT-S training benchmark, RTX 3090, AMP "
            "(results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv)"
        )
        print(
            f"the DeiT recipe's train augmentation (RandomResizedCrop 224, flip, RandAugment rand-m9-mstd0.5-inc1, "
            f"random erasing 0.25) of {args.images} JPEG files per size: the CPU time each pipeline leaves on the "
            "CPU, per image\n"
        )
        for row in rows:
            figure = (
                f"{row['img_per_s_per_core']:.0f} img/s per CPU core"
                if row["img_per_s_per_core"]
                else "needs a GPU to measure"
            )
            print(f"{row['pipeline']} ({row['jpeg']} JPEGs, {row['where']}): {figure}")
        print()
        print(
            markdown(
                [
                    dict(
                        row,
                        full_tokens=f"{gpu:.0f} img/s: {row['cores_full_tokens'] or '-'} cores",
                        toe_stage1=f"{row['stage1_img_per_s']:.0f} img/s: {row['cores_toe_stage1'] or '-'} cores",
                    )
                    for row in rows
                ],
                ["pipeline", "jpeg", "img_per_s_per_core", "full_tokens", "toe_stage1"],
                floatfmt=".0f",
            )
        )
        print(f"\nCores to feed DeiT-S with full tokens and in ToE stage 1 ({speedup:.2f}x); GPU img/s: {source}.")
    else:
        try:
            rows = bench_flops(args.table)
        except (ValueError, TypeError, KeyError) as err:  # a table that is not rows of shapes and schedules
            parser.error(f"--table {args.table}: not a FLOP table like conf/bench/flops_table.yaml ({err})")
        print(flops_markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"command": args.command, "device": str(device), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
