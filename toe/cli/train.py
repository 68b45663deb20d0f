"""``toe-train``: the Hydra entry of :func:`toe.train.train` (a run, a multirun job, a SLURM job or its requeue).

The configs are the package ``toe.conf`` (``pkg://toe.conf``), so the command works from any directory, in a
clone, an editable install or a wheel. A config that cannot work is refused with one line naming the key and
the value, before anything is written: Hydra refuses unknown keys and wrong types while composing (the schema of
:mod:`toe.schema`), :func:`toe.schema.validate` refuses the rest. ``HYDRA_FULL_ERROR=1`` shows Hydra's own report.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

log = logging.getLogger("toe.train")
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


def _task(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from toe.data import DataRootError
    from toe.record import StartRefused
    from toe.schema import ConfigError
    from toe.train import DiskFull, train

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
    try:
        summary = train(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), started_at)
    except (ConfigError, DataRootError, StartRefused, DiskFull) as err:
        log.error("%s", str(err).splitlines()[0])
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # this job fails and the sweep goes on with the others
        sys.exit(1 if isinstance(err, DiskFull) else 2)  # a single run: one clear line, no traceback
    return summary.final_top1


def main() -> Optional[float]:
    import hydra

    from toe.data import DataRootError
    from toe.record import StartRefused
    from toe.schema import ConfigError, compose_error_line, is_compose_error
    from toe.train import DiskFull

    wants_hydra_report = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra prints composition errors over several lines and exits; with HYDRA_FULL_ERROR it raises them instead,
    # so that they can be said in one line here.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return hydra.main(version_base="1.3", config_path="pkg://toe.conf", config_name="train")(_task)()
    except (ConfigError, DataRootError, StartRefused, DiskFull) as err:  # a multirun's job, re-raised at the end
        print(f"toe-train: a job failed: {str(err).splitlines()[0]} (toe-sweep status <sweep dir> lists every job)",
              file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 - sorted below: config errors get one line, others their traceback
        if wants_hydra_report or not is_compose_error(err):
            raise
        print(f"toe-train: {compose_error_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Run the importable toe.cli.train, not this __main__ copy: submitit pickles the task function by reference.
    from toe.cli.train import main as _main

    _main()
