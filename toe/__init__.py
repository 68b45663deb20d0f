"""toe: Token Expansion (ToE, CVPR 2024) for training vision transformers."""

from .expansion import TokenExpansion, expand_tokens, unexpand
from .merging import TokenMerging, bipartite_soft_matching, merge_tokens, unmerge
from .schedule import ExpansionSchedule, MergeSchedule

__all__ = ["ExpansionSchedule", "MergeSchedule", "TokenExpansion", "TokenMerging", "bipartite_soft_matching",
           "expand_tokens", "merge_tokens", "unexpand", "unmerge"]
__version__ = "0.1.0"

from .patch import expansion_op, patch, patch_dropout, patch_merging, reduction_op, set_epoch  # noqa: E402

__all__ += ["expansion_op", "patch", "patch_dropout", "patch_merging", "reduction_op", "set_epoch"]
