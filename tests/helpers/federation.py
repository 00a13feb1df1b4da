"""An in-process federation: the real strategy and ClientApp handlers, no Ray.

Drives ``FedGKT.configure_*`` / ``aggregate_*`` and ``handle_train`` /
``handle_evaluate`` exactly as the Flower runtime would, with one
``Context`` per node, so tests can inspect every message.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flwr_gkt.core.models import EdgeModel
from flwr_gkt.data import ClientData
from flwr_gkt.flower.client_app import handle_evaluate, handle_train


def set_task_identity() -> None:
    """Messages need a run/node/task identity, as inside a ServerApp."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


def seeded_builders(make: Callable[[], EdgeModel], count: int) -> list[Callable[[], EdgeModel]]:
    """``count`` edge-model builders; builder ``i`` seeds torch with ``i`` before ``make()``."""

    def builder(i: int) -> Callable[[], EdgeModel]:
        def build() -> EdgeModel:
            torch.manual_seed(i)
            return make()

        return build

    return [builder(i) for i in range(count)]


class FakeGrid:
    """Just enough of ``flwr.serverapp.Grid`` for sampling."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


class LocalFederation:
    """Nodes ``node_ids[i]`` hold ``datas[i]`` and build ``builders[i]()``."""

    def __init__(
        self, node_ids: list[int], datas: list[ClientData], builders: list[Callable[[], EdgeModel]]
    ):
        set_task_identity()
        self.grid = FakeGrid(node_ids)
        self.nodes = {
            nid: (
                Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={}),
                d,
                b,
            )
            for nid, d, b in zip(node_ids, datas, builders, strict=True)
        }
        self.tamper: Callable[[int, int, Message], Message] | None = None

    def reply(self, msg: Message, server_round: int) -> Message:
        nid = msg.metadata.dst_node_id
        context, data, build = self.nodes[nid]
        handler = handle_train if msg.metadata.message_type == "train" else handle_evaluate
        reply = handler(msg, context, data, build, "cpu")
        if self.tamper is not None:
            reply = self.tamper(nid, server_round, reply)
        return reply

    def run_round(self, strategy, server_round: int, config: ConfigRecord | None = None):
        config = config or ConfigRecord()
        arrays = ArrayRecord()
        train_msgs = list(strategy.configure_train(server_round, arrays, config, self.grid))
        self.last_train_messages = train_msgs
        replies = [self.reply(m, server_round) for m in train_msgs]
        train_out = strategy.aggregate_train(server_round, replies)
        eval_msgs = list(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid)
        )
        eval_replies = [self.reply(m, server_round) for m in eval_msgs]
        eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)
        return train_out, eval_metrics
