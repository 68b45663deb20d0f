"""The paper's tables (the ToE paper's Tables 1-4 and ablations) filled from collected runs.

Every table has one row per setting (seeds pooled) and the paper's columns: top-1 mean +- std over seeds with n,
analytic GFLOPs per image (forward, epoch-averaged, linear layers only and with the attention matmuls, the units of
the paper's FLOP counts), train time as measured (GPU- or CPU-hours), speed-up against the reference row of the same
model, and the top-1 change against it. Reference numbers (e.g. the paper's) can come from a CSV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from toe.cost.flops import TRAIN_TO_FORWARD

# the row columns a row's reference row shares (the same model, data set, pre-training): the rest may differ
PER_REFERENCE = ("model", "data", "pretrained")


@dataclass(frozen=True)
class TableSpec:
    title: str
    rows: List[str]  # run columns that make a row (seeds are pooled)
    reference: Dict[str, str] = field(default_factory=lambda: {"method": "baseline"})  # the row others compare to
    per: Tuple[str, ...] = PER_REFERENCE  # the row columns a row and its reference row share


TABLES: Dict[str, TableSpec] = {
    "table1_deit": TableSpec("Table 1: DeiT on ImageNet-1K, full tokens vs ToE", ["model", "method"]),
    "table2_consistency": TableSpec("Table 2: training consistency (ToE_r1 and ToE^Hyper_r1)", ["model", "variant"]),
    "table3_lvvit": TableSpec("Table 3: LV-ViT with token labeling", ["model", "method"]),
    "table4_efficienttrain": TableSpec(
        "Table 4: EfficientTrain and EfficientTrain + ToE", ["model", "method"], {"method": "efficienttrain"}
    ),
    "finetune_cifar": TableSpec(
        "Fine-tuning on CIFAR: pre-trained with full tokens or ToE, fine-tuned with ToE off or on",
        ["data", "model", "pretrained_from", "method"],
        {"pretrained_from": "baseline", "method": "baseline"},
    ),
    "ablation_init": TableSpec("Ablation: seed initialisation", ["model", "toe.init"], {"toe.init": "spatial"}),
    "ablation_expand": TableSpec("Ablation: expansion", ["model", "toe.expand"], {"toe.expand": "widest"}),
    "ablation_merge": TableSpec("Ablation: merging", ["model", "toe.merge"], {"toe.merge": "mean"}),
    "ablation_distance": TableSpec("Ablation: distance", ["model", "toe.distance"], {"toe.distance": "cosine"}),
    "ablation_repeats": TableSpec("Ablation: repetition step k", ["model", "toe.repeats"], {"toe.repeats": "2"}),
    "ablation_keep_rates": TableSpec("Ablation: kept-rate sets", ["model", "toe"], {"toe": "r0.5"}),
    "ablation_stage_split": TableSpec("Ablation: stage split", ["model", "schedule"], {"schedule": "official"}),
    "compare_token_reduction": TableSpec(
        "Token reduction at matched train FLOPs: full tokens, ToE, PatchDropout, Token Merging", ["model", "method"]
    ),
    "vpt_vtab": TableSpec(
        "Visual prompt tuning on VTAB-1k: VPT-deep and VPT-shallow, full tokens vs ToE, per task",
        ["data.task", "prompts.deep", "method"],
        per=("model", "data.task", "prompts.deep"),
    ),
}
NOT_ROW_KEYS = {"seed", "experiments", "smoke", "logger", "data.root", "hydra.sweep.dir", "hydra.run.dir"}


def spec_for(experiment: Optional[str], runs: pd.DataFrame) -> TableSpec:
    """The layout of a known experiment, else model x method x whatever else the sweep varied."""
    if experiment in TABLES:
        return TABLES[experiment]
    varied = [
        c
        for c in runs.columns
        if ("." in c or c in ("variant", "toe", "schedule"))
        and c not in NOT_ROW_KEYS
        and runs[c].nunique(dropna=True) > 1
    ]
    return TableSpec(f"Runs of {experiment or 'an ad-hoc sweep'}", ["model", "method"] + sorted(varied))


def device_kind(runs: pd.DataFrame) -> str:
    """``GPU`` if any of the runs trained on CUDA, else ``CPU``: what their device-hours are hours of."""
    devices = runs.get("device", pd.Series(dtype=object)).dropna().astype(str)
    return "GPU" if devices.str.startswith("cuda").any() else "CPU"


def build_table(runs: pd.DataFrame, spec: TableSpec, reference_csv: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per setting of ``spec.rows`` over completed runs, with the paper's columns (numbers, not text)."""
    done = runs[runs["status"] == "completed"].reindex(
        columns=list(runs.columns) + [c for c in MEMORY_COLUMNS if c not in runs.columns]
    )
    rows = [c for c in spec.rows if c in done.columns]
    for column in rows:
        done[column] = done[column].astype(str)
    # a detector's accuracy is its COCO box AP (task=detection records final_box_ap, not top-1)
    detection = "final_box_ap" in done.columns and done["final_box_ap"].notna().any()
    metric = "final_box_ap" if detection else "final_top1"
    if detection:
        done = done.reindex(columns=list(done.columns) + [c for c in ("final_box_ap50",) if c not in done.columns])
    grouped = done.groupby(rows, sort=True, dropna=False)
    extra = {"ap50_mean": ("final_box_ap50", "mean")} if detection else {}
    table = grouped.agg(
        n=(metric, "count"),
        top1_mean=(metric, "mean"),
        top1_std=(metric, "std"),
        **extra,
        gflops_linear=("train_flops_per_image_linear", "mean"),
        gflops_attn=("train_flops_per_image", "mean"),
        hours=("device_hours", "mean"),
        activation_peak=("peak_activation_mib", "mean"),
        activation_mean=("mean_activation_mib", "mean"),
        cuda_peak=("peak_cuda_mib", "mean"),
    ).reset_index()
    table[["top1_mean", "top1_std"] + list(extra)] *= 100.0
    table[["gflops_linear", "gflops_attn"]] /= TRAIN_TO_FORWARD * 1e9
    is_reference = np.logical_and.reduce(
        [table[k] == v for k, v in spec.reference.items() if k in table] or [np.zeros(len(table), dtype=bool)]
    )
    table["is_reference"] = is_reference
    per_model = [c for c in rows if c in spec.per]
    compared = {"hours": "ref_hours", "top1_mean": "ref_top1", "activation_mean": "ref_activation_mean"}
    reference = (
        table.loc[table["is_reference"], per_model + list(compared)]
        .rename(columns=compared)
        .drop_duplicates(subset=per_model)
    )
    if per_model:
        table = table.merge(reference, on=per_model, how="left")
    else:
        for column in compared.values():
            table[column] = reference[column].iloc[0] if len(reference) else np.nan
    table["speedup"] = table.pop("ref_hours") / table["hours"]
    table["top1_delta"] = table["top1_mean"] - table.pop("ref_top1")
    table["activation_saving"] = 1.0 - table["activation_mean"] / table.pop("ref_activation_mean")
    if reference_csv is not None:
        keys = [c for c in rows if c in reference_csv.columns]
        extra = reference_csv.rename(columns={c: f"ref_{c}" for c in reference_csv.columns if c not in keys})
        table = table.merge(extra.astype({k: str for k in keys}), on=keys, how="left")
    table.attrs.update(
        title=spec.title,
        rows=rows,
        per=per_model,
        time_unit=f"{device_kind(done)}-h",
        metric="box AP" if detection else "top-1",
    )
    return table


def vtab_groups(table: pd.DataFrame) -> pd.DataFrame:
    """VTAB-1k's summary as VPT's Table 1 gives it, from a per-task table (:data:`TABLES` ``vpt_vtab``): the mean
    top-1 over the tasks of each group (natural, specialized, structured; the tasks counted), and the mean of the
    three group means, per setting of the other row columns; train hours summed over the tasks."""
    from toe.data.vtab import TASK_GROUP, VTAB_GROUPS

    settings = [c for c in table.attrs["rows"] if c != "data.task"]
    known = table[table["data.task"].isin(TASK_GROUP)].assign(group=lambda t: t["data.task"].map(TASK_GROUP))
    grouped = (
        known.groupby(settings + ["group"], sort=True)
        .agg(tasks=("data.task", "nunique"), top1=("top1_mean", "mean"), hours=("hours", "sum"))
        .reset_index()
    )
    wide = grouped.pivot_table(index=settings, columns="group", values="top1").reindex(columns=list(VTAB_GROUPS))
    counts = grouped.pivot_table(index=settings, columns="group", values="tasks").reindex(columns=list(VTAB_GROUPS))
    out = wide.copy()
    out["mean of groups"] = wide.mean(axis=1, skipna=False)
    out["tasks"] = counts.fillna(0).sum(axis=1).astype(int)
    out["train hours (all tasks)"] = grouped.groupby(settings)["hours"].sum()
    return out.reset_index()


# the record's memory figures (toe.train.record.Summary); blank in records written before they were kept
MEMORY_COLUMNS = ("peak_activation_mib", "mean_activation_mib", "peak_cuda_mib")

# Where a command's time went (toe.train.record.Summary), in the order it passes
TIME_PARTS = {
    "startup_seconds": "start-up",
    "total_train_seconds": "train",
    "total_eval_seconds": "eval",
    "total_checkpoint_seconds": "checkpoint",
    "other_seconds": "other",
    "wall_seconds": "whole command",
}


# Of the training time, the share the loop waited for its batches (Summary.data_wait_share): an input-bound run's
# wall clock does not follow its step's speed-up
WAIT_COLUMN = {"data_wait_share": "train waiting for input (%)"}


def time_split(runs: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Per row of ``spec``: the seconds of start-up, training, evaluation, checkpoints, the rest and the whole
    command, and the share of the training spent waiting for input, mean over its completed runs (blank for
    records written before each was kept)."""
    done = runs[runs["status"] == "completed"].reindex(
        columns=list(runs.columns) + [part for part in TIME_PARTS if part not in runs.columns]
    )
    rows = [c for c in spec.rows if c in done.columns]
    for column in rows:
        done[column] = done[column].astype(str)
    if "data_wait_share" not in done.columns:
        done["data_wait_share"] = float("nan")
    done["data_wait_share"] = 100 * done["data_wait_share"].astype(float)
    parts = list(TIME_PARTS) + ["data_wait_share"]
    split = done.groupby(rows, sort=True, dropna=False)[parts].mean().reset_index()
    return split.rename(columns={**{part: f"{label} (s)" for part, label in TIME_PARTS.items()}, **WAIT_COLUMN})


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the paper prints it: text cells, units in the headers."""
    unit = table.attrs.get("time_unit", "h")

    def pm(row):
        std = "" if pd.isna(row["top1_std"]) else f" ± {row['top1_std']:.2f}"
        return f"{row['top1_mean']:.2f}{std} (n={row['n']})"

    metric = table.attrs.get("metric", "top-1")
    out = table[table.attrs["rows"]].copy()
    out[f"{metric[0].upper()}{metric[1:]} (%)"] = table.apply(pm, axis=1)
    if "ap50_mean" in table.columns:
        out["AP50 (%)"] = [f"{v:.2f}" for v in table["ap50_mean"]]
    out["GFLOPs/img fwd (linear / +attn)"] = [
        f"{a:.4g} / {b:.4g}" for a, b in zip(table["gflops_linear"], table["gflops_attn"])
    ]
    out[f"Train time ({unit})"] = [f"{h:.4g}" for h in table["hours"]]
    out["Activations (MiB/step, mean / peak)"] = [
        "n/a" if pd.isna(m) else f"{m:.4g} / {p:.4g}"
        for m, p in zip(table["activation_mean"], table["activation_peak"])
    ]
    if table["cuda_peak"].notna().any():
        out["CUDA peak (MiB)"] = ["n/a" if pd.isna(c) else f"{c:.5g}" for c in table["cuda_peak"]]
    out["Speed-up"] = [
        "ref." if r else ("n/a" if pd.isna(s) else f"{s:.2f}x") for s, r in zip(table["speedup"], table["is_reference"])
    ]
    out[f"Δ {metric}"] = [
        "ref." if r else ("n/a" if pd.isna(d) else f"{d:+.2f}")
        for d, r in zip(table["top1_delta"], table["is_reference"])
    ]
    ref_columns = [c for c in table.columns if c.startswith("ref_")]
    if ref_columns:
        for column in ref_columns:
            out[column.replace("ref_", "reference: ")] = table[column].map(lambda v: "not given" if pd.isna(v) else v)
    else:
        out["Reference"] = "not given"
    return out


def write_table(table: pd.DataFrame, out_dir: Path, name: str) -> Dict[str, Path]:
    """``name.md``, ``name.csv`` (numbers) and ``name.tex`` (the formatted cells) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = format_table(table)
    paths = {"md": out_dir / f"{name}.md", "csv": out_dir / f"{name}.csv", "tex": out_dir / f"{name}.tex"}
    paths["md"].write_text(f"**{table.attrs['title']}**\n\n{shown.to_markdown(index=False)}\n")
    table.to_csv(paths["csv"], index=False)
    paths["tex"].write_text(shown.to_latex(index=False, caption=table.attrs["title"]))
    return paths
