"""flwr-gkt: Group Knowledge Transfer (FedGKT) as a Flower strategy plugin.

Main entry points:

* :class:`flwr_gkt.flower.strategy.FedGKT` -- the Message API strategy (server side);
* :class:`flwr_gkt.flower.async_strategy.AsyncFedGKT` -- asynchronous FedGKT: the
  server model trains as soon as any node's features arrive;
* :func:`flwr_gkt.flower.client_app.handle_train` / :func:`~flwr_gkt.flower.client_app.handle_evaluate`
  -- the ClientApp handlers (edge side), over a node's
  :class:`~flwr_gkt.data.ClientData` (in-memory tensors) or
  :class:`~flwr_gkt.data.DatasetData` (its own torch or Hugging Face dataset,
  streamed in batches);
* :class:`flwr_gkt.core.server.GKTServer` -- server model, feature store and training;
* :class:`flwr_gkt.flower.fedagg_strategy.FedAgg` / :func:`flwr_gkt.flower.fedagg_client.handle_fedagg`
  -- FedAgg / FedEEC on an end-edge-cloud tree (cloud strategy and node
  handler; training math in :mod:`flwr_gkt.core.fedagg`, bridge samples in
  :mod:`flwr_gkt.core.bridge`);
* :mod:`flwr_gkt.core.models` / :mod:`flwr_gkt.core.registry` -- ResNet builders and the
  name registry for edge/server/tier models;
* :mod:`flwr_gkt.core.losses` / :mod:`flwr_gkt.core.training` -- CE + KD losses and the
  one training loop;
* :mod:`flwr_gkt.wire` -- the wire format, the feature codecs (``float32``,
  ``float16``, ``int8``) and payload validation;
* :mod:`flwr_gkt.core.checkpoint` -- crash-safe checkpoints
  (:func:`~flwr_gkt.core.checkpoint.save_checkpoint` /
  :func:`~flwr_gkt.core.checkpoint.load_checkpoint`);
* :mod:`flwr_gkt.config` -- :class:`~flwr_gkt.config.RunConfig`, presets and
  overrides;
* :class:`flwr_gkt.flower.legacy.FedGKTLegacy` -- the legacy Strategy API adapter.
"""

__version__ = "0.1.0"
