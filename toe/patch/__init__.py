"""Host integration: put ToE on the output of a vision transformer's first block, in place.

Like ToMe's ``tome.patch``, a host's class is swapped for a subclass that adds the operator, so no parameter is
added and the ``state_dict`` keys stay those of the unpatched model; the host model itself knows nothing of ToE.
One module per host family: :mod:`toe.patch.timm` (timm ``VisionTransformer`` and any model with ``blocks`` and
``num_prefix_tokens``) and :mod:`toe.patch.lvvit` (LV-ViT, whose dense head needs every position back). As in ToMe,
the function :func:`patch` shadows the package's name on ``toe``: import a host module with
``from toe.patch import timm``.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple, Type

from torch import nn

from ..expansion import TokenExpansion
from ..patch_dropout import KeptRateSchedule, ScheduledPatchDropout
from ..schedule import ExpansionSchedule
from . import lvvit, timm

TokenReducer = (TokenExpansion, ScheduledPatchDropout)  # the ops whose stage follows the epoch


def hosts() -> List[Tuple[Type[nn.Module], Callable[[nn.Module, TokenExpansion], None]]]:
    """(host type, how to patch it), most specific first; the first whose type matches the model is used. A
    function, so that ``import toe`` does not import the host models (and timm with them)."""
    return [(lvvit.host_type(), lvvit.apply), (nn.Module, timm.apply)]


def patch(model: nn.Module, schedule: ExpansionSchedule, sparse_eval: bool = False) -> nn.Module:
    """Make ``model`` a ToE model in place and return it.

    ``model`` is a vision transformer with ``blocks`` (at least two) and ``num_prefix_tokens``: a timm
    ``VisionTransformer`` or an LV-ViT. Patching twice replaces the schedule. Drive the stage with
    :func:`set_epoch`; evaluation uses all tokens unless ``sparse_eval``.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) < 2:
        raise TypeError(
            f"toe.patch needs a vision transformer with at least two `blocks`; got {type(model).__name__}"
        )
    op = TokenExpansion(schedule, num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
                        sparse_eval=sparse_eval)
    apply = next(apply for host, apply in hosts() if isinstance(model, host))
    apply(model, op)
    return model


def patch_dropout(model: nn.Module, schedule: KeptRateSchedule) -> nn.Module:
    """Put a :class:`toe.patch_dropout.ScheduledPatchDropout` in ``model``'s ``patch_drop`` slot (timm's ViTs call
    it after the position embedding, before the first block), in place; drive it with :func:`set_epoch`."""
    if isinstance(model, lvvit.host_type()):
        raise TypeError("PatchDropout on LV-ViT is not built yet: its dense head needs the dropped positions back")
    if not isinstance(getattr(model, "patch_drop", None), nn.Module) or not hasattr(model, "blocks"):
        raise TypeError(f"PatchDropout needs a timm vision transformer (its patch_drop slot); got "
                        f"{type(model).__name__}")
    model.patch_drop = ScheduledPatchDropout(schedule, num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)))
    return model


def reduction_ops(model: nn.Module) -> Iterator[nn.Module]:
    """Every token-reduction op in ``model`` whose stage follows the epoch (ToE, scheduled PatchDropout)."""
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
