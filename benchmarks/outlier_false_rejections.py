"""False rejections of honest nodes by the outlier check under label skew.

Runs honest FedGKT federations (in-process runtime, the real strategy and
ClientApp) on Dirichlet(alpha) partitions and records, for every train and
evaluate stage, the payload statistics the outlier check sees
(:func:`flwr_gkt.core.robust.payload_stats`). Then it counts how many honest
replies each rule would have rejected: the old default (``rel_floor`` 0.1,
i.e. "more than twice the median") and the current one. Nothing is rejected
while recording (the check is replaced by a recorder).

    python benchmarks/outlier_false_rejections.py --alphas 0.1 0.5 --nodes 8 16 --rounds 3
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time

from flwr_gkt.app.__main__ import main as simulation_main
from flwr_gkt.core import robust
from flwr_gkt.wire import gate

RULES = {"old (rel-floor 0.1)": 0.1, "current default": None}


def record_run(
    alpha: float, nodes: int, rounds: int, out: str
) -> list[list[dict[str, float] | None]]:
    """The per-stage payload statistics of one honest run."""
    seen: list[list[dict[str, float] | None]] = []

    def recorder(stats, threshold, *args, **kwargs):
        seen.append(list(stats))
        return [None] * len(stats)

    original = gate.find_outliers
    gate.find_outliers = recorder
    try:
        simulation_main(
            [
                "--preset",
                "fmnist-small-noniid",
                "--runtime",
                "inprocess",
                "--set",
                f"num-clients={nodes} dirichlet-alpha={alpha} num-server-rounds={rounds} "
                f"results-dir={out} run-name=a{alpha}-n{nodes} checkpoint=0",
            ]
        )
    finally:
        gate.find_outliers = original
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=10.0)
    args = parser.parse_args()
    default_floor = inspect.signature(robust.find_outliers).parameters["rel_floor"].default
    print(f"threshold {args.threshold}; current default rel-floor {default_floor}")
    header = (
        "| alpha | nodes | replies checked | " + " | ".join(RULES) + " | worst ratio to median |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    with tempfile.TemporaryDirectory() as out:
        for alpha in args.alphas:
            for n in args.nodes:
                t0 = time.perf_counter()
                stages = record_run(alpha, n, args.rounds, out)
                checked = sum(len(s) for s in stages)
                counts = []
                for floor in RULES.values():
                    floor = default_floor if floor is None else floor
                    counts.append(
                        sum(
                            r is not None
                            for s in stages
                            for r in robust.find_outliers(s, args.threshold, rel_floor=floor)
                        )
                    )
                worst = 0.0
                for s in stages:
                    for key in ("feature-norm", "logit-norm"):
                        vals = sorted(x[key] for x in s if x and key in x)
                        if vals:
                            med = vals[len(vals) // 2]
                            worst = max(worst, vals[-1] / med, med / max(vals[0], 1e-12))
                lines.append(
                    f"| {alpha} | {n} | {checked} | "
                    + " | ".join(str(c) for c in counts)
                    + f" | {worst:.2f}x |"
                )
                print(f"alpha {alpha}, {n} nodes: {time.perf_counter() - t0:.0f}s", flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
