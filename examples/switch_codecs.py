"""Switch the wire codecs: what float16 / int8 feature maps cost and save.

FedGKT uploads one feature map per training sample every round (16 x 28 x 28
float32 = 49 KB per Fashion-MNIST image), so the encoding of those maps
dominates the traffic. Two config keys choose it:

* ``feature-dtype``: ``float32`` (default), ``float16`` (half the bytes) or
  ``int8`` (affine quantization per channel, ``x ~= (q + 128) * scale + min``,
  a quarter of the bytes; the per-channel ``min`` / ``scale`` travel along);
* ``logit-dtype``: ``float32`` or ``float16``, for the logits in both
  directions.

Part 1 runs the same small federation (same seed: same data, same initial
models) once per codec, in this process, and prints the bytes uploaded per
round and the final accuracy of each. Part 2 uses the wire API directly:
encode real edge feature maps into a Flower ``ArrayRecord`` with each codec,
decode and validate them as the server does, and report the bytes and the
largest absolute error.

Run it from the repository root::

    .venv/bin/python examples/switch_codecs.py                 # 4 nodes, 3 rounds, 4 codecs: ~2 min
    .venv/bin/python examples/switch_codecs.py --tiny          # 2 nodes, 300 images: ~20 s (CI)
    .venv/bin/python examples/switch_codecs.py --codecs float32 int8:float16

A codec is ``FEATURE_DTYPE[:LOGIT_DTYPE]`` (logits default to float32). The
last line of the output is ``RESULT {...}`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses

import _common
import torch
from flwr.app import RecordDict

from flwr_gkt.config import RunConfig
from flwr_gkt.core.registry import build_edge_model
from flwr_gkt.data import load_dataset, normalize
from flwr_gkt.wire import (
    ARRAYS_KEY,
    FEATURE_DTYPES,
    METRICS_KEY,
    PayloadError,
    PayloadSpec,
    decode_payload,
    encode_payload,
    metrics_record,
    quantize_int8,
    record_nbytes,
)

MB = 1024 * 1024


# ------------------------------------------------------------- part 1: federations
def compare_codecs(base: RunConfig, codecs: list[str]) -> dict[str, dict]:
    """One federation per codec; per-round bytes and final accuracy of each."""
    runs = {}
    for codec in codecs:
        feature_dtype, _, logit_dtype = codec.partition(":")
        logit_dtype = logit_dtype or "float32"
        # The only difference between the runs: two config keys (the same as
        # `python -m simulation --set feature-dtype=int8 logit-dtype=float16`).
        cfg = dataclasses.replace(
            base,
            feature_dtype=feature_dtype,
            logit_dtype=logit_dtype,
            run_name=f"codec-{feature_dtype}-{logit_dtype}",
        )
        history = _common.run(cfg).history  # one dict per round, as in results.json
        runs[f"{feature_dtype}:{logit_dtype}"] = {
            # Training traffic per round: H + Z_c + Y up, Z_s down (payload bytes).
            "bytes-up-train": [int(row["bytes-up-train"]) for row in history],
            "bytes-down-train": [int(row["bytes-down-train"]) for row in history],
            # The test-set features uploaded for evaluation use the same codec.
            "bytes-up-eval": [int(row["bytes-up-eval"]) for row in history],
            "accuracy": round(history[-1]["accuracy"], 4),
            "edge-accuracy": round(history[-1]["edge-accuracy"], 4),
        }
    return runs


def print_runs(runs: dict[str, dict]) -> dict[str, float]:
    """A table of the runs; return each run's upload per round relative to the first run."""
    first = next(iter(runs.values()))["bytes-up-train"][0]
    ratios = {}
    print(
        f"\n{'codec (features:logits)':<24} {'up MB/round':>12} {'down MB/round':>14} "
        f"{'vs first':>9} {'accuracy':>9}"
    )
    for codec, r in runs.items():
        up = r["bytes-up-train"][0]
        ratios[codec] = round(up / first, 4)
        down = max(r["bytes-down-train"])  # round 1 sends no server logits yet
        print(
            f"{codec:<24} {up / MB:>12.2f} {down / MB:>14.3f} {ratios[codec]:>8.3f}x "
            f"{r['accuracy']:>9.4f}"
        )
    return ratios


# ------------------------------------------------------------- part 2: the wire API
def wire_demo(num_samples: int, logit_dtype: str = "float16") -> dict[str, dict]:
    """Encode, decode and validate real edge features with every feature codec."""
    # Feature maps and logits of an (untrained) ResNet-8 edge model on test images.
    raw = load_dataset("fashion-mnist")  # offline: /usr/share/datasets/fashion-mnist
    images = normalize(raw.x_test[:num_samples], raw.info)
    labels = raw.y_test[:num_samples]
    torch.manual_seed(0)
    edge = build_edge_model("resnet8", num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        logits, features = edge.forward_with_features(images)

    # What a valid train reply looks like to the server: 10 classes and
    # feature maps of exactly this shape (anything else is rejected).
    spec = PayloadSpec(num_classes=10, feature_shape=tuple(features.shape[1:]))
    print(f"\nwire API: {num_samples} feature maps of {list(features.shape[1:])}")
    out = {}
    for feature_dtype in FEATURE_DTYPES:
        # Node side: tensors -> ArrayRecord (+ the MetricRecord with num-examples).
        record = encode_payload(features, labels, logits, feature_dtype, logit_dtype)
        content = RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(len(labels))})
        nbytes = record_nbytes(content)  # how the strategy counts bytes up/down
        # Server side: decode (int8 is dequantized here) and validate.
        payload = decode_payload(content, spec, with_logits=True)
        error = float((payload.dense_features() - features).abs().max())
        out[feature_dtype] = {"bytes": nbytes, "max-abs-error": error}
        line = (
            f"  {feature_dtype:>7}: {nbytes:>9,} bytes ({len(record['features'].data):,} of them "
            f"features), max abs error {error:.2e}"
        )
        if feature_dtype == "int8":  # the quantization error is at most half a step
            _, _, scale = quantize_int8(features.numpy())
            out[feature_dtype]["error-bound"] = float(scale.max()) / 2
            line += f" (bound: half the largest step, {float(scale.max()) / 2:.2e})"
        print(line)

    # Validation: a reply that does not match what it declares is refused with
    # a one-line reason (the strategy logs it and goes on without that node).
    bad = RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(len(labels) + 1)})
    try:
        decode_payload(bad, spec, with_logits=True)
    except PayloadError as err:
        print(f"  a reply claiming {len(labels) + 1} samples is rejected: {err}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--codecs",
            nargs="+",
            default=["float32", "float16", "int8", "int8:float16"],
            help="FEATURE_DTYPE[:LOGIT_DTYPE] per run; the first is the reference for the ratios",
        )
        parser.add_argument("--num-nodes", type=int, default=4)
        parser.add_argument("--data-fraction", type=float, default=0.02)
        parser.add_argument("--test-fraction", type=float, default=0.1)
        parser.add_argument("--wire-samples", type=int, default=256)

    return _common.parse_args(
        __doc__,
        "2 nodes, 300 training images, 2 rounds, 1 server epoch of batch 16, 3 codecs",
        add_arguments,
        {
            "codecs": ["float32", "float16", "int8"],
            "num_nodes": 2,
            "rounds": 2,
            "server_epochs": 1,
            "overrides": ["server-batch-size=16"],
            "data_fraction": 0.005,
            "test_fraction": 0.02,
            "wire_samples": 32,
        },
        argv,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    base = _common.smoke_config(  # smoke: ResNet-8 edge, ResNet-10 server
        args, **{"data-fraction": args.data_fraction, "test-fraction": args.test_fraction}
    )
    runs = compare_codecs(base, args.codecs)
    ratios = print_runs(runs)
    wire = wire_demo(args.wire_samples)
    return _common.report({"runs": runs, "up-ratio": ratios, "wire": wire})


if __name__ == "__main__":
    main()
