"""FedGKT for Flower's legacy Strategy API (``configure_fit`` / ``aggregate_fit``).

:class:`FedGKTLegacy` drives a :class:`~flwr_gkt.flower.strategy.FedGKT`
through its Message API hooks, for ServerApps built with ``server_fn`` and
clients written as :class:`flwr.client.NumPyClient`: sampling, round config,
the reply gate, replay, ``min_train_replies``, ``store_max_age``, the
learning-rate schedules and ``on_round`` are FedGKT's own.
:class:`GKTNumPyClient` runs :func:`~flwr_gkt.flower.client_app.handle_train`.

Wire mapping (the legacy API carries no names, so arrays travel by position):

* ``FitIns.parameters``: ``[server_logits]`` when FedGKT sends them, else
  empty; ``FitIns.config``: FedGKT's train config.
* ``FitRes.parameters``: the train reply's arrays in the order of
  ``features, logits, labels[, feature-min, feature-scale]`` (int8 features),
  or ``[logits]`` in a replay round.
* ``EvaluateRes`` carries no arrays in the legacy API, so evaluation is done
  on the node: ``EvaluateIns.parameters`` are the server model's weights, the
  node stacks its extractor and the server model (the paper's "offline
  inference") and reports ``accuracy``, ``edge-accuracy`` and ``edge-loss``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import WARNING
from typing import Any, cast

import numpy as np
import torch
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.client import NumPyClient
from flwr.common import Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.common.constant import ErrorCode
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import nn

from flwr_gkt.core.edge import extract
from flwr_gkt.core.models import EdgeModel
from flwr_gkt.core.training import (
    TensorBatches,
    evaluate_logits,
    get_device,
    predict,
    prepare_model,
)
from flwr_gkt.data import ClientData
from flwr_gkt.flower.async_strategy import AsyncFedGKT
from flwr_gkt.flower.client_app import handle_train, load_edge_model
from flwr_gkt.flower.strategy import FedGKT
from flwr_gkt.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES, PayloadError
from flwr_gkt.wire.gate import Incoming, clean_text, node_error

__all__ = ["FedGKTLegacy", "GKTNumPyClient"]

#: The train reply's arrays, in their legacy positions.
_FIT_KEYS = ("features", "logits", "labels", "feature-min", "feature-scale")
#: Metrics a legacy evaluate reply may carry (see :func:`flwr_gkt.wire.gate.read_metrics`).
_EVAL_METRICS = frozenset({NUM_EXAMPLES, "loss", "accuracy", "edge-accuracy", "edge-loss"})

#: The example-weighted sums of :func:`~flwr_gkt.flower.strategy_utils.evaluate_row`: metric.
_EVAL_SUMS = {"loss": "loss", "correct": "accuracy", "edge-correct": "edge-accuracy"}


def _scalars(config: ConfigRecord) -> dict[str, Scalar]:
    """Return a legacy instruction config (scalars only) built from a ConfigRecord."""
    out: dict[str, Scalar] = {}
    for key, value in config.items():
        if not isinstance(value, int | float | str | bytes):
            raise TypeError(f"config {key!r}: the legacy API carries scalars only")
        out[key] = value
    return out


def _npy_array(data: bytes) -> Array:
    """Wrap ``.npy`` bytes in an Array, its dtype and shape read from the header (no copy).

    The wire's decoders check the data against them (:func:`flwr_gkt.wire.validate.load_array`).
    """
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
    return Array(dtype=str(dtype), shape=tuple(shape), stype="numpy.ndarray", data=data)


def _fit_content(res: FitRes) -> RecordDict:
    """Return the content of the train reply a ``FitRes`` stands for (arrays still unread)."""
    tensors = res.parameters.tensors
    if len(tensors) > len(_FIT_KEYS) or (tensors and res.parameters.tensor_type != "numpy.ndarray"):
        raise PayloadError(f"{len(tensors)} arrays of type {res.parameters.tensor_type!r}")
    names = ("logits",) if len(tensors) == 1 else _FIT_KEYS
    content = RecordDict()
    if tensors:
        content[ARRAYS_KEY] = ArrayRecord(
            {k: _npy_array(t) for k, t in zip(names, tensors, strict=False)}
        )
    # what a MetricRecord cannot hold (strings, bytes, flags) the gate would drop anyway
    metrics: dict[str, int | float | list[int] | list[float]] = {
        k: v
        for k, v in {**res.metrics, NUM_EXAMPLES: res.num_examples}.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    content[METRICS_KEY] = MetricRecord(metrics)
    return content


def _outcomes(
    sent: Iterable[int],
    results: Sequence[tuple[ClientProxy, Any]],
    failures: Sequence[tuple[ClientProxy, Any] | BaseException],
) -> list[tuple[int, Any, Error | None]]:
    """Each answering node's ``(node, res, None)`` or ``(node, None, error)``.

    A failure without a node (an exception) is logged; as many sampled nodes
    without an answer as there are exceptions (Flower's failed calls) get an
    error in its place.
    """
    out: list[tuple[int, Any, Error | None]] = []
    raised = 0
    for item in [*results, *failures]:
        if isinstance(item, BaseException):
            log(WARNING, "FedGKT: a node call failed: %s", clean_text(repr(item)))
            raised += 1
            continue
        proxy, res = item
        ok = res.status.code == Code.OK
        error = None if ok else Error(int(res.status.code.value), res.status.message)
        out.append((int(proxy.cid), res if ok else None, error))
    answered = {node for node, *_ in out}
    silent = [node for node in sent if node not in answered][:raised]
    reason = "the call failed without a reply (see the log)"
    return out + [(node, None, Error(ErrorCode.UNKNOWN, reason)) for node in silent]


class _ClientGrid:
    """The part of a :class:`~flwr.serverapp.Grid` FedGKT's sampling reads, over a ClientManager."""

    def __init__(self, clients: ClientManager) -> None:
        self.clients = clients
        #: The proxies of the node ids last listed.
        self.proxies: dict[int, ClientProxy] = {}

    def get_node_ids(self) -> list[int]:
        self.proxies = {int(cid): proxy for cid, proxy in self.clients.all().items()}
        return list(self.proxies)


def _instructions(
    configure: Callable[[int, ArrayRecord, ConfigRecord, Grid], Iterable[Message]],
    server_round: int,
    clients: ClientManager,
    make: Callable[[Message], Any],
) -> tuple[list[int], list[tuple[ClientProxy, Any]]]:
    """Run a FedGKT ``configure_*`` over ``clients``; return the nodes and legacy instructions."""
    grid = _ClientGrid(clients)
    messages = list(configure(server_round, ArrayRecord(), ConfigRecord(), cast(Grid, grid)))
    pairs = [(grid.proxies[m.metadata.dst_node_id], make(m)) for m in messages]
    return [m.metadata.dst_node_id for m in messages], pairs


class FedGKTLegacy(Strategy):
    """A :class:`~flwr_gkt.flower.strategy.FedGKT` behind the legacy ``Strategy`` interface.

    ``configure_fit`` / ``configure_evaluate`` run FedGKT's ``configure_train``
    / ``configure_evaluate`` over the ClientManager (``node_wait_timeout``
    included); ``aggregate_fit`` hands the ``FitRes`` and failures to
    ``aggregate_train`` as reply messages, so the same gate
    (:class:`~flwr_gkt.wire.gate.ReplyGate`) and every option of FedGKT hold.
    The nodes evaluate locally (see the module): ``aggregate_evaluate`` passes
    their metrics through the gate into :attr:`history` and steps the plateau.

    Parameters
    ----------
    strategy : FedGKT
        The strategy driven. Not :class:`~flwr_gkt.flower.async_strategy.AsyncFedGKT`
        and without ``checkpoint_path``: both need FedGKT's own round loop
        (:meth:`~flwr_gkt.flower.strategy.FedGKT.start`).
    num_rounds : int, optional
        Rounds of the run (the legacy server's ``ServerConfig``), for the
        cosine schedule and the end of the run; ``None``: left as set.

    Raises
    ------
    ValueError
        If ``strategy`` needs FedGKT's round loop.
    """

    def __init__(self, strategy: FedGKT, num_rounds: int | None = None) -> None:
        if isinstance(strategy, AsyncFedGKT):
            raise ValueError("server-mode async (AsyncFedGKT) needs the Message API (FedGKT.start)")
        if strategy.checkpoint_path is not None:
            raise ValueError("checkpoint_path: checkpoints are written by FedGKT.start only")
        super().__init__()
        self.strategy = strategy
        #: The driven strategy's server and per-round history (shared, not copies).
        self.server, self.history = strategy.server, strategy.history
        if num_rounds is not None:
            strategy.num_rounds = num_rounds
        strategy.rounds.start_run(strategy.num_rounds)
        self._sent_fit: list[int] = []
        self._sent_eval: list[int] = []
        self._round_start = time.perf_counter()

    def __repr__(self) -> str:
        """Return the strategy's name with its server model's class."""
        return f"FedGKTLegacy(server={type(self.server.model).__name__})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Return the server model's initial weights (what ``History`` tracks)."""
        return arrayrecord_to_parameters(
            ArrayRecord(self.server.model.state_dict()), keep_input=True
        )

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send FedGKT's train instructions: per node its server logits and config.

        ``parameters`` (the server model's weights) are not sent.
        """
        self._round_start = time.perf_counter()

        def fit_ins(msg: Message) -> FitIns:
            arrays = msg.content.array_records.get(ARRAYS_KEY, ArrayRecord())
            params = arrayrecord_to_parameters(arrays, keep_input=True)
            params.tensor_type = "numpy.ndarray"
            return FitIns(params, _scalars(msg.content.config_records[CONFIG_KEY]))

        self._sent_fit, out = _instructions(
            self.strategy.configure_train, server_round, client_manager, fit_ins
        )
        return out

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Hand the replies to FedGKT's ``aggregate_train``; return its weights and row.

        Returns
        -------
        tuple[Parameters | None, dict[str, Scalar]]
            The server model's weights (``None`` when it trained on no
            example) and the round's :attr:`history` row.
        """
        replies = []
        for node, res, error in _outcomes(self._sent_fit, results, failures):
            instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
            if error is None:
                try:
                    replies.append(Message(_fit_content(res), reply_to=instruction))
                    continue
                except Exception as err:  # nothing a node sends raises
                    error = Error(ErrorCode.UNKNOWN, f"unreadable reply: {err!r}")
            replies.append(Message(error, reply_to=instruction))
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        weights = None if arrays is None else arrayrecord_to_parameters(arrays, keep_input=False)
        return weights, _metric_dict(metrics or {})

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Send the server model's weights to the nodes FedGKT samples for evaluation.

        With no node sampled Flower skips ``aggregate_evaluate``: the round ends here.
        """
        self._sent_eval, out = _instructions(
            self.strategy.configure_evaluate,
            server_round,
            client_manager,
            lambda m: EvaluateIns(parameters, _scalars(m.content.config_records[CONFIG_KEY])),
        )
        if not out:
            self.round_done(server_round)
        return out

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Average the nodes' loss and accuracies by examples, after the gate.

        Returns
        -------
        tuple[float | None, dict[str, Scalar]]
            The loss, and ``accuracy``, ``edge-accuracy``, ``edge-loss``,
            ``num-examples`` with the counts (merged into :attr:`history`);
            ``(None, {})`` when no example was reported.
        """
        incoming = [
            _evaluate_incoming(node, res, error)
            for node, res, error in _outcomes(self._sent_eval, results, failures)
        ]
        gate = self.strategy.gate.check(
            server_round,
            "evaluate",
            incoming,
            None,
            _EVAL_METRICS,
            required=frozenset({NUM_EXAMPLES, "loss"}),
        )
        self.strategy.node_history.extend(gate.records)
        sums = dict.fromkeys(("loss", "correct", "n", "edge-correct", "edge-loss"), 0.0)
        for admitted in gate.accepted:
            n = admitted.metrics[NUM_EXAMPLES]
            sums["n"] += n
            for key, name in {**_EVAL_SUMS, "edge-loss": "edge-loss"}.items():
                sums[key] += admitted.metrics.get(name, 0.0) * n
        if sums["n"] == 0:
            self.round_done(server_round)
            return None, {}
        rounds = self.strategy.rounds
        metrics = rounds.evaluate_row(sums, len(gate.accepted), gate.rejected, 0, 0)
        metrics["round-seconds"] = time.perf_counter() - self._round_start
        rounds.merge_row(server_round, metrics)
        if self.strategy.plateau is not None:  # the reference steps it with the test accuracy
            self.strategy.plateau.step(metrics["accuracy"])
        rounds.log_evaluate(server_round, metrics)
        self.round_done(server_round)
        return metrics["loss"], _metric_dict(metrics)

    def round_done(self, server_round: int) -> None:
        """End a round: after the last, read the staged features back; then FedGKT's ``round_done``."""
        self.strategy.staging.after_evaluate(last_round=server_round >= self.strategy.num_rounds)
        self.strategy.round_done(server_round)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Skip centralized evaluation (always ``None``)."""
        return None


def _evaluate_incoming(node: int, res: Any, error: Error | None) -> Incoming:
    """Return the gate's input for one evaluate outcome (metrics beside the content)."""
    if error is not None:
        return Incoming(node, error=node_error(error.code, error.reason))
    return Incoming(node, metrics={**res.metrics, NUM_EXAMPLES: res.num_examples, "loss": res.loss})


def _metric_dict(metrics: Mapping[str, Any]) -> dict[str, Scalar]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


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
        self.device = device

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        """Run :func:`~flwr_gkt.flower.client_app.handle_train` on the legacy instruction.

        Parameters
        ----------
        parameters : list[np.ndarray]
            ``[server_logits]`` for the local training set, or empty.
        config : dict[str, Any]
            The train config.

        Returns
        -------
        tuple[list[np.ndarray], int, dict[str, Scalar]]
            The reply's arrays in their legacy positions (see the module), the
            number of training examples and the edge metrics.

        Raises
        ------
        PayloadError
            If the server logits do not match the local training set.
        """
        content = RecordDict({CONFIG_KEY: ConfigRecord(dict(config))})
        if parameters:
            content[ARRAYS_KEY] = ArrayRecord({"server-logits": Array(np.asarray(parameters[0]))})
        meta = Metadata(
            run_id=self.ctx.run_id,
            message_id="",
            src_node_id=0,
            dst_node_id=self.ctx.node_id,
            reply_to_message_id="",
            group_id="",
            created_at=time.time(),
            ttl=DEFAULT_TTL,
            message_type=MessageType.TRAIN,
        )
        # a reply needs the instruction's metadata; outside a ServerApp a Message built
        # from a node id would need Flower's process-wide task identity
        msg = Message(content, metadata=meta)  # type: ignore[call-overload]
        reply = handle_train(msg, self.ctx, self.data, self.build_edge, self.device).content
        record = reply.array_records[ARRAYS_KEY]
        metrics = _metric_dict(reply.metric_records[METRICS_KEY])
        n = int(metrics.pop(NUM_EXAMPLES))
        return [record[k].numpy() for k in _FIT_KEYS if k in record], n, metrics

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
            (extractor + server model), ``edge-accuracy`` and ``edge-loss``
            (edge model alone).
        """
        device = get_device(self.device)
        edge = load_edge_model(self.ctx, self.build_edge, device)
        server = self.build_server()
        keys = list(server.state_dict().keys())
        server.load_state_dict(
            {k: torch.from_numpy(np.asarray(v)) for k, v in zip(keys, parameters, strict=True)}
        )
        server = prepare_model(server, device)
        batch_size = int(config.get("batch-size", 64))
        features, edge_logits = extract(edge, self.data.x_test, batch_size, device)
        y = self.data.y_test
        logits = predict(server, TensorBatches(features, y, batch_size), device)
        loss_sum, correct = evaluate_logits(logits, y)
        edge_loss, edge_correct = evaluate_logits(edge_logits, y)
        n = len(y)
        metrics = {"accuracy": correct / n, "edge-accuracy": edge_correct / n}
        return loss_sum / n, n, {**metrics, "edge-loss": edge_loss / n}
