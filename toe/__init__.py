"""toe: Token Expansion (ToE, CVPR 2024) for training vision transformers.

The names below are loaded on first use (PEP 562), so ``import toe`` imports no host library and changes nothing:
``toe.patch(model, schedule)`` imports the host integrations (and timm) when it is first called. The layers, lowest
first, each importing only from those below it: ``ops`` (tensor operations), ``cost``, ``models``, ``hosts``,
``data``, ``config``, ``train``, ``sweep``, ``bench``, ``vis``, ``analysis``, ``cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "ExpansionSchedule": "toe.ops.schedule",
    "MergeSchedule": "toe.ops.schedule",
    "TokenExpansion": "toe.ops.expansion",
    "expand_tokens": "toe.ops.expansion",
    "unexpand": "toe.ops.expansion",
    "TokenMerging": "toe.ops.merging",
    "bipartite_soft_matching": "toe.ops.merging",
    "merge_tokens": "toe.ops.merging",
    "unmerge": "toe.ops.merging",
    "patch": "toe.hosts",
    "patch_merging": "toe.hosts",
    "patch_dropout": "toe.hosts",
    "patch_method": "toe.hosts",
    "set_epoch": "toe.hosts",
    "reduction_op": "toe.hosts",
    "expansion_op": "toe.hosts",
}
__all__ = [
    "ExpansionSchedule",
    "MergeSchedule",
    "TokenExpansion",
    "TokenMerging",
    "bipartite_soft_matching",
    "expand_tokens",
    "expansion_op",
    "merge_tokens",
    "patch",
    "patch_dropout",
    "patch_merging",
    "patch_method",
    "reduction_op",
    "set_epoch",
    "unexpand",
    "unmerge",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'toe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what editors and type checkers see
    from toe.hosts import (
        expansion_op,
        patch,
        patch_dropout,
        patch_merging,
        patch_method,
        reduction_op,
        set_epoch,
    )
    from toe.ops.expansion import TokenExpansion, expand_tokens, unexpand
    from toe.ops.merging import TokenMerging, bipartite_soft_matching, merge_tokens, unmerge
    from toe.ops.schedule import ExpansionSchedule, MergeSchedule
