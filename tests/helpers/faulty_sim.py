"""A Ray simulation in which one node sends a bad payload (used by tests/e2e/test_simulation.py).

``python tests/helpers/faulty_sim.py RESULTS_DIR MODE``: 3 nodes, 3 rounds of the smoke
preset; in round 2 the node with partition-id 1 replies with NaN features
(MODE=nan or mixed) and the node with partition-id 2 with feature maps of the
wrong shape (MODE=shape or mixed).
"""

import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flwr_gkt.app.server_app import make_server_app
from flwr_gkt.app.task import PRESETS_DIR, edge_builder, node_data
from flwr_gkt.config import resolve_config
from flwr_gkt.flower.client_app import handle_evaluate, handle_train
from flwr_gkt.wire import ARRAYS_KEY

out, mode = sys.argv[1], sys.argv[2]
cfg = resolve_config(
    {
        "preset": "smoke",
        "num-server-rounds": 3,
        "num-clients": 3,
        "min-nodes": 3,
        "server-epochs": 1,
        "results-dir": out,
        "run-name": mode,
    },
    PRESETS_DIR,
)
client = ClientApp()


def _setup(context):
    node, data = node_data(cfg, context.node_config, True)
    return node.partition_id, data, edge_builder(cfg, node.partition_id)


@client.train()
def train(msg: Message, context: Context) -> Message:
    pid, data, build = _setup(context)
    reply = handle_train(msg, context, data, build, "cpu")
    nan = pid == 1 and mode in ("nan", "mixed")
    shape = pid == 2 and mode in ("shape", "mixed")
    if (nan or shape) and msg.content["config"]["server-round"] == 2:
        feats = reply.content.array_records[ARRAYS_KEY]["features"].numpy().copy()
        if nan:
            feats[3, 0, 5, 5] = np.nan
        else:
            feats = np.ascontiguousarray(feats[:, :8])
        reply.content.array_records[ARRAYS_KEY]["features"] = Array(feats)
        print(f"FAULTY node {context.node_id} sent a bad payload", flush=True)
    return reply


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, data, build = _setup(context)
    return handle_evaluate(msg, context, data, build, "cpu")


if __name__ == "__main__":
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=client,
        num_supernodes=3,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False},
        },
    )
