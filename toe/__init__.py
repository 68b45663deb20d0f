"""toe: Token Expansion (ToE, CVPR 2024) for training vision transformers."""

from .expansion import TokenExpansion, expand_tokens, unexpand
from .merging import TokenMerging, bipartite_soft_matching, merge_tokens, unmerge
from .schedule import ExpansionSchedule, MergeSchedule

__all__ = [
    "ExpansionSchedule",
    "MergeSchedule",
    "TokenExpansion",
    "TokenMerging",
    "bipartite_soft_matching",
    "expand_tokens",
    "merge_tokens",
    "unexpand",
    "unmerge",
]
__version__ = "0.1.0"

from .patch import (
    expansion_op,
    patch,
    patch_dropout,
    patch_merging,
    patch_method,
    reduction_op,  # noqa: E402
    set_epoch,
)

__all__ += ["expansion_op", "patch", "patch_dropout", "patch_merging", "patch_method", "reduction_op", "set_epoch"]


def _list_hydra_plugin() -> None:
    """Hydra finds plugins by listing the ``hydra_plugins`` namespace with ``pkgutil``, which cannot see a portion
    that an editable install maps through an import hook (``pip install -e``): add the folder of toe's sweeper to
    the namespace's path, so that ``hydra/sweeper=toe_optuna`` is found in a clone too. A wheel needs nothing."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("hydra_plugins.toe_optuna_sweeper")
    if spec is None or spec.origin is None:
        return
    import hydra_plugins

    folder = os.path.dirname(os.path.dirname(spec.origin))
    if folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)


_list_hydra_plugin()
