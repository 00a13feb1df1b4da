"""Results of runs: plots (matplotlib), long CSV and markdown tables.

A run directory holds ``results.json`` (config, per-round history, totals),
``metrics.csv`` and ``metrics.png``. The functions here read any number of
them and render the comparison of an experiment (see
:mod:`flwr_gkt.app.experiment`) or of runs picked by hand (see
:mod:`flwr_gkt.app.summary`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Run",
    "communication_table",
    "find_runs",
    "load_run",
    "markdown_table",
    "plot_grid",
    "plot_runs",
    "write_long_csv",
]

_MB = 1024 * 1024
# Config keys that never distinguish runs in a table.
_IGNORED_KEYS = {
    "run-name",
    "results-dir",
    "data-dir",
    "device",
    "server-devices",
    "server-threads",
    "client-threads",
    "client-cpus",
}


@dataclass
class Run:
    """One finished run: its name, config, per-round history and totals."""

    name: str
    path: Path
    config: dict[str, Any]
    history: list[dict[str, float]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def algorithm(self) -> str:
        return str(self.extra.get("algorithm", "fedgkt"))

    def train_bytes(self) -> list[float]:
        """Training bytes (up + down) of each round."""
        return [
            float(r.get("bytes-up-train", 0)) + float(r.get("bytes-down-train", 0))
            for r in self.history
        ]

    def cumulative_mb(self) -> list[float]:
        total, out = 0.0, []
        for b in self.train_bytes():
            total += b
            out.append(total / _MB)
        return out

    def accuracies(self) -> list[float]:
        return [float(r.get("accuracy", float("nan"))) for r in self.history]

    def totals(self) -> dict[str, float]:
        """Summary figures of the run (final/best accuracy, bytes, time)."""
        acc = [a for a in self.accuracies() if a == a]
        h = self.history
        out = {
            "rounds": float(len(h)),
            "final-accuracy": acc[-1] if acc else float("nan"),
            "best-accuracy": max(acc) if acc else float("nan"),
            "mb-up": sum(float(r.get("bytes-up-train", 0)) for r in h) / _MB,
            "mb-down": sum(float(r.get("bytes-down-train", 0)) for r in h) / _MB,
            "mb-eval": sum(
                float(r.get("bytes-up-eval", 0)) + float(r.get("bytes-down-eval", 0)) for r in h
            )
            / _MB,
            "seconds": float(
                self.extra.get("seconds", sum(float(r.get("round-seconds", 0)) for r in h))
            ),
            "server-seconds": sum(float(r.get("server-seconds", 0)) for r in h),
            "client-seconds": sum(
                float(r.get("edge-seconds-max", r.get("client-seconds", 0))) for r in h
            ),
        }
        if h and "edge-accuracy" in h[-1]:
            out["edge-accuracy"] = float(h[-1]["edge-accuracy"])
        for key in (
            "edge-flops",
            "edge-params",
            "server-flops",
            "server-params",
            "full-flops",
            "full-params",
        ):
            if key in self.extra.get("costs", {}):
                out[key] = float(self.extra["costs"][key])
        return out


def load_run(path: str | Path) -> Run:
    """Read a run directory (or its ``results.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    data = json.loads(path.read_text())
    config = data.pop("config", {})
    history = data.pop("history", [])
    name = str(config.get("run-name") or path.parent.name)
    return Run(name, path.parent, config, history, data)


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run under ``paths`` (directories searched recursively), by path."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        else:
            found += sorted(p.rglob("results.json"))
    return [load_run(f) for f in sorted(set(found))]


def write_long_csv(runs: Sequence[Run], path: Path) -> None:
    """One row per run and round: run name, algorithm, every history column, cumulative MB."""
    columns = ["run", "algorithm", "round"]
    for run in runs:
        for row in run.history:
            columns += [k for k in row if k not in columns]
    columns.append("cumulative-train-mb")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for run in runs:
            for row, mb in zip(run.history, run.cumulative_mb(), strict=True):
                writer.writerow(
                    {
                        "run": run.name,
                        "algorithm": run.algorithm,
                        **row,
                        "cumulative-train-mb": round(mb, 6),
                    }
                )


def plot_runs(runs: Sequence[Run], path: Path, title: str = "") -> None:
    """Accuracy vs round and accuracy vs training bytes communicated, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_round, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        rounds = [int(r["round"]) for r in run.history]
        style = "--" if run.algorithm == "fedavg" else "-"
        ax_round.plot(rounds, run.accuracies(), style, marker="o", ms=3, label=run.name)
        ax_bytes.plot(
            run.cumulative_mb(), run.accuracies(), style, marker="o", ms=3, label=run.name
        )
    ax_round.set(xlabel="round", ylabel="test accuracy", title="accuracy vs round")
    ax_bytes.set(
        xlabel="training traffic, up + down (MB, cumulative)",
        ylabel="test accuracy",
        title="accuracy vs bytes communicated",
    )
    if any(mb > 0 for run in runs for mb in run.cumulative_mb()):
        ax_bytes.set_xscale("log")
    for ax in (ax_round, ax_bytes):
        ax.grid(alpha=0.3)
    ax_round.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grid(
    cells: Sequence[tuple[str, str, Run]], path: Path, title: str = "", columns: Sequence[str] = ()
) -> None:
    """Accuracy vs round, one panel per grid column, one line per grid row.

    ``cells`` holds ``(row label, column label, run)``; ``columns`` fixes the
    panel order (default: first appearance).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(columns) or list(dict.fromkeys(c for _, c, _ in cells))
    fig, axes = plt.subplots(
        1, len(order), figsize=(5.2 * len(order), 4.4), sharey=True, squeeze=False
    )
    for ax, column in zip(axes[0], order, strict=True):
        for row, col, run in cells:
            if col != column:
                continue
            rounds = [int(r["round"]) for r in run.history]
            style = (
                "--"
                if run.algorithm == "fedavg"
                else (":" if run.algorithm.startswith("centralized") else "-")
            )
            ax.plot(rounds, run.accuracies(), style, marker="o", ms=2, label=row)
        ax.set(
            title=column, xlabel="round (centralized: epochs x edge-epochs)", ylabel="test accuracy"
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _mb(value: float) -> str:
    return f"{value:,.1f}" if value >= 10 else f"{value:.3f}"


def markdown_table(runs: Sequence[Run], columns: Sequence[str] | None = None) -> str:
    """A markdown table of runs: the config keys that differ, then the results.

    ``columns`` picks the config keys shown (default: those whose value is not
    the same in every run).
    """
    if not runs:
        return "(no runs)\n"
    if columns is None:
        keys = [k for k in runs[0].config if k not in _IGNORED_KEYS]
        columns = [k for k in keys if len({str(r.config.get(k)) for r in runs}) > 1]
    header = [
        "run",
        "algorithm",
        *columns,
        "rounds",
        "accuracy",
        "best",
        "edge-only",
        "MB up",
        "MB down",
        "time (s)",
        "server s",
        "client s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        t = run.totals()
        cells = [
            run.name,
            run.algorithm,
            *(_fmt(run.config.get(c, "")) for c in columns),
            f"{t['rounds']:.0f}",
            f"{100 * t['final-accuracy']:.2f}%",
            f"{100 * t['best-accuracy']:.2f}%",
            f"{100 * t['edge-accuracy']:.2f}%" if "edge-accuracy" in t else "-",
            _mb(t["mb-up"]),
            _mb(t["mb-down"]),
            f"{t['seconds']:.0f}",
            f"{t['server-seconds']:.0f}",
            f"{t['client-seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: The analytic cost (``results.json`` ``analytic``) of each algorithm's runs.
_ANALYTIC_KEY = {
    "sl": "sl-bytes-per-epoch",
    "splitfed-v1": "sl-bytes-per-epoch",
    "splitfed-v2": "sl-bytes-per-epoch",
    "fedgkt": "fedgkt-bytes-per-epoch",
    "fedavg": "fedavg-bytes-per-epoch",
}


def mb_to_accuracy(run: Run, target: float) -> float:
    """Cumulative training MB (up + down) when the run first reaches ``target`` accuracy (NaN: never)."""
    for acc, mb in zip(run.accuracies(), run.cumulative_mb(), strict=True):
        if acc == acc and acc >= target:
            return mb
    return float("nan")


def communication_table(runs: Sequence[Run], target: float) -> str:
    """A markdown table of the runs' traffic: MB to reach ``target``, measured vs analytic per epoch.

    Measured per epoch: the first round's training bytes over ``edge-epochs``.
    Analytic: :func:`flwr_gkt.core.efficiency.communication_costs` as a
    split-learning run records it (``analytic`` in its ``results.json``), for
    the runs whose wire settings it assumes (float32 features, features every
    round); ``-`` elsewhere.
    """
    analytic: dict[str, Any] = next(
        (r.extra["analytic"] for r in runs if "analytic" in r.extra), {}
    )
    lines = [
        f"| run | algorithm | final accuracy | MB total | MB to {100 * target:.0f}% "
        "| MB / epoch measured | MB / epoch analytic |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        t = run.totals()
        epochs = max(int(run.config.get("edge-epochs", 1) or 1), 1)
        measured = run.train_bytes()[0] / epochs / _MB if run.history else float("nan")
        key = _ANALYTIC_KEY.get(run.algorithm, "")
        plain = run.algorithm != "fedgkt" or (
            str(run.config.get("feature-dtype", "float32")) == "float32"
            and int(run.config.get("feature-upload-every", 1) or 0) == 1
        )
        value = analytic.get(key) if plain else None
        reach = mb_to_accuracy(run, target)
        lines.append(
            f"| {run.name} | {run.algorithm} | {100 * t['final-accuracy']:.2f}% "
            f"| {_mb(t['mb-up'] + t['mb-down'])} | {_mb(reach) if reach == reach else '-'} "
            f"| {_mb(measured)} | {_mb(float(value) / _MB) if value else '-'} |"
        )
    if analytic:
        lines.append(
            f"\nPer sample and epoch: activations {analytic['activation-bytes-per-sample']:,.0f} B "
            f"up, gradients {analytic['gradient-bytes-per-sample']:,.0f} B down (split learning)."
        )
    return "\n".join(lines) + "\n"
