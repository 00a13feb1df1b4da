"""ClientApp side of FedAgg / FedEEC: end devices and edge servers.

Every node runs :func:`handle_fedagg` on the cloud's ``train`` messages; the
message's ``fedagg-stage`` says what to do (see ``docs/fedagg.md``):

``init`` (end devices, once)
    Encode the local training images with the frozen bridge encoder and reply
    with the embeddings and labels (:func:`flwr_gkt.wire.encode_embeddings`).
``store`` (edge servers)
    Keep the embeddings of the leaves now under this node (``fedagg-emb/<uid>``
    records), drop those listed in ``drop`` (a leaf that migrated away).
``teach``
    For every ``teach/<name>`` entry (a comma-separated list of leaf uids),
    compute this node's logits on the bridge samples of those leaves, in that
    order, and reply them by name (logits only).
``learn``
    For every ``learn/<name>`` entry, train one BSBODP pass with the
    neighbour's logits sent under ``<name>`` (end device:
    :func:`flwr_gkt.core.fedagg.train_leaf` on its real images and their bridge
    samples; edge: :func:`flwr_gkt.core.fedagg.train_nonleaf`).

:func:`handle_topology_query` answers the cloud's ``query``: the node's uid,
tier and parent. The node's model and the embeddings it holds live in
``context.state``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import Tensor, nn

from flwr_gkt.core.bridge import BridgeAutoencoder
from flwr_gkt.core.fedagg import BSBODPConfig, teacher_logits, train_leaf, train_nonleaf
from flwr_gkt.core.rectify import get_rectifier
from flwr_gkt.core.training import get_device
from flwr_gkt.data import ClientData
from flwr_gkt.flower.client_app import load_edge_model, round_seed
from flwr_gkt.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NODE_KEY,
    NODE_UID,
    decode_named_logits,
    encode_embeddings,
    encode_named_logits,
    metrics_record,
    scalar,
    settings_from_config,
)

__all__ = [
    "EMB_PREFIX",
    "STATE_MODEL",
    "TierRole",
    "bsbodp_config",
    "handle_fedagg",
    "handle_topology_query",
    "leaves_of",
    "lesson_order",
]

STATE_MODEL = "fedagg-model"
#: ``context.state.array_records[EMB_PREFIX + leaf_uid]``: that leaf's embeddings and labels.
EMB_PREFIX = "fedagg-emb/"


@dataclass(frozen=True)
class TierRole:
    """Where a node sits in the tree.

    Parameters
    ----------
    uid : str
        The node's stable identity.
    tier : str
        ``end`` (end device) or ``edge`` (edge server).
    parent : str
        The parent's uid, or ``cloud``.

    Raises
    ------
    ValueError
        If ``tier`` is neither ``end`` nor ``edge``.
    """

    uid: str
    tier: str
    parent: str

    def __post_init__(self) -> None:
        """Check the tier."""
        if self.tier not in ("end", "edge"):
            raise ValueError(f"tier must be 'end' or 'edge', got {self.tier!r}")


def leaves_of(spec: str) -> list[str]:
    """Split a comma-separated list of leaf uids.

    Parameters
    ----------
    spec : str
        For example ``"a,b,c"``; empty items are skipped.

    Returns
    -------
    list[str]
        The uids, e.g. ``["a", "b", "c"]``.
    """
    return [uid for uid in str(spec).split(",") if uid]


def lesson_order(lessons: Iterable[str]) -> list[str]:
    """Return the order a node learns its round's lessons in: children, then parent.

    The official FedAgg code (``train_FedAgg``) is depth-first: a non-leaf
    node first learns from each of its children in turn (right after that
    child learned from it), then from its own parent. Children are taken in
    uid order.

    Parameters
    ----------
    lessons : Iterable[str]
        Lesson names: ``parent`` and ``child/<uid>``.

    Returns
    -------
    list[str]
        The names, ``child/*`` sorted first, ``parent`` last.
    """
    return sorted(lessons, key=lambda n: (n == "parent", n))


def bsbodp_config(config: ConfigRecord) -> BSBODPConfig:
    """Read the BSBODP settings sent with a ``learn`` instruction.

    Parameters
    ----------
    config : ConfigRecord
        The instruction's config (see :func:`flwr_gkt.wire.settings_from_config`).

    Returns
    -------
    BSBODPConfig
        The settings; missing keys keep their defaults.
    """
    return settings_from_config(BSBODPConfig, config)


def handle_topology_query(msg: Message, role: TierRole) -> Message:
    """Tell the cloud who this node is and where it hangs.

    Parameters
    ----------
    msg : Message
        The cloud's topology query.
    role : TierRole
        This node's place in the tree.

    Returns
    -------
    Message
        The reply, with ``node-uid``, ``tier`` and ``parent`` in its ``node``
        ConfigRecord.
    """
    info = ConfigRecord({NODE_UID: role.uid, "tier": role.tier, "parent": role.parent})
    return Message(content=RecordDict({NODE_KEY: info}), reply_to=msg)


def _embeddings(context: Context, leaves: list[str]) -> tuple[Tensor, Tensor]:
    eps, labels = [], []
    for uid in leaves:
        record = context.state.array_records.get(EMB_PREFIX + uid)
        if record is None:
            raise KeyError(f"no embeddings of leaf {uid!r} on this node")
        eps.append(torch.from_numpy(record["embeddings"].numpy()))
        labels.append(torch.from_numpy(record["labels"].numpy()))
    return torch.cat(eps), torch.cat(labels)


def handle_fedagg(
    msg: Message,
    context: Context,
    role: TierRole,
    autoencoder: BridgeAutoencoder,
    build_model: Callable[[], nn.Module],
    data: ClientData | None = None,
    device: str = "auto",
) -> Message:
    """Run one FedAgg stage on this node (see the module docstring); reply to the cloud.

    Parameters
    ----------
    msg : Message
        The cloud's ``train`` message; its config's ``fedagg-stage`` is
        ``init``, ``store``, ``teach`` or ``learn``.
    context : Context
        The node's context; its state holds the node's model and the
        embeddings it holds.
    role : TierRole
        This node's place in the tree.
    autoencoder : BridgeAutoencoder
        The frozen bridge autoencoder (the same on every node).
    build_model : Callable[[], nn.Module]
        Builds the node's (untrained) model.
    data : ClientData, optional
        The local data; required on end devices (``init`` and ``learn``).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    Message
        ``init``: the embeddings and labels; ``store``: the number of leaves
        held; ``teach``: the logits by name; ``learn``: the training loss,
        accuracy and seconds. Each with ``num-examples``.

    Raises
    ------
    ValueError
        If the stage is unknown, or an end device's data is missing (or an
        edge server is asked to ``init``).
    KeyError
        If the node lacks the embeddings of a leaf it is asked about.
    PayloadError
        If the teachers' logits of a ``learn`` message fail validation.
    """
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    stage = str(config.get("fedagg-stage", ""))
    dev = get_device(device)
    start = time.perf_counter()
    if stage == "init":
        content = _init(context, role, autoencoder, data)
    elif stage == "store":
        content = _store(msg, context, config)
    elif stage == "teach":
        model = load_edge_model(context, build_model, dev, STATE_MODEL)
        content = _teach(context, config, model, autoencoder, dev)
    elif stage == "learn":
        model = load_edge_model(context, build_model, dev, STATE_MODEL)
        content = _learn(msg, context, config, role, model, autoencoder, data, dev, start)
    else:
        raise ValueError(f"unknown fedagg-stage {stage!r}")
    return Message(content=content, reply_to=msg)


def _init(
    context: Context, role: TierRole, autoencoder: BridgeAutoencoder, data: ClientData | None
) -> RecordDict:
    """Stage ``init``: an end device encodes its training images once; the embeddings go up."""
    if role.tier != "end" or data is None:
        raise ValueError("only an end device with data uploads embeddings")
    pixels = data.x_train * autoencoder.std + autoencoder.mean  # the encoder reads [0, 1] images
    eps = autoencoder.encode(pixels)
    record = encode_embeddings(eps, data.y_train)
    context.state.array_records[EMB_PREFIX + role.uid] = record
    return RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(len(eps))})


def _store(msg: Message, context: Context, config: ConfigRecord) -> RecordDict:
    """Stage ``store``: keep the embeddings sent, drop those named; reply the count held."""
    for key, record in msg.content.array_records.items():
        if key.startswith(EMB_PREFIX):
            context.state.array_records[key] = record
    for uid in leaves_of(str(config.get("drop", ""))):
        context.state.array_records.pop(EMB_PREFIX + uid, None)
    held = sum(1 for k in context.state.array_records if k.startswith(EMB_PREFIX))
    return RecordDict({METRICS_KEY: metrics_record(held)})


def _teach(
    context: Context,
    config: ConfigRecord,
    model: nn.Module,
    autoencoder: BridgeAutoencoder,
    dev: torch.device,
) -> RecordDict:
    """Stage ``teach``: this node's logits on the bridge samples of each leaf set asked for."""
    logits = {}
    for key in config:
        if key.startswith("teach/"):
            eps, _ = _embeddings(context, leaves_of(str(config[key])))
            logits[key[len("teach/") :]] = teacher_logits(model, autoencoder.bridge(eps), dev)
    n = sum(len(z) for z in logits.values())
    return RecordDict(
        {
            ARRAYS_KEY: encode_named_logits(logits, str(config.get("logit-dtype", "float32"))),
            METRICS_KEY: metrics_record(n),
        }
    )


def _learn(
    msg: Message,
    context: Context,
    config: ConfigRecord,
    role: TierRole,
    model: nn.Module,
    autoencoder: BridgeAutoencoder,
    data: ClientData | None,
    dev: torch.device,
    start: float,
) -> RecordDict:
    """Stage ``learn``: train on each lesson's bridge samples against its teacher's logits."""
    cfg = bsbodp_config(config)
    rectify = get_rectifier(str(config.get("rectify", "none")))
    lessons = {
        key[len("learn/") :]: leaves_of(str(config[key]))
        for key in config
        if key.startswith("learn/")
    }
    embedded = {name: _embeddings(context, leaves) for name, leaves in lessons.items()}
    teachers = decode_named_logits(
        msg.content.array_records.get(ARRAYS_KEY, ArrayRecord()),
        {name: len(labels) for name, (_, labels) in embedded.items()},
        int(scalar(config, "num-classes", 10)),
    )
    gen = torch.Generator().manual_seed(round_seed(config))
    loss_sum, correct_sum, seen = 0.0, 0.0, 0
    for name in lesson_order(lessons):
        eps, labels = embedded[name]
        bridge = autoencoder.bridge(eps)
        if role.tier == "end":
            if data is None:
                raise ValueError("an end device needs its data")
            result = train_leaf(
                model, data.x_train, bridge, labels, teachers[name], cfg, dev, gen, rectify
            )
        else:
            result = train_nonleaf(model, bridge, labels, teachers[name], cfg, dev, gen, rectify)
        loss_sum += result.loss * result.num_examples
        correct_sum += result.accuracy * result.num_examples
        seen += result.num_examples
    context.state.array_records[STATE_MODEL] = ArrayRecord(model.state_dict())
    metrics = metrics_record(
        seen,
        **{
            "train-loss": loss_sum / max(seen, 1),
            "train-accuracy": correct_sum / max(seen, 1),
            "seconds": time.perf_counter() - start,
        },
    )
    return RecordDict({METRICS_KEY: metrics})
