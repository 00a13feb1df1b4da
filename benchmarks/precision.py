"""Benchmark: step time and accuracy per training precision, edge and server.

``python benchmarks/precision.py [--train 3000 --test 2000 --edge-epochs 2 --server-epochs 2]``

Edge: ResNet-8 trained on Fashion-MNIST images (CE), then tested. Server:
ResNet-10 trained on the features of one common, frozen ResNet-8 extractor
(CE), then tested on the test images' features. Each precision -- fp32, bf16
where the device supports it, fp16 on CUDA -- starts from the same weights and
sees the same batches (the loop of :func:`flwr_gkt.core.training.fit`). Step
times are the median over the steps of the last epoch; the runs of the
precisions are interleaved epoch by epoch so that they share any drift of the
machine. Prints step time, speed-up over fp32 and test accuracy, and the time
of one optimizer step with PyTorch's fused kernels (what ``make_optimizer``
uses) and without.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr_gkt.core.edge import extract
from flwr_gkt.core.models import resnet8
from flwr_gkt.core.registry import build_server_model
from flwr_gkt.core.training import (
    TensorBatches,
    autocast,
    bf16_supported,
    evaluate_logits,
    get_device,
    make_optimizer,
    predict,
    prepare_model,
    to_device,
)
from flwr_gkt.data import client_data


def _epoch(model, opt, x, y, batch, device, precision, gen, scaler) -> list[float]:
    """One epoch; return each step's seconds (synchronised, to time the step itself)."""
    times = []
    model.train()
    for inputs, labels, _ in TensorBatches(x, y, batch, True, gen):
        start = time.perf_counter()
        inputs, labels = to_device(inputs, device), labels.to(device)
        with autocast(device, precision):
            loss = F.cross_entropy(model(inputs).float(), labels)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def compare(name, build, x, y, xt, yt, epochs, batch, device, precisions) -> None:
    """Train one copy per precision, interleaved; print step time and test accuracy."""
    torch.manual_seed(0)
    base = build()
    runs = {}
    for p in precisions:
        model = prepare_model(copy.deepcopy(base), device)
        runs[p] = {
            "model": model,
            "opt": make_optimizer("adam", model.parameters(), 2e-3),
            "gen": torch.Generator().manual_seed(0),
            "scaler": torch.amp.GradScaler(device.type) if p == "fp16" else None,
            "times": [],
        }
    for _ in range(epochs):
        for p, r in runs.items():
            r["times"] = _epoch(r["model"], r["opt"], x, y, batch, device, p, r["gen"], r["scaler"])
    fp32 = statistics.median(runs["fp32"]["times"])
    for p, r in runs.items():
        step = statistics.median(r["times"])
        logits = predict(r["model"], TensorBatches(xt, yt, 256), device, p)
        _, correct = evaluate_logits(logits, yt)
        print(
            f"{name:<7} {p:<5} step {step * 1e3:7.2f} ms  speed-up {fp32 / step:4.2f}x  "
            f"test accuracy {correct / len(yt):.4f}"
        )


def optimizer_step(name, model, device, steps: int = 200) -> None:
    """Print the median time of one optimizer step (Adam with AMSGrad), fused vs PyTorch's default.

    ``make_optimizer`` picks the fused kernels where it can; the default here is
    the same optimizer with ``fused`` left to PyTorch (on the CPU: one
    parameter after another).
    """
    model = prepare_model(model, device)
    params = list(model.parameters())
    fused = make_optimizer("adam", params, 1e-3)
    default = make_optimizer("adam", params, 1e-3)
    for group in default.param_groups:
        group["fused"] = None
    times: dict[str, list[float]] = {"default": [], "fused": []}
    for _ in range(steps):  # interleaved
        for label, opt in (("default", default), ("fused", fused)):
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            start = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[label].append(time.perf_counter() - start)
    a, b = statistics.median(times["default"]), statistics.median(times["fused"])
    print(
        f"{name:<7} optimizer step (Adam, AMSGrad): default {a * 1e3:.2f} ms, fused "
        f"{b * 1e3:.2f} ms ({a / b:.2f}x; fused={fused.defaults['fused']})"
    )


def main() -> None:
    """Run the edge and the server comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--edge-epochs", type=int, default=2)
    parser.add_argument("--server-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = get_device(args.device)
    precisions = ["fp32"] + (["bf16"] if bf16_supported(device) else [])
    precisions += ["fp16"] if device.type == "cuda" else []
    if len(precisions) == 1:
        print(f"{device}: no reduced precision supported here; fp32 only")
    data = client_data(0, 1, fraction=args.train / 60_000, test_fraction=args.test / 10_000)
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
    print(f"{device}: {len(y)} training / {len(yt)} test images, batch {args.batch_size}")
    compare(
        "edge",
        lambda: resnet8(10, 1),
        x,
        y,
        xt,
        yt,
        args.edge_epochs,
        args.batch_size,
        device,
        precisions,
    )
    optimizer_step("edge", resnet8(10, 1), device)
    optimizer_step("server", build_server_model("resnet10", 10), device)
    torch.manual_seed(1)
    extractor = prepare_model(resnet8(10, 1), device)
    (h, _), (ht, _) = extract(extractor, x, 256, device), extract(extractor, xt, 256, device)
    compare(
        "server",
        lambda: build_server_model("resnet10", 10, h.shape[1]),
        h,
        y,
        ht,
        yt,
        args.server_epochs,
        args.batch_size,
        device,
        precisions,
    )


if __name__ == "__main__":
    main()
