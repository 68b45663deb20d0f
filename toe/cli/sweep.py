"""``toe-sweep status <sweep dir>``: every job of a sweep with its overrides and state (SLURM's too, where squeue
answers); exits 1 if any failed, died or cannot be read.
``toe-sweep retry <sweep dir>``: run the failed, interrupted, died and never-started jobs again, with their own
overrides and run dirs (so they resume from their checkpoints), on the sweep's launcher or ``--launcher``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional


def status(sweep_dir: Path) -> int:
    import pandas as pd

    from toe.sweep.status import sweep_runs
    from toe.train.record import SUMMARY_FILE

    runs = sweep_runs(sweep_dir)
    if not runs:
        print(f"toe-sweep: no runs under {sweep_dir} (no run record or .hydra/overrides.yaml found)", file=sys.stderr)
        return 2
    rows = []
    for run in runs:
        state = (
            run.state
            + (f" (resumed at epoch {', '.join(map(str, run.summary.resumed_at))})" if run.summary.resumed_at else "")
            + (f" [SLURM {run.slurm}]" if run.slurm else "")
        )
        summary_file = run.path / SUMMARY_FILE
        rows.append(
            {
                "run": str(run.path.relative_to(sweep_dir)) or ".",
                "overrides": " ".join(run.overrides),
                "state": state,
                "epochs": len(run.history),
                "final_top1": run.summary.final_top1,
                "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary_file.stat().st_mtime))
                if summary_file.exists()
                else None,
            }
        )
    print(pd.DataFrame(rows).to_markdown(index=False))
    bad = False
    for run, row in zip(runs, rows):
        if run.state in ("failed", "died"):
            print(f"\n{run.state.upper()} {row['run']}: {run.error}")
            bad = True
        for problem in run.problems:
            print(f"\nUNREADABLE {row['run']}: {problem}")
            bad = bad or not problem.endswith("(ignored)")
    counts = pd.Series([run.state for run in runs]).value_counts()
    print("\n" + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return 1 if bad else 0


def retry(sweep_dir: Path, launcher: Optional[str], dry_run: bool) -> int:
    import subprocess

    from toe.sweep.status import RETRY_STATES, retry_command, sweep_runs

    runs = sweep_runs(sweep_dir)
    if not runs:
        print(
            f"toe-sweep: no runs under {sweep_dir} (no run record, .hydra/overrides.yaml or multirun.yaml found)",
            file=sys.stderr,
        )
        return 2
    todo = [run for run in runs if run.state in RETRY_STATES]
    if not todo:
        print(f"toe-sweep: nothing to retry in {sweep_dir}: every job completed or is running")
        return 0
    commands = [retry_command(run, sweep_dir, launcher) for run in todo]
    for run, command in zip(todo, commands):
        print(
            f"{'would retry' if dry_run else 'retrying'} {run.path.relative_to(sweep_dir)} ({run.state}): "
            f"{' '.join(command[2:])}"
        )
    if dry_run:
        return 0
    on_slurm = any("hydra/launcher=slurm" in command for command in commands)
    if on_slurm:  # each command waits on its own SLURM job: submit them all, then wait for all
        procs = [subprocess.Popen(command) for command in commands]
        codes = [proc.wait() for proc in procs]
    else:  # here, one after another, as the basic launcher runs a sweep
        codes = [subprocess.run(command).returncode for command in commands]
    failed = [str(run.path.relative_to(sweep_dir)) for run, code in zip(todo, codes) if code != 0]
    print(f"toe-sweep: retried {len(todo)} jobs" + (f"; still failing: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="toe-sweep", description="Inspect and finish the runs of a sweep.")
    sub = parser.add_subparsers(dest="command", required=True)
    status_parser = sub.add_parser("status", help="every job with its overrides and state; exits 1 if any failed")
    status_parser.add_argument("sweep_dir", type=Path)
    retry_parser = sub.add_parser("retry", help="run the failed, interrupted, died and never-started jobs again")
    retry_parser.add_argument("sweep_dir", type=Path)
    retry_parser.add_argument(
        "--launcher",
        choices=("basic", "submitit_local", "slurm"),
        help="where to run them (default: the launcher the sweep used)",
    )
    retry_parser.add_argument("--dry-run", action="store_true", help="list the jobs and their commands only")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    if args.command == "retry":
        return retry(args.sweep_dir, args.launcher, args.dry_run)
    return status(args.sweep_dir)


if __name__ == "__main__":
    sys.exit(main())
