"""Soak test: a long federation with random faults; memory, files and descriptors over time.

``python benchmarks/soak.py [--rounds 50 --nodes 4 --fault-rate 0.2 --out results/soak]``

Runs FedGKT in-process (``flwr_gkt.app.inprocess``: the real ServerApp and
ClientApp, no Ray) on a tiny Fashion-MNIST federation for ``--rounds`` short
rounds, with a random fault (crash, timeout, late or duplicate reply, see
:mod:`flwr_gkt.flower.faults`) for each node in each round with probability
``--fault-rate``, checkpoints every round, node states saved to disk and a
memory budget on the feature store. A sampler thread records, per round, the
process's resident memory, the files under the run's directories and the open
file descriptors. The script prints rounds completed, faults injected, peak
memory and the growth of memory / files / descriptors between the first and
the last tenth of the run (no growth expected), and writes ``soak.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flwr_gkt.app.client_app import make_client_app
from flwr_gkt.app.inprocess import run_inprocess
from flwr_gkt.app.server_app import make_server_app
from flwr_gkt.app.task import PRESETS_DIR
from flwr_gkt.config import resolve_config

_ROUND = re.compile(r"\[ROUND (\d+)/\d+\]")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _files(*dirs: Path) -> int:
    return sum(1 for d in dirs if d.exists() for p in d.rglob("*") if p.is_file())


class _RoundWatcher(logging.Handler):
    """Follows the ``[ROUND n/N]`` lines of the strategy's log."""

    def __init__(self) -> None:
        super().__init__()
        self.round = 0

    def emit(self, record: logging.LogRecord) -> None:
        match = _ROUND.search(record.getMessage())
        if match:
            self.round = int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--out", default="results/soak")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    values = {
        "preset": "smoke",
        "num-clients": args.nodes,
        "min-nodes": args.nodes,
        "num-server-rounds": args.rounds,
        "data-fraction": 0.004,
        "test-fraction": 0.02,
        "server-epochs": 1,
        "round-timeout": 1.0,
        "fault-rate": args.fault_rate,
        "memory-budget-mb": 4,
        "results-dir": str(out.parent),
        "run-name": out.name,
        "node-state-dir": str(out / "nodes"),
        "client-threads": 1,
    }
    values.update(dict(item.split("=", 1) for item in args.overrides))
    cfg = resolve_config(values, PRESETS_DIR)

    watcher = _RoundWatcher()
    logging.getLogger("flwr").addHandler(watcher)
    samples: list[dict[str, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(
                {
                    "round": watcher.round,
                    "rss-mb": _rss_mb(),
                    "files": _files(out),
                    "fds": len(os.listdir("/proc/self/fd")),
                    "t": time.perf_counter(),
                }
            )
            done.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    run_inprocess(make_server_app(cfg), make_client_app(cfg), cfg.num_clients)
    done.set()
    thread.join()
    elapsed = time.perf_counter() - start

    results = json.loads((out / "results.json").read_text())
    history = results["history"]
    per_round: dict[int, dict[str, float]] = {}
    for s in samples:
        row = per_round.setdefault(int(s["round"]), {"rss-mb": 0.0, "files": 0, "fds": 0})
        for key in ("rss-mb", "files", "fds"):
            row[key] = max(row[key], s[key])
    rounds = sorted(r for r in per_round if r > 0)
    tenth = max(len(rounds) // 10, 1)

    def avg(key: str, which: list[int]) -> float:
        return sum(per_round[r][key] for r in which) / len(which)

    early, late = rounds[:tenth], rounds[-tenth:]
    summary = {
        "rounds-planned": args.rounds,
        "rounds-completed": len(history),
        "faults-injected": results.get("faults-injected", {}),
        "replies-accepted": sum(int(h.get("nodes-replied", 0)) for h in history),
        "replies-rejected": sum(int(h.get("nodes-rejected", 0)) for h in history),
        "replies-lost": sum(int(h.get("nodes-lost", 0)) for h in history),
        "replies-late-ignored": sum(int(h.get("replies-late", 0)) for h in history),
        "replies-duplicate-ignored": sum(int(h.get("replies-duplicate", 0)) for h in history),
        "final-accuracy": history[-1].get("accuracy"),
        "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss-mb-first-tenth": avg("rss-mb", early),
        "rss-mb-last-tenth": avg("rss-mb", late),
        "files-first-tenth": avg("files", early),
        "files-last-tenth": avg("files", late),
        "fds-first-tenth": avg("fds", early),
        "fds-last-tenth": avg("fds", late),
        "seconds": elapsed,
    }
    (out / "soak.json").write_text(
        json.dumps({"summary": summary, "per-round": per_round}, indent=2)
    )
    print(
        f"\nsoak: {summary['rounds-completed']}/{args.rounds} rounds in {elapsed:.0f}s, "
        f"{args.nodes} nodes, fault rate {args.fault_rate}"
    )
    print(f"faults injected: {summary['faults-injected']} (train + evaluate instructions)")
    print(
        f"replies: {summary['replies-accepted']} accepted, {summary['replies-rejected']} rejected, "
        f"{summary['replies-lost']} lost, {summary['replies-late-ignored']} late and "
        f"{summary['replies-duplicate-ignored']} duplicate ignored; final accuracy "
        f"{summary['final-accuracy']:.4f}"
    )
    print(
        f"peak RSS {summary['peak-rss-mb']:.0f} MB; RSS first/last tenth of the rounds "
        f"{summary['rss-mb-first-tenth']:.0f} / {summary['rss-mb-last-tenth']:.0f} MB; files "
        f"{summary['files-first-tenth']:.0f} / {summary['files-last-tenth']:.0f}; open fds "
        f"{summary['fds-first-tenth']:.0f} / {summary['fds-last-tenth']:.0f}"
    )
    return 0 if summary["rounds-completed"] == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
