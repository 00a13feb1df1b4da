"""A FedGKT strategy on a tiny server model, the honest replies of its nodes, a round by hand.

Shared by the tests of hostile and extreme replies, the trust boundary, feature
storage and heterogeneous edge models.
"""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from flwr_gkt.core.server import GKTServer
from flwr_gkt.flower.options import SamplingOptions
from flwr_gkt.flower.strategy import FedGKT
from flwr_gkt.wire import ARRAYS_KEY, METRICS_KEY, encode_payload, metrics_record
from tests.helpers.federation import FakeGrid

SHAPE = (16, 8, 8)
NODES = [11, 22, 33, 44]
N = 12  # samples per node


def tiny_server_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(SHAPE[0], 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )


def make_strategy(nodes=NODES, **kwargs):
    torch.manual_seed(0)
    server = GKTServer(tiny_server_model(), epochs=1, batch_size=16, device="cpu")
    return FedGKT(
        server,
        10,
        feature_shape=SHAPE,
        sampling=SamplingOptions(min_train_nodes=len(nodes), min_available_nodes=len(nodes)),
        **kwargs,
    )


def honest(node: int, rnd: int):
    gen = torch.Generator().manual_seed(node * 100 + rnd)
    features = torch.rand((N, *SHAPE), generator=gen)
    labels = torch.randint(0, 10, (N,), generator=gen)
    logits = torch.randn((N, 10), generator=gen)
    return features, labels, logits


def reply_to(instruction: Message, features, labels, logits, num_examples=None) -> Message:
    content = RecordDict(
        {
            ARRAYS_KEY: encode_payload(features, labels, logits),
            METRICS_KEY: metrics_record(len(labels) if num_examples is None else num_examples),
        }
    )
    return Message(content, reply_to=instruction)


def train_round(strategy, rnd, tamper=None, nodes=NODES):
    """One train round with honest replies, except what ``tamper(node, f, y, z)`` changes."""
    instructions = list(
        strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), FakeGrid(nodes))
    )
    replies = []
    for msg in instructions:
        node = msg.metadata.dst_node_id
        f, y, z = honest(node, rnd)
        if tamper is not None:
            f, y, z = tamper(node, f, y, z)
        replies.append(reply_to(msg, f, y, z))
    return strategy.aggregate_train(rnd, replies)


def statuses(strategy, rnd):
    return {
        r["node-id"]: (r["status"], r.get("reason", ""))
        for r in strategy.node_history
        if r["round"] == rnd
    }


# ------------------------------------------------------------- the legacy API
class ClientProxy:
    """Just enough of a legacy ``ClientProxy``: its ``cid``."""

    def __init__(self, cid):
        self.cid = str(cid)


def legacy_clients(nodes):
    """A legacy ClientManager holding a proxy per node."""
    from flwr.server.client_manager import SimpleClientManager

    clients = SimpleClientManager()
    for node in nodes:
        clients.register(ClientProxy(node))
    return clients


def legacy_strategy(**kwargs):
    """The legacy adapter over a FedGKT of the hostile-payload tests (``kwargs`` are FedGKT's)."""
    from flwr_gkt.flower.legacy import FedGKTLegacy

    return FedGKTLegacy(make_strategy(nodes=[1, 2], **kwargs))


def legacy_fit(strategy, rnd, results, failures=(), nodes=None):
    """``configure_fit`` to ``nodes`` (default: those of ``results``), then ``aggregate_fit``."""
    from flwr.common import Parameters

    nodes = [int(p.cid) for p, _ in results] if nodes is None else nodes
    strategy.configure_fit(rnd, Parameters([], ""), legacy_clients(nodes))
    return strategy.aggregate_fit(rnd, results, list(failures))
