"""Swap an instance's class for a ToE subclass of it, as ToMe's patches do: one subclass per host class, made once."""

from __future__ import annotations

from typing import Dict, Tuple, Type

from torch import nn

_SUBCLASSES: Dict[Tuple[type, type], type] = {}


def add_mixin(module: nn.Module, mixin: Type[nn.Module]) -> None:
    """Make ``module`` an instance of ``ToE<its class>``, a subclass of ``(mixin, its class)``; a no-op when it is
    one already (patching twice)."""
    base = type(module)
    if isinstance(module, mixin):
        return
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"ToE{base.__name__}", (mixin, base), {"__module__": mixin.__module__})
    module.__class__ = _SUBCLASSES[key]
