"""``toe-sweep status <sweep dir>``: every run of a sweep with its overrides and state; exits 1 if any failed or
cannot be read."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional


def status(sweep_dir: Path) -> int:
    import pandas as pd

    from toe.record import SUMMARY_FILE
    from toe.sweep import sweep_runs

    runs = sweep_runs(sweep_dir)
    if not runs:
        print(f"toe-sweep: no runs under {sweep_dir} (no run record or .hydra/overrides.yaml found)", file=sys.stderr)
        return 2
    rows = []
    for run in runs:
        state = run.state + (f" (resumed at epoch {', '.join(map(str, run.summary['resumed_at']))})"
                             if run.summary.get("resumed_at") else "")
        summary_file = run.path / SUMMARY_FILE
        rows.append({"run": str(run.path.relative_to(sweep_dir)) or ".", "overrides": " ".join(run.overrides),
                     "state": state, "epochs": len(run.history), "final_top1": run.summary.get("final_top1"),
                     "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary_file.stat().st_mtime))
                     if summary_file.exists() else None})
    print(pd.DataFrame(rows).to_markdown(index=False))
    bad = False
    for run, row in zip(runs, rows):
        if run.state == "failed":
            print(f"\nFAILED {row['run']}: {run.error}")
            bad = True
        for problem in run.problems:
            print(f"\nUNREADABLE {row['run']}: {problem}")
            bad = bad or not problem.endswith("(ignored)")
    counts = pd.Series([run.state for run in runs]).value_counts()
    print("\n" + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return 1 if bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="toe-sweep", description="Inspect the runs of a sweep.")
    sub = parser.add_subparsers(dest="command", required=True)
    status_parser = sub.add_parser("status", help="every run with its overrides and state; exits 1 if any failed")
    status_parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    return status(args.sweep_dir)


if __name__ == "__main__":
    sys.exit(main())
