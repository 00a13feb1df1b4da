"""Run an experiment -- several runs side by side -- and compare them.

``python -m flwr_gkt.app.experiment NAME [--set key=value ...] [--only RUN ...]``

``NAME`` is a file in ``flwr_gkt/app/experiments/`` (or a path to a YAML file)::

    title: FedGKT vs FedAvg on Fashion-MNIST
    preset: compare          # base preset of every run
    pretrain: {out: "{experiment-dir}/edge.pt"}   # optional: EcoFed extractor
    bridge: {out: "{experiment-dir}/bridge.pt"}   # optional: FedAgg bridge autoencoder
    runtime: inprocess       # optional: flwr (default: flwr run, Ray) or inprocess (no Ray, one process)
    set: {num-server-rounds: 5}   # overrides for every run (optional)
    runs:
      fedgkt-iid: {algorithm: fedgkt, set: {partition: iid}}
      fedavg-iid: {algorithm: fedavg, set: {partition: iid}}

Instead of ``runs``, a ``grid`` crosses rows (algorithms and their settings)
with columns (data settings); run ``<row>--<column>`` gets the column's
``preset``/``set`` overlaid by the row's, and ``summary.md`` adds a table of
final accuracies with one row and column each (e.g. ``paper-table1-fmnist``)::

    grid:
      rows:
        fedgkt: {label: FedGKT, algorithm: fedgkt}
        fedavg: {label: FedAvg, algorithm: fedavg}
      columns:
        iid: {label: IID, set: {partition: iid}}
        dir0.5: {label: "Dirichlet(0.5)", set: {partition: dirichlet}}

Each run is a separate ``python -m simulation`` process (its own Flower
simulation), writing its results into ``<results-dir>/<experiment>/<run>/``.
Runs of the same experiment share the seed, hence exactly the same partitions.
When all runs are done the experiment directory gets:

- ``comparison.csv``: one row per run and round (accuracy, bytes each way,
  cumulative training MB, compute seconds, ...),
- ``comparison.png``: accuracy vs round and accuracy vs bytes communicated,
- ``summary.md``: the markdown table of the runs (see :mod:`flwr_gkt.app.summary`).

Progress: one line per run start/end and the per-round evaluation lines of
the running simulation; the full log of each run is in ``<run>/run.log``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from flwr_gkt.config import RunConfig, add_override_argument, parse_overrides

from .report import (
    communication_table,
    find_runs,
    load_run,
    markdown_table,
    plot_grid,
    plot_runs,
    write_long_csv,
)

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"
#: ``algorithm`` of a run (``python -m simulation --algorithm``).
ALGORITHMS = ("fedgkt", "fedavg", "fedagg", "centralized", "sl", "splitfed-v1", "splitfed-v2")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_PREFIX = re.compile(r"^(INFO|WARNING|ERROR|DEBUG)\s*:\s*")
_PROGRESS_MARKERS = (" eval: accuracy", ": cloud accuracy", " rejected: ", "ERROR", "Traceback")


def load_experiment(name: str) -> tuple[str, dict[str, Any]]:
    """Read an experiment definition by name (in ``experiments/``) or path."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"experiment {name!r} not found at {path}; available: {available}")
    spec = yaml.safe_load(path.read_text()) or {}
    if "grid" in spec:
        spec["runs"] = expand_grid(spec["grid"])
    if not isinstance(spec.get("runs"), dict) or not spec["runs"]:
        raise ValueError(f"{path}: an experiment needs a non-empty 'runs' mapping")
    for run, body in spec["runs"].items():
        algorithm = (body or {}).get("algorithm", "fedgkt")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"{path}: run {run!r} has unknown algorithm {algorithm!r}")
    return path.stem, spec


def expand_grid(grid: dict[str, Any]) -> dict[str, Any]:
    """The runs of a ``grid``: one per row and column, ``<row>--<column>``, column by column.

    A run's ``preset`` is the row's, else the column's; its ``set`` is the
    column's overlaid by the row's; ``algorithm`` and ``runtime`` come from the
    row. The labels are kept for the table (``row``/``column`` keys).
    """
    rows, columns = grid.get("rows") or {}, grid.get("columns") or {}
    if not rows or not columns:
        raise ValueError("a grid needs non-empty 'rows' and 'columns'")
    runs: dict[str, Any] = {}
    for c, col in columns.items():  # column by column: a partial run has whole columns
        col = col or {}
        for r, row in rows.items():
            row = row or {}
            run = {k: v for k, v in row.items() if k not in ("label", "set", "preset")}
            if "preset" in row or "preset" in col:
                run["preset"] = row.get("preset", col.get("preset"))
            run["set"] = {**(col.get("set") or {}), **(row.get("set") or {})}
            run["row"], run["column"] = str(row.get("label", r)), str(col.get("label", c))
            runs[f"{r}--{c}"] = run
    return runs


def grid_table(spec: dict[str, Any], runs: list[Any]) -> str:
    """Markdown table of a grid's runs: final accuracy (best) per row and column.

    Each cell also carries the run's rejected honest replies when there were
    any (``nodes.csv``), so a reader sees that no node was lost to the
    outlier check.
    """
    by_name = {r.path.name: r for r in runs}
    columns = list(dict.fromkeys(b["column"] for b in spec["runs"].values()))
    rows = list(dict.fromkeys(b["row"] for b in spec["runs"].values()))
    cells: dict[tuple[str, str], str] = {}
    for name, body in spec["runs"].items():
        run = by_name.get(name)
        if run is None:
            cells[(body["row"], body["column"])] = "(not run)"
            continue
        t = run.totals()
        text = f"{100 * t['final-accuracy']:.2f} ({100 * t['best-accuracy']:.2f})"
        rejected = rejected_replies(run.path)
        if rejected:
            text += f", {rejected} rejected"
        cells[(body["row"], body["column"])] = text
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cells.get((row, c), "") for c in columns) + " |")
    return (
        "Final test accuracy in % after the last round (best round in brackets).\n\n"
        + "\n".join(lines)
        + "\n"
    )


def rejected_replies(run_dir: Path) -> int:
    """Replies of the run rejected by the server (``nodes.csv`` rows with status ``rejected``)."""
    path = run_dir / "nodes.csv"
    if not path.is_file():
        return 0
    import csv

    with open(path, newline="") as f:
        return sum(row.get("status") == "rejected" for row in csv.DictReader(f))


def _expand(value: Any, out_dir: Path) -> Any:
    """Replace ``{experiment-dir}`` in string values by the experiment's directory."""
    return value.replace("{experiment-dir}", str(out_dir)) if isinstance(value, str) else value


def run_command(spec: dict[str, Any], run: str, out_dir: Path, extra: dict[str, Any]) -> list[str]:
    """The ``python -m simulation`` command line of one run."""
    body = spec["runs"][run] or {}
    values = {
        **(spec.get("set") or {}),
        **(body.get("set") or {}),
        **extra,
        "results-dir": str(out_dir),
        "run-name": run,
    }
    values = {k: _expand(v, out_dir) for k, v in values.items()}
    preset = str(body.get("preset", spec.get("preset", "fmnist")))
    cmd = [
        sys.executable,
        "-m",
        "flwr_gkt.app",
        "--preset",
        preset,
        "--algorithm",
        str(body.get("algorithm", "fedgkt")),
        "--runtime",
        str(body.get("runtime", spec.get("runtime", "flwr"))),
    ]
    for key, value in values.items():
        cmd += [
            "--set",
            f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}",
        ]
    return cmd


def _section_target(
    spec: dict[str, Any], key: str, out_dir: Path, extra: dict[str, Any]
) -> tuple[dict[str, Any], Path, RunConfig] | None:
    """``(section, output path, base config)`` of a one-time training section; ``None`` if absent or done."""
    section = spec.get(key)
    if not section:
        return None
    path = Path(_expand(str(section["out"]), out_dir))
    if path.is_file():
        return None
    from flwr_gkt.config import resolve_config

    from .task import PRESETS_DIR

    cfg = resolve_config(
        {"preset": spec.get("preset", "fmnist"), **(spec.get("set") or {}), **extra}, PRESETS_DIR
    )
    return section, path, cfg


def pretrain(spec: dict[str, Any], out_dir: Path, extra: dict[str, Any]) -> None:
    """Run the experiment's one-time training sections before its runs.

    ``pretrain: {out: "{experiment-dir}/edge.pt", samples: 5000, epochs: 2}``
    trains the base preset's edge model on training images no node holds
    (:mod:`flwr_gkt.data.pretrain`; runs load it with ``edge-pretrained``).
    ``bridge: {out: "{experiment-dir}/bridge.pt", samples: 5000, epochs: 3}``
    trains the FedAgg bridge autoencoder the same way (:mod:`flwr_gkt.data.bridge`;
    runs load it with ``bridge-autoencoder``). A file that exists is kept.
    """
    from flwr_gkt.data.bridge import pretrain_autoencoder
    from flwr_gkt.data.pretrain import pretrain_edge

    if (target := _section_target(spec, "pretrain", out_dir, extra)) is not None:
        section, path, cfg = target
        result = pretrain_edge(
            path, edge_model=cfg.edge_model, **_held_out_options(cfg, section, epochs=2)
        )
        print(
            f"pre-trained {cfg.edge_model} on {int(result['samples'])} held-out images "
            f"(test accuracy {100 * result['test-accuracy']:.2f}%) -> {path}",
            flush=True,
        )
    if (target := _section_target(spec, "bridge", out_dir, extra)) is not None:
        section, path, cfg = target
        result = pretrain_autoencoder(path, **_held_out_options(cfg, section, epochs=3))
        print(
            f"bridge autoencoder trained on {int(result['samples'])} held-out images "
            f"(test MSE {result['test-mse']:.4f}) -> {path}",
            flush=True,
        )


def _held_out_options(cfg: RunConfig, section: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The held-out pre-training arguments of a section (default: 5,000 samples, ``epochs``)."""
    from .task import held_out_options

    return held_out_options(
        cfg, int(section.get("samples", 5000)), int(section.get("epochs", epochs))
    )


def _run(cmd: list[str], log_path: Path, label: str) -> int:
    """Run one simulation, log everything to ``log_path``, echo progress lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if any(m in line for m in _PROGRESS_MARKERS):
                text = _LOG_PREFIX.sub("", _ANSI.sub("", line)).strip()
                print(f"  [{label}] {text[:200]}", flush=True)
        return proc.wait()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flwr_gkt.app.experiment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("experiment", help="name in flwr_gkt/app/experiments/ or a YAML path")
    add_override_argument(parser, "override a config key in every run")
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="RUN", help="run only these runs"
    )
    parser.add_argument(
        "--results-dir", default="results", help="parent of the experiment directory"
    )
    parser.add_argument(
        "--name", default="", help="experiment directory name (default: the experiment's)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="do not run anything; rebuild the comparison from existing runs",
    )
    return parser


def _run_all(
    spec: dict[str, Any], runs: list[str], out_dir: Path, extra: dict[str, Any]
) -> list[str]:
    """Run each run of the experiment as its own process, one after another; return the failed."""
    failed: list[str] = []
    start = time.perf_counter()
    pretrain(spec, out_dir, extra)
    for i, run in enumerate(runs, 1):
        run_dir = out_dir / run
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        print(
            f"[{i}/{len(runs)}] {run}: started ({time.perf_counter() - start:.0f}s into the experiment)",
            flush=True,
        )
        rc = _run(run_command(spec, run, out_dir, extra), run_dir / "run.log", run)
        if rc == 0 and (run_dir / "results.json").is_file():
            t = load_run(run_dir).totals()
            print(
                f"[{i}/{len(runs)}] {run}: done in {time.perf_counter() - t0:.0f}s, accuracy "
                f"{100 * t['final-accuracy']:.2f}%, {t['mb-up'] + t['mb-down']:.1f} MB",
                flush=True,
            )
        else:
            failed.append(run)
            print(
                f"[{i}/{len(runs)}] {run}: FAILED (exit {rc}); see {run_dir / 'run.log'}",
                flush=True,
            )
    return failed


def _compare(spec: dict[str, Any], name: str, out_dir: Path) -> bool:
    """Write the comparison of the finished runs (CSV, plots, summary.md); ``False``: none."""
    done = [r for r in find_runs([out_dir]) if r.path.name in spec["runs"]]
    order = {r: i for i, r in enumerate(spec["runs"])}
    done.sort(key=lambda r: order[r.path.name])
    if not done:
        return False
    title = str(spec.get("title", name))
    write_long_csv(done, out_dir / "comparison.csv")
    plot_runs(done, out_dir / "comparison.png", title=title)
    table = markdown_table(done, spec.get("columns"))
    if "grid" in spec:
        table = f"{grid_table(spec, done)}\n![curves](grid.png)\n\n## All runs\n\n{table}"
        cells = [
            (spec["runs"][r.path.name]["row"], spec["runs"][r.path.name]["column"], r) for r in done
        ]
        plot_grid(cells, out_dir / "grid.png", title=title)
    if spec.get("target-accuracy"):
        table += "\n## Communication\n\n" + communication_table(
            done, float(spec["target-accuracy"])
        )
    (out_dir / "summary.md").write_text(f"# {title}\n\n{table}")
    print(
        f"\n{table}\nwritten: {out_dir / 'comparison.csv'}, {out_dir / 'comparison.png'}, "
        f"{out_dir / 'summary.md'}",
        flush=True,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m flwr_gkt.app.experiment``: an experiment's runs, then their comparison."""
    parser = _parser()
    args = parser.parse_args(argv)
    name, spec = load_experiment(args.experiment)
    extra = parse_overrides(args.overrides)
    out_dir = Path(args.results_dir).expanduser() / (args.name or name)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in spec["runs"] if args.only is None or r in args.only]
    unknown = set(args.only or []) - set(spec["runs"])
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; known: {list(spec['runs'])}")
    failed: list[str] = []
    if not args.report_only:
        print(f"experiment {name}: {len(runs)} runs -> {out_dir}", flush=True)
        failed = _run_all(spec, runs, out_dir, extra)
    done = _compare(spec, name, out_dir)
    if failed:
        print(f"failed runs: {failed}", flush=True)
        return 1
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
