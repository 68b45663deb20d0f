"""``toe-report <sweep dir | wandb:entity/project> [-o out/]``: every table the runs allow, the plots, the flagged
runs, and a one-line verdict per setting against its reference row. Markdown plus PNGs, or one HTML file; the work is
:func:`toe.analysis.report.build_report`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from toe.analysis.collect import collect, collect_wandb
from toe.analysis.report import build_report, read_reference


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="toe-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a sweep or runs directory, or wandb:<entity>/<project>")
    parser.add_argument("-o", "--out", type=Path, default=Path("report"), help="output directory (default: report)")
    parser.add_argument("--reference", type=Path, help="CSV of reference numbers keyed by the table's row columns")
    parser.add_argument("--html", action="store_true", help="also write one self-contained report.html")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"-o {args.out}: a file, not a directory")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"-o {args.out}: cannot make the directory ({err.strerror})")
    try:
        if args.source.startswith("wandb:"):
            collected = collect_wandb(args.source[len("wandb:") :])
        else:
            collected = collect(Path(args.source))
    except FileNotFoundError as err:
        print(f"toe-report: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - wandb raises its own types for a missing login or network
        if not type(err).__module__.startswith("wandb"):
            raise
        print(
            f"toe-report: {args.source}: W&B cannot be read ({str(err).splitlines()[0]}; `wandb login`, or "
            "report the run dirs instead)",
            file=sys.stderr,
        )
        return 2
    reference = None
    if args.reference:
        try:
            reference = read_reference(args.reference)
        except (OSError, ValueError) as err:
            parser.error(f"--reference {args.reference}: {str(err).splitlines()[0]}")
    root = None if args.source.startswith("wandb:") else Path(args.source)
    path = build_report(collected, args.out, args.source, reference, html=args.html, root=root)
    flagged = collected.runs["flag"].notna().sum()
    print(f"toe-report: wrote {path} ({len(collected.runs)} runs, {flagged} flagged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
