"""ClientApp side of split learning and SplitFed: the edge half of every mini-batch.

A node's turn (one round of SL, or the node's share of a SplitFed round) is a
sequence of ``train`` instructions from the server, told apart by the
config's ``split-stage``:

``begin``
    Carries the edge extractor's weights (``edge`` ArrayRecord: relayed from
    the previous node in SL, the average in SplitFed) and the turn's settings
    (``epochs``, ``batch-size``, ``optimizer``, ``lr``, ``weight-decay``,
    ``seed``, ``feature-dtype``). The node loads the weights (checked against
    its own model), draws the turn's mini-batches (seeded) and replies with
    the activations and labels of batch 0 and ``batches``, the turn's number
    of batches.
``step``
    Carries ``dL/dH`` of batch ``batch`` (``gkt`` ArrayRecord ``gradient``).
    The node back-propagates it (recomputing ``f_e`` on the same batch with
    the same weights: :func:`flwr_gkt.core.split.edge_backward`), steps its
    optimizer, and replies with the activations of batch ``batch + 1`` -- or,
    after the last batch, with its trained weights (``gkt``).

``evaluate`` instructions carry the weights to evaluate (``edge``); the node
replies with the activations of its local test split, as a FedGKT evaluate
reply. The node's extractor weights, optimizer state and turn live in
``context.state`` between messages (persistent per node across messages, in
simulation and deployment alike), so no ClientApp process needs to survive
from one message to the next.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from flwr_gkt.core.split import batch_indices, edge_activations, edge_backward
from flwr_gkt.core.training import get_device, make_optimizer, prepare_model, to_device
from flwr_gkt.data import ClientData
from flwr_gkt.flower.client_app import load_edge_model
from flwr_gkt.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    PayloadError,
    decode_gradient,
    decode_state,
    encode_activations,
    encode_state,
    metrics_record,
    scalar,
    settings_from_config,
    settings_record,
)

__all__ = [
    "EDGE_KEY",
    "STATE_EXTRACTOR",
    "STATE_OPTIMIZER",
    "STATE_TURN",
    "SplitTurn",
    "handle_split_evaluate",
    "handle_split_train",
    "turn_seed",
]

#: RecordDict key of the edge weights in ``begin`` and ``evaluate`` instructions.
EDGE_KEY = "edge"
#: ``context.state`` keys: the extractor's weights, the optimizer's state, the current turn.
STATE_EXTRACTOR = "split-extractor"
STATE_OPTIMIZER = "split-optimizer"
STATE_TURN = "split-turn"


def turn_seed(seed: int, server_round: int, node_id: int) -> int:
    """Return the seed of node ``node_id``'s mini-batches in round ``server_round``.

    Derived from the run's ``seed`` (the same on recomputation), for
    :func:`torch.Generator.manual_seed`.
    """
    return (seed * 1_000_003 + server_round * 7919 + node_id) % (2**63)


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(CONFIG_KEY, ConfigRecord())


def _opt_to_array(optimizer: torch.optim.Optimizer) -> ArrayRecord:
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    return ArrayRecord({"state": Array(np.frombuffer(buf.getvalue(), dtype=np.uint8).copy())})


def _opt_from_array(optimizer: torch.optim.Optimizer, record: ArrayRecord) -> None:
    data = record["state"].numpy().tobytes()
    state = torch.load(io.BytesIO(data), weights_only=True)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError):  # another optimizer than last turn: start afresh
        pass


@dataclass
class SplitTurn:
    """A node's turn as it keeps it in ``context.state`` (also read from ``begin``).

    Parameters
    ----------
    server_round : int
        The round of the turn.
    seed : int
        Seed of the turn's mini-batches (:func:`turn_seed`).
    epochs : int
        Local epochs of the turn.
    batch_size : int
        Mini-batch size.
    optimizer : str
        ``adam`` or ``sgd``.
    lr : float
        Learning rate.
    weight_decay : float
        Weight decay of ``sgd``.
    feature_dtype : str
        Activations on the wire.
    batches : int
        Batches in the turn.
    pending : int
        The batch whose activations were sent last (``-1``: none).
    pending_shape : str
        Their shape, ``"N,C,H,W"``.
    trained : int
        Samples back-propagated so far.
    seconds : float
        Time spent on the turn so far.
    """

    server_round: int = 0
    seed: int = 0
    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    feature_dtype: str = "float32"
    batches: int = 0
    pending: int = -1
    pending_shape: str = ""
    trained: int = 0
    seconds: float = 0.0


def _optimizer(model: nn.Module, turn: SplitTurn, context: Context) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(turn.optimizer, params, turn.lr, turn.weight_decay)
    saved = context.state.array_records.get(STATE_OPTIMIZER)
    if saved is not None:
        _opt_from_array(optimizer, saved)
    for group in optimizer.param_groups:
        group["lr"] = turn.lr
    return optimizer


def _batch(data: ClientData, turn: SplitTurn, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the inputs and labels of the turn's batch ``b`` (augmented, seeded per batch)."""
    gen = torch.Generator().manual_seed(turn.seed)
    idx = batch_indices(len(data.y_train), turn.batch_size, turn.epochs, gen)[b]
    x = data.x_train[idx]
    if data.augment is not None:
        x = data.augment(x, torch.Generator().manual_seed(turn.seed + 1 + b))
    return x, data.y_train[idx]


def _activations_reply(
    msg: Message,
    extractor: nn.Module,
    data: ClientData,
    turn: SplitTurn,
    b: int,
    device: torch.device,
    **metrics: float,
) -> Message:
    x, y = _batch(data, turn, b)
    h = edge_activations(extractor, x, device)
    record = encode_activations(h, y, turn.feature_dtype)
    turn.pending = b
    turn.pending_shape = ",".join(str(int(d)) for d in h.shape)
    content = RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(len(y), **metrics)})
    return Message(content=content, reply_to=msg)


def handle_split_train(
    msg: Message,
    context: Context,
    data: ClientData,
    build_extractor: Callable[[], nn.Module],
    device: str = "auto",
) -> Message:
    """Run one ``begin`` or ``step`` of this node's split-learning turn (module docstring).

    Parameters
    ----------
    msg : Message
        The server's ``train`` instruction.
    context : Context
        The node's context: its state keeps the extractor's weights, the
        optimizer's state and the turn between messages.
    data : ClientData
        The node's local data.
    build_extractor : Callable[[], nn.Module]
        Builds the (untrained) edge extractor ``f_e``.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    Message
        The activations and labels of the next batch (``num-examples``: the
        batch's size, ``batch``: its index, and on ``begin`` ``batches``), or
        after the last batch the trained weights (``num-examples``: samples
        trained in the turn, ``edge-seconds``).

    Raises
    ------
    PayloadError
        If the weights or the gradient fail validation, or a ``step`` answers
        another batch than the one last sent.
    ValueError
        If the stage is unknown.
    """
    config = _config(msg)
    stage = str(config.get("split-stage", ""))
    dev = get_device(device)
    start = time.perf_counter()
    extractor = load_edge_model(context, build_extractor, dev, STATE_EXTRACTOR)
    if stage == "begin":
        record = msg.content.array_records.get(EDGE_KEY)
        if record is None:
            raise PayloadError(f"missing ArrayRecord '{EDGE_KEY}' (the edge weights)")
        extractor.load_state_dict(decode_state(record, extractor.state_dict()))
        turn = settings_from_config(SplitTurn, config)
        turn = dataclasses.replace(
            turn,
            seed=turn_seed(turn.seed, turn.server_round, int(msg.metadata.dst_node_id)),
            epochs=max(1, turn.epochs),
            batch_size=max(2, turn.batch_size),
            batches=0,
            pending=-1,
            trained=0,
            seconds=0.0,
        )
        gen = torch.Generator().manual_seed(turn.seed)
        turn.batches = len(batch_indices(len(data.y_train), turn.batch_size, turn.epochs, gen))
        optimizer = _optimizer(extractor, turn, context)
        reply = _activations_reply(
            msg, extractor, data, turn, 0, dev, batch=0, batches=float(turn.batches)
        )
    elif stage == "step":
        kept = context.state.config_records.get(STATE_TURN)
        turn = settings_from_config(SplitTurn, kept or {})
        b = int(scalar(config, "batch", -1))
        if kept is None or b < 0 or turn.pending != b:
            raise PayloadError(f"a gradient for batch {b}, which this node did not send last")
        if int(scalar(config, "server-round", 0)) != turn.server_round:
            raise PayloadError("a gradient of another round than this node's turn")
        optimizer = _optimizer(extractor, turn, context)
        shape = tuple(int(d) for d in turn.pending_shape.split(","))
        gradient = decode_gradient(msg.content, shape)
        x, y = _batch(data, turn, b)
        edge_backward(extractor, optimizer, x, gradient, dev)
        turn.trained += len(y)
        if b + 1 < turn.batches:
            reply = _activations_reply(msg, extractor, data, turn, b + 1, dev, batch=b + 1)
        else:
            turn.pending = -1
            seconds = turn.seconds + time.perf_counter() - start
            metrics = metrics_record(turn.trained, **{"edge-seconds": seconds})
            content = RecordDict(
                {ARRAYS_KEY: encode_state(extractor.state_dict()), METRICS_KEY: metrics}
            )
            reply = Message(content=content, reply_to=msg)
    else:
        raise ValueError(f"unknown split-stage {stage!r}")
    turn.seconds += time.perf_counter() - start
    context.state.config_records[STATE_TURN] = settings_record(turn)
    context.state.array_records[STATE_EXTRACTOR] = encode_state(extractor.state_dict())
    context.state.array_records[STATE_OPTIMIZER] = _opt_to_array(optimizer)
    return reply


@torch.inference_mode()
def handle_split_evaluate(
    msg: Message,
    data: ClientData,
    build_extractor: Callable[[], nn.Module],
    device: str = "auto",
) -> Message:
    """Reply with the activations of the local test split under the weights sent.

    ``msg`` is the server's ``evaluate`` instruction: the weights (``edge``)
    and ``batch-size`` / ``feature-dtype`` in its config; ``data``,
    ``build_extractor`` and ``device`` are as in :func:`handle_split_train`.

    Returns
    -------
    Message
        ``gkt``: the test activations and labels; ``num-examples``.

    Raises
    ------
    PayloadError
        If the weights are missing or fail validation.
    """
    config = _config(msg)
    dev = get_device(device)
    extractor = prepare_model(build_extractor(), dev)
    record = msg.content.array_records.get(EDGE_KEY)
    if record is None:
        raise PayloadError(f"missing ArrayRecord '{EDGE_KEY}' (the edge weights)")
    extractor.load_state_dict(decode_state(record, extractor.state_dict()))
    extractor.eval()
    batch = max(1, int(scalar(config, "batch-size", 256)))
    feats: list[Any] = []
    for start in range(0, len(data.y_test), batch):
        feats.append(extractor(to_device(data.x_test[start : start + batch], dev)).float().cpu())
    h = torch.cat(feats).contiguous()
    content = RecordDict(
        {
            ARRAYS_KEY: encode_activations(
                h, data.y_test, str(config.get("feature-dtype", "float32"))
            ),
            METRICS_KEY: metrics_record(len(data.y_test)),
        }
    )
    return Message(content=content, reply_to=msg)
