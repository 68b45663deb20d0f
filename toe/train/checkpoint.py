"""The training state and its checkpoint: :class:`TrainState` is the one owner of the format.

A checkpoint holds plain ``state_dict``s (``model``, ``model_ema`` as DeiT names it, ``optimizer``, the timm
``scheduler``, the AMP ``scaler``), the run's :class:`Progress` (next epoch, update count, metric history, resumes,
W&B id, accepted config changes, time spent), RNG states (torch, CUDA, numpy, python) as tensors and lists, and the
resolved ``config`` as a plain dict. No pickled objects: it loads with ``torch.load(weights_only=True)``, so a newer
torch still reads it. It is written atomically next to the one before it.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from toe.train.distributed import DistInfo, gather_objects
from toe.train.record import EpochRow, StartRefused, replaced_atomically

log = logging.getLogger(__name__)


def capture_rng() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
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
        disk_full = None
        try:
            torch.save(state, tmp)
        except RuntimeError as err:
            disk_full = _as_disk_full(err, tmp)
            if disk_full is err:
                raise
        if disk_full is not None:
            # torch's writer leaves its file open when its last write fails, held by the frames of its error: with
            # the error dropped, collect it, so that the partial file's space is freed when it is removed
            gc.collect()
            raise disk_full
        if path.exists():
            os.replace(path, previous_path(path))


LOW_SPACE_BYTES = 2**20
REQUIRED_KEYS = ("epoch", "history", "model", "optimizer", "scheduler", "rng")  # what a resume reads


def _as_disk_full(err: RuntimeError, path: Path) -> BaseException:
    """torch.save reports a full disk as a ``RuntimeError`` of its stream writer ("file write failed", "iostream
    error"), not as an ``OSError``: where the file system has (almost) no space left, or the message says so, it
    becomes the ``OSError(ENOSPC)`` that the run's ending handles; any other error stays as it is."""
    import errno
    import shutil

    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    try:
        low = shutil.disk_usage(path.parent).free < LOW_SPACE_BYTES
    except OSError:
        low = False
    if low or "no space" in str(err).lower() or "quota" in str(err).lower():
        return OSError(errno.ENOSPC, f"no space left on device while torch.save wrote it ({text})", str(path))
    return err


def _load(path: Path, map_location: Optional[str]) -> Dict[str, Any]:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"not a toe-train checkpoint (a {type(state).__name__}, not a dict)")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"not a toe-train checkpoint (no {', '.join(missing)})")
    return state


def load_checkpoint(path: Path, map_location: Optional[str] = "cpu") -> Optional[Dict[str, Any]]:
    """The run's checkpoint, or ``None`` if there is none. An unreadable ``checkpoint.pth`` falls back to
    ``checkpoint.prev.pth`` (logged); if both are unreadable, :class:`CheckpointUnreadable` says what to do."""
    path = Path(path)
    previous = previous_path(path)
    if not path.exists() and not previous.exists():
        return None
    errors = []
    for candidate in (path, previous):
        if not candidate.exists():  # a kill between save_checkpoint's two renames leaves only the previous one
            errors.append(f"{candidate.name}: missing")
            continue
        try:
            state = _load(candidate, map_location)
        except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
            errors.append(f"{candidate.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            continue
        if candidate == previous and not path.exists():
            log.warning(
                "%s is missing (the run stopped between the checkpoint's two renames); resuming from %s (epoch %d)",
                path,
                previous.name,
                state["epoch"],
            )
        elif candidate == previous:
            log.warning(
                "%s is unreadable (%s); resuming from %s (epoch %d) instead",
                path,
                errors[0].split(": ", 1)[1],
                previous.name,
                state["epoch"],
            )
        return state
    raise CheckpointUnreadable(
        f"{path} cannot be resumed from ({'; '.join(errors)}): move it aside to start over, or restore a previous copy"
    )


@dataclass
class Progress:
    """What a run has done so far: saved in the checkpoint, summarised in ``summary.json``. Known before the model
    is built, so that a resume can be checked (config, completion) before anything is written."""

    epoch: int = 0  # the next epoch to train
    num_updates: int = 0
    history: List[EpochRow] = field(default_factory=list)
    resumed_at: List[int] = field(default_factory=list)  # epochs at which the run resumed from its checkpoint
    wandb_id: Optional[str] = None
    # Config changes a resume accepted (resume.allow_changes=true): [{"epoch": e, "changes": {key: [old, new]}}]
    config_changes: List[Dict[str, Any]] = field(default_factory=list)
    startup_seconds: float = 0.0  # every start's time to its first epoch, summed
    wall_seconds: float = 0.0  # every start's time to its last checkpoint, summed

    KEYS = (
        "epoch",
        "num_updates",
        "history",
        "resumed_at",
        "wandb_id",
        "config_changes",
        "startup_seconds",
        "wall_seconds",
    )

    def state_dict(self) -> Dict[str, Any]:
        state = {key: getattr(self, key) for key in self.KEYS}
        state["history"] = [row.to_dict() for row in self.history]
        return state

    @classmethod
    def from_checkpoint(cls, checkpoint: Optional[Dict[str, Any]]) -> "Progress":
        """A fresh run's progress, or a checkpoint's, with this start noted as a resume."""
        if checkpoint is None:
            return cls()
        progress = cls(**{key: checkpoint[key] for key in cls.KEYS if key in checkpoint})
        progress.history = [EpochRow.from_dict(row) for row in checkpoint["history"]]
        progress.resumed_at = list(progress.resumed_at) + [progress.epoch]
        progress.config_changes = list(progress.config_changes)
        return progress

    @property
    def last(self) -> Optional[EpochRow]:
        return self.history[-1] if self.history else None


class TrainState:
    """Everything a resumed run needs to go on exactly as an uninterrupted one: the model, its EMA, the optimizer,
    the LR scheduler, the AMP scaler, every process's RNG, the :class:`Progress`, and the config it trains with."""

    FORMAT = 2  # 1: toe 0.1 (EMA under "ema")

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        ema: Any = None,
        scaler: Any = None,
        progress: Optional[Progress] = None,
        config: Optional[Dict[str, Any]] = None,
        dist: Optional[DistInfo] = None,
    ):
        self.model, self.optimizer, self.scheduler, self.ema, self.scaler = model, optimizer, scheduler, ema, scaler
        self.progress = progress or Progress()
        self.config = config or {}
        self.dist = dist or DistInfo()

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint. A collective under DDP: every process's RNG is gathered, so call it on every rank."""
        rng = gather_objects(capture_rng(), self.dist)
        return {
            "format": self.FORMAT,
            "model": self.model.state_dict(),
            "model_ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng if self.dist.enabled else rng[0],
            "config": self.config,
            **self.progress.state_dict(),
        }

    def load_state_dict(self, checkpoint: Dict[str, Any]) -> None:
        """Restore the modules, the RNG of this process and the scheduler's epoch from ``checkpoint``; the progress
        comes from :meth:`Progress.from_checkpoint`, read before the run was built."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if not self.optimizer.defaults.get("fused"):
            # torch takes the saved groups' flags: a checkpoint from a device with a fused kernel (a GPU) resumed
            # where this torch has none (an older torch's CPU) would fail at its first step
            for group in self.optimizer.param_groups:
                if group.get("fused"):
                    group["fused"] = False
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        ema_state = checkpoint.get("model_ema") or checkpoint.get("ema")  # "ema": format 1
        if self.ema is not None and ema_state:
            self.ema.load_state_dict(ema_state)
        elif self.ema is not None:
            log.warning("the checkpoint holds no EMA weights: the EMA starts again from the model")
            self.ema.set(self.model)
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        rng = checkpoint["rng"]
        restore_rng(rng[self.dist.rank] if isinstance(rng, list) else rng)
        self.scheduler.step(checkpoint["epoch"])

    def save(self, path: Path) -> float:
        """Write the checkpoint (rank 0; every rank takes part in gathering the RNG); returns the seconds taken."""
        start = time.perf_counter()
        state = self.state_dict()
        if self.dist.is_main:
            save_checkpoint(path, state)
        return time.perf_counter() - start
