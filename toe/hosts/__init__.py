"""Host integration: put a token-reduction op (ToE, Token Merging, PatchDropout) in a vision transformer, in place.

Like ToMe's ``tome.patch``, a host's class is swapped for a subclass that adds the op, so no parameter is added and
the ``state_dict`` keys stay those of the unpatched model; the host model itself knows nothing of token reduction.
One module per host family: :mod:`toe.hosts.timm` (timm's ``VisionTransformer``, ``Eva``, ``Beit``,
``VisionTransformerRelPos`` and any model with ``blocks`` and ``num_prefix_tokens``; for the families whose blocks
read token positions, :mod:`toe.hosts.positions` hands them the kept tokens'), :mod:`toe.hosts.lvvit` (LV-ViT,
whose dense head needs every position back) and :mod:`toe.hosts.yolos` (YOLOS, whose detection tokens come after
the patches and whose mid position embeddings follow the kept tokens); each has ``apply`` (ToE), ``apply_merging`` and
``apply_patch_dropout``. The functions here are also ``toe.patch``,
``toe.patch_merging`` and ``toe.patch_dropout``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Iterator, List, Optional, Sequence, Tuple, Type

from torch import nn

from toe.hosts import lvvit, timm, yolos
from toe.ops.expansion import TokenExpansion
from toe.ops.merging import TokenMerging
from toe.ops.methods import REDUCER_METHOD
from toe.ops.patch_dropout import KeptRateSchedule, ScheduledPatchDropout
from toe.ops.schedule import ExpansionSchedule, MergeSchedule
from toe.ops.tokens import prefix_tokens

TokenReducer = (TokenExpansion, TokenMerging, ScheduledPatchDropout)  # the ops whose stage follows the epoch


def hosts() -> List[Tuple[Type[nn.Module], ModuleType]]:
    """(host type, its host module), most specific first; the first whose type matches the model is used. A
    function, so that ``import toe`` does not import the host models (and timm with them)."""
    return [(lvvit.host_type(), lvvit), (yolos.host_type(), yolos), (nn.Module, timm)]


def _host(model: nn.Module, method: str) -> ModuleType:
    check_host(model, method)
    return next(module for host, module in hosts() if isinstance(model, host))


def model_name(model: nn.Module) -> str:
    """timm's name of ``model`` (its pretrained config's architecture), else its class."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def check_host(model: nn.Module, method: str) -> None:
    """Refuse, in one line naming the model, the part and why, a model that ``method`` (ToE, Token Merging,
    PatchDropout) cannot reduce tokens in: fewer than two blocks, or blocks that need the whole token grid (XCiT's
    convolution over it). Rotary embeddings and relative position biases are no reason: every method hands them
    the kept tokens' positions (:mod:`toe.hosts.positions`)."""
    from toe.hosts.timm import grid_part

    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) < 2:
        raise TypeError(f"{method} needs a vision transformer with at least two `blocks`; got {type(model).__name__}")
    part = grid_part(model)
    if part is not None:
        raise TypeError(
            f"{method} cannot reduce the tokens of {model_name(model)} ({type(model).__name__}): its blocks use "
            f"{part}, which needs the whole token grid in every block; toe hands the kept tokens' positions to "
            "rotary embeddings and relative position biases, not to an operation over the grid"
        )


# how errors name each method's patch
LABELS = {"toe": "toe.patch", "patchdropout": "PatchDropout", "tome": "Token Merging"}


def _prefix(model: nn.Module) -> int:
    return prefix_tokens(model)  # VPT's prompts included


def _like(model: nn.Module, op: nn.Module) -> nn.Module:
    """``op`` in ``model``'s mode: a model patched in eval mode evaluates with all tokens until ``.train()``."""
    return op.train(model.training)


def patch(model: nn.Module, schedule: ExpansionSchedule, sparse_eval: bool = False) -> nn.Module:
    """Make ``model`` a ToE model in place and return it.

    ``model`` is a vision transformer with ``blocks`` (at least two) and ``num_prefix_tokens``: a timm
    ``VisionTransformer``, ``Eva`` (rotary embeddings), ``Beit`` or ``VisionTransformerRelPos`` (relative position
    biases), or an LV-ViT. Patching twice replaces the schedule. Drive the stage with
    :func:`set_epoch`; evaluation uses all tokens unless ``sparse_eval``.
    """
    host = _host(model, LABELS["toe"])
    host.apply(model, _like(model, TokenExpansion(schedule, num_prefix_tokens=_prefix(model), sparse_eval=sparse_eval)))
    return model


def patch_merging(
    model: nn.Module, schedule: MergeSchedule, prop_attn: bool = True, sparse_eval: bool = False
) -> nn.Module:
    """Token Merging (ToMe) in every block of ``model``, in place: ``r`` tokens per block per stage of
    ``schedule``, size-weighted attention with ``prop_attn``; evaluation uses all tokens unless ``sparse_eval``.
    Drive the stage with :func:`set_epoch`. At ``r = 0`` the model computes what the unpatched one does."""
    host = _host(model, LABELS["tome"])
    op = TokenMerging(schedule, _prefix(model), prop_attn=prop_attn, sparse_eval=sparse_eval)
    host.apply_merging(model, _like(model, op))
    return model


def patch_dropout(model: nn.Module, schedule: KeptRateSchedule) -> nn.Module:
    """A :class:`toe.ops.patch_dropout.ScheduledPatchDropout` before the first block of ``model``, in place (timm's
    ViTs: their ``patch_drop`` slot, after the position embedding); drive it with :func:`set_epoch`."""
    host = _host(model, LABELS["patchdropout"])
    host.apply_patch_dropout(model, _like(model, ScheduledPatchDropout(schedule, num_prefix_tokens=_prefix(model))))
    return model


METHODS = tuple(REDUCER_METHOD.values())  # toe, patchdropout, tome


def patch_method(
    model: nn.Module,
    method: str,
    schedule: ExpansionSchedule,
    keep_rates: Optional[Sequence[float]] = None,
    rs: Optional[Sequence[float]] = None,
    prop_attn: bool = True,
    sparse_eval: bool = False,
) -> nn.Module:
    """Patch one of :data:`METHODS` into ``model`` on the stage starts of the ToE ``schedule``: ToE itself, or
    PatchDropout with ``keep_rates`` / Token Merging with ``rs`` per stage; left ``None``, those are the ones whose
    train FLOPs match ``schedule``'s stage by stage (:func:`toe.cost.plan.match_stages`)."""
    if method == "toe":
        return patch(model, schedule, sparse_eval=sparse_eval)
    if method not in METHODS:
        raise ValueError(f"unknown token-reduction method {method!r}: expected one of {', '.join(METHODS)}")
    if (keep_rates if method == "patchdropout" else rs) is None:
        from toe.cost.flops import ViTShape
        from toe.cost.plan import match_stages

        check_host(model, LABELS[method])  # the matching reads the model's shape before the patch checks it

        matches = match_stages(ViTShape.from_model(model), schedule)
        keep_rates, rs = [m.kept_rate for m in matches], [m.merge_r for m in matches]
    starts = schedule.stage_starts
    if method == "patchdropout":
        return patch_dropout(model, KeptRateSchedule(starts, tuple(keep_rates)))
    return patch_merging(model, MergeSchedule(starts, tuple(rs)), prop_attn=prop_attn, sparse_eval=sparse_eval)


def reduction_ops(model: nn.Module) -> Iterator[nn.Module]:
    """Every token-reduction op in ``model`` whose stage follows the epoch (ToE, ToMe, scheduled PatchDropout)."""
    return (m for m in model.modules() if isinstance(m, TokenReducer))


def expansion_ops(model: nn.Module) -> Iterator[TokenExpansion]:
    return (m for m in model.modules() if isinstance(m, TokenExpansion))


def set_epoch(model: nn.Module, epoch: int) -> int:
    """Set the stage of every token-reduction op in ``model`` from the global epoch; returns the stage (0 if
    there is none)."""
    stage = 0
    for op in reduction_ops(model):
        stage = op.set_epoch(epoch)
    return stage


def reduction_op(model: nn.Module) -> Optional[nn.Module]:
    return next(reduction_ops(model), None)


def expansion_op(model: nn.Module) -> Optional[TokenExpansion]:
    return next(expansion_ops(model), None)
