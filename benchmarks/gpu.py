"""Benchmark: server training throughput, the project's path vs a plain loop, per device.

``python benchmarks/gpu.py [--nodes 4 --samples 500 --server-model resnet10 --epochs 2]``

For each device (the CPU, and CUDA when present), precision (fp32, bf16 where
supported, fp16 on CUDA), stored feature dtype (float32, int8) and, on CUDA,
feature placement (``streamed``: gathered on the host into pinned memory, one
batch ahead; ``resident``: held on the device), it times the server training of
:class:`flwr_gkt.core.server.GKTServer` -- ``E_s`` epochs over every stored
node's features, CE + KD, capturing each sample's server logits -- and a plain
PyTorch loop over the same features already on the device (same model,
weights, optimizer, batch size, memory format, precision). Prints samples per
second of both and their ratio (the project's cost over the floor), then the
AMP speed-up. Without CUDA, the CUDA rows are skipped with a message. With
``--compile``, the plain loop also runs with ``torch.compile`` (eager vs compiled
samples per second, per device and precision).

The multi-device row times the same server training with ``server-devices``
(DistributedDataParallel, one worker process per device; the server batch is
the global batch) on every CUDA device, against one device; with fewer than 2
CUDA devices it is skipped with a message (``--ddp-devices cpu:2`` runs it on
two CPU ranks). ``--json PATH`` also writes every figure to ``PATH``
(``benchmarks/gpu_check.sh`` reads it).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr_gkt.core.distributed import parse_devices
from flwr_gkt.core.payload import Payload
from flwr_gkt.core.registry import build_server_model
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.training import autocast, bf16_supported, prepare_model
from flwr_gkt.wire import PayloadSpec, decode_payload, encode_payload, metrics_record


def _payloads(nodes: int, samples: int, dtype: str, seed: int = 0) -> list[Payload]:
    """Each node's payload as the server stores it after decoding (``dtype`` on the wire)."""
    from flwr.app import RecordDict

    from flwr_gkt.wire import ARRAYS_KEY, METRICS_KEY

    g = torch.Generator().manual_seed(seed)
    spec = PayloadSpec(10, (16, 28, 28))
    out = []
    for _ in range(nodes):
        feats = torch.relu(torch.randn(samples, 16, 28, 28, generator=g))
        labels = torch.randint(0, 10, (samples,), generator=g)
        logits = torch.randn(samples, 10, generator=g)
        record = encode_payload(feats, labels, logits, feature_dtype=dtype)
        content = RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(samples)})
        out.append(decode_payload(content, spec, with_logits=True))
    return out


def project(model, payloads, device, precision, resident: bool, args, devices=()) -> float:
    """Samples per second of ``GKTServer.train_round`` (E_s epochs, the last one's seconds).

    ``devices``: train on these with DDP (the warm-up round starts the workers).
    """
    server = GKTServer(
        copy.deepcopy(model),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=1e-3,
        device=str(device),
        precision=precision,
        device_memory_budget=(1 << 40) if resident else 0,
        devices=devices,
    )
    for node, p in enumerate(payloads):
        server.put(node, p)
    try:
        server.train_round()  # warm-up (cuDNN autotuning, allocator)
        result = server.train_round()
    finally:
        server.close()
    return result.num_examples * args.epochs / result.seconds


def plain(model, payloads, device, precision, args, compile: bool = False) -> float:
    """Samples per second of a plain loop over the same features, resident on ``device``.

    With ``compile``, the model is ``torch.compile``-d (the warm-up epoch compiles it).
    """
    model = prepare_model(copy.deepcopy(model), device)
    if compile:
        model = torch.compile(model)
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=5e-4)
    x = torch.cat([p.dense_features() for p in payloads]).to(
        device, memory_format=torch.channels_last
    )
    y = torch.cat([p.labels for p in payloads]).to(device)
    z = torch.cat([p.logits for p in payloads if p.logits is not None]).to(device)
    captured = torch.empty_like(z)

    def epoch() -> None:
        order = torch.randperm(len(y), device=device)
        for i in range(0, len(y), args.batch_size):
            idx = order[i : i + args.batch_size]
            with autocast(device, precision):
                out = model(x[idx]).float()
            log_p, log_q = F.log_softmax(out / 3, 1), F.log_softmax(z[idx] / 3, 1)
            kd = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * 9
            loss = F.cross_entropy(out, y[idx]) + kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            captured[idx] = out.detach()

    model.train()
    epoch()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.epochs):
        epoch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(y) * args.epochs / (time.perf_counter() - start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--samples", type=int, default=500, help="per node")
    parser.add_argument("--server-model", default="resnet10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--compile", action="store_true", help="also time the plain loop with torch.compile"
    )
    parser.add_argument(
        "--ddp-devices",
        default="",
        help="server-devices of the multi-device row (default: every CUDA device, when 2 or more)",
    )
    parser.add_argument(
        "--cuda-only", action="store_true", help="skip the CPU rows (when there is a CUDA device)"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args()


def single_device_rows(model, devices, args) -> list[dict]:
    """Project vs plain loop per device, precision, stored dtype and placement (printed)."""
    print(
        f"{'device':<6} {'prec':<5} {'stored':<8} {'features':<9} {'project':>10} {'plain':>10} {'ratio':>6}"
    )
    rows = []
    for device in devices:
        precisions = ["fp32"] + (["bf16"] if bf16_supported(device) else [])
        precisions += ["fp16"] if device.type == "cuda" else []
        placements = [False, True] if device.type == "cuda" else [False]
        for precision in precisions:
            floor = plain(
                model, _payloads(args.nodes, args.samples, "float32"), device, precision, args
            )
            for dtype in ("float32", "int8"):
                payloads = _payloads(args.nodes, args.samples, dtype)
                for resident in placements:
                    rate = project(model, payloads, device, precision, resident, args)
                    where = "resident" if resident else "streamed"
                    rows.append(
                        {"device": device.type, "precision": precision, "stored": dtype,
                         "features": where, "project": rate, "plain": floor}
                    )  # fmt: skip
                    print(
                        f"{device.type:<6} {precision:<5} {dtype:<8} {where:<9} "
                        f"{rate:>8.0f}/s {floor:>8.0f}/s {floor / rate:>6.2f}"
                    )
    return rows


def amp_speedups(rows: list[dict]) -> dict[str, float]:
    """Best project samples/s of each AMP precision over fp32's, per device (printed)."""
    best: dict[tuple[str, str], float] = {}
    for row in rows:
        key = (row["device"], row["precision"])
        best[key] = max(best.get(key, 0.0), row["project"])
    out = {}
    for (device, precision), rate in best.items():
        base = best.get((device, "fp32"))
        if precision != "fp32" and base:
            out[f"{precision} on {device}"] = rate / base
            print(f"AMP {precision} on {device}: {rate / base:.2f}x fp32")
    return out


def ddp_row(model, args) -> dict | None:
    """Server training with DDP on ``--ddp-devices`` against one of them (printed)."""
    spec = args.ddp_devices
    if not spec:
        count = torch.cuda.device_count()
        if count < 2:
            print(f"{count} CUDA device(s): the multi-device (DDP) row needs 2 or more, skipped")
            return None
        spec = ",".join(f"cuda:{i}" for i in range(count))
    devices = parse_devices(spec)
    first = torch.device(devices[0])
    payloads = _payloads(args.nodes, args.samples, "float32")
    one = project(model, payloads, first, "fp32", False, args)
    many = project(model, payloads, first, "fp32", False, args, devices=devices)
    print(
        f"DDP {spec} (fp32, streamed, global batch {args.batch_size}): {many:.0f}/s against "
        f"{one:.0f}/s on {first} ({many / one:.2f}x)"
    )
    return {"devices": spec, "ranks": len(devices), "ddp": many, "one-device": one}


def compile_rows(model, devices, args) -> None:
    """Eager vs ``torch.compile`` of the plain loop, per device and precision (printed)."""
    payloads = _payloads(args.nodes, args.samples, "float32")
    for device in devices:
        for precision in ["fp32"] + (["bf16"] if bf16_supported(device) else []):
            eager = plain(model, payloads, device, precision, args)
            start = time.perf_counter()
            compiled = plain(model, payloads, device, precision, args, compile=True)
            print(
                f"torch.compile, plain loop, {device.type} {precision}: {eager:.0f}/s eager, "
                f"{compiled:.0f}/s compiled ({compiled / eager:.2f}x; "
                f"{time.perf_counter() - start:.0f}s with compilation)"
            )


def main() -> None:
    """Print samples/s of the project's server training and of the plain loop."""
    args = parse_args()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices = [torch.device("cuda")] if args.cuda_only else [*devices, torch.device("cuda")]
    else:
        print("no CUDA device: the CUDA rows (fp16, resident vs streamed features) are skipped")
    torch.manual_seed(0)
    model = build_server_model(args.server_model, 10, 16)
    print(
        f"{args.nodes} nodes x {args.samples} samples of 16x28x28 features, {args.server_model}, "
        f"batch {args.batch_size}, {args.epochs} epochs"
    )
    rows = single_device_rows(model, devices, args)
    amp = amp_speedups(rows)
    ddp = ddp_row(model, args)
    if args.compile:
        compile_rows(model, devices, args)
    if args.json:
        figures = {"rows": rows, "amp": amp, "ddp": ddp, "args": vars(args)}
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
