"""ClientApp side of FedGKT: message handlers for the edge node.

:func:`handle_train` and :func:`handle_evaluate` do the Flower part of the
edge's work -- read the instruction, keep the node's state, reply -- and leave
the training math to :mod:`flwr_gkt.core.edge`. A ClientApp wires them to its data,
a :class:`~flwr_gkt.data.ClientData` of in-memory tensors or a
:class:`~flwr_gkt.data.DatasetData` of map-style datasets streamed in batches
(any torch ``Dataset``, a Hugging Face ``datasets.Dataset`` with a transform):

.. code-block:: python

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, load_my_data(context), build_my_edge_model)

The node's edge model and its latest server logits live in ``context.state``
(persistent per node across rounds, in simulation and deployment alike).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore import log

from flwr_gkt.core.checkpoint import write_atomic
from flwr_gkt.core.edge import (
    EdgeRoundConfig,
    extract,
    extract_batches,
    train_edge,
    train_edge_batches,
)
from flwr_gkt.core.models import EdgeModel
from flwr_gkt.core.privacy import PrivacyConfig, apply_privacy
from flwr_gkt.core.training import (
    FitResult,
    ModuleT,
    evaluate_logits,
    get_device,
    prepare_model,
)
from flwr_gkt.data import ClientData, NodeData
from flwr_gkt.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NODE_EDGE_MODEL,
    NODE_KEY,
    NODE_TOKEN,
    NODE_UID,
    PayloadError,
    decode_server_logits,
    encode_logits,
    encode_payload,
    metrics_record,
    scalar,
    settings_from_config,
    validate_server_logits,
)

__all__ = [
    "STATE_FILE",
    "STATE_LOGITS",
    "STATE_MODEL",
    "edge_round",
    "edge_round_config",
    "handle_evaluate",
    "handle_query",
    "handle_train",
    "load_edge_model",
    "restore_state",
    "save_state",
]

#: ``context.state`` keys: the edge model's weights and the last server logits received.
STATE_MODEL = "gkt-edge-model"
STATE_LOGITS = "gkt-server-logits"
#: ``context.state`` ConfigRecord of the node's identity (the server's token).
STATE_NODE = "gkt-node"
#: File in a node's ``state-dir`` holding its saved state.
STATE_FILE = "gkt-node-state.pt"


def edge_round_config(config: Mapping[str, Any]) -> EdgeRoundConfig:
    """Read the per-round edge settings from the instruction's ConfigRecord.

    Parameters
    ----------
    config : ConfigRecord
        The train instruction's config; key ``batch-size`` sets field
        ``batch_size``, and so on (see :func:`flwr_gkt.wire.settings_from_config`).

    Returns
    -------
    EdgeRoundConfig
        The settings; missing keys keep their defaults.
    """
    return settings_from_config(EdgeRoundConfig, config)


def load_edge_model(
    context: Context, build: Callable[[], ModuleT], device: torch.device, key: str = STATE_MODEL
) -> ModuleT:
    """Build the node's edge model, with its weights from ``context.state`` if any.

    Parameters
    ----------
    context : Context
        The node's context; its state holds the edge model's weights from the
        previous round, if any.
    build : Callable[[], ModuleT]
        Builds the (untrained) edge model (any ``nn.Module``).
    device : torch.device
        Device to move the model to.
    key : str
        The ArrayRecord of ``context.state`` that holds the weights (FedGKT's
        edge model by default; FedAgg's node model, split learning's extractor).

    Returns
    -------
    ModuleT
        The model, on ``device``.
    """
    model = build()
    state = context.state.array_records.get(key)
    if state is not None:
        model.load_state_dict(state.to_torch_state_dict())
    return prepare_model(model, device)


def edge_round(
    context: Context,
    data: NodeData,
    build_model: Callable[[], EdgeModel],
    server_logits: torch.Tensor | None,
    cfg: EdgeRoundConfig,
    device: torch.device,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, FitResult, float]:
    """Run ``ClientTrain``: train, extract ``(H, Z_c)`` in sample order, keep the model.

    The trained weights are stored in ``context.state`` for the next round.

    Parameters
    ----------
    context : Context
        The node's context (edge model weights in its state).
    data : ClientData or DatasetData
        The node's local data; the training split is used.
    build_model : Callable[[], EdgeModel]
        Builds the (untrained) edge model.
    server_logits : torch.Tensor, optional
        Per-sample server logits ``Z_s`` to distil from; ``None`` trains
        without them.
    cfg : EdgeRoundConfig
        The round's edge settings.
    device : torch.device
        Device to train on.
    seed : int
        Seed of the data shuffling (and augmentation) generator.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor, FitResult, float]
        ``(features, logits, fit result, seconds)``: the training split's
        features ``H`` and logits ``Z_c`` after training, the training loss
        and accuracy, and the seconds spent training and extracting.
    """
    features, logits, _, result, seconds = _edge_round(
        context, data, build_model, server_logits, cfg, device, seed
    )
    return features, logits, result, seconds


def _edge_round(
    context: Context,
    data: NodeData,
    build_model: Callable[[], EdgeModel],
    server_logits: torch.Tensor | None,
    cfg: EdgeRoundConfig,
    device: torch.device,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, FitResult, float]:
    """:func:`edge_round`, also returning the labels ``Y`` in the order of the rows."""
    model = load_edge_model(context, build_model, device)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(data, ClientData):
        result = train_edge(
            model, data.x_train, data.y_train, server_logits, cfg, device, gen, data.augment
        )
        start = time.perf_counter()
        augment = data.augment if cfg.extract_augment else None
        features, logits = extract(
            model, data.x_train, cfg.batch_size, device, augment, gen, cfg.precision
        )
        labels = data.y_train
    else:  # streamed: a seeded shuffle for training, then indices 0..N-1 in order
        pin = device.type == "cuda"
        batches = data.train_batches(cfg.batch_size, gen, pin)
        result = train_edge_batches(model, batches, server_logits, cfg, device)
        start = time.perf_counter()
        passes = data.extraction_batches(cfg.batch_size, cfg.extract_augment, gen, pin)
        features, logits, labels = extract_batches(model, passes, device, cfg.precision)
    seconds = result.seconds + time.perf_counter() - start
    context.state.array_records[STATE_MODEL] = ArrayRecord(model.state_dict())
    return features, logits, labels, result, seconds


def _num_train(data: NodeData) -> int:
    """Return the number of training samples (rows of the payload and of ``Z_s``)."""
    return len(data.y_train) if isinstance(data, ClientData) else data.num_train


def round_seed(config: Mapping[str, Any]) -> int:
    """Return the seed of the node's data shuffling for this round.

    Parameters
    ----------
    config : Mapping[str, Any]
        The instruction's config; ``seed`` and ``server-round`` (both default 0).

    Returns
    -------
    int
        ``seed * 100003 + server-round``.
    """
    return int(scalar(config, "seed", 0)) * 100_003 + int(scalar(config, "server-round", 0))


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(CONFIG_KEY, ConfigRecord())


def _read_state(path: Path) -> tuple[int, dict[str, Any], dict[str, str]] | None:
    """``(round, arrays, node identity)`` of a saved node state, ``None`` if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
    except Exception as err:
        log(WARNING, "node state %s cannot be read (%s); ignored", path, err)
        return None
    if "arrays" not in data:  # written before states carried their round
        return -1, data, {}
    node = {str(k): str(v) for k, v in data.get("node", {}).items()}
    return int(data["round"]), data["arrays"], node


def _write_state(
    path: Path, server_round: int, arrays: dict[str, Any], node: dict[str, str]
) -> None:
    """Write the state atomically (:func:`flwr_gkt.core.checkpoint.write_atomic`)."""
    buf = io.BytesIO()
    torch.save({"round": server_round, "arrays": arrays, "node": node}, buf)
    write_atomic(path, buf.getvalue())


def save_state(context: Context, state_dir: str | Path, server_round: int = 0) -> Path:
    """Write the node's state (edge model, latest server logits) after ``server_round``.

    Written to a temporary file and renamed, so a crash never leaves a
    half-written state. The state of the previous round is kept beside it
    (``gkt-node-state.prev.pt``): a server that resumes from its last
    checkpoint may repeat the round this node already finished, and the node
    must then start that round from the state it had before (see
    :func:`restore_state`). Two files, whatever the number of rounds.

    Parameters
    ----------
    context : Context
        The node's context; its edge model and server logits are saved.
    state_dir : str or Path
        Directory of the state files (created if needed).
    server_round : int
        The round after which the state is saved.

    Returns
    -------
    Path
        The state file written.
    """
    path = Path(state_dir) / STATE_FILE
    prev = path.with_name(STATE_FILE.replace(".pt", ".prev.pt"))
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        key: {name: torch.from_numpy(array.numpy()) for name, array in record.items()}
        for key, record in context.state.array_records.items()
        if key in (STATE_MODEL, STATE_LOGITS)
    }
    node = {k: str(v) for k, v in context.state.config_records.get(STATE_NODE, {}).items()}
    latest = _read_state(path)
    if latest is not None and latest[0] < server_round:
        os.replace(path, prev)  # the previous round's state becomes the fallback
    elif (
        latest is not None
    ):  # this round again (after a server resume): keep an older fallback only
        kept = _read_state(prev)
        if kept is not None and kept[0] >= server_round:
            prev.unlink()
    _write_state(path, server_round, arrays, node)
    return path


def restore_state(context: Context, state_dir: str | Path, up_to_round: int | None = None) -> bool:
    """Load a saved node state into an empty ``context.state``.

    Nothing is loaded when the context already holds an edge model (the node
    did not restart). Unreadable state files are logged and skipped.

    Parameters
    ----------
    context : Context
        The node's context.
    state_dir : str or Path
        Directory of the state files written by :func:`save_state`.
    up_to_round : int, optional
        Load the newest saved state from this round or before (a train
        instruction for round ``r`` restores the state after round ``r - 1``,
        so a node repeats a round the resumed server repeats from the same
        state). ``None``: the newest state.

    Returns
    -------
    bool
        ``True`` if a state was loaded.
    """
    if STATE_MODEL in context.state.array_records:
        return False
    path = Path(state_dir) / STATE_FILE
    for candidate in (path, path.with_name(STATE_FILE.replace(".pt", ".prev.pt"))):
        saved = _read_state(candidate)
        if saved is None or (up_to_round is not None and saved[0] > up_to_round):
            continue
        for key, arrays in saved[1].items():
            context.state.array_records[key] = ArrayRecord(
                {n: Array(t.numpy()) for n, t in arrays.items()}
            )
        if saved[2]:
            context.state.config_records[STATE_NODE] = ConfigRecord(dict(saved[2]))
        log(
            INFO,
            "node %d: state restored from %s (saved after round %d)",
            context.node_id,
            candidate,
            saved[0],
        )
        return True
    return False


def _stored_server_logits(context: Context, n: int, num_classes: int) -> torch.Tensor | None:
    if STATE_LOGITS not in context.state.array_records:
        return None
    try:
        return validate_server_logits(
            context.state.array_records[STATE_LOGITS]["server-logits"].numpy(), n, num_classes
        )
    except PayloadError as err:  # e.g. a restored state from another partition: not used
        del context.state.array_records[STATE_LOGITS]
        log(WARNING, "node %d: kept server logits dropped: %s", context.node_id, err)
        return None


def handle_train(
    msg: Message,
    context: Context,
    data: NodeData,
    build_model: Callable[[], EdgeModel],
    device: str = "auto",
    state_dir: str | Path | None = None,
    privacy: PrivacyConfig | None = None,
    node_uid: str = "",
    edge_model: str = "",
) -> Message:
    """Run ``ClientTrain`` for one round and reply with ``H``, ``Z_c``, ``Y``.

    In a replay round (``send-features`` false in the instruction, EcoFed) the
    reply carries ``Z_c`` alone. Server logits received are kept in
    ``context.state``; when an instruction carries none, the kept ones are
    used (if they still match the training set).

    Parameters
    ----------
    msg : Message
        The train instruction: round config, and optionally the node's server
        logits ``Z_s``.
    context : Context
        The node's context (edge model and server logits in its state).
    data : ClientData or DatasetData
        The node's local data; the training split is used. A
        :class:`~flwr_gkt.data.DatasetData` is streamed in batches of the
        instruction's ``batch-size``: training in a seeded shuffle, the
        extraction pass in index order, whose labels are uploaded.
    build_model : Callable[[], EdgeModel]
        Builds the (untrained) edge model.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    state_dir : str or Path, optional
        With it, the node's state is restored from there when the node
        (re)starts and saved after every round (see :func:`save_state`).
    privacy : PrivacyConfig, optional
        With it, features and logits are clipped and noised before they leave
        the node (:mod:`flwr_gkt.core.privacy`); the node's setting, not the
        server's.
    node_uid : str
        The node's stable identity, sent along when not empty (see
        :func:`handle_query`).
    edge_model : str
        The name of the node's edge model, sent along when not empty (the
        server records it in its node history; heterogeneous federations).

    Returns
    -------
    Message
        The reply: the encoded payload (features, logits, labels, or logits
        alone) and the edge metrics, weighted by the number of examples.

    Raises
    ------
    PayloadError
        If the server logits do not match the local training set (Flower then
        replies with an error).
    """
    config = _config(msg)
    cfg = edge_round_config(config)
    dev = get_device(device)
    n = _num_train(data)
    server_round = int(scalar(config, "server-round", 0))
    if state_dir:
        restore_state(context, state_dir, server_round - 1 if server_round > 0 else None)
    token = config.get(NODE_TOKEN)
    if isinstance(token, str) and token:
        context.state.config_records[STATE_NODE] = ConfigRecord({NODE_TOKEN: token})
    server_logits = decode_server_logits(msg.content, n, data.num_classes)
    if server_logits is None:
        server_logits = _stored_server_logits(context, n, data.num_classes)
    else:  # only the validated logits are kept, nothing else the server sent
        context.state.array_records[STATE_LOGITS] = ArrayRecord(
            {"server-logits": Array(server_logits.numpy())}
        )

    features, logits, labels, result, seconds = _edge_round(
        context, data, build_model, server_logits, cfg, dev, round_seed(config)
    )

    if privacy is not None:
        features, logits = apply_privacy(features, logits, privacy)
    logit_dtype = str(config.get("logit-dtype", "float32"))
    if bool(config.get("send-features", True)):
        payload = encode_payload(
            features,
            labels,
            logits,
            logit_dtype=logit_dtype,
            feature_dtype=str(config.get("feature-dtype", "float32")),
        )
    else:  # replay round: the server still holds this node's features
        payload = encode_logits(logits, logit_dtype)
    metrics = metrics_record(
        n,
        **{
            "edge-train-loss": result.loss,
            "edge-train-accuracy": result.accuracy,
            "edge-seconds": seconds,
            "used-server-logits": float(server_logits is not None and cfg.kd_mode.edge_distills),
        },
    )
    if state_dir:
        save_state(context, state_dir, server_round)
    content = RecordDict({ARRAYS_KEY: payload, METRICS_KEY: metrics})
    info = {NODE_UID: node_uid, NODE_EDGE_MODEL: edge_model}
    if node_uid or edge_model:
        content[NODE_KEY] = ConfigRecord({k: v for k, v in info.items() if v})
    return Message(content=content, reply_to=msg)


def handle_query(
    msg: Message, context: Context, node_uid: str, state_dir: str | Path | None = None
) -> Message:
    """Answer the server's identity query with ``node_uid``.

    A server resuming from a checkpoint asks its nodes who they are: node ids
    can change when nodes or the server restart (a Ray simulation draws new
    ones), ``node_uid`` does not (e.g. ``partition-3-of-10``, or a SuperNode's
    ``node-uid`` node config). Unknown queries get an error reply.

    Parameters
    ----------
    msg : Message
        The query instruction; its config's ``query`` must be ``node-uid``.
    context : Context
        The node's context (not used).
    node_uid : str
        The node's stable identity.
    state_dir : str or Path, optional
        Where the node's state is saved (a restarted node answers with the
        token saved there).

    Returns
    -------
    Message
        The reply, with ``node_uid`` and the node's token (when it holds one)
        in its ``node`` ConfigRecord.

    Raises
    ------
    ValueError
        If the query is not ``node-uid``.
    """
    config = _config(msg)
    if config.get("query") != NODE_UID:
        raise ValueError(f"unknown query {config.get('query')!r}")
    info = ConfigRecord({NODE_UID: node_uid})
    token = context.state.config_records.get(STATE_NODE, ConfigRecord()).get(NODE_TOKEN)
    if token is None and state_dir:  # a restarted node: its token is in its saved state
        saved = _read_state(Path(state_dir) / STATE_FILE)
        token = saved[2].get(NODE_TOKEN) if saved else None
    if isinstance(token, str):
        info[NODE_TOKEN] = token
    return Message(content=RecordDict({NODE_KEY: info}), reply_to=msg)


def handle_evaluate(
    msg: Message,
    context: Context,
    data: NodeData,
    build_model: Callable[[], EdgeModel],
    device: str = "auto",
    state_dir: str | Path | None = None,
    privacy: PrivacyConfig | None = None,
) -> Message:
    """Reply with the features and labels of the local test split.

    The server classifies the features with its model (edge extractor + server
    model accuracy); the edge model's own accuracy is computed here and sent
    as a metric.

    Parameters
    ----------
    msg : Message
        The evaluate instruction (``batch-size``, ``feature-dtype``,
        ``server-round``).
    context : Context
        The node's context (edge model in its state).
    data : ClientData or DatasetData
        The node's local data; the test split is used (a
        :class:`~flwr_gkt.data.DatasetData` is streamed in index order).
    build_model : Callable[[], EdgeModel]
        Builds the (untrained) edge model.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    state_dir : str or Path, optional
        With it, the node's state is restored from there when the node
        (re)starts (see :func:`restore_state`).
    privacy : PrivacyConfig, optional
        Applies to the uploaded test features as to the training ones (the
        edge metrics are computed before).

    Returns
    -------
    Message
        The reply: the test features and labels, and ``edge-loss`` /
        ``edge-accuracy`` weighted by the number of examples.

    Raises
    ------
    ValueError
        If the node's :class:`~flwr_gkt.data.DatasetData` has no test split
        (Flower then replies with an error).
    """
    config = _config(msg)
    dev = get_device(device)
    if state_dir:
        restore_state(context, state_dir, int(scalar(config, "server-round", 0)) or None)
    model = load_edge_model(context, build_model, dev)
    batch_size = int(scalar(config, "batch-size", 64))
    precision = str(config.get("precision", "fp32"))
    if isinstance(data, ClientData):
        features, logits = extract(model, data.x_test, batch_size, dev, precision=precision)
        labels = data.y_test
    else:
        batches = data.test_batches(batch_size, pin_memory=dev.type == "cuda")
        features, logits, labels = extract_batches(model, batches, dev, precision)
    loss_sum, correct = evaluate_logits(logits, labels)
    n = len(labels)
    if privacy is not None:
        features, _ = apply_privacy(features, None, privacy)
    payload = encode_payload(
        features, labels, None, feature_dtype=str(config.get("feature-dtype", "float32"))
    )
    metrics = metrics_record(
        n, **{"edge-loss": loss_sum / max(n, 1), "edge-accuracy": correct / max(n, 1)}
    )
    return Message(content=RecordDict({ARRAYS_KEY: payload, METRICS_KEY: metrics}), reply_to=msg)
