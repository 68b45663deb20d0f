"""The comparison report: every table the runs allow, the plots, the flagged runs, and a one-line verdict per setting
against its reference row; Markdown plus PNGs, or one HTML file. ``toe-report`` (:mod:`toe.cli.report`) writes it."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import List, Optional, Tuple

import pandas as pd

from toe.analysis.collect import Runs
from toe.analysis.plots import plot_runs
from toe.analysis.tables import (
    PER_REFERENCE,
    build_table,
    format_table,
    spec_for,
    time_split,
    vtab_groups,
    write_table,
)
from toe.ops.methods import REDUCING_METHODS
from toe.train.record import CHECKPOINT_FILE


def verdicts(table: pd.DataFrame) -> List[str]:
    """'<row>: faster by 1.27x, 31 % less activation memory, top-1 -0.10 points (within the seed spread of 0.15)'
    for every non-reference row (activation memory: per train step, averaged over the epochs, so that ToE's
    reduced stages count; the tables give the peak too)."""
    rows, lines = table.attrs["rows"], []
    reference = table[table["is_reference"]]
    for _, row in table[~table["is_reference"]].iterrows():
        name = ", ".join(str(row[c]) for c in rows)
        if pd.isna(row["speedup"]):
            lines.append(f"{name}: no reference row to compare with")
            continue
        same = reference
        for column in table.attrs.get("per", [c for c in rows if c in PER_REFERENCE]):
            same = same[same[column] == row[column]]
        spread = pd.concat([same["top1_std"], pd.Series([row["top1_std"]])]).max()
        faster = f"faster by {row['speedup']:.2f}x" if row["speedup"] >= 1 else f"slower by {1 / row['speedup']:.2f}x"
        if pd.isna(spread):
            judged = "no seed spread to judge by (one seed)"
        elif abs(row["top1_delta"]) <= spread:
            judged = f"within the seed spread of {spread:.2f}"
        else:
            judged = f"outside the seed spread of {spread:.2f}"
        saving = row.get("activation_saving", float("nan"))  # a table of records without memory figures
        memory = (
            ""
            if pd.isna(saving)
            else f", {100 * saving:.0f} % less activation memory"
            if saving >= 0
            else f", {-100 * saving:.0f} % more activation memory"
        )
        metric = table.attrs.get("metric", "top-1")
        lines.append(f"{name}: {faster}{memory}, {metric} {row['top1_delta']:+.2f} points ({judged})")
    return lines


def read_reference(path: Path) -> pd.DataFrame:
    """A CSV of reference numbers: the table's row columns as text, number columns (top1*, speedup*, gflops*,
    time*) as numbers; a number column holding text is refused with the column's name."""
    reference = pd.read_csv(path, dtype=str)
    for column in reference.columns:
        if column.startswith(("top1", "speedup", "gflops", "time")):
            try:
                reference[column] = pd.to_numeric(reference[column])
            except ValueError as err:
                raise ValueError(f"column {column}: {err}") from None
    return reference


def token_pictures(subset: pd.DataFrame, root: Path, rows: List[str], out_dir: Path) -> List[Tuple[str, Path]]:
    """``toe-vis`` grids (:func:`toe.vis.draw.draw_run`) of one completed run with a checkpoint per setting of a
    token-reduction method; a run that cannot be drawn (e.g. its data is not on this machine) is named, not fatal."""
    from toe.vis.draw import draw_run

    done = subset[(subset["status"] == "completed") & subset["method"].isin(REDUCING_METHODS)]
    pictures = []
    for setting, group in done.groupby([c for c in rows if c in done.columns], sort=True, dropna=False):
        setting = setting if isinstance(setting, tuple) else (setting,)
        name = "_".join(str(v) for v in setting)
        for run in sorted(group["run"]):
            run_dir = root / run if (root / run).is_dir() else root  # a single run dir reports itself
            if not (run_dir / CHECKPOINT_FILE).is_file():
                continue
            out = out_dir / f"tokens_{name}.png".replace("/", "-")
            try:
                draw_run(out, run_dir, count=3)
            except Exception as err:  # noqa: BLE001 - a picture is never worth losing the report
                pictures.append((f"{name}: not drawn ({type(err).__name__}: {str(err).splitlines()[0]})", None))
            else:
                pictures.append((name, out))
            break
    return pictures


def search_section(root: Path, out_dir: Path) -> Tuple[List[str], List[str]]:
    """A budgeted search's trials (from its Optuna study, ``optuna.db`` in the sweep dir, pruned trials included):
    the trials table, the best trial, and top-1 vs train-FLOP speed-up with the Pareto front."""
    from toe.analysis.plots import plot_search
    from toe.sweep.search import load_trials

    trials = load_trials(root)
    if trials is None or not len(trials):
        return [], []
    budget = _search_budget(root)
    plot = plot_search(trials, out_dir / "search" / "top1_vs_flop_ratio.png", budget)
    shown = trials.drop(columns=["study"]).copy()
    shown["top1"] = shown["top1"].map(lambda v: "" if pd.isna(v) else f"{100 * v:.2f}")
    shown["flop_ratio"] = shown["flop_ratio"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}x")
    shown = shown.fillna("")
    shown.to_csv(out_dir / "search" / "trials.csv", index=False)
    complete = trials[trials["state"] == "COMPLETE"].dropna(subset=["top1"])
    if len(complete):
        top = complete.loc[complete["top1"].idxmax()]
        params = ", ".join(f"{c.removeprefix('param ')}={top[c]}" for c in complete.columns if c.startswith("param "))
        best = (
            f"trial {int(top['trial'])}: top-1 {100 * top['top1']:.2f} % at a {top['flop_ratio']:.3f}x "
            f"train-FLOP speed-up, {params}"
        )
    else:
        best = "none trained yet"
    counts = trials["state"].value_counts().to_dict()
    parts = [
        "\n## Search: trials\n",
        f"Study `{trials['study'].iloc[0]}` in `{root}`: {len(trials)} trials "
        f"({', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items()))})"
        + (f"; budget {budget:g}x train-FLOP speed-up (trials below it pruned before training)" if budget else "")
        + ".\n",
        f"**Best**: {best}\n",
        shown.to_markdown(index=False),
        "",
        f"![top-1 vs FLOP ratio](search/{plot.name})",
    ]
    html = [
        "<h2>Search: trials</h2>",
        f"<p>Best: {best}</p>",
        shown.to_html(index=False),
        f'<img alt="search" src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">',
    ]
    return parts, html


def _search_budget(root: Path) -> Optional[float]:
    import yaml

    plan = root / "multirun.yaml"
    if not plan.is_file():
        return None
    saved = yaml.safe_load(plan.read_text()) or {}
    budget = saved.get("hydra", {}).get("sweeper", {}).get("budget")
    if isinstance(budget, str):  # Hydra saves it unresolved: ${budget}
        budget = saved.get(budget.strip("${}"))
    return float(budget) if isinstance(budget, (int, float)) else None


def build_report(
    collected: Runs,
    out_dir: Path,
    source: str,
    reference_csv: Optional[pd.DataFrame] = None,
    html: bool = False,
    root: Optional[Path] = None,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = collected.runs
    parts = [
        f"# toe report: {source}\n",
        f"{len(runs)} runs, {int((runs['status'] == 'completed').sum())} completed.\n",
    ]
    html_parts = [f"<h1>toe report: {source}</h1>"]
    experiments = runs["experiment"].fillna("runs")
    for experiment in sorted(experiments.unique()):
        subset = runs[experiments == experiment]
        spec = spec_for(experiment, subset)
        table = build_table(subset, spec, reference_csv)
        name = str(experiment)
        section = out_dir / name
        write_table(table, section, "table")
        run_ids = set(subset["run"])
        plots = plot_runs(
            subset,
            collected.epochs[collected.epochs["run"].isin(run_ids)] if len(collected.epochs) else collected.epochs,
            table.attrs["rows"],
            spec.title,
            section,
        )
        lines = verdicts(table)
        data = ", ".join(sorted(str(d) for d in subset["data"].dropna().unique())) or "unknown"
        parts += [
            f"\n## {spec.title}\n",
            f"Experiment `{name}`, data: {data}; rows pool seeds; speed-up and Δ top-1 against the "
            f"reference row ({', '.join(f'{k}={v}' for k, v in spec.reference.items())}) of the same model.\n",
            format_table(table).to_markdown(index=False),
            "\n\n**Verdicts**\n",
        ]
        parts += [f"- {line}" for line in lines] or ["- (no row to compare)"]
        if "data.task" in table.attrs["rows"] and len(table):
            groups = vtab_groups(table)
            groups.to_csv(section / "vtab_groups.csv", index=False)
            parts += [
                "\n**VTAB-1k groups** (mean top-1 % over the tasks of each group that have runs, `tasks` counting "
                "them; the mean of the three groups is blank until each group has runs)\n",
                groups.to_markdown(index=False, floatfmt=".2f"),
            ]
        split = time_split(subset, spec)
        parts += [
            "\n**Where the time went** (seconds, mean over seeds; start-up counts from the process start)\n",
            split.to_markdown(index=False, floatfmt=".1f"),
        ]
        parts += [""] + [f"![{key}]({name}/{path.name})" for key, path in plots.items()]
        pictures = token_pictures(subset, root, table.attrs["rows"], section) if root is not None else []
        if pictures:
            parts.append(
                "\n**What the token reduction keeps** (`toe-vis`: one run per setting; thick border: a "
                "kept token, its colour how it was chosen; fill: the kept token a patch was merged into)\n"
            )
            parts += [f"![tokens {key}]({name}/{path.name})" if path else f"- {key}" for key, path in pictures]
        html_parts += [
            f"<h2>{spec.title}</h2>",
            format_table(table).to_html(index=False),
            "<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>",
            "<h3>Where the time went (seconds)</h3>",
            split.to_html(index=False, float_format="%.1f"),
        ]
        images = list(plots.items()) + [(f"tokens {key}", p) for key, p in pictures if p is not None]
        html_parts += [
            f'<img alt="{key}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
            for key, p in images
        ]
    if root is not None:
        search_parts, search_html = search_section(root, out_dir)
        parts += search_parts
        html_parts += search_html
    flagged = runs[runs["flag"].notna()]
    parts.append("\n## Flagged runs\n")
    if len(flagged):
        parts += [f"- `{r['run']}`: {r['flag']}" for _, r in flagged.iterrows()]
        html_parts += (
            ["<h2>Flagged runs</h2><ul>"]
            + [f"<li>{r['run']}: {r['flag']}</li>" for _, r in flagged.iterrows()]
            + ["</ul>"]
        )
    else:
        parts.append("None: every run completed.")
    (out_dir / "runs.csv").write_text(runs.to_csv(index=False))
    markdown = out_dir / "report.md"
    markdown.write_text("\n".join(parts) + "\n")
    if html:
        page = out_dir / "report.html"
        page.write_text(
            "<!doctype html><meta charset='utf-8'><title>toe report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:"
            "collapse}td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}</style>" + "\n".join(html_parts)
        )
        return page
    return markdown
