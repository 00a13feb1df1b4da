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
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def project(model, payloads, device, precision, resident: bool, args) -> float:
    """Samples per second of ``GKTServer.train_round`` (E_s epochs, the last one's seconds)."""
    server = GKTServer(
        copy.deepcopy(model),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=1e-3,
        device=str(device),
        precision=precision,
        device_memory_budget=(1 << 40) if resident else 0,
    )
    for node, p in enumerate(payloads):
        server.put(node, p)
    server.train_round()  # warm-up (cuDNN autotuning, allocator)
    result = server.train_round()
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


def main() -> None:
    """Print samples/s of the project's server training and of the plain loop."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--samples", type=int, default=500, help="per node")
    parser.add_argument("--server-model", default="resnet10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--compile", action="store_true", help="also time the plain loop with torch.compile"
    )
    args = parser.parse_args()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    else:
        print("no CUDA device: the CUDA rows (fp16, resident vs streamed features) are skipped")
    torch.manual_seed(0)
    model = build_server_model(args.server_model, 10, 16)
    print(
        f"{args.nodes} nodes x {args.samples} samples of 16x28x28 features, {args.server_model}, "
        f"batch {args.batch_size}, {args.epochs} epochs"
    )
    print(
        f"{'device':<6} {'prec':<5} {'stored':<8} {'features':<9} {'project':>10} {'plain':>10} {'ratio':>6}"
    )
    speed: dict[tuple[str, str], float] = {}
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
                    speed[(device.type, precision)] = max(
                        speed.get((device.type, precision), 0), rate
                    )
                    print(
                        f"{device.type:<6} {precision:<5} {dtype:<8} {where:<9} "
                        f"{rate:>8.0f}/s {floor:>8.0f}/s {floor / rate:>6.2f}"
                    )
    for device in devices:
        base = speed.get((device.type, "fp32"))
        for precision in ("bf16", "fp16"):
            if base and (device.type, precision) in speed:
                print(
                    f"AMP {precision} on {device.type}: {speed[(device.type, precision)] / base:.2f}x fp32"
                )
    if args.compile:
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


if __name__ == "__main__":
    main()
