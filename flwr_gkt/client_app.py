"""ClientApp side of FedGKT: message handlers for the edge node.

:func:`handle_train` and :func:`handle_evaluate` do the Flower part of the
edge's work -- read the instruction, keep the node's state, reply -- and leave
the training math to :mod:`flwr_gkt.edge`. A ClientApp wires them to its data:

.. code-block:: python

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, load_my_data(context), build_my_edge_model)

The node's edge model and its latest server logits live in ``context.state``
(persistent per node across rounds, in simulation and deployment alike).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from .data import ClientData
from .edge import EdgeRoundConfig, extract, train_edge
from .losses import KDMode
from .models import EdgeModel
from .training import FitResult, evaluate_logits, get_device, prepare_model
from .wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    decode_server_logits,
    encode_payload,
    metrics_record,
)

__all__ = [
    "handle_train",
    "handle_evaluate",
    "edge_round",
    "edge_round_config",
    "load_edge_model",
    "STATE_MODEL",
    "STATE_LOGITS",
]

STATE_MODEL = "gkt-edge-model"
STATE_LOGITS = "gkt-server-logits"


def edge_round_config(config: ConfigRecord) -> EdgeRoundConfig:
    """Read the per-round edge settings from the instruction's ConfigRecord."""
    d = EdgeRoundConfig()
    return EdgeRoundConfig(
        epochs=int(config.get("epochs", d.epochs)),  # type: ignore[arg-type]
        batch_size=int(config.get("batch-size", d.batch_size)),  # type: ignore[arg-type]
        optimizer=str(config.get("optimizer", d.optimizer)),
        lr=float(config.get("lr", d.lr)),  # type: ignore[arg-type]
        weight_decay=float(config.get("weight-decay", d.weight_decay)),  # type: ignore[arg-type]
        temperature=float(config.get("temperature", d.temperature)),  # type: ignore[arg-type]
        alpha=float(config.get("alpha", d.alpha)),  # type: ignore[arg-type]
        kd_mode=KDMode(str(config.get("kd-mode", d.kd_mode.value))),
    )


def load_edge_model(
    context: Context, build: Callable[[], EdgeModel], device: torch.device
) -> EdgeModel:
    """The node's edge model: built, with its weights from ``context.state`` if any."""
    model = build()
    state = context.state.array_records.get(STATE_MODEL)
    if state is not None:
        model.load_state_dict(state.to_torch_state_dict())
    return prepare_model(model, device)  # type: ignore[return-value]


def edge_round(
    context: Context,
    data: ClientData,
    build_model: Callable[[], EdgeModel],
    server_logits: torch.Tensor | None,
    cfg: EdgeRoundConfig,
    device: torch.device,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, FitResult, float]:
    """``ClientTrain``: train, extract ``(H, Z_c)`` in sample order, keep the model.

    Returns ``(features, logits, fit result, seconds)``; the trained weights are
    stored in ``context.state`` for the next round.
    """
    model = load_edge_model(context, build_model, device)
    gen = torch.Generator().manual_seed(seed)
    result = train_edge(model, data.x_train, data.y_train, server_logits, cfg, device, gen, data.augment)
    start = time.perf_counter()
    features, logits = extract(model, data.x_train, cfg.batch_size, device, data.augment, gen)
    seconds = result.seconds + time.perf_counter() - start
    context.state.array_records[STATE_MODEL] = ArrayRecord(model.state_dict())
    return features, logits, result, seconds


def round_seed(config: ConfigRecord | dict) -> int:
    """Seed of the node's data shuffling for this round."""
    return int(config.get("seed", 0)) * 100_003 + int(config.get("server-round", 0))  # type: ignore[arg-type]


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(CONFIG_KEY, ConfigRecord())


def handle_train(
    msg: Message,
    context: Context,
    data: ClientData,
    build_model: Callable[[], EdgeModel],
    device: str = "auto",
) -> Message:
    """Run ``ClientTrain`` for one round and reply with ``H``, ``Z_c``, ``Y``.

    Raises (and so replies with an error) when the server logits do not match
    the local training set.
    """
    config = _config(msg)
    cfg = edge_round_config(config)
    dev = get_device(device)
    n = len(data.y_train)
    server_logits = decode_server_logits(msg.content, n, data.num_classes)
    if server_logits is None and STATE_LOGITS in context.state.array_records:
        server_logits = torch.from_numpy(
            context.state.array_records[STATE_LOGITS]["server-logits"].numpy()
        )
    elif server_logits is not None:
        context.state.array_records[STATE_LOGITS] = msg.content.array_records[ARRAYS_KEY]

    features, logits, result, seconds = edge_round(
        context, data, build_model, server_logits, cfg, dev, round_seed(config)
    )

    payload = encode_payload(
        features, data.y_train, logits, feature_dtype=str(config.get("feature-dtype", "float32"))
    )
    metrics = metrics_record(
        n,
        **{
            "edge-train-loss": result.loss,
            "edge-train-accuracy": result.accuracy,
            "edge-seconds": seconds,
            "used-server-logits": float(server_logits is not None and cfg.kd_mode.edge_distills),
        },
    )
    content = RecordDict({ARRAYS_KEY: payload, METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


def handle_evaluate(
    msg: Message,
    context: Context,
    data: ClientData,
    build_model: Callable[[], EdgeModel],
    device: str = "auto",
) -> Message:
    """Reply with the features and labels of the local test split.

    The server classifies the features with its model (edge extractor + server
    model accuracy); the edge model's own accuracy is computed here and sent
    as a metric.
    """
    config = _config(msg)
    dev = get_device(device)
    model = load_edge_model(context, build_model, dev)
    batch_size = int(config.get("batch-size", 64))  # type: ignore[arg-type]
    features, logits = extract(model, data.x_test, batch_size, dev)
    loss_sum, correct = evaluate_logits(logits, data.y_test)
    n = len(data.y_test)
    payload = encode_payload(
        features, data.y_test, None, feature_dtype=str(config.get("feature-dtype", "float32"))
    )
    metrics = metrics_record(
        n, **{"edge-loss": loss_sum / max(n, 1), "edge-accuracy": correct / max(n, 1)}
    )
    return Message(content=RecordDict({ARRAYS_KEY: payload, METRICS_KEY: metrics}), reply_to=msg)
