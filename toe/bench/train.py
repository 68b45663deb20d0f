"""``toe-bench e2e`` and ``toe-bench train``: toe-train's own runs timed, built in this process from toe-train's
overrides."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List

import pandas as pd
import torch
from tqdm import tqdm

from toe.bench.timing import measure
from toe.hosts import expansion_op
from toe.ops.tokens import tokens_after_first_block
from toe.train.record import known_mean


class _FirstBatches:
    """The first ``count`` batches of ``batches`` (a loader or a list), with a length, as train_one_epoch wants."""

    def __init__(self, batches: Any, count: int):
        self.batches, self.count = batches, count

    def __len__(self) -> int:
        return min(self.count, len(self.batches))

    def __iter__(self):
        return itertools.islice(iter(self.batches), len(self))


def deit_engine_epoch(net: torch.nn.Module, batches: Any, step: Any) -> None:
    """One pass of the train loop of DeiT's ``engine.py`` (the loop the official ToE trainer,
    Osilly/TokenExpansion ``ToE/deit/engine.py``, runs) over ``batches``, with the run's own model, optimizer, loss,
    Mixup, EMA and scaler: Mixup, forward and loss under autocast, ``loss.item()``, ``zero_grad``, backward and
    step (through the scaler when there is one), a CUDA synchronize, the EMA update. The reference against which
    ``toe-bench e2e`` sets toe's own loop (:func:`toe.train.step.train_one_epoch`)."""
    net.train()
    for inputs, targets in batches:
        inputs = inputs.to(step.device, non_blocking=True)
        targets = targets.to(step.device, non_blocking=True)
        if step.batch_transform is not None:  # the tensor pipeline's augmentation (DeiT's is in its loader)
            inputs = step.batch_transform(inputs)
        if step.mixup is not None:
            inputs, targets = step.mixup(inputs, targets)
        with step.autocast():
            loss = step.criterion(net(inputs), targets)
        loss.item()  # DeiT's loss_value, checked for finiteness every step
        step.optimizer.zero_grad()
        if step.loss_scaler is not None:
            step.loss_scaler(loss, step.optimizer, clip_grad=step.clip_grad, parameters=net.parameters())
        else:
            loss.backward()
            if step.clip_grad:
                torch.nn.utils.clip_grad_norm_(net.parameters(), step.clip_grad)
            step.optimizer.step()
        if step.device.type == "cuda":
            torch.cuda.synchronize(step.device)
        if step.ema is not None:
            step.ema.update(net)


def bench_e2e(overrides: List[str], batches: int, warmup: int, rounds: int = 3) -> List[Dict[str, Any]]:
    """Where the time of a real run goes, per ToE stage (stage 0: full tokens), side by side in one process.

    The run is built as ``toe-train <overrides>`` builds it (its data, augmentations, model, optimizer, EMA, Mixup),
    then timed over ``batches`` batches: the train loader alone, the train step alone on batches already on the
    device, and the loop end to end (loader and step together). The slower of the first two bounds the run. On
    the PIL pipeline the loader decodes and augments; on the tensor pipeline it only indexes, and the augmentation
    runs in the step, on the device (``pipeline`` column). The step is also timed through DeiT's engine loop
    (:func:`deit_engine_epoch`, the official trainer's) on the same batches, the two alternated over ``rounds``:
    ``step_vs_deit_loop`` above 1 means toe's loop is the faster.
    """
    from toe.bench.timing import measure_interleaved
    from toe.train.epoch import block_tokens
    from toe.train.step import train_one_epoch

    _, run = _config_and_run(overrides)
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
        toe_loop, deit_loop = measure_interleaved(
            [lambda: train_one_epoch(run.net, on_device, step, 0), lambda: deit_engine_epoch(run.net, on_device, step)],
            run.device,
            warmup,
            rounds,
        )
        step_rate, deit_rate = images / toe_loop["median"], images / deit_loop["median"]
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
                "deit_loop_img_per_s": deit_rate,
                "step_vs_deit_loop": step_rate / deit_rate,
                "loop_img_per_s": loop_rate,
                "bound_by": "loader" if loader_rate < step_rate else "step",
                "loop_vs_bound": loop_rate / min(loader_rate, step_rate),
                "step_speedup": step_rate / rows[0]["step_img_per_s"] if rows else 1.0,
                "loop_speedup": loop_rate / rows[0]["loop_img_per_s"] if rows else 1.0,
                "flop_ratio": run.shape.train_macs() / run.shape.train_macs_blocks(tokens),
            }
        )
    return rows


def _config_and_run(overrides: List[str]) -> Any:
    """The config and the run ``toe-train <overrides>`` would train (without W&B), built in this process."""
    from toe.config.compose import compose_config
    from toe.config.validate import checked_config
    from toe.train.build import build_run
    from toe.train.distributed import DistInfo

    cfg, plan = checked_config(compose_config(["logger=none", *overrides]))
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
    from toe.train.epoch import EpochSetup, Evaluator, train_epoch

    runs = []
    for name, extra in (("run", overrides), ("against", [*overrides, *against])):
        cfg, run = _config_and_run(extra)
        runs.append(
            {
                "name": name,
                "overrides": extra,
                "run": run,
                "rng": capture_rng(),
                "setup": EpochSetup(run),
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
                entry["setup"],
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
        activations = known_mean(row.activation_mib for row in entry["rows"])
        totals.append(
            {
                "run": entry["name"],
                "overrides": " ".join(entry["overrides"]) or "(toe-train defaults)",
                "train_seconds": last.train_seconds_total,
                "eval_seconds": sum(row.eval_seconds for row in entry["rows"]),
                "final_top1": last.val_top1,
                "final_ema_top1": last.ema_top1,
                "final_box_ap": last.val_box_ap,  # task=detection: COCO box AP and AP50
                "final_box_ap50": last.val_box_ap50,
                "final_loss": last.train_loss,
                "train_flops": last.train_flops_total,
                "mean_activation_mib": float("nan") if activations is None else activations,
            }
        )
        frame = pd.DataFrame([row.to_dict() for row in entry["rows"]])
        frames.append(frame.assign(train_flops=frame.train_flops_total.diff().fillna(frame.train_flops_total)))
    first, second = frames
    stages = []
    for stage, epochs_of_stage in first.groupby("stage", sort=True):
        other = second.loc[epochs_of_stage.index]
        activations, against_activations = epochs_of_stage.activation_mib.mean(), other.activation_mib.mean()
        stages.append(
            {
                "stage": stage,
                "tokens": int(epochs_of_stage.tokens_after_first_block.iloc[0]),
                "epochs": len(epochs_of_stage),
                "seconds": epochs_of_stage.epoch_seconds.sum(),
                "against_seconds": other.epoch_seconds.sum(),
                "speedup": other.epoch_seconds.sum() / epochs_of_stage.epoch_seconds.sum(),
                "flop_ratio": other.train_flops.sum() / epochs_of_stage.train_flops.sum(),
                "activation_mib": activations,
                "against_activation_mib": against_activations,
                "activation_saving": 1.0 - activations / against_activations,
            }
        )
    run_total, against_total = totals
    ratios = {
        "train_speedup": against_total["train_seconds"] / run_total["train_seconds"],
        "train_and_eval_speedup": (against_total["train_seconds"] + against_total["eval_seconds"])
        / (run_total["train_seconds"] + run_total["eval_seconds"]),
        "flop_ratio": against_total["train_flops"] / run_total["train_flops"],
        "activation_saving": 1.0 - run_total["mean_activation_mib"] / against_total["mean_activation_mib"],
    }
    return {"runs": totals, "stages": stages, "ratios": ratios}
