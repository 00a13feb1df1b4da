"""Edge efficiency: FLOPs and parameters, counted with ``torch.utils.flop_counter``.

``python -m flwr_gkt.core.efficiency [--num-classes 10] [--in-channels 3] [--size 32]``
prints the paper's comparison (Section 4.3, Fig. 4): what an edge device
computes and stores with FedGKT (ResNet-8) versus FedAvg (ResNet-56/110).
FLOPs are those of one forward pass of one sample, as counted by PyTorch
(a multiply-accumulate counts as 2 FLOPs).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from flwr_gkt.core import models

__all__ = ["ModelCost", "edge_cost_table", "forward_flops", "num_parameters", "run_costs"]


def num_parameters(model: nn.Module) -> int:
    """Count the parameters of ``model`` (weights and biases, BatchNorm affine included).

    Buffers (BatchNorm running statistics) are not counted; frozen parameters
    are.
    """
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Count the FLOPs of one eval-mode forward pass of one sample of ``input_shape``.

    The model runs on a zero batch of one sample on the CPU, without gradient,
    under :class:`torch.utils.flop_counter.FlopCounterMode`; its training mode
    is restored afterwards. ``input_shape`` has no batch dimension (e.g.
    ``(3, 32, 32)``); a multiply-accumulate counts as 2 FLOPs.
    """
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return int(counter.get_total_flops())


@dataclass
class ModelCost:
    """FLOPs per sample and parameters of one model.

    Parameters
    ----------
    name : str
        Display name of the model.
    flops : int
        FLOPs of one forward pass of one sample (see :func:`forward_flops`).
    params : int
        Number of parameters (see :func:`num_parameters`).
    """

    name: str
    flops: int
    params: int


def edge_cost_table(num_classes: int = 10, in_channels: int = 3, size: int = 32) -> list[ModelCost]:
    """Return the costs of the FedGKT edge models and of the full models FedAvg trains on the edge.

    The rows are ResNet-8, ResNet-6, ResNet-4 (FedGKT edge), then ResNet-56
    and ResNet-110 (FedAvg edge), on square images of side ``size``.
    """
    shape = (in_channels, size, size)
    builders = {
        "ResNet-8 (FedGKT edge)": models.resnet8,
        "ResNet-6 (FedGKT edge)": models.resnet6,
        "ResNet-4 (FedGKT edge)": models.resnet4,
        "ResNet-56 (FedAvg edge)": models.resnet56,
        "ResNet-110 (FedAvg edge)": models.resnet110,
    }
    rows = []
    for name, build in builders.items():
        model = build(num_classes, in_channels)
        rows.append(ModelCost(name, forward_flops(model, shape), num_parameters(model)))
    return rows


def run_costs(
    edge_model: str, server_model: str, num_classes: int, in_channels: int, size: int
) -> dict[str, int]:
    """Return the FLOPs per sample and parameters of a run's models, by registry name.

    The server model is measured on one ``16 x size x size`` feature map.

    Returns
    -------
    dict[str, int]
        Keys: ``edge-flops``/``edge-params`` (edge model on the image),
        ``server-flops``/``server-params`` (server model on one feature map)
        and, where the registry knows it, ``full-flops``/``full-params`` (the
        full model FedAvg trains on every node).

    Raises
    ------
    KeyError
        If ``edge_model`` or ``server_model`` is not registered.
    """
    from flwr_gkt.core.registry import build_edge_model, build_full_model, build_server_model

    edge = build_edge_model(edge_model, num_classes, in_channels)
    server = build_server_model(server_model, num_classes, models.FEATURE_CHANNELS)
    out = {
        "edge-flops": forward_flops(edge, (in_channels, size, size)),
        "edge-params": num_parameters(edge),
        "server-flops": forward_flops(server, (models.FEATURE_CHANNELS, size, size)),
        "server-params": num_parameters(server),
    }
    try:
        full = build_full_model(server_model, num_classes, in_channels)
    except KeyError:
        return out
    out["full-flops"] = forward_flops(full, (in_channels, size, size))
    out["full-params"] = num_parameters(full)
    return out


#: Bytes per element of the wire dtypes.
DTYPE_BYTES = {"float32": 4, "float16": 2, "int8": 1, "int64": 8}


def state_bytes(model: nn.Module) -> int:
    """Return the bytes of a model's state dict (weights and buffers, in their dtypes).

    What one copy of the model costs on the wire, without headers.
    """
    return sum(int(v.numel()) * v.element_size() for v in model.state_dict().values())


def communication_costs(
    *,
    num_samples: int,
    activation_numel: int,
    num_classes: int,
    num_nodes: int,
    edge_state_bytes: int,
    full_state_bytes: int = 0,
    feature_dtype: str = "float32",
    gradient_dtype: str = "float32",
    logit_dtype: str = "float32",
) -> dict[str, float]:
    """Return the analytic training traffic of one epoch over all nodes' data, by algorithm.

    Payload bytes only (no record headers, no int8 per-channel parameters),
    one local epoch per round, every node taking part:

    * split learning and SplitFed: per sample the activations up, the label
      up, their gradient down; per node and round the edge weights down (the
      relay or the average) and back up;
    * FedGKT: per sample the features, label and edge logits up and the
      server logits down (Section 4.3);
    * FedAvg: per node and round the full model down and back up.

    Parameters
    ----------
    num_samples : int
        Training samples over all nodes.
    activation_numel : int
        Elements of one sample's activations / features (``C x H x W``).
    num_classes : int
        Number of classes (logit columns).
    num_nodes : int
        Nodes per round.
    edge_state_bytes : int
        Bytes of the edge extractor's weights (:func:`state_bytes`).
    full_state_bytes : int
        Bytes of FedAvg's full model (``0``: FedAvg left out).
    feature_dtype, gradient_dtype, logit_dtype : str
        Wire dtypes (:data:`DTYPE_BYTES`).

    Returns
    -------
    dict[str, float]
        ``activation-bytes-per-sample``, ``gradient-bytes-per-sample``,
        ``sl-bytes-per-epoch``, ``fedgkt-bytes-per-epoch`` and, with
        ``full_state_bytes``, ``fedavg-bytes-per-epoch``.
    """
    act = activation_numel * DTYPE_BYTES[feature_dtype]
    grad = activation_numel * DTYPE_BYTES[gradient_dtype]
    label = DTYPE_BYTES["int64"]
    logit = num_classes * DTYPE_BYTES[logit_dtype]
    out = {
        "activation-bytes-per-sample": float(act),
        "gradient-bytes-per-sample": float(grad),
        "sl-bytes-per-epoch": float(
            num_samples * (act + label + grad) + 2 * num_nodes * edge_state_bytes
        ),
        "fedgkt-bytes-per-epoch": float(num_samples * (act + label + 2 * logit)),
    }
    if full_state_bytes:
        out["fedavg-bytes-per-epoch"] = float(2 * num_nodes * full_state_bytes)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run ``python -m flwr_gkt.core.efficiency``: print the edge and server cost tables."""
    parser = argparse.ArgumentParser(
        prog="python -m flwr_gkt.core.efficiency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    rows = edge_cost_table(args.num_classes, args.in_channels, args.size)
    base = rows[0]
    print(
        f"Edge cost per sample, {args.in_channels}x{args.size}x{args.size} input, "
        f"{args.num_classes} classes\n"
    )
    print("| model | MFLOPs / sample | parameters | FLOPs vs ResNet-8 | params vs ResNet-8 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r.name} | {r.flops / 1e6:.1f} | {r.params:,} | {r.flops / base.flops:.1f}x | "
            f"{r.params / base.params:.1f}x |"
        )
    print(f"\nServer side (FedGKT): one feature map of 16x{args.size}x{args.size} per sample\n")
    print("| server model | MFLOPs / sample | parameters |")
    print("| --- | ---: | ---: |")
    for name in ("resnet55", "resnet109"):
        cost = run_costs("resnet8", name, args.num_classes, args.in_channels, args.size)
        print(f"| {name} | {cost['server-flops'] / 1e6:.1f} | {cost['server-params']:,} |")
    print(
        "\nPaper (Section 4.3): ResNet-8 needs 9x / 17x fewer FLOPs than ResNet-56 / ResNet-110 "
        "and has 54x / 105x fewer parameters (~11K)."
    )


if __name__ == "__main__":
    main()
