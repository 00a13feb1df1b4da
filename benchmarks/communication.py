"""Benchmark: communication and server memory of FedGKT's codecs and EcoFed mode.

``python benchmarks/communication.py [--results-dir results/bench] [--skip-runs] [--skip-memory]``

In one run on Fashion-MNIST (preset ``fmnist-small``: 4 nodes x 1,500
images, 6 rounds, same partitions and seed for every run):

1. runs the ``communication`` experiment (``flwr_gkt/app/experiments/communication.yaml``):
   FedGKT with float32 / float16 / int8 features, EcoFed replay (pre-trained
   frozen extractor, features uploaded once, then logits only; float32 and
   int8 + float16 logits) and Flower's FedAvg on the full model;
2. prints, per run, bytes per round each way, total training traffic, final
   accuracy, and the ratios of traffic to float32 FedGKT and to FedAvg;
3. measures the server's peak RSS with and without the feature store's memory
   budget (``benchmarks/server_memory.py``: dataset 4x the budget).

The experiment's runs take ~2-3 minutes each on a 2-core CPU (~15 minutes in
all), the memory part ~2 minutes. ``--skip-runs`` re-reads existing results.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import server_memory  # noqa: E402

from flwr_gkt.app.report import load_run  # noqa: E402

_MB = 1024 * 1024


def communication_table(exp_dir: Path) -> list[dict]:
    """One row per run: bytes per round, totals, accuracy."""
    rows = []
    for run_dir in sorted(p for p in exp_dir.iterdir() if (p / "results.json").is_file()):
        run = load_run(run_dir)
        t = run.totals()
        rounds = max(t["rounds"], 1)
        rows.append(
            {
                "run": run_dir.name,
                "up-mb-per-round": t["mb-up"] / rounds,
                "down-mb-per-round": t["mb-down"] / rounds,
                "train-mb": t["mb-up"] + t["mb-down"],
                "accuracy": t["final-accuracy"],
            }
        )
    return rows


def print_communication(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["run"] == "fp32"), None)
    fedavg = next((r for r in rows if r["run"] == "fedavg"), None)
    print(
        f"\n{'run':<20} {'up MB/round':>12} {'down MB/round':>14} {'train MB total':>15} "
        f"{'accuracy':>9} {'vs fp32 FedGKT':>15} {'vs FedAvg':>10}"
    )
    for r in rows:
        vs_fp32 = f"{ref['train-mb'] / r['train-mb']:.1f}x less" if ref and r["train-mb"] else "-"
        vs_avg = (
            f"{r['train-mb'] / fedavg['train-mb']:.2f}x" if fedavg and fedavg["train-mb"] else "-"
        )
        print(
            f"{r['run']:<20} {r['up-mb-per-round']:>12.2f} {r['down-mb-per-round']:>14.3f} "
            f"{r['train-mb']:>15.1f} {100 * r['accuracy']:>8.2f}% {vs_fp32:>15} {vs_avg:>10}"
        )
    print(
        "(train MB: upload + download of the training rounds; 'vs FedAvg': FedGKT traffic / FedAvg traffic; "
        "evaluation traffic not included)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results-dir", default="results/benchmarks")
    parser.add_argument("--skip-runs", action="store_true", help="only re-read the runs' results")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--budget-mb", type=float, default=64)
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these runs of the experiment"
    )
    args = parser.parse_args(argv)
    exp_dir = Path(args.results_dir) / "communication"
    if not args.skip_runs:
        cmd = [
            sys.executable,
            "-m",
            "flwr_gkt.app.experiment",
            "communication",
            "--results-dir",
            args.results_dir,
        ]
        if args.only:
            cmd += ["--only", *args.only]
        rc = subprocess.call(cmd, cwd=ROOT)
        if rc != 0:
            print(f"experiment failed (exit {rc})")
    print_communication(communication_table(exp_dir))
    if not args.skip_memory:
        print(
            f"\nserver memory, feature store budget {args.budget_mb:.0f} MB vs none "
            "(16 nodes, 4 replying per round, 16x28x28 float32 features):"
        )
        server_memory.print_table(server_memory.measure(args.budget_mb, [4.0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
