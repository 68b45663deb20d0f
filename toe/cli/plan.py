"""``toe-plan``: ToE settings for a train-FLOP speed-up, and the PatchDropout and Token Merging settings of the same
train FLOPs (the planning is :mod:`toe.cost.plan`).

- ``toe-plan --speedup 1.31``                    kept rates and r_0 (the paper's ToE_r1 family) for a stage split
- ``toe-plan --speedup 1.44 --keep-rates 0.5 0.75 1.0``   a stage split for fixed kept rates
- ``toe-plan``                                   the FLOPs of given (by default the official DeiT-S) settings
- ``--budget G`` instead of ``--speedup``: average train GFLOPs per image; ``--measure`` times the plan with
  ``toe-bench step`` and puts the measured speed-up beside the predicted one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from toe.cli.args import kept_rate, non_negative_int, positive_float, positive_int, torch_device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toe-plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--model", default="deit_small_patch16_224", help="a timm model name (LV-ViT: lvvit_s)")
    parser.add_argument("--img-size", type=positive_int, default=224)
    parser.add_argument("--epochs", type=positive_int, default=300, help="the run's length")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--speedup", type=positive_float, help="the train-FLOP speed-up to reach (full / ToE)")
    target.add_argument(
        "--budget",
        type=positive_float,
        help="average train GFLOPs per image over the run (forward + backward) to reach",
    )
    parser.add_argument(
        "--stage-starts",
        type=non_negative_int,
        nargs="+",
        help="epochs at which ToE's stages start (default: 0, 1/3 and 2/3 of --epochs)",
    )
    parser.add_argument(
        "--keep-rates",
        type=kept_rate,
        nargs="+",
        help="kept rate per stage (with a target: plan the stage split for them)",
    )
    parser.add_argument("--init-keep-rate", type=kept_rate, help="r_0 (default: half the first kept rate)")
    parser.add_argument("--k", type=positive_int, default=2, help="expansion sub-steps per stage")
    parser.add_argument("--rate-step", type=kept_rate, default=0.05, help="grid of the planned first kept rate")
    parser.add_argument(
        "--linear-only",
        action="store_true",
        help="count linear layers only (thop's convention), not the attention matmuls",
    )
    parser.add_argument("--measure", action="store_true", help="time the plan with toe-bench step")
    parser.add_argument("--device", type=torch_device, default=None, help="for --measure (default: cuda if any)")
    parser.add_argument("--batch", type=positive_int, default=None, help="for --measure (default: 16 CPU, 128 GPU)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="for --measure")
    parser.add_argument("--repeats", type=positive_int, default=3, help="for --measure")
    parser.add_argument("--json", type=Path, help="also write the plan as JSON here")
    return parser


def _shape(parser: argparse.ArgumentParser, args: argparse.Namespace):
    import timm

    import toe.models  # noqa: F401 - registers LV-ViT with timm
    from toe.cost.flops import ViTShape
    from toe.hosts import check_host

    try:
        model = timm.create_model(args.model, img_size=args.img_size)
    except (RuntimeError, TypeError, AssertionError) as err:  # an unknown model, or a size its patch does not divide
        parser.error(f"--model {args.model} --img-size {args.img_size}: {str(err).splitlines()[0]}")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if isinstance(patch, int) and args.img_size % patch:
        parser.error(f"--img-size {args.img_size}: the patch size {patch} of {args.model} does not divide it")
    try:
        check_host(model, "toe-plan")  # XCiT: planned tokens its blocks could not take
        return ViTShape.from_model(model)
    except TypeError as err:
        parser.error(f"--model {args.model}: {err}")
    except AttributeError:
        parser.error(
            f"--model {args.model}: not a vision transformer with blocks (toe.cost.flops reads blocks, "
            "patch_embed and embed_dim)"
        )


TARGET_TOLERANCE = 0.03  # a planned speed-up further than this share from its target is not the target


def _default_starts(epochs: int, stages: int) -> List[int]:
    return [round(i * epochs / stages) for i in range(stages)]


def plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Dict[str, Any]:
    from toe.cost.plan import (
        match_stages,
        plan_keep_rates,
        plan_stage_split,
        rates_from_first,
        stage_epochs,
        toe_flop_ratio,
    )
    from toe.ops.schedule import ExpansionSchedule

    shape = _shape(parser, args)
    attention = not args.linear_only
    full = shape.train_macs_blocks(shape.full_block_tokens(), attention)
    target = args.speedup if args.speedup is not None else (full / (args.budget * 1e9) if args.budget else None)
    if target is not None and not 1.0 < target < float("inf"):
        given = f"--speedup {args.speedup:g}" if args.speedup is not None else f"--budget {args.budget:g}"
        parser.error(
            f"{given}: a train-FLOP speed-up of {target:g}x cannot be planned (ToE removes work, so it is "
            f"above 1 and finite; full tokens cost {full / 1e9:.3g} GFLOPs per image)"
        )
    if target is not None and args.keep_rates and args.stage_starts:
        parser.error("--keep-rates and --stage-starts are both given: with a target, toe-plan plans one of them")
    try:
        if target is not None and args.keep_rates:
            r0 = args.init_keep_rate or round(args.keep_rates[0] / 2, 6)
            schedule, _ = plan_stage_split(shape, args.keep_rates, r0, args.epochs, target, args.k, attention)
            mode = f"the stage split for kept rates {args.keep_rates}"
        elif target is not None:
            starts = args.stage_starts or _default_starts(args.epochs, 3)
            schedule, _ = plan_keep_rates(shape, starts, args.epochs, target, args.rate_step, args.k, attention)
            mode = f"kept rates (r_0 = r_1 / 2, rising evenly to 1.0) for the split {list(starts)}"
        else:
            rates = args.keep_rates or [0.5, 0.75, 1.0]
            r0 = args.init_keep_rate or rates_from_first(rates[0], len(rates))[0]
            starts = args.stage_starts or _default_starts(args.epochs, len(rates))
            schedule = ExpansionSchedule(tuple(starts), tuple(rates), r0, repeats=args.k)
            mode = "the given settings"
    except ValueError as err:
        hint = (
            f" (the stage split of {args.epochs} epoch(s): give more --epochs or --stage-starts)"
            if "stage_starts" in str(err)
            else ""
        )
        parser.error(f"{err}{hint}")
    if target is not None:
        reached = toe_flop_ratio(shape, schedule, args.epochs, attention)
        if abs(reached - target) > TARGET_TOLERANCE * target:
            parser.error(
                f"a train-FLOP speed-up of {target:.3g}x cannot be reached with {mode}: the nearest plan "
                f"gives {reached:.3g}x (change the split, the kept rates or the epochs)"
            )
    if schedule.stage_starts[-1] >= args.epochs:
        parser.error(
            f"--stage-starts {list(schedule.stage_starts)}: the last stage starts after --epochs {args.epochs}"
        )
    spent = stage_epochs(schedule.stage_starts, args.epochs)
    matches = match_stages(shape, schedule, attention)
    stages = [
        {
            "stage": m.stage,
            "start": start,
            "epochs": e,
            "keep_rate": rate,
            "tokens_after_first_block": m.toe_tokens,
            "train_gflops_per_img": m.toe_macs / 1e9,
            "flop_ratio": full / m.toe_macs,
            "patchdropout_keep_rate": m.kept_rate,
            "patchdropout_gflops": m.dropout_macs / 1e9,
            "tome_r": m.merge_r,
            "tome_gflops": m.merge_macs / 1e9,
        }
        for m, start, e, rate in zip(matches, schedule.stage_starts, spent, schedule.keep_rates)
    ]
    return {
        "model": args.model,
        "img_size": args.img_size,
        "epochs": args.epochs,
        "attention": attention,
        "target": target,
        "mode": mode,
        "num_patches": shape.num_patches,
        "depth": shape.depth,
        "full_train_gflops_per_img": full / 1e9,
        "init_keep_rate": schedule.init_keep_rate,
        "keep_rates": list(schedule.keep_rates),
        "stage_starts": list(schedule.stage_starts),
        "repeats": schedule.repeats,
        "flop_ratio": toe_flop_ratio(shape, schedule, args.epochs, attention),
        "stages": stages,
    }


def _list(values) -> str:
    return "[" + ",".join(f"{v:g}" for v in values) + "]"


def report(result: Dict[str, Any]) -> str:
    import pandas as pd

    flops = "incl. attention" if result["attention"] else "linear layers only"
    lines = [
        f"# toe-plan: {result['model']} at {result['img_size']} px ({result['num_patches']} patches, depth "
        f"{result['depth']}), {result['epochs']} epochs; train FLOPs {flops}, "
        f"{result['full_train_gflops_per_img']:.3g} GFLOPs per image at full tokens"
    ]
    if result["target"] is not None:
        lines.append(f"target: {result['target']:.3f}x -> {result['mode']}")
    stages = pd.DataFrame(result["stages"])
    lines += [
        "",
        f"ToE: r_0 {result['init_keep_rate']:g}, k {result['repeats']}; predicted train-FLOP speed-up "
        f"{result['flop_ratio']:.3f}x",
        "",
    ]
    lines.append(
        stages[
            ["stage", "start", "epochs", "keep_rate", "tokens_after_first_block", "train_gflops_per_img", "flop_ratio"]
        ].to_markdown(index=False, floatfmt=".4g")
    )
    for method in ("patchdropout", "tome"):
        stages[f"{method}_vs_toe"] = [
            f"{v:+.2%}" for v in stages[f"{method}_gflops"] / stages["train_gflops_per_img"] - 1
        ]
    lines += ["", "The same train FLOPs per stage with the other methods (vs_toe: their FLOPs against ToE's):", ""]
    lines.append(
        stages[
            ["stage", "train_gflops_per_img", "patchdropout_keep_rate", "patchdropout_vs_toe", "tome_r", "tome_vs_toe"]
        ].to_markdown(index=False, floatfmt=".4g")
    )
    starts, epochs = _list(result["stage_starts"]), result["epochs"]
    common = f"'schedule.stage_starts={starts}' schedule.length={epochs} schedule.epochs={epochs}"
    lines += [
        "",
        "toe-train overrides:",
        f"  ToE:          method=toe toe.init_keep_rate={result['init_keep_rate']:g} "
        f"'toe.keep_rates={_list(result['keep_rates'])}' toe.repeats={result['repeats']} {common}",
        f"  PatchDropout: method=patchdropout "
        f"'patch_dropout.keep_rates={_list(s['patchdropout_keep_rate'] for s in result['stages'])}' {common}",
        f"  ToMe:         method=tome 'tome.r={_list(s['tome_r'] for s in result['stages'])}' {common}",
        "  (PatchDropout and ToMe left at null match the toe: node's FLOPs themselves)",
    ]
    return "\n".join(lines)


def measure(args: argparse.Namespace, result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Predicted and measured speed-up per stage, from ``toe-bench step`` on the plan."""
    import torch

    from toe.bench.step import StepSettings, bench_step

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = StepSettings(
        model=args.model,
        img_size=args.img_size,
        batch=args.batch or (128 if device.type == "cuda" else 16),
        keep_rates=result["keep_rates"],
        init_keep_rate=result["init_keep_rate"],
        stage_starts=result["stage_starts"],
        epochs=args.epochs,
        k=result["repeats"],
        warmup=args.warmup,
        repeats=args.repeats,
        amp=device.type == "cuda",
        compile=False,
    )
    return bench_step(settings, device)


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: the folder {args.json.parent} does not exist")
    result = plan(parser, args)
    print(report(result))
    if args.measure:
        from toe.bench.timing import markdown

        rows = measure(args, result)
        result["measured"] = rows
        print(
            "\nPredicted (flop_ratio) and measured (speedup) per stage, toe-bench step, batch "
            f"{args.batch or 'default'}; 'schedule' projects the run:\n"
        )
        print(markdown(rows, ["method", "stage", "tokens", "img_per_s", "flop_ratio", "speedup", "efficiency"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
