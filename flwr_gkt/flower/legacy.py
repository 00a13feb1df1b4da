"""FedGKT for Flower's legacy Strategy API (``configure_fit`` / ``aggregate_fit``).

A thin adapter over the same pieces as the Message API strategy
(:class:`flwr_gkt.core.server.GKTServer`, :mod:`flwr_gkt.core.edge`, the validation of
:mod:`flwr_gkt.wire`), for ServerApps built with ``server_fn`` and clients
written as :class:`flwr.client.NumPyClient`. The Message API
(:class:`flwr_gkt.flower.strategy.FedGKT`) is the primary interface.

Wire mapping:

* ``FitIns.parameters``: ``[server_logits]`` for the node (empty in its first
  round); ``FitIns.config``: the edge round settings.
* ``FitRes.parameters``: ``[features, client_logits, labels]``.
* ``EvaluateRes`` carries no arrays in the legacy API, so evaluation is done
  on the node: ``EvaluateIns.parameters`` are the server model's weights, the
  node stacks its extractor and the server model (the paper's "offline
  inference") and reports ``accuracy`` and ``edge-accuracy``.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common.recorddict_compat import (
    arrayrecord_to_parameters,
    parameters_to_arrayrecord,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.supercore import log
from torch import nn

from flwr_gkt.core.edge import EdgeRoundConfig, extract
from flwr_gkt.core.models import EdgeModel
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.training import (
    TensorBatches,
    evaluate_logits,
    get_device,
    lr_factor,
    predict,
    prepare_model,
)
from flwr_gkt.data import ClientData
from flwr_gkt.flower.client_app import (
    STATE_LOGITS,
    edge_round,
    edge_round_config,
    load_edge_model,
    round_seed,
)
from flwr_gkt.flower.strategy import edge_config_record
from flwr_gkt.wire import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    PayloadError,
    PayloadSpec,
    encode_server_logits,
    scalar,
    validate_arrays,
    validate_server_logits,
)
from flwr_gkt.wire.gate import TRAIN_METRICS, Incoming, ReplyGate, clean_text, node_error

__all__ = ["FedGKTLegacy", "GKTNumPyClient"]

#: Metrics a legacy evaluate reply may carry (see :func:`flwr_gkt.wire.gate.read_metrics`).
_EVAL_METRICS = frozenset({NUM_EXAMPLES, "loss", "accuracy", "edge-accuracy"})


def _state_arrays(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def _scalars(config: ConfigRecord) -> dict[str, Scalar]:
    """Return a legacy ``FitIns`` config (scalars only) built from a ConfigRecord."""
    out: dict[str, Scalar] = {}
    for key, value in config.items():
        if not isinstance(value, int | float | str | bytes):
            raise TypeError(f"config {key!r}: the legacy API carries scalars only")
        out[key] = value
    return out


def _exceptions(failures: list[Any]) -> int:
    """Count the failures that are exceptions (no node to attribute them to)."""
    return sum(isinstance(f, BaseException) for f in failures)


def _incoming(
    results: list[tuple[ClientProxy, Any]],
    failures: list[tuple[ClientProxy, Any] | BaseException],
    metrics: Callable[[Any], dict[str, Any]],
) -> list[Incoming]:
    """Turn legacy ``(ClientProxy, FitRes | EvaluateRes)`` pairs into the gate's input.

    Arrays stay serialized (the gate measures them before decoding); a failed
    call with a status becomes an error reply; a failure without a node (an
    exception) is logged here.
    """
    out = []
    for failure in failures:
        if isinstance(failure, BaseException):
            log(WARNING, "FedGKT: a node call failed: %s", clean_text(repr(failure)))
            continue
        proxy, res = failure
        out.append(Incoming(int(proxy.cid), error=node_error(res.status.code, res.status.message)))
    for proxy, res in results:
        if res.status.code != Code.OK:
            error = node_error(res.status.code, res.status.message)
            out.append(Incoming(int(proxy.cid), error=error))
            continue
        try:
            params = getattr(res, "parameters", None)
            content = RecordDict()
            if params is not None:
                content[ARRAYS_KEY] = parameters_to_arrayrecord(params, keep_input=True)
                content[METRICS_KEY] = MetricRecord({NUM_EXAMPLES: res.num_examples})
            out.append(Incoming(int(proxy.cid), content, metrics=metrics(res)))
        except Exception as err:  # nothing a node sends raises
            why = f"unreadable reply: {clean_text(repr(err))}"
            out.append(Incoming(int(proxy.cid), error=why))
    return out


class FedGKTLegacy(Strategy):
    """FedGKT behind the legacy ``flwr.server.strategy.Strategy`` interface.

    Parameters
    ----------
    server : GKTServer
        Server model, optimizer and feature store.
    num_classes : int
        Number of classes.
    feature_shape : tuple[int, int, int], optional
        Expected ``(C, H, W)`` of the feature maps.
    edge_config : EdgeRoundConfig, optional
        Settings sent to the nodes each round.
    min_fit_clients, min_evaluate_clients, min_available_clients : int
        Sampling bounds; all available nodes are sampled.
    lr_schedule : str
        ``constant`` or ``cosine`` over ``num_rounds`` (as in :class:`FedGKT`).
    num_rounds : int
        Number of rounds of the run (for the learning-rate schedule).
    max_payload_bytes : int, optional
        Largest size of one reply (all its fields); larger ones are rejected.
    outlier_threshold : float
        The reply gate's outlier check (as in :class:`FedGKT`); ``0``: off.

    Every reply passes the same gate as the Message API's
    (:meth:`flwr_gkt.wire.gate.ReplyGate.check`): size, metric schema,
    array validation and the outlier check; nothing a node sends raises.
    """

    def __init__(
        self,
        server: GKTServer,
        num_classes: int,
        *,
        feature_shape: tuple[int, int, int] | None = None,
        edge_config: EdgeRoundConfig | None = None,
        min_fit_clients: int = 2,
        min_evaluate_clients: int = 2,
        min_available_clients: int = 2,
        lr_schedule: str = "constant",
        num_rounds: int = 1,
        max_payload_bytes: int | None = None,
        outlier_threshold: float = 10.0,
    ) -> None:
        super().__init__()
        self.gate = ReplyGate(max_payload_bytes, outlier_threshold)
        lr_factor(lr_schedule, 1, 1)  # raises on an unknown schedule
        if lr_schedule == "plateau":
            raise ValueError("lr-schedule plateau needs the Message API strategy (FedGKT)")
        self.lr_schedule = lr_schedule
        self.num_rounds = num_rounds
        self.server = server
        self.spec = PayloadSpec(num_classes, feature_shape)
        self.edge_config = edge_config or EdgeRoundConfig(kd_mode=server.kd_mode)
        self.min_fit_clients = min_fit_clients
        self.min_evaluate_clients = min_evaluate_clients
        self.min_available_clients = min_available_clients
        self.history: list[dict[str, float]] = []

    def __repr__(self) -> str:
        """Return the strategy's name with its server model's class."""
        return f"FedGKTLegacy(server={type(self.server.model).__name__})"

    def lr_factor(self, server_round: int) -> float:
        """Return the schedule's learning-rate multiplier of ``server_round``."""
        return lr_factor(self.lr_schedule, server_round, max(self.num_rounds, server_round))

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Return the server model's initial weights (what ``History`` tracks).

        Parameters
        ----------
        client_manager : ClientManager
            Not used.

        Returns
        -------
        Parameters | None
            The server model's ``state_dict`` values, in order.
        """
        return ndarrays_to_parameters(_state_arrays(self.server.model))

    def _sample(self, client_manager: ClientManager, minimum: int) -> list[ClientProxy]:
        client_manager.wait_for(max(minimum, self.min_available_clients), timeout=86400)
        return client_manager.sample(
            num_clients=max(client_manager.num_available(), minimum),
            min_num_clients=self.min_available_clients,
        )

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send every available node its own server logits and the round config.

        Parameters
        ----------
        server_round : int
            The current round, starting from 1.
        parameters : Parameters
            The server model's weights; not sent (the edge and server models
            differ).
        client_manager : ClientManager
            Waits for and samples the nodes (all available ones, at least
            ``min_fit_clients``).

        Returns
        -------
        list[tuple[ClientProxy, FitIns]]
            Per node: its server logits ``Z_s`` as ``float32`` (no array in its
            first round) and the edge settings with ``server-round`` and the
            scheduled ``lr``.
        """
        lr = self.edge_config.lr * self.lr_factor(server_round)
        config = _scalars(
            edge_config_record(self.edge_config, **{"server-round": server_round, "lr": lr})
        )
        out = []
        for proxy in self._sample(client_manager, self.min_fit_clients):
            logits = self.server.server_logits(int(proxy.cid))
            arrays = [] if logits is None else [logits.numpy().astype(np.float32)]
            out.append((proxy, FitIns(ndarrays_to_parameters(arrays), dict(config))))
        return out

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate and store ``(H, Z_c, Y)`` per node, then train the server model.

        A reply that is not three arrays or fails validation
        (:func:`flwr_gkt.wire.validate_arrays`) is rejected with a log line;
        failures are logged and counted as rejected. The server model then
        trains ``E_s`` epochs on all stored features.

        Parameters
        ----------
        server_round : int
            The current round, starting from 1.
        results : list[tuple[ClientProxy, FitRes]]
            The nodes' fit replies.
        failures : list[tuple[ClientProxy, FitRes] | BaseException]
            Failed fit calls.

        Returns
        -------
        tuple[Parameters | None, dict[str, Scalar]]
            The server model's weights (``None`` when it trained on no
            example) and the round's node counts and server train loss,
            accuracy and examples.
        """
        gate = self.gate.check(
            server_round,
            "train",
            _incoming(results, failures, lambda r: {**r.metrics, NUM_EXAMPLES: r.num_examples}),
            self._decode_fit,
            TRAIN_METRICS,
            lambda admitted, payload: self.server.put(admitted.node, payload),
        )
        accepted = len(gate.accepted)
        result = self.server.train_round(lr_scale=self.lr_factor(server_round))
        metrics: dict[str, Scalar] = {
            "nodes-replied": accepted,
            "nodes-rejected": gate.rejected + _exceptions(failures),
            "server-train-loss": result.loss,
            "server-train-accuracy": result.accuracy,
            "server-train-examples": result.num_examples,
        }
        self.history.append({"round": server_round, **{k: scalar(metrics, k) for k in metrics}})
        log(INFO, "FedGKT round %d fit: %s", server_round, metrics)
        if result.num_examples == 0:
            return None, metrics
        return ndarrays_to_parameters(_state_arrays(self.server.model)), metrics

    def _decode_fit(self, node: int, content: RecordDict) -> Any:
        """Read a fit reply's ``[features, client_logits, labels]`` (the gate's decoder)."""
        arrays = parameters_to_ndarrays(
            arrayrecord_to_parameters(content.array_records[ARRAYS_KEY], keep_input=True)
        )
        if len(arrays) != 3:
            raise PayloadError(f"expected [features, logits, labels], got {len(arrays)} arrays")
        features, logits, labels = arrays
        n = content.metric_records[METRICS_KEY][NUM_EXAMPLES]
        if not isinstance(n, int):
            raise PayloadError(f"'{NUM_EXAMPLES}' is not an integer")
        return validate_arrays(features, labels, logits, self.spec, n)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Send the server model to the nodes for on-node evaluation.

        Parameters
        ----------
        server_round : int
            The current round, starting from 1.
        parameters : Parameters
            The server model's weights, sent as they are.
        client_manager : ClientManager
            Waits for and samples the nodes (all available ones, at least
            ``min_evaluate_clients``).

        Returns
        -------
        list[tuple[ClientProxy, EvaluateIns]]
            The same instruction for every node: the weights, ``server-round``
            and ``batch-size``.
        """
        ins = EvaluateIns(
            parameters, {"server-round": server_round, "batch-size": self.edge_config.batch_size}
        )
        return [(p, ins) for p in self._sample(client_manager, self.min_evaluate_clients)]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Average the nodes' loss, accuracy and edge-only accuracy by examples.

        Parameters
        ----------
        server_round : int
            The current round, starting from 1.
        results : list[tuple[ClientProxy, EvaluateRes]]
            The nodes' evaluate replies.
        failures : list[tuple[ClientProxy, EvaluateRes] | BaseException]
            Failed evaluate calls (not used).

        Returns
        -------
        tuple[float | None, dict[str, Scalar]]
            The loss and ``accuracy``, ``edge-accuracy`` and ``num-examples``;
            ``(None, {})`` when no example was reported.
        """
        gate = self.gate.check(
            server_round,
            "evaluate",
            _incoming(
                results,
                failures,
                lambda r: {**r.metrics, NUM_EXAMPLES: r.num_examples, "loss": r.loss},
            ),
            None,
            _EVAL_METRICS,
            required=frozenset({NUM_EXAMPLES, "loss"}),
        )
        checked = [
            (int(a.metrics[NUM_EXAMPLES]), a.metrics["loss"], a.metrics) for a in gate.accepted
        ]
        n = sum(size for size, _, _ in checked)
        if n == 0:
            return None, {}
        loss = sum(size * value for size, value, _ in checked) / n
        metrics: dict[str, Scalar] = {
            key: sum(m.get(key, 0.0) * size for size, _, m in checked) / n
            for key in ("accuracy", "edge-accuracy")
        }
        metrics["num-examples"] = n
        if self.history and self.history[-1]["round"] == server_round:
            self.history[-1].update({"loss": loss, **{k: scalar(metrics, k) for k in metrics}})
        log(INFO, "FedGKT round %d evaluate: loss %.4f %s", server_round, loss, metrics)
        return loss, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Skip centralized evaluation.

        Parameters
        ----------
        server_round : int
            The current round.
        parameters : Parameters
            The server model's weights.

        Returns
        -------
        tuple[float, dict[str, Scalar]] | None
            Always ``None``.
        """
        return None


class GKTNumPyClient(NumPyClient):
    """The edge node for :class:`FedGKTLegacy`.

    Parameters
    ----------
    context : Context
        The node's context; its ``state`` keeps the edge model and the latest
        server logits across rounds.
    data : ClientData
        Local training and test data.
    build_edge : Callable[[], EdgeModel]
        Builds the (untrained) edge model.
    build_server : Callable[[], nn.Module]
        Builds the server architecture, for on-node evaluation.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    def __init__(
        self,
        context: Context,
        data: ClientData,
        build_edge: Callable[[], EdgeModel],
        build_server: Callable[[], nn.Module],
        device: str = "auto",
    ) -> None:
        self.ctx = context
        self.data = data
        self.build_edge = build_edge
        self.build_server = build_server
        self.device = get_device(device)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        """Train ``E_c`` epochs with KD from the server logits; return ``[H, Z_c, Y]``.

        Parameters
        ----------
        parameters : list[np.ndarray]
            ``[server_logits]`` for the local training set, or empty (first
            round); received logits are also kept in the context's state.
        config : dict[str, Any]
            The edge round settings (see :func:`flwr_gkt.flower.client_app.edge_round_config`).

        Returns
        -------
        tuple[list[np.ndarray], int, dict[str, Scalar]]
            ``[features, client_logits, labels]`` in sample order, the number
            of training examples, and ``edge-train-loss`` /
            ``edge-train-accuracy``.

        Raises
        ------
        PayloadError
            If the server logits do not match the local training set.
        """
        cfg = edge_round_config(config)
        n = len(self.data.y_train)
        server_logits = None
        if parameters:
            server_logits = validate_server_logits(parameters[0], n, self.data.num_classes)
            self.ctx.state.array_records[STATE_LOGITS] = encode_server_logits(server_logits)
        features, logits, result, _ = edge_round(
            self.ctx,
            self.data,
            self.build_edge,
            server_logits,
            cfg,
            self.device,
            round_seed(config),
        )
        arrays = [features.numpy(), logits.numpy(), self.data.y_train.numpy()]
        return arrays, n, {"edge-train-loss": result.loss, "edge-train-accuracy": result.accuracy}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the edge extractor + server model, and the edge model alone.

        Parameters
        ----------
        parameters : list[np.ndarray]
            The server model's weights, in ``state_dict`` order.
        config : dict[str, Any]
            ``batch-size`` (default 64).

        Returns
        -------
        tuple[float, int, dict[str, Scalar]]
            The mean cross-entropy loss of extractor + server model on the
            local test split, its number of examples, and ``accuracy``
            (extractor + server model) and ``edge-accuracy`` (edge model alone).
        """
        edge = load_edge_model(self.ctx, self.build_edge, self.device)
        server = self.build_server()
        keys = list(server.state_dict().keys())
        server.load_state_dict(
            {k: torch.from_numpy(np.asarray(v)) for k, v in zip(keys, parameters, strict=True)}
        )
        server = prepare_model(server, self.device)
        batch_size = int(config.get("batch-size", 64))
        features, edge_logits = extract(edge, self.data.x_test, batch_size, self.device)
        y = self.data.y_test
        logits = predict(server, TensorBatches(features, y, batch_size), self.device)
        loss_sum, correct = evaluate_logits(logits, y)
        _, edge_correct = evaluate_logits(edge_logits, y)
        n = len(y)
        return loss_sum / n, n, {"accuracy": correct / n, "edge-accuracy": edge_correct / n}
