"""One process per run dir: a lock file that names its holder (host, PID, SLURM job).

A second process on a locked run dir is refused, naming the holder. A lock left by a process that is gone (same
host, PID no longer alive) or by an earlier run of the same SLURM job (a requeue, maybe on another node) is taken
over, and the takeover is logged. ``fcntl`` locks are not used because they vanish silently on some network file
systems and cannot say who holds them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from toe.train.record import StartRefused

log = logging.getLogger(__name__)
LOCK_FILE = ".toe.lock"


class RunDirBusy(StartRefused):
    """Another live process holds the run dir."""


def _me() -> Dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read(path: Path) -> Optional[Dict[str, Any]]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or isinstance(holder.get("pid"), bool) or not isinstance(holder.get("pid"), int):
        return None  # not a lock this module wrote: read as an unreadable one
    return holder


def _gone_here(holder: Dict[str, Any]) -> bool:
    """The holder ran on this host and its process no longer exists."""
    return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))


def _stale_reason(holder: Optional[Dict[str, Any]], me: Dict[str, Any]) -> Optional[str]:
    """Why the lock of ``holder`` may be taken over, or None if its holder may still be running."""
    if holder is None:
        return "an unreadable lock file"
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and (holder.get("host"), holder.get("pid")) != (me["host"], me["pid"]):
        return f"an earlier run of SLURM job {job} (requeued)"
    if _gone_here(holder):
        return f"PID {holder.get('pid')} on {holder.get('host')}, which is no longer running"
    return None


def acquire(run_dir: Path) -> Path:
    """Take the lock of ``run_dir``; raises :class:`RunDirBusy` naming a live holder."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _me()
    for attempt in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None and attempt == 0:
                time.sleep(0.2)  # a holder may be writing it this very moment
                continue
            reason = _stale_reason(holder, me)
            if reason is None:
                raise RunDirBusy(
                    f"{run_dir} is in use by PID {holder['pid']} on {holder['host']} (since {holder.get('since')}): "
                    f"two processes would interleave one record. Wait for it or stop it; if it is gone, delete "
                    f"{path}"
                ) from None
            log.warning("taking over the lock of %s, left by %s", run_dir, reason)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return path
    raise RunDirBusy(f"{run_dir}: could not take its lock {path} (another process keeps taking it)")


def release(path: Path) -> None:
    """Remove the lock if it is still ours."""
    holder = _read(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def locked(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of ``run_dir`` for the block (``enabled=False``: DDP ranks other than 0, which share it)."""
    if not enabled:
        yield
        return
    path = acquire(run_dir)
    try:
        yield
    finally:
        release(path)


def holder(run_dir: Path) -> Optional[Dict[str, Any]]:
    """Who holds the lock of ``run_dir`` (host, pid, slurm_job_id, since), or None if nobody does."""
    return _read(Path(run_dir) / LOCK_FILE) if (Path(run_dir) / LOCK_FILE).exists() else None


def holder_is_gone(run_dir: Path) -> bool:
    """True if the run dir's lock was left by a process on this host that is no longer running."""
    held = holder(run_dir)
    return held is not None and _gone_here(held)
