"""What a resume may change: the resolved keys that differ between a checkpoint's config and a new start's, less
those that do not change what is trained."""

from __future__ import annotations

from typing import Any, Dict, List

from toe.ops.methods import REDUCTION_NODES

# --- what a resume may change --------------------------------------------------------------------------------------
# Keys that do not change what is trained: where and how fast it runs, what is logged, how often it is evaluated.
RESUMABLE_CHANGES = (
    "logger.",
    "train.device",
    "train.workers",
    "train.dali_decode",
    "train.progress",
    "train.eval_every",
    "train.compile",
    "data.root",
    "data.download",
    "task_name",
    "smoke_",
    "vtab_tasks",
    "resume.",
)


def _flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: node}
    return {prefix[:-1]: node}


# Nodes whose keys the user adds (the model's own keyword arguments): a key there that the checkpoint's config
# lacks was added for this start, not by a newer toe, and changes what is trained.
FREE_FORM = ("model.kwargs.",)


def config_changes(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, List[Any]]:
    """``{key: [before, after]}`` for every resolved key that differs and that changes the training (everything
    but :data:`RESUMABLE_CHANGES`). Two kinds of difference change nothing and are left out: a key the checkpoint's
    config does not have (a newer toe added it; the run trained with what it did before) unless it is one of
    :data:`FREE_FORM`'s (``+model.kwargs.proj_drop_rate=0.5`` is a change), and the settings of a
    token-reduction method that is off in both (``patch_dropout``, ``tome``), and the ``detection`` settings of two
    classification runs."""
    old, new = _flat(before), _flat(after)
    off = tuple(
        f"{node}." for node in REDUCTION_NODES[1:] if not old.get(f"{node}.enabled") and not new.get(f"{node}.enabled")
    )
    if old.get("task", "classification") == new.get("task", "classification") == "classification":
        off += ("detection.",)  # YOLOS's settings, read only by task=detection
    return {
        key: [old.get(key), new.get(key)]
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
        and not key.startswith(RESUMABLE_CHANGES)
        and (key in old or key.startswith(FREE_FORM))
        and not key.startswith(off)
    }
