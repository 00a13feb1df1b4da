"""ServerApp: FedGKT trains the large server model on the nodes' feature maps.

No weights are averaged. Each round the strategy sends every node its server
logits, takes the nodes' features, logits and labels, and trains the server
model on them (:class:`flwr_gkt.GKTServer`, cross-entropy plus distillation
from the node logits); evaluation classifies the nodes' test features.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flwr_gkt import EdgeRoundConfig, FedGKT, GKTServer, build_server_model

from .task import FEATURE_SHAPE, NUM_CLASSES

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of FedGKT."""
    config = context.run_config
    server = GKTServer(
        build_server_model(str(config["server-model"]), NUM_CLASSES),
        epochs=int(config["server-epochs"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        precision="auto",  # bf16 where the device runs it natively, else fp32
        seed=int(config["seed"]),
    )
    strategy = FedGKT(
        server,
        NUM_CLASSES,
        feature_shape=FEATURE_SHAPE,
        edge_config=EdgeRoundConfig(
            batch_size=int(config["batch-size"]), lr=float(config["lr"]), precision="auto"
        ),
        seed=int(config["seed"]),
    )
    strategy.start(
        grid=grid,
        initial_arrays=strategy.initial_arrays(),
        num_rounds=int(config["num-server-rounds"]),
    )
    final = strategy.history[-1]
    log(INFO, "quickstart-fedgkt: final accuracy %.4f (edge + server)", final["accuracy"])
