"""toe: Token Expansion (ToE, CVPR 2024) for training vision transformers."""

from .expansion import TokenExpansion, expand_tokens, unexpand
from .schedule import ExpansionSchedule

__all__ = ["ExpansionSchedule", "TokenExpansion", "expand_tokens", "unexpand"]
__version__ = "0.1.0"

from .patch import expansion_op, patch, patch_dropout, reduction_op, set_epoch  # noqa: E402

__all__ += ["expansion_op", "patch", "patch_dropout", "reduction_op", "set_epoch"]
