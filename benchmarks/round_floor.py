"""Benchmark: one default-preset round through the project vs the same work in a plain loop.

``python benchmarks/round_floor.py [--preset fmnist --runtimes flwr,inprocess --repeats 1 --rounds 1 --set k=v ...]``

Runs one round of the preset through the project -- ``python -m simulation``
with Flower's Ray simulation and with the in-process runtime, each in its own
process, one after the other -- and reads the round's ``round-seconds`` (from
the first train instruction to the last evaluate reply, no start-up) and its
parts: waiting for the train and the evaluate replies (edge work and
transport), server training, and the rest. Then, in
this process and alone on the machine, a plain PyTorch loop does exactly the
same work on the same tensors: each node's edge training (``E_c`` epochs, CE;
the first round has no server logits), the extraction of its training
features and logits, ``E_s`` server epochs over all nodes' features shuffled
together (CE + KD from the client logits, capturing each sample's server
logits), and the evaluation (test features through the edge extractor, then
the server model). Same models, initial weights, optimizers
(``make_optimizer``), batch sizes, precision and memory format; nodes one after
the other, with every thread.

Prints each runtime's round time, its parts and its ratio to the plain loop
(goal: <= 1.15). ``--repeats N`` runs the whole sequence N times, interleaved (a
slow spell of the machine hits every runtime alike), and then prints the
medians and the ratio of the medians.

``--rounds R`` runs R rounds everywhere and times the last. A first round
pays for start-up in every fresh process (Ray's ClientApp workers and the
ServerApp: first-touch memory, oneDNN's kernels), while the plain loop runs
in this one process, warm from the second repeat on; from round 2 each edge
also distils from its server logits, in the plain loop too.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def project_round(
    preset: str, runtime: str, overrides: list[str], out: Path, rounds: int = 1
) -> dict[str, float]:
    """Run ``rounds`` rounds of ``preset`` through ``python -m simulation``; return the last row."""
    sets = [f"num-server-rounds={rounds}", f"results-dir={out}", f"run-name={runtime}", *overrides]
    cmd = [sys.executable, "-m", "simulation", "--preset", preset, "--runtime", runtime]
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as home:
        env = dict(os.environ, FLWR_HOME=home)
        start = time.perf_counter()
        subprocess.run([*cmd, "--set", *sets], cwd=ROOT, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
    with open(out / runtime / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
        row = {k: float(v) for k, v in last.items() if v not in ("", None)}
    row["wall-seconds"] = wall
    return row


def _kd(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    log_p = F.log_softmax(student / t, dim=1)
    log_q = F.log_softmax(teacher / t, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * t * t


def plain_round(preset: str, overrides: list[str], rounds: int = 1) -> dict[str, float]:
    """The same rounds' work in plain PyTorch, in this process; return the last round's seconds.

    From the second round on, each node's edge distils from the server logits
    of its samples (CE + KD, ``kd-mode: both``), as in the project; the edge
    optimizer is created anew every round, the server's persists.
    """
    from flwr_gkt.app.task import (
        build_server,
        config_from_run_config,
        edge_builder,
        load_client_data,
    )
    from flwr_gkt.config import parse_overrides
    from flwr_gkt.core.training import get_device, make_optimizer

    cfg = config_from_run_config({"preset": preset, **parse_overrides(overrides)})
    device = get_device(cfg.device)
    nodes = [load_client_data(cfg, k, cfg.num_clients) for k in range(cfg.num_clients)]
    cl = torch.channels_last
    edges = [edge_builder(cfg, k)().to(device, memory_format=cl) for k in range(len(nodes))]
    torch.manual_seed(cfg.seed)
    server = build_server(cfg).to(device, memory_format=cl)
    server_opt = make_optimizer(
        cfg.server_optimizer, server.parameters(), cfg.server_lr, cfg.weight_decay
    )
    server_logits: list[torch.Tensor | None] = [None] * len(nodes)
    for _ in range(rounds):
        times = _plain_one_round(cfg, device, nodes, edges, server, server_opt, server_logits)
    return times


def _plain_one_round(
    cfg: Any,
    device: torch.device,
    nodes: list[Any],
    edges: list[torch.nn.Module],
    server: torch.nn.Module,
    server_opt: torch.optim.Optimizer,
    server_logits: list[torch.Tensor | None],
) -> dict[str, float]:
    """One round: edge training (KD once ``server_logits`` are set), server epochs, evaluation."""
    from flwr_gkt.core.training import autocast, make_optimizer

    cl = torch.channels_last
    times = {"edge": 0.0, "server": 0.0, "evaluate": 0.0}
    feats, zs, ys = [], [], []
    for k, (data, model) in enumerate(zip(nodes, edges, strict=True)):
        start = time.perf_counter()
        opt = make_optimizer(cfg.edge_optimizer, model.parameters(), cfg.edge_lr, cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + 1)
        teacher_k = server_logits[k]
        model.train()
        for _ in range(cfg.edge_epochs):
            order = torch.randperm(len(data.y_train), generator=gen)
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                x = data.x_train[idx].to(device, memory_format=cl)
                with autocast(device, cfg.edge_precision):
                    out = model(x).float()
                    loss = F.cross_entropy(out, data.y_train[idx].to(device))
                    if teacher_k is not None:
                        loss = loss + cfg.alpha * _kd(
                            out, teacher_k[idx].to(device), cfg.temperature
                        )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        with torch.inference_mode(), autocast(device, cfg.edge_precision):
            h, z = [], []
            for i in range(0, len(data.y_train), cfg.batch_size):
                zi, hi = model.forward_with_features(
                    data.x_train[i : i + cfg.batch_size].to(device, memory_format=cl)
                )
                h.append(hi.float().contiguous())
                z.append(zi.float())
        feats.append(torch.cat(h).cpu())
        zs.append(torch.cat(z).cpu())
        ys.append(data.y_train)
        times["edge"] += time.perf_counter() - start
    start = time.perf_counter()
    features, teacher, labels = torch.cat(feats), torch.cat(zs), torch.cat(ys)
    gen = torch.Generator().manual_seed(cfg.seed)
    captured = torch.empty(len(labels), teacher.shape[1], device=device)
    server.train()
    for _ in range(cfg.server_epochs):
        order = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(order), cfg.server_batch_size):
            idx = order[i : i + cfg.server_batch_size]
            x = features[idx].to(device, memory_format=cl)
            y, zt = labels[idx].to(device), teacher[idx].to(device)
            with autocast(device, cfg.server_precision):
                out = server(x).float()
                loss = F.cross_entropy(out, y) + cfg.alpha * _kd(out, zt, cfg.temperature)
            server_opt.zero_grad(set_to_none=True)
            loss.backward()
            server_opt.step()
            captured[idx.to(device)] = out.detach()
    captured = captured.cpu()
    server_logits[:] = captured.split([len(y) for y in ys])
    times["server"] = time.perf_counter() - start
    start = time.perf_counter()
    correct = total = 0
    server.eval()
    with torch.inference_mode():
        for model, data in zip(edges, nodes, strict=True):
            for i in range(0, len(data.y_test), cfg.batch_size):
                x = data.x_test[i : i + cfg.batch_size].to(device, memory_format=cl)
                with autocast(device, cfg.edge_precision):
                    _, h = model.forward_with_features(x)
                with autocast(device, cfg.server_precision):
                    pred = server(h.float()).argmax(1).cpu()
                correct += int((pred == data.y_test[i : i + cfg.batch_size]).sum())
                total += len(pred)
    times["evaluate"] = time.perf_counter() - start
    times["round"] = sum(times.values())
    times["accuracy"] = correct / max(total, 1)
    return times


def main() -> None:
    """Run the project's round per runtime, then the plain loop; print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fmnist")
    parser.add_argument("--runtimes", default="flwr,inprocess")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats (medians)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds per run; the last one is timed (2: a round past start-up, with KD)",
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="round-floor-"))
    runtimes = [r for r in args.runtimes.split(",") if r]
    nan = float("nan")
    times: dict[str, list[float]] = {r: [] for r in [*runtimes, "plain"]}
    for rep in range(1, args.repeats + 1):
        for runtime in runtimes:
            row = project_round(args.preset, runtime, args.set, out / str(rep), args.rounds)
            times[runtime].append(row["round-seconds"])
            train_wait = row.get("train-wait-seconds", nan)
            eval_wait = row.get("eval-wait-seconds", nan)
            rest = row["round-seconds"] - train_wait - eval_wait - row["server-seconds"]
            print(
                f"[{rep}] {runtime:>10}: round {row['round-seconds']:.1f}s "
                f"(edge {row.get('edge-seconds-mean', nan):.1f}s per node; waiting for "
                f"replies {train_wait:.1f}s train + {eval_wait:.1f}s eval; server "
                f"{row['server-seconds']:.1f}s; the rest (gate, store, evaluation) "
                f"{rest:.1f}s; process "
                f"{row['wall-seconds']:.0f}s; accuracy {row.get('accuracy', nan):.4f})",
                flush=True,
            )
        plain = plain_round(args.preset, args.set, args.rounds)
        times["plain"].append(plain["round"])
        print(
            f"[{rep}] {'plain':>10}: round {plain['round']:.1f}s (edge {plain['edge']:.1f}s for "
            f"all nodes, server {plain['server']:.1f}s, evaluate {plain['evaluate']:.1f}s; "
            f"accuracy {plain['accuracy']:.4f})",
            flush=True,
        )
        for runtime in runtimes:
            print(f"[{rep}] ratio {runtime}/plain: {times[runtime][-1] / plain['round']:.3f}")
    if args.repeats > 1:
        med = {k: statistics.median(v) for k, v in times.items()}
        print("medians: " + ", ".join(f"{k} {v:.1f}s" for k, v in med.items()))
        for runtime in runtimes:
            per = [a / b for a, b in zip(times[runtime], times["plain"], strict=True)]
            print(
                f"ratio {runtime}/plain of the medians: {med[runtime] / med['plain']:.3f} "
                f"(per repeat {', '.join(f'{r:.2f}' for r in per)})"
            )


if __name__ == "__main__":
    main()
