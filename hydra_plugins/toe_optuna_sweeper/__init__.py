"""toe's Optuna sweeper for Hydra (``hydra/sweeper=toe_optuna``, used by ``hparams_search=...``); Hydra finds
plugins only in the ``hydra_plugins`` namespace package. The search itself is :mod:`toe.sweep.search`."""
