"""flwr-gkt: Group Knowledge Transfer (FedGKT) as a Flower strategy plugin.

Main entry points:

* :class:`flwr_gkt.strategy.FedGKT` -- the Message API strategy (server side);
* :class:`flwr_gkt.async_strategy.AsyncFedGKT` -- asynchronous FedGKT: the
  server model trains as soon as any node's features arrive;
* :func:`flwr_gkt.client_app.handle_train` / :func:`~flwr_gkt.client_app.handle_evaluate`
  -- the ClientApp handlers (edge side);
* :class:`flwr_gkt.server.GKTServer` -- server model, feature store and training;
* :class:`flwr_gkt.fedagg_strategy.FedAgg` / :func:`flwr_gkt.fedagg_client.handle_fedagg`
  -- FedAgg / FedEEC on an end-edge-cloud tree (cloud strategy and node
  handler; training math in :mod:`flwr_gkt.fedagg`, bridge samples in
  :mod:`flwr_gkt.bridge`);
* :mod:`flwr_gkt.models` / :mod:`flwr_gkt.registry` -- ResNet builders and the
  name registry for edge/server/tier models;
* :mod:`flwr_gkt.losses` / :mod:`flwr_gkt.training` -- CE + KD losses and the
  one training loop;
* :mod:`flwr_gkt.wire` -- the wire format, the feature codecs (``float32``,
  ``float16``, ``int8``) and payload validation;
* :mod:`flwr_gkt.checkpoint` -- crash-safe checkpoints
  (:func:`~flwr_gkt.checkpoint.save_checkpoint` /
  :func:`~flwr_gkt.checkpoint.load_checkpoint`);
* :mod:`flwr_gkt.config` -- :class:`~flwr_gkt.config.RunConfig`, presets and
  overrides;
* :class:`flwr_gkt.legacy.FedGKTLegacy` -- the legacy Strategy API adapter.
"""

__version__ = "0.1.0"
