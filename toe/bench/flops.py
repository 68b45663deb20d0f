"""``toe-bench flops``: the analytic per-image FLOPs table of the official schedules
(``conf/bench/flops_table.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pandas as pd
import yaml

from toe.cost.flops import ViTShape, schedule_average_macs
from toe.ops.schedule import ExpansionSchedule


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


def deit_s_stage1_flop_ratio() -> float:
    """Train FLOPs of DeiT-S with full tokens over ToE stage 1 of the official schedule (98 of 196 patches)."""
    shape = ViTShape.deit(384)
    return shape.train_macs(196) / shape.train_macs(98)
