"""The training methods toe runs and the token reducer each uses: the one list that the config schema, the host
patch, the benchmarks and the report read.

A method's ``name`` is its ``method_name`` (``conf/method/<name>.yaml``) and the ``method`` of its run record; its
``reducer`` is the config node of its token reducer (``toe``, ``patch_dropout``, ``tome``), ``None`` with full tokens;
``curriculum`` says whether it trains under EfficientTrain's curriculum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Method:
    name: str
    reducer: Optional[str]
    curriculum: bool = False
    label: str = ""  # as tables and plots name it


METHODS: Tuple[Method, ...] = (
    Method("baseline", None, label="full tokens"),
    Method("toe", "toe", label="ToE"),
    Method("efficienttrain", None, curriculum=True, label="EfficientTrain"),
    Method("efficienttrain_toe", "toe", curriculum=True, label="EfficientTrain + ToE"),
    Method("patchdropout", "patch_dropout", label="PatchDropout"),
    Method("tome", "tome", label="ToMe"),
)
METHOD_NAMES: Tuple[str, ...] = tuple(m.name for m in METHODS)
# The config nodes of the token reducers, ToE's first; a run enables at most one.
REDUCTION_NODES: Tuple[str, ...] = tuple(dict.fromkeys(m.reducer for m in METHODS if m.reducer))
# The method that is a reducer alone, by its node: what toe.patch_method takes (toe, patchdropout, tome).
REDUCER_METHOD: Dict[str, str] = {
    node: next(m.name for m in METHODS if m.reducer == node and not m.curriculum) for node in REDUCTION_NODES
}
REDUCING_METHODS: Tuple[str, ...] = tuple(m.name for m in METHODS if m.reducer)
