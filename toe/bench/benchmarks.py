"""``toe-bench``: ToE's cost and speed-up, measured side by side in one process.

- ``toe-bench op``    the operator vs the plain loop-based reference (DeiT-T/S/B token shapes, every stage, k)
- ``toe-bench step``  train-step throughput of every ToE stage vs full tokens, next to the analytic FLOP ratio
- ``toe-bench flops`` the analytic per-image FLOPs table of the official schedules (``conf/bench/flops_table.yaml``)

Timings: warm-up calls, then ``--repeats`` timed calls, each closed by a device synchronisation; the median and
the min-max spread are reported. A hand-written loop rather than ``torch.utils.benchmark`` because the reference
is slow enough that a fixed, small repeat count matters more than auto-ranging.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import pandas as pd
import torch
import yaml
from tqdm import tqdm

from toe.cost.flops import ViTShape, schedule_average_macs
from toe.hosts import expansion_op, reduction_op
from toe.ops.expansion import expand_tokens
from toe.ops.methods import REDUCER_METHOD
from toe.ops.reference import reference_expand_tokens
from toe.ops.schedule import ExpansionSchedule
from toe.ops.tokens import BlockTokens, tokens_after_first_block

DEIT = {192: "deit_tiny_patch16_224", 384: "deit_small_patch16_224", 768: "deit_base_patch16_224"}


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Dict[str, float]:
    """Median, min and max seconds of ``fn`` over ``repeats`` timed calls after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def measure_interleaved(
    fns: List[Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> List[Dict[str, float]]:
    """Like :func:`measure` for several functions timed in turn (A B C A B C ...), so that a machine whose speed
    drifts during the run slows all of them alike and their ratios stay fair."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync()
            bucket.append(time.perf_counter() - start)
    return [{"median": statistics.median(t), "min": min(t), "max": max(t)} for t in times]


def _spread(t: Dict[str, float], scale: float = 1e3) -> str:
    return f"{t['median'] * scale:.3g} [{t['min'] * scale:.3g}-{t['max'] * scale:.3g}]"


def deit_schedule(repeats: int = 2) -> ExpansionSchedule:
    return ExpansionSchedule([0, 100, 200], [0.5, 0.75, 1.0], 0.25, repeats=repeats)


STEP_METHODS = (*REDUCER_METHOD.values(), "tome-noprop")  # ToMe without size-weighted attention too


class StepBench:
    """One optimiser step (forward, backward, AdamW) of a timm model at a fixed batch, per stage of its token
    reduction: ToE (``method="toe"``), or PatchDropout (``"patchdropout"``) or Token Merging (``"tome"``; without
    proportional attention ``"tome-noprop"``) at the train FLOPs of ToE's stages
    (:func:`toe.cost.plan.match_stages`)."""

    def __init__(
        self,
        model_name: str,
        batch: int,
        img_size: int,
        schedule: ExpansionSchedule,
        device: torch.device,
        amp: bool,
        compile_model: bool,
        method: str = "toe",
    ):
        import timm

        from toe.hosts import patch_method

        if method not in STEP_METHODS:
            raise ValueError(f"unknown method {method!r}: expected one of {', '.join(STEP_METHODS)}")
        model = patch_method(
            timm.create_model(model_name, img_size=img_size),
            method.removesuffix("-noprop"),
            schedule,
            prop_attn=method != "tome-noprop",
        )
        self.model = model.to(device).train()
        self.method = method
        self.shape = ViTShape.from_model(self.model)
        self.net = torch.compile(self.model) if compile_model else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.inputs = torch.randn(batch, 3, img_size, img_size, device=device)
        self.targets = torch.randint(0, self.shape.num_classes, (batch,), device=device)
        self.device, self.amp = device, amp and device.type == "cuda"

    def set_stage(self, stage: int) -> BlockTokens:
        """Put the op in ``stage``; returns the (attention, MLP) tokens of each block."""
        op = reduction_op(self.model)
        op.stage = stage
        return op.block_tokens(self.shape.num_patches, self.shape.depth)

    def train_macs(self, tokens: BlockTokens) -> float:
        return self.shape.train_macs_blocks(tokens)

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = torch.nn.functional.cross_entropy(self.net(self.inputs), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


@dataclass(frozen=True)
class OpSettings:
    """What ``toe-bench op`` measures: the operator at DeiT widths ``dims`` on ``batch`` x 197 tokens for each ``k`` in
    ``repeats_k``, against the loop reference; at ``share_dims`` also its share of a DeiT train step of
    ``step_batch`` images."""

    dims: Sequence[int]
    share_dims: Sequence[int]
    batch: int
    step_batch: int
    repeats_k: Sequence[int]
    warmup: int
    repeats: int
    ref_repeats: int
    step_repeats: int
    amp: bool


@dataclass(frozen=True)
class StepSettings:
    """What ``toe-bench step`` measures: one train step of ``model`` per stage of the ToE schedule (stage starts,
    kept rates, r_0, k) and per method, over an ``epochs``-epoch run."""

    model: str
    img_size: int
    batch: int
    stage_starts: Sequence[int]
    keep_rates: Sequence[float]
    init_keep_rate: float
    k: int
    epochs: int
    warmup: int
    repeats: int
    amp: bool
    compile: bool
    methods: Sequence[str] = tuple(REDUCER_METHOD.values())


def settings_from(kind: type, values: Mapping[str, Any] | Any):
    """``kind`` (:class:`OpSettings`, :class:`StepSettings`) from a mapping or an object with its fields as keys or
    attributes (the parsed command line): other keys are ignored."""
    get = values.get if isinstance(values, Mapping) else lambda name, default=None: getattr(values, name, default)
    return kind(**{f.name: get(f.name) for f in fields(kind) if get(f.name) is not None})


def bench_op(args: OpSettings, device: torch.device) -> List[Dict[str, Any]]:
    rows = []
    for dim in args.dims:
        step_bench = None
        if dim in args.share_dims:
            step_bench = StepBench(DEIT[dim], args.step_batch, 224, deit_schedule(), device, args.amp, False)
        for k in args.repeats_k:
            sched = deit_schedule(k)
            x = torch.randn(args.batch, 197, dim, device=device, requires_grad=True)
            for stage in range(1, sched.num_stages + 1):
                op_t = measure(lambda x=x, s=sched, t=stage: expand_tokens(x, s, t), device, args.warmup, args.repeats)
                ref_t = measure(
                    lambda x=x, s=sched, t=stage: reference_expand_tokens(x, s, t), device, 1, args.ref_repeats
                )
                same = torch.equal(expand_tokens(x, sched, stage)[1].cpu(), reference_expand_tokens(x, sched, stage)[1])
                row = {
                    "dim": dim,
                    "k": k,
                    "stage": stage,
                    "tokens": 1 + sched.kept_tokens(196, stage),
                    "op_ms": op_t["median"] * 1e3,
                    "op_ms_min": op_t["min"] * 1e3,
                    "op_ms_max": op_t["max"] * 1e3,
                    "ref_ms": ref_t["median"] * 1e3,
                    "speedup_vs_ref": ref_t["median"] / op_t["median"],
                    "same_selection": same,
                    "op": _spread(op_t),
                    "reference": _spread(ref_t),
                }
                if step_bench is not None and not sched.is_identity(stage):
                    xs = torch.randn(args.step_batch, 197, dim, device=device, requires_grad=True)
                    op_s = measure(
                        lambda x=xs, s=sched, t=stage: expand_tokens(x, s, t), device, args.warmup, args.repeats
                    )
                    step_bench.set_stage(stage)
                    step_t = measure(step_bench, device, 1, args.step_repeats)
                    row.update(
                        step_batch=args.step_batch,
                        step_ms=step_t["median"] * 1e3,
                        op_share_of_step=op_s["median"] / step_t["median"],
                    )
                rows.append(row)
    return rows


def bench_step(args: StepSettings, device: torch.device) -> List[Dict[str, Any]]:
    """Train-step img/s per stage of each method in ``args.methods`` against its own full-token stage, every
    (method, stage) timed in turn so that drift hits all alike; a ``schedule`` row per method projects the run."""
    sched = ExpansionSchedule(args.stage_starts, args.keep_rates, args.init_keep_rate, repeats=args.k)
    benches = {
        method: StepBench(args.model, args.batch, args.img_size, sched, device, args.amp, args.compile, method)
        for method in args.methods
    }
    stage_epochs = [b - a for a, b in zip(sched.expansion_steps, list(sched.expansion_steps[1:]) + [args.epochs])]
    cases = [(method, stage) for method in args.methods for stage in range(0, sched.num_stages + 1)]

    def at_stage(method: str, stage: int) -> Callable[[], None]:
        return lambda: (benches[method].set_stage(stage), benches[method]())

    timings = measure_interleaved([at_stage(m, s) for m, s in cases], device, args.warmup, args.repeats)
    rows: List[Dict[str, Any]] = []
    for method in args.methods:
        bench, method_rows = benches[method], []
        for (case_method, stage), t in zip(cases, timings):
            if case_method != method:
                continue
            tokens = bench.set_stage(stage)
            method_rows.append(
                {
                    "method": method,
                    "stage": stage,
                    "tokens": tokens_after_first_block(tokens),
                    "epochs": sched.expansion_steps[0] if stage == 0 else stage_epochs[stage - 1],
                    "img_per_s": args.batch / t["median"],
                    "step_ms": _spread(t),
                    "flops_per_img_G": bench.train_macs(tokens) / 1e9,
                }
            )
        rows += _with_ratios(method, method_rows)
    return rows


def _with_ratios(method: str, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Speed-up, FLOP ratio and their ratio against the method's full-token stage, and the schedule's projection."""
    full = rows[0]
    for row in rows:
        row["speedup"] = row["img_per_s"] / full["img_per_s"]
        row["flop_ratio"] = full["flops_per_img_G"] / row["flops_per_img_G"]
        row["efficiency"] = row["speedup"] / row["flop_ratio"]
    total_epochs = sum(r["epochs"] for r in rows)
    seconds = sum(r["epochs"] / r["img_per_s"] for r in rows)
    flops = sum(r["epochs"] * r["flops_per_img_G"] for r in rows)
    projection = {
        "method": method,
        "stage": "schedule",
        "tokens": None,
        "epochs": total_epochs,
        "img_per_s": total_epochs / seconds,
        "speedup": total_epochs / full["img_per_s"] / seconds,
        "flop_ratio": total_epochs * full["flops_per_img_G"] / flops,
        "flops_per_img_G": flops / total_epochs,
    }
    projection["efficiency"] = projection["speedup"] / projection["flop_ratio"]
    return rows + [projection]


def default_flops_table() -> Path:
    """``conf/bench/flops_table.yaml`` as installed with the package (``toe.conf``)."""
    from importlib.resources import files

    return Path(str(files("toe.conf") / "bench" / "flops_table.yaml"))


def bench_flops(table_file: Path) -> List[Dict[str, Any]]:
    try:
        table = yaml.safe_load(Path(table_file).read_text(errors="replace"))
    except yaml.YAMLError as err:
        raise ValueError(f"not YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        raise ValueError("no `rows:` list")
    rows = []
    for spec in table["rows"]:
        if spec.get("model"):  # the real host, read from its timm model (LV-ViT: conv stem and dense head too)
            import timm

            import toe.models  # noqa: F401 - registers LV-ViT with timm

            shape = ViTShape.from_model(timm.create_model(spec["model"]))
        else:
            shape = ViTShape(
                spec["embed_dim"],
                spec["depth"],
                spec["mlp_ratio"] * spec["embed_dim"],
                196,
                1,
                3 * 16 * 16 * spec["embed_dim"],
                1000,
            )
        sched = ExpansionSchedule(**spec["toe"]) if spec.get("toe") else None
        phases = [(p["epochs"], p["img_size"]) for p in spec["phases"]]
        row: Dict[str, Any] = {"schedule": spec["name"]}
        for attention, tag in ((False, "linear"), (True, "attn")):
            full = shape.forward_macs(None, attention) / 1e9
            avg = schedule_average_macs(shape, phases, sched, attention=attention) / 1e9
            row[f"full_{tag}"], row[f"avg_{tag}"], row[f"ratio_{tag}"] = full, avg, full / avg
            for stage in (1, 2):
                row[f"stage{stage}_{tag}"] = (
                    shape.forward_macs(sched.kept_tokens(196, stage), attention) / 1e9
                    if sched and len(phases) == 1
                    else None
                )
        rows.append(row)
    return rows


def flops_markdown(rows: List[Dict[str, Any]]) -> str:
    def pair(row, key, digits=3):
        a, b = row[f"{key}_linear"], row[f"{key}_attn"]
        return "" if a is None else f"{a:.{digits}f} / {b:.{digits}f}"

    table = pd.DataFrame(
        [
            {
                "model / schedule (linear-only / incl. attn, forward GMACs per image)": r["schedule"],
                "full": pair(r, "full"),
                "stage 1": pair(r, "stage1"),
                "stage 2": pair(r, "stage2"),
                "epoch-avg": pair(r, "avg"),
                "FLOP ratio full/avg": pair(r, "ratio", 2),
            }
            for r in rows
        ]
    )
    return table.to_markdown(index=False)


def markdown(rows: List[Dict[str, Any]], columns: List[str], floatfmt: str = ".3g") -> str:
    return pd.DataFrame(rows)[columns].to_markdown(index=False, floatfmt=floatfmt)


class _FirstBatches:
    """The first ``count`` batches of ``batches`` (a loader or a list), with a length, as train_one_epoch wants."""

    def __init__(self, batches: Any, count: int):
        self.batches, self.count = batches, count

    def __len__(self) -> int:
        return min(self.count, len(self.batches))

    def __iter__(self):
        return itertools.islice(iter(self.batches), len(self))


def bench_e2e(overrides: List[str], batches: int, warmup: int) -> List[Dict[str, Any]]:
    """Where the time of a real run goes, per ToE stage (stage 0: full tokens), side by side in one process.

    The run is built as ``toe-train <overrides>`` builds it (its data, augmentations, model, optimizer, EMA, Mixup),
    then timed over ``batches`` batches: the train loader alone, the train step alone on batches already on the
    device, and the loop end to end (loader and step together). The slower of the first two bounds the run. On
    the PIL pipeline the loader decodes and augments; on the tensor pipeline it only indexes, and the augmentation
    runs in the step, on the device (``pipeline`` column).
    """
    from toe.train.epoch import block_tokens
    from toe.train.step import train_one_epoch

    _, run = _build_run(overrides)
    op = expansion_op(run.model)
    stages = range(0, op.schedule.num_stages + 1) if op is not None else [0]
    step = run.step_config()
    on_device = [
        (inputs.to(run.device), targets.to(run.device) if torch.is_tensor(targets) else targets)
        for inputs, targets in _FirstBatches(run.train_loader, batches)
    ]
    images = sum(inputs.shape[0] for inputs, _ in on_device)  # every pass below sees these many (drop_last)

    def images_per_second(fn: Callable[[], Any]) -> float:
        return images / measure(fn, run.device, warmup, 1)["median"]

    loader_rate = images_per_second(lambda: list(_FirstBatches(run.train_loader, batches)))
    rows = []
    for stage in stages:
        if op is not None:
            op.stage = stage
        run.model.train()
        step_rate = images_per_second(lambda: train_one_epoch(run.net, on_device, step, 0))
        loop_rate = images_per_second(
            lambda: train_one_epoch(run.net, _FirstBatches(run.train_loader, batches), step, 0)
        )
        tokens = block_tokens(run.model, run.shape)
        rows.append(
            {
                "stage": stage,
                "tokens": tokens_after_first_block(tokens),
                "pipeline": run.pipeline,
                "loader_img_per_s": loader_rate,
                "step_img_per_s": step_rate,
                "loop_img_per_s": loop_rate,
                "bound_by": "loader" if loader_rate < step_rate else "step",
                "loop_vs_bound": loop_rate / min(loader_rate, step_rate),
                "step_speedup": step_rate / rows[0]["step_img_per_s"] if rows else 1.0,
                "loop_speedup": loop_rate / rows[0]["loop_img_per_s"] if rows else 1.0,
                "flop_ratio": run.shape.train_macs() / run.shape.train_macs_blocks(tokens),
            }
        )
    return rows


def _build_run(overrides: List[str]) -> Any:
    """The config and the run ``toe-train <overrides>`` would train (without W&B), built in this process."""
    from toe.config.compose import compose_config
    from toe.config.schema import typed_config
    from toe.config.validate import validate
    from toe.train.build import build_run
    from toe.train.distributed import DistInfo

    cfg = compose_config(["logger=none", *overrides])
    plan = validate(cfg)
    cfg = typed_config(cfg)
    return cfg, build_run(cfg, plan, DistInfo())


def bench_train(overrides: List[str], against: List[str], progress: bool = False) -> Dict[str, Any]:
    """Train ``toe-train <overrides>`` and ``toe-train <overrides> <against>`` (the baseline: ``method=baseline``)
    whole, in one process, an epoch of one then an epoch of the other, so that a machine whose speed drifts from
    minute to minute (a shared host's CPU) slows both alike; separate commands run minutes apart cannot be
    compared closer than that drift.

    Each run keeps its own RNG state between its epochs, so each trains exactly as it would alone (same crops,
    same shuffles, same final accuracy as ``toe-train``). Returns per run the train and eval seconds, the final
    top-1 (model and EMA) and the train FLOPs, per ToE stage of the first run the seconds of both over its epochs,
    and the speed-ups.
    """
    from toe.config.schema import ConfigError
    from toe.train.checkpoint import capture_rng, restore_rng
    from toe.train.epoch import EpochInputs, Evaluator, train_epoch

    runs = []
    for name, extra in (("run", overrides), ("against", [*overrides, *against])):
        cfg, run = _build_run(extra)
        runs.append(
            {
                "name": name,
                "overrides": extra,
                "run": run,
                "rng": capture_rng(),
                "inputs": EpochInputs(run),
                "evaluator": Evaluator(run, cfg.train.eval_every, False),
                "rows": [],
                "num_updates": 0,
            }
        )
    epochs = runs[0]["run"].plan.epochs
    if runs[1]["run"].plan.epochs != epochs:
        raise ConfigError(f"the two runs train {epochs} and {runs[1]['run'].plan.epochs} epochs: give both the same")
    for epoch in tqdm(range(epochs), desc="epochs (both runs)", disable=not progress):
        for entry in runs:
            restore_rng(entry["rng"])
            row, entry["num_updates"] = train_epoch(
                entry["run"],
                entry["inputs"],
                entry["evaluator"],
                epoch,
                entry["num_updates"],
                entry["rows"][-1] if entry["rows"] else None,
            )
            entry["rng"] = capture_rng()
            entry["rows"].append(row)
    totals, frames = [], []
    for entry in runs:
        last = entry["rows"][-1]
        totals.append(
            {
                "run": entry["name"],
                "overrides": " ".join(entry["overrides"]) or "(toe-train defaults)",
                "train_seconds": last.train_seconds_total,
                "eval_seconds": sum(row.eval_seconds for row in entry["rows"]),
                "final_top1": last.val_top1,
                "final_ema_top1": last.ema_top1,
                "final_loss": last.train_loss,
                "train_flops": last.train_flops_total,
            }
        )
        frame = pd.DataFrame([row.to_dict() for row in entry["rows"]])
        frames.append(frame.assign(train_flops=frame.train_flops_total.diff().fillna(frame.train_flops_total)))
    first, second = frames
    stages = []
    for stage, epochs_of_stage in first.groupby("stage", sort=True):
        other = second.loc[epochs_of_stage.index]
        stages.append(
            {
                "stage": stage,
                "tokens": int(epochs_of_stage.tokens_after_first_block.iloc[0]),
                "epochs": len(epochs_of_stage),
                "seconds": epochs_of_stage.epoch_seconds.sum(),
                "against_seconds": other.epoch_seconds.sum(),
                "speedup": other.epoch_seconds.sum() / epochs_of_stage.epoch_seconds.sum(),
                "flop_ratio": other.train_flops.sum() / epochs_of_stage.train_flops.sum(),
            }
        )
    run_total, against_total = totals
    ratios = {
        "train_speedup": against_total["train_seconds"] / run_total["train_seconds"],
        "train_and_eval_speedup": (against_total["train_seconds"] + against_total["eval_seconds"])
        / (run_total["train_seconds"] + run_total["eval_seconds"]),
        "flop_ratio": against_total["train_flops"] / run_total["train_flops"],
    }
    return {"runs": totals, "stages": stages, "ratios": ratios}


# Training throughput of DeiT-S on one GPU, the default of --gpu-img-per-s: timm's published benchmark
# (huggingface/pytorch-image-models, results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv:
# deit_small_patch16_224, 1053.64 train samples/s, batch 384, AMP, RTX 3090, PyTorch 1.12).
PUBLISHED_DEIT_S_TRAIN_IMG_PER_S = 1053.64


def write_jpeg_images(folder: Path, count: int, size: int = 224, seed: int = 0) -> List[Path]:
    """``count`` JPEG files of ``size`` px (quality 90) with smooth structure plus noise, so that they decode like
    photographs rather than like flat colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        frequency = rng.uniform(2, 12, 3)
        smooth = np.stack([np.sin(frequency[c] * (xs + ys * (c + 1)) + phase[c]) for c in range(3)], -1)
        pixels = np.clip(127 + 90 * smooth + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"image_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def bench_capacity(
    images: int, gpu_img_per_s: float, stage1_speedup: float, repeats: int, folder: Optional[Path] = None
) -> Dict[str, Any]:
    """Decode + the DeiT recipe's train augmentation (timm's PIL path: RandomResizedCrop 224, flip, RandAugment
    rand-m9-mstd0.5-inc1, random erasing 0.25, normalise) on one CPU core, in img/s, and the cores a GPU needs to
    be fed at ``gpu_img_per_s`` with full tokens and at ``stage1_speedup`` times that in ToE stage 1."""
    import math
    import tempfile
    from importlib.resources import files

    from omegaconf import OmegaConf
    from PIL import Image

    from toe.data.datasets import build_transforms

    recipe = OmegaConf.create((files("toe.conf") / "recipe" / "deit.yaml").read_text())
    data_config = {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    train_transform, _ = build_transforms(data_config, recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: what one DataLoader worker gets
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_jpeg_images(Path(folder or tmp), images)

            def one_pass() -> None:
                for path in paths:
                    with Image.open(path) as image:
                        train_transform(image.convert("RGB"))

            seconds = measure(one_pass, torch.device("cpu"), 1, repeats)["median"]
    finally:
        torch.set_num_threads(threads)
    per_core = images / seconds
    return {
        "img_per_s_per_core": per_core,
        "gpu_img_per_s": gpu_img_per_s,
        "cores_full_tokens": math.ceil(gpu_img_per_s / per_core),
        "stage1_img_per_s": gpu_img_per_s * stage1_speedup,
        "cores_toe_stage1": math.ceil(gpu_img_per_s * stage1_speedup / per_core),
        "stage1_speedup": stage1_speedup,
        "transform": str(train_transform).replace("\n", " "),
    }


def deit_s_stage1_flop_ratio() -> float:
    """Train FLOPs of DeiT-S with full tokens over ToE stage 1 of the official schedule (98 of 196 patches)."""
    shape = ViTShape.deit(384)
    return shape.train_macs(196) / shape.train_macs(98)
