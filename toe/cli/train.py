"""``toe-train``: the Hydra entry of :func:`toe.train.task.train` (a run, a multirun job, a SLURM job or its requeue).

The configs are the package ``toe.conf`` (``pkg://toe.conf``), so the command works from any directory, in a
clone, an editable install or a wheel. A config that cannot work is refused with one line naming the key and
the value, before anything is written: Hydra refuses unknown keys and wrong types while composing (the schema of
:mod:`toe.config.schema`), :func:`toe.config.validate.validate` refuses the rest. ``HYDRA_FULL_ERROR=1`` shows
Hydra's own report.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Optional

from omegaconf import DictConfig

log = logging.getLogger("toe.train.task")
# what making or writing a run dir can run into: no such parent, a name too long, a read-only file system, a file
# where the dir should be, no permission
RUN_DIR_ERRNOS = (errno.ENOENT, errno.ENAMETOOLONG, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EACCES, errno.EPERM)
_first_job = True


def _process_started_at() -> float:
    """When this process started, so that the record's start-up counts Python's and torch's imports too: from
    Linux's /proc (the process's start in clock ticks since boot, against the uptime); the time of the call
    elsewhere."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # the command name (field 2) may hold spaces: count fields after its closing parenthesis
        ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def _hydra_files(cfg: DictConfig) -> Dict[str, str]:
    """What Hydra writes into a job's ``.hydra/`` (its ``run_job`` with an ``output_subdir``), as text: toe-train
    writes it itself once the start is accepted, so that a refused start leaves the run dir as it was."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.instance().cfg
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
    }


def _stamp(path: Path) -> Optional[tuple]:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _job_logs(run_dir: Path) -> Dict[Path, int]:
    """The job log files (Hydra's ``<job>.log``, opened at their first line) in ``run_dir`` and their sizes now."""
    sizes = {}
    for handler in logging.getLogger().handlers:
        name = getattr(handler, "baseFilename", None)
        if name is not None and Path(name).parent == run_dir.resolve():
            sizes[Path(name)] = Path(name).stat().st_size if Path(name).exists() else -1
    return sizes


def _restore_job_logs(sizes: Dict[Path, int]) -> None:
    """Close the job log files and cut them back to their sizes at the start (remove the new ones): a refused
    start says why on the console only, and the dir of an existing run stays byte-identical."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "baseFilename", None) is not None and Path(handler.baseFilename) in sizes:
            root.removeHandler(handler)
            handler.close()
    for path, size in sizes.items():
        with contextlib.suppress(OSError):
            if size < 0:
                path.unlink(missing_ok=True)
            else:
                os.truncate(path, size)


# What ends a run with one line and its record, not a traceback: a refused start (a config or data that cannot work, a
# busy or unresumable run dir) and the failures the record names (a full disk, a non-finite loss, label maps that
# do not fit). Named by module, not imported here: see _one_line_errors.
ONE_LINE_ERRORS = (
    ("toe.config.schema", "ConfigError"),
    ("toe.data.datasets", "DataRootError"),
    ("toe.data.token_label", "LabelMapError"),
    ("toe.train.record", "StartRefused"),
    ("toe.train.task", "DiskFull"),
)


def _one_line_errors() -> tuple:
    """The classes of :data:`ONE_LINE_ERRORS` whose modules are imported, and ``FloatingPointError``. An error of a
    module that was never imported cannot have been raised, and importing them all to say that a key is mistyped
    would import timm and torchvision: 11 of the 13 seconds such a refusal took."""
    loaded = [getattr(sys.modules[module], name) for module, name in ONE_LINE_ERRORS if module in sys.modules]
    return (*loaded, FloatingPointError)


def _task(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from toe.train.checkpoint import previous_path
    from toe.train.record import CHECKPOINT_FILE, CONFIG_FILE, SUMMARY_FILE
    from toe.train.task import train

    global _first_job
    hydra_cfg = HydraConfig.get()
    started_at = _process_started_at() if _first_job else time.time()  # a multirun's later jobs start now
    if _first_job:
        # What the imports left (torch, timm, Hydra: about 400,000 objects) lives as long as the process. Frozen out
        # of the cyclic collector's reach, neither its collections during the run nor the one at exit scan it again:
        # the command ends 1.1 s sooner after the record is written (embedded default, 3 runs each way). Later jobs
        # of a multirun leave it as it is, so that each job's own garbage stays collectable.
        gc.freeze()
    _first_job = False
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    key = "sweep.dir" if multirun else "run.dir"
    if not str(OmegaConf.select(hydra_cfg, key)).strip():
        # Hydra would take the working directory itself as the run dir
        _restore_job_logs(_job_logs(Path(hydra_cfg.runtime.output_dir)))
        log.error("hydra.%s is empty: name a directory for the run (or leave it out: runs/<task_name>/<time>)", key)
        sys.exit(2)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    fresh = run_dir.is_dir() and not any(run_dir.iterdir())  # Hydra made it for this start and wrote nothing yet
    has_record = any(
        (run_dir / name).exists() for name in (SUMMARY_FILE, CHECKPOINT_FILE, previous_path(Path(CHECKPOINT_FILE)).name)
    )
    logs, config_before = _job_logs(run_dir), _stamp(run_dir / CONFIG_FILE)
    try:
        summary = train(cfg, run_dir, list(hydra_cfg.overrides.task), started_at, _hydra_files(cfg))
    except _one_line_errors() as err:
        # the start was accepted when the run wrote its config.yaml (atomically: a new file); a refused one leaves
        # an existing run's dir as it was, and a single run's new dir not at all; a multirun job without a record
        # keeps the line in its log, which toe-sweep status reads as the job's error
        refused = _stamp(run_dir / CONFIG_FILE) == config_before
        if refused and (has_record or not multirun):
            _restore_job_logs(logs)
        elif refused:  # the job's overrides beside its error, so that toe-sweep lists the job and can retry it
            from toe.train.record import write_hydra_files

            with contextlib.suppress(OSError):
                write_hydra_files(run_dir, _hydra_files(cfg))
        log.error("%s", str(err).splitlines()[0])
        if multirun:
            raise  # this job fails (its new dir says so) and the sweep goes on with the others
        if refused and fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        sys.exit(2 if refused else 1)  # a single run: one clear line, no traceback (2: refused, 1: failed)
    return summary.final_top1


def main() -> Optional[float]:
    import hydra

    from toe.config.compose import compose_error_line, is_compose_error, make_sweeper_findable

    make_sweeper_findable()
    wants_hydra_report = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra prints composition errors over several lines and exits; with HYDRA_FULL_ERROR it raises them instead,
    # so that they can be said in one line here.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return hydra.main(version_base="1.3", config_path="pkg://toe.conf", config_name="train")(_task)()
    except KeyboardInterrupt:  # the record already says interrupted: no traceback for Ctrl-C
        print(
            "toe-train: interrupted (Ctrl-C); the run's summary says so, and the same command resumes it",
            file=sys.stderr,
        )
        sys.exit(130)
    except _one_line_errors() as err:  # a multirun's job, re-raised at the end
        print(
            f"toe-train: a job failed: {str(err).splitlines()[0]} (toe-sweep status <sweep dir> lists every job)",
            file=sys.stderr,
        )
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 - sorted below: config errors get one line, others their traceback
        if (
            not wants_hydra_report
            and isinstance(err, OSError)
            and not is_compose_error(err)
            and err.errno in RUN_DIR_ERRNOS
            and err.filename
        ):
            # Hydra makes the run dir before toe-train runs: a path that cannot be a directory here
            print(
                f"toe-train: {err.filename}: {err.strerror} (the run dir, hydra.run.dir or hydra.sweep.dir, must "
                "be a directory this process can write)",
                file=sys.stderr,
            )
            sys.exit(2)
        if wants_hydra_report or not is_compose_error(err):
            raise
        print(f"toe-train: {compose_error_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Run the importable toe.cli.train, not this __main__ copy: submitit pickles the task function by reference.
    from toe.cli.train import main as _main

    _main()
