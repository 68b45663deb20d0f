"""Composing toe's configs outside a Hydra app, and one line for what Hydra or OmegaConf refuses while composing."""

from __future__ import annotations

import re
from typing import Optional, Sequence

from omegaconf import DictConfig

from toe.config.schema import ConfigError


def make_sweeper_findable() -> None:
    """Hydra finds plugins by listing the ``hydra_plugins`` namespace with ``pkgutil``, which cannot see a portion
    that an editable install maps through an import hook (``pip install -e``): add the folder of toe's sweeper to
    the namespace's path, so that ``hydra/sweeper=toe_optuna`` is found in a clone too. A wheel needs nothing. Called
    where Hydra starts (toe-train, :func:`compose_config`, the config package), never on ``import toe``."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("hydra_plugins.toe_optuna_sweeper")
    if spec is None or spec.origin is None:
        return
    import hydra_plugins

    folder = os.path.dirname(os.path.dirname(spec.origin))
    if folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The config ``toe-train <overrides>`` trains with, composed outside a Hydra app from the package's configs
    (``toe.conf``), for tools that build a run in their own process (``toe-bench``, ``toe-vis``)."""
    from hydra import compose, initialize_config_module

    make_sweeper_findable()
    with initialize_config_module(config_module="toe.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def config_error_message(err: BaseException) -> Optional[str]:
    """What to say of a config that cannot work: a :class:`ConfigError`'s text, or Hydra's or OmegaConf's
    composition error in one line (:func:`compose_error_line`); ``None`` for any other error, to be raised."""
    from toe.data.datasets import DataRootError

    if isinstance(err, (ConfigError, DataRootError)):
        return str(err)
    return compose_error_line(err) if is_compose_error(err) else None


def is_compose_error(err: BaseException) -> bool:
    """Whether ``err`` comes from composing a config (a bad override, option, key, type or value)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(err, (HydraException, OmegaConfBaseException, ConfigError))


def compose_error_line(err: BaseException) -> str:
    """One line for a composition error: the override or key, its value and what is wrong, without Hydra's advice
    on stack traces."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    chain, current = [], err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    head = lines[0] if lines else type(err).__name__
    if isinstance(err, OverrideParseException):
        override = getattr(err, "override", None) or (head.split("'")[1] if "'" in head else "")
        return (
            f"cannot read the override {override!r}: {head.split(' See https')[0]} (close every bracket and "
            "quote; quote the whole override for the shell: 'toe.keep_rates=[0.5,0.75,1.0]', and a value with "
            "spaces or other special characters inside it: 'data.root=\"/data/my images\"')"
        )
    if isinstance(err, MissingConfigException) and "Available options" in str(err):
        options = [line.strip() for line in str(err).splitlines() if line.startswith("\t") and "=" not in line]
        return f"{head} (available: {', '.join(options)})"
    append = re.search(r"use (\+\S+)", str(err))
    cause = next((e for e in chain if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None)), None)
    if cause is not None:
        reason = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
        override = re.search(r"override '?([^' ]+)'?", head)
        subject = override.group(1).rstrip(".") if override else cause.full_key
        if append:  # an override of a key the schema does not have
            subject = append.group(1)[1:]
            return f"{subject}: {reason}" + (
                " (to add a key to model.kwargs, use +" + subject + ")" if subject.startswith("model.kwargs.") else ""
            )
        if override and "=" not in subject and getattr(cause, "value", None) is not None:
            subject = f"{subject}={cause.value}"
        return f"{subject}: {reason}"
    return " ".join(lines[:3])
