"""flwr-gkt: Group Knowledge Transfer (FedGKT) as a Flower strategy plugin.

Main entry points:

* :class:`flwr_gkt.strategy.FedGKT` -- the Message API strategy (server side);
* :func:`flwr_gkt.client_app.handle_train` / :func:`~flwr_gkt.client_app.handle_evaluate`
  -- the ClientApp handlers (edge side);
* :class:`flwr_gkt.server.GKTServer` -- server model, feature store and training;
* :mod:`flwr_gkt.models` / :mod:`flwr_gkt.registry` -- ResNet builders and the
  name registry for edge/server models;
* :mod:`flwr_gkt.wire` -- the wire format and its validation;
* :class:`flwr_gkt.legacy.FedGKTLegacy` -- the legacy Strategy API adapter.
"""

__version__ = "0.1.0"
