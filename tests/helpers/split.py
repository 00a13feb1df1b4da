"""Split learning runs driven in process, and a Grid that records every message."""

import csv
import json

import torch
from flwr.app import Context, RecordDict

from flwr_gkt.app.inprocess import InProcessGrid
from flwr_gkt.app.split_app import make_split_apps
from flwr_gkt.app.task import PRESETS_DIR
from flwr_gkt.config import resolve_config
from flwr_gkt.core.models import resnet8
from flwr_gkt.core.registry import build_server_model


def split_models(seed=0):
    """A ResNet-8 extractor and a ResNet-10 server model, seeded with ``seed``."""
    torch.manual_seed(seed)
    extractor = resnet8(10, 1).extractor
    server = build_server_model("resnet10", 10, 16)
    return extractor, server


class RecordingGrid(InProcessGrid):
    """Keeps every instruction and every reply."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent, self.replies = [], []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += messages
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.replies += replies
        return replies


def split_config(tmp_path, name, mode, **values):
    """A small smoke-preset run of split mode ``mode`` named ``name``, ``values`` overriding."""
    return resolve_config(
        {
            "preset": "smoke",
            "data-fraction": 0.006,
            "test-fraction": 0.05,
            "results-dir": str(tmp_path),
            "run-name": name,
            "split-mode": mode,
            "edge-optimizer": "adam",
            "server-optimizer": "adam",
            "edge-lr": 0.003,
            "server-lr": 0.003,
            "batch-size": 32,
            "server-batch-size": 256,
            "device": "cpu",
            "client-threads": 1,
            **values,
        },
        PRESETS_DIR,
    )


def run_split(cfg, client=None):
    """Run ``cfg`` in process: ``(metrics rows, node rows, results.json, the RecordingGrid)``."""
    server, app = make_split_apps(cfg)
    grid = RecordingGrid(client or app, cfg.num_clients)
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    out = cfg.results_dir + "/" + cfg.run_name
    with open(out + "/metrics.csv") as f:
        history = list(csv.DictReader(f))
    with open(out + "/nodes.csv") as f:
        nodes = list(csv.DictReader(f))
    with open(out + "/results.json") as f:
        results = json.load(f)
    return history, nodes, results, grid
