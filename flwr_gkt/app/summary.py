"""Markdown table (and optional plot/CSV) across finished runs.

``python -m flwr_gkt.app.summary results/ [more dirs or results.json ...]
[--columns kd-mode edge-model] [--output table.md] [--plot runs.png] [--csv runs.csv]``

Every ``results.json`` under the given paths is one row: the config keys that
differ between the runs (or ``--columns``), final and best accuracy, edge-only
accuracy (FedGKT), training MB up/down, wall time and compute seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import find_runs, markdown_table, plot_runs, write_long_csv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flwr_gkt.app.summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="+", help="run directories, results.json files, or parents of them"
    )
    parser.add_argument("--columns", nargs="+", default=None, help="config keys to show")
    parser.add_argument("--output", default="", help="also write the table to this file")
    parser.add_argument("--plot", default="", help="also plot the runs into this PNG")
    parser.add_argument(
        "--csv", default="", help="also write one row per run and round to this CSV"
    )
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)
    if not runs:
        print(f"no results.json under {args.paths}", file=sys.stderr)
        return 1
    table = markdown_table(runs, args.columns)
    print(table, end="")
    if args.output:
        Path(args.output).write_text(table)
    if args.plot:
        plot_runs(runs, Path(args.plot))
    if args.csv:
        write_long_csv(runs, Path(args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
