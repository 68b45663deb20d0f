"""toe's Hydra configs, installed as the package ``toe.conf`` (pyproject.toml maps this folder there) and found by
Hydra as ``pkg://toe.conf``. ``experiments`` is a link to the repository's top-level ``experiments/`` folder, so
that the experiment files are the config group ``experiments`` in a clone, an editable install and a wheel alike."""

from toe.config.compose import make_sweeper_findable as _make_sweeper_findable
from toe.config.schema import register as _register_schema

# Hydra imports this package to read its files, so any way of composing these configs (toe-train, hydra.compose,
# a user's own @hydra.main) finds the schema that conf/train.yaml names first, and toe's sweeper in a clone too.
_register_schema()
_make_sweeper_findable()
