"""ClientApp: each node trains its edge model and sends the server its features.

A train instruction carries the round's edge settings and the server's logits
for this node's samples; the node trains with cross-entropy plus distillation
from them and replies with its feature maps, logits and labels
(:func:`flwr_gkt.handle_train`). An evaluate instruction gets the features of
its test split back (:func:`flwr_gkt.handle_evaluate`): the server classifies
them with its model. The node's edge model lives in ``context.state``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flwr_gkt import handle_evaluate, handle_train

from .task import edge_model, load_data

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; reply with ``H``, ``Z_c`` and ``Y``."""
    return handle_train(msg, context, load_data(context), lambda: edge_model(context))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Reply with the features of the local test split."""
    return handle_evaluate(msg, context, load_data(context), lambda: edge_model(context))
