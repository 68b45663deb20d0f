"""Analysis of toe runs: collect run records into pandas, rebuild the paper's tables and plots, write reports."""

from toe.analysis.collect import Runs, collect, collect_wandb

__all__ = ["Runs", "collect", "collect_wandb"]
