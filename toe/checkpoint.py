"""One checkpoint schema, written atomically and loadable with ``torch.load(weights_only=True)``.

Contents: plain ``state_dict``s (model, EMA, optimizer, timm scheduler, AMP scaler), the next epoch to run, the
update count, RNG states (torch, CUDA, numpy, python) as tensors and lists, the W&B run id, the metric history
and the resolved config as a plain dict. No pickled objects, so a newer torch still loads it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .record import StartRefused, replaced_atomically


def capture_rng() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


PREVIOUS_SUFFIX = ".prev"  # checkpoint.pth -> checkpoint.prev.pth


class CheckpointUnreadable(StartRefused):
    """Neither the checkpoint nor the previous one can be loaded; the message says what to do."""


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + PREVIOUS_SUFFIX + path.suffix)


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and keep the one before it as ``checkpoint.prev.pth``: a crash,
    SIGKILL or full disk at any point leaves at least one complete checkpoint and no ``.tmp`` file."""
    path = Path(path)
    with replaced_atomically(path) as tmp:
        torch.save(state, tmp)
        if path.exists():
            os.replace(path, previous_path(path))


def _load(path: Path, map_location: Optional[str]) -> Dict[str, Any]:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "epoch" not in state:
        raise ValueError("not a toe-train checkpoint (no epoch)")
    return state


def load_checkpoint(path: Path, map_location: Optional[str] = "cpu") -> Optional[Dict[str, Any]]:
    """The run's checkpoint, or ``None`` if there is none. An unreadable ``checkpoint.pth`` falls back to
    ``checkpoint.prev.pth`` (logged); if both are unreadable, :class:`CheckpointUnreadable` says what to do."""
    import logging

    path = Path(path)
    previous = previous_path(path)
    if not path.exists() and not previous.exists():
        return None
    errors = []
    for candidate in (path, previous):
        if not candidate.exists():
            continue
        try:
            state = _load(candidate, map_location)
        except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
            errors.append(f"{candidate.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            continue
        if candidate == previous:
            logging.getLogger(__name__).warning("%s is unreadable (%s); resuming from %s (epoch %d) instead",
                                                path, errors[0], previous.name, state["epoch"])
        return state
    raise CheckpointUnreadable(
        f"{path} is unreadable ({'; '.join(errors)}): move it aside to start over, or restore a previous copy")
