"""Plots of a set of runs (PNG, matplotlib): top-1 vs epoch with the ToE stage boundaries, top-1 vs train time,
and tokens after the first block vs epoch. One line or marker style per table row (seeds pooled)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from toe.analysis.tables import device_kind  # noqa: E402
from toe.ops.schedule import scale_epoch  # noqa: E402


def _label(run: pd.Series, rows: List[str]) -> str:
    return ", ".join(f"{run[c]}" for c in rows if c in run and pd.notna(run[c]))


def _stage_boundaries(runs: pd.DataFrame, last_epoch: int) -> List[int]:
    """Stage start epochs (0-based, as toe-train scales them) of the plotted ToE runs, inside the plotted range."""
    starts = set()
    for _, run in runs[runs["toe_enabled"] == True].iterrows():  # noqa: E712 - pandas element-wise
        epochs, length = run.get("epochs_planned"), run.get("schedule_length") or run.get("epochs_planned")
        if isinstance(run.get("stage_starts"), list) and epochs and length:
            starts |= {scale_epoch(s, epochs, length) for s in run["stage_starts"]}
    return sorted(s for s in starts if 0 < s <= last_epoch)


def _time_axis(hours: pd.Series, device_unit: str):
    """Train time in hours, minutes or seconds, whichever reads best."""
    top = hours.max() if len(hours) else 0.0
    if top >= 0.5:
        return hours, f"train time ({device_unit}-hours)"
    if top * 60 >= 1:
        return hours * 60, f"train time ({device_unit}-minutes)"
    return hours * 3600, f"train time ({device_unit}-seconds)"


def plot_runs(runs: pd.DataFrame, epochs: pd.DataFrame, rows: List[str], title: str, out_dir: Path) -> Dict[str, Path]:
    """Write the three plots for ``runs`` into ``out_dir``; returns their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = runs.copy()
    runs["label"] = runs.apply(lambda r: _label(r, rows), axis=1)
    per_epoch = epochs.merge(runs[["run", "label"]], on="run")
    paths = {}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, group in per_epoch.dropna(subset=["val_top1"]).groupby("label"):
        # float first: a column with nulls (epochs without evaluation) is object-typed on older pandas
        curve = group.astype({"val_top1": float}).groupby("epoch")["val_top1"].agg(["mean", "std"]) * 100
        # numpy arrays, not Series: matplotlib 3.7.0's fill_between cannot take pandas 2 Series
        x, mean, std = (
            curve.index.to_numpy(dtype=float) + 1,
            curve["mean"].to_numpy(dtype=float),
            curve["std"].fillna(0).to_numpy(dtype=float),
        )
        ax.plot(x, mean, marker="o", markersize=3, label=label)
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    plotted = runs[runs["run"].isin(per_epoch["run"])]
    last = int(per_epoch["epoch"].max()) if len(per_epoch) else 0
    for boundary in _stage_boundaries(plotted, last):
        ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=0.8)  # between epochs s and s + 1
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title=f"{title}\ntop-1 vs epoch (dashed: ToE stage starts)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths["top1_vs_epoch"] = _save(fig, out_dir / "top1_vs_epoch.png")

    done = runs[runs["status"] == "completed"].dropna(subset=["final_top1"]).copy()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done["time"], time_label = _time_axis(done["device_hours"], device_kind(done))
    for i, (label, group) in enumerate(done.groupby("label")):
        color = f"C{i}"
        ax.scatter(
            group["time"].to_numpy(dtype=float),
            group["final_top1"].to_numpy(dtype=float) * 100,
            color=color,
            alpha=0.45,
            s=25,
        )
        ax.scatter(
            group["time"].mean(),
            group["final_top1"].mean() * 100,
            color=color,
            marker="*",
            s=180,
            edgecolor="black",
            label=f"{label} (mean of {len(group)})",
        )
    ax.set(
        xlabel=time_label,
        ylabel="final val top-1 (%)",
        title=f"{title}\ntop-1 vs train time (dots: runs, stars: means)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths["top1_vs_time"] = _save(fig, out_dir / "top1_vs_time.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, group in per_epoch.groupby("label"):
        tokens = group.groupby("epoch")["tokens_after_first_block"].mean()
        ax.step(tokens.index.to_numpy(dtype=float) + 1, tokens.to_numpy(dtype=float), where="mid", label=label)
    ax.set(xlabel="epoch", ylabel="tokens after the first block", title=f"{title}\ntokens per block vs epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths["tokens_vs_epoch"] = _save(fig, out_dir / "tokens_vs_epoch.png")
    return paths


def _save(fig, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points no other point beats on both ``x`` and ``y`` (both larger is better), by ``x``."""
    ordered = points.sort_values([x, y], ascending=[False, False])
    front, best = [], float("-inf")
    for index, row in ordered.iterrows():
        if row[y] > best:
            front.append(index)
            best = row[y]
    return points.loc[front].sort_values(x)


def plot_search(trials: pd.DataFrame, out: Path, budget: float = None) -> Path:
    """Final top-1 vs train-FLOP speed-up of a search's trained trials, the Pareto front joined, the best trial
    marked, and the budget as a line (pruned trials: crosses at their speed-up, below the axis)."""
    trained = trials[trials["state"] == "COMPLETE"].dropna(subset=["top1", "flop_ratio"])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(trained["flop_ratio"], 100 * trained["top1"], color="#1f77b4", label="trained trial", zorder=3)
    if len(trained):
        front = pareto_front(trained, "flop_ratio", "top1")
        ax.plot(
            front["flop_ratio"].to_numpy(),
            100 * front["top1"].to_numpy(),
            color="#d62728",
            marker="o",
            label="Pareto front",
            zorder=4,
        )
        best = trained.loc[trained["top1"].idxmax()]
        ax.scatter(
            [best["flop_ratio"]],
            [100 * best["top1"]],
            s=180,
            facecolor="none",
            edgecolor="black",
            linewidth=1.5,
            label=f"best: trial {int(best['trial'])}",
            zorder=5,
        )
        for _, row in trained.iterrows():
            ax.annotate(
                str(int(row["trial"])),
                (row["flop_ratio"], 100 * row["top1"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    pruned = trials[(trials["state"] == "PRUNED")].dropna(subset=["flop_ratio"])
    if len(pruned):
        low = ax.get_ylim()[0]
        ax.scatter(
            pruned["flop_ratio"],
            [low] * len(pruned),
            marker="x",
            color="grey",
            label="pruned (budget)",
            clip_on=False,
            zorder=2,
        )
    if budget:
        ax.axvline(budget, color="grey", linestyle="--", linewidth=1, label=f"budget {budget:g}x")
    ax.set_xlabel("train-FLOP speed-up over full tokens")
    ax.set_ylabel("final val top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out, dpi=120)
