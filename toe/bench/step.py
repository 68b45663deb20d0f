"""``toe-bench op`` (the operator vs the plain loop-based reference, DeiT-T/S/B token shapes, every stage and k) and
``toe-bench step`` (train-step throughput of every stage of each token reducer vs full tokens, beside the analytic
FLOP ratio)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch

from toe.bench.timing import measure, measure_interleaved, spread
from toe.cost.flops import ViTShape
from toe.cost.memory import SavedActivations
from toe.hosts import reduction_op
from toe.ops.expansion import expand_tokens
from toe.ops.methods import REDUCER_METHOD
from toe.ops.reference import reference_expand_tokens
from toe.ops.schedule import ExpansionSchedule
from toe.ops.tokens import BlockTokens, tokens_after_first_block

DEIT = {192: "deit_tiny_patch16_224", 384: "deit_small_patch16_224", 768: "deit_base_patch16_224"}


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
        prompts: int = 0,
        deep: bool = True,
        det_tokens: int = 0,
        mid_pe: bool = False,
    ):
        import dataclasses

        import timm

        from toe.hosts import patch_method
        from toe.hosts.prompts import add_prompts

        if method not in STEP_METHODS:
            raise ValueError(f"unknown method {method!r}: expected one of {', '.join(STEP_METHODS)}")
        if det_tokens:  # YOLOS on the model as its backbone, COCO's 91 class ids, DETR's loss on 3 boxes an image
            from toe.models.detr import SetCriterion
            from toe.models.yolos import Yolos

            backbone = timm.create_model(model_name, num_classes=0, dynamic_img_size=True)
            size = (img_size, img_size)
            model = Yolos(backbone, 91, det_tokens, size, size if mid_pe else None)
            self.criterion: Callable = SetCriterion(91).to(device)
            gen = torch.Generator().manual_seed(0)
            self.targets: Any = [
                {
                    "labels": torch.randint(1, 91, (3,), generator=gen).to(device),
                    "boxes": (torch.rand(3, 4, generator=gen) * 0.4 + 0.2).to(device),
                }
                for _ in range(batch)
            ]
        else:  # ImageNet's head: a model published without one (EVA-02's MIM weights: num_classes=0) gets it too
            model = timm.create_model(model_name, img_size=img_size, num_classes=1000)
            self.criterion = torch.nn.functional.cross_entropy
        if prompts:  # visual prompt tuning: the backbone frozen, prompts and head trained
            add_prompts(model, prompts, deep)
        model = patch_method(model, method.removesuffix("-noprop"), schedule, prop_attn=method != "tome-noprop")
        self.model = model.to(device).train()
        self.method = method
        self.shape = ViTShape.from_model(self.model)
        if det_tokens:  # the patch grid of the timed images, not of the backbone's pre-training
            patches = (img_size // self.model.patch_size) ** 2
            self.shape = dataclasses.replace(self.shape, num_patches=patches)
        else:
            self.targets = torch.randint(0, self.shape.num_classes, (batch,), device=device)
        self.net = torch.compile(self.model) if compile_model else self.model
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.inputs = torch.randn(batch, 3, img_size, img_size, device=device)
        self.device, self.amp = device, amp and device.type == "cuda"

    def set_stage(self, stage: int) -> BlockTokens:
        """Put the op in ``stage``; returns the (attention, MLP) tokens of each block."""
        op = reduction_op(self.model)
        op.stage = stage
        return op.block_tokens(self.shape.num_patches, self.shape.depth)

    def train_macs(self, tokens: BlockTokens) -> float:
        return self.shape.train_macs_blocks(tokens)

    def _loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.criterion(self.net(self.inputs), self.targets)

    def __call__(self) -> None:
        loss = self._loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def activation_mib(self) -> float:
        """MiB of activations one step saves for backward at the current stage (apart from the timed steps, whose
        speed the counting hook would change)."""
        with SavedActivations(self.model.parameters()) as saved:
            loss = self._loss()
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return saved.mib


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
    prompts: int = 0  # visual prompt tuning: prompt tokens per set on a frozen backbone (0: train the whole model)
    shallow: bool = False  # VPT-shallow (one set at the input) rather than VPT-deep
    det_tokens: int = 0  # YOLOS with this many detection tokens on the model as its backbone (0: the classifier)
    mid_pe: bool = False  # YOLOS: with mid position embeddings (YOLOS-S)


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
                    "op": spread(op_t),
                    "reference": spread(ref_t),
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
        method: StepBench(
            args.model,
            args.batch,
            args.img_size,
            sched,
            device,
            args.amp,
            args.compile,
            method,
            prompts=args.prompts,
            deep=not args.shallow,
            det_tokens=args.det_tokens,
            mid_pe=args.mid_pe,
        )
        for method in args.methods
    }
    stage_epochs = [b - a for a, b in zip(sched.stage_starts, list(sched.stage_starts[1:]) + [args.epochs])]
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
            activations = bench.activation_mib()
            method_rows.append(
                {
                    "method": method,
                    "stage": stage,
                    "tokens": tokens_after_first_block(tokens),
                    "epochs": sched.stage_starts[0] if stage == 0 else stage_epochs[stage - 1],
                    "img_per_s": args.batch / t["median"],
                    "step_ms": spread(t),
                    "flops_per_img_G": bench.train_macs(tokens) / 1e9,
                    "activation_mib": activations,
                }
            )
        rows += _with_ratios(method, method_rows)
    return rows


def _with_ratios(method: str, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Speed-up, FLOP ratio and their ratio, and the activation memory saved, against the method's full-token stage;
    and the schedule's projection."""
    full = rows[0]
    for row in rows:
        row["speedup"] = row["img_per_s"] / full["img_per_s"]
        row["flop_ratio"] = full["flops_per_img_G"] / row["flops_per_img_G"]
        row["efficiency"] = row["speedup"] / row["flop_ratio"]
        row["activation_saving"] = 1.0 - row["activation_mib"] / full["activation_mib"]
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
        # what a run must have room for: its largest stage's (ToE's last stage has every token)
        "activation_mib": max(r["activation_mib"] for r in rows),
    }
    projection["activation_saving"] = 1.0 - projection["activation_mib"] / full["activation_mib"]
    projection["efficiency"] = projection["speedup"] / projection["flop_ratio"]
    return rows + [projection]
