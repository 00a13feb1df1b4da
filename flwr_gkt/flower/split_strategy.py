"""Split learning and SplitFed as a Flower strategy: one message wave per mini-batch.

The baselines of FedGKT's communication comparison (Section 4.3, Fig. 5): the
same edge extractor ``f_e`` (e.g. ResNet-8's stem) on the nodes and the same
server model ``f_s`` (e.g. ResNet-55) as FedGKT, trained as *one* network by
exchanging, every mini-batch, the activations ``H`` (node -> server, with the
labels) and their gradient ``dL/dH`` (server -> node). Modes:

``sl`` (vanilla split learning, Gupta & Raskar 2018)
    The nodes take turns, in node-id order; each trains ``epochs`` local
    epochs against the one server model. The edge weights pass from node to
    node, relayed by the server (the ``begin`` of a turn carries them, its
    last reply returns them).
``splitfed-v1`` (Thapa et al., AAAI 2022)
    The nodes work in parallel, each against its own copy of the server
    model; after the round the server copies are averaged (weighted by
    samples) and so are the edge models.
``splitfed-v2``
    The nodes work in parallel against one server model, which processes
    each wave's batches one node after the other; the edge models are
    averaged after the round.

Each exchange is one wave of messages (:func:`~flwr_gkt.flower.strategy_utils.send_wave`,
pulling every ``poll_interval`` seconds rather than the Grid's 3 s) and every reply
passes :class:`~flwr_gkt.wire.gate.ReplyGate` (activations decoded by
:func:`flwr_gkt.wire.decode_activations`, weights by
:func:`flwr_gkt.wire.decode_state`). A node whose reply is rejected or lost
is out for the rest of the round: its edge weights are not used (SL: the
next node gets the last good ones) and the round goes on with the others.
After each round the nodes send the activations of their test split under
the round's edge weights and the server model classifies them (``accuracy``,
as FedGKT's). Bytes are counted from every message's arrays, up and down,
with the same columns as FedGKT (``bytes-up-train``, ``bytes-down-train``,
``bytes-up-eval``, ``bytes-down-eval``) plus a breakdown; ``waves`` counts the
round's training waves, ``train-seconds`` their wall time and
``seconds-per-wave`` the quotient (the cost of one round trip, see
``docs/split-learning.md``). The math is in
:mod:`flwr_gkt.core.split`, the node side in :mod:`flwr_gkt.flower.split_client`.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import Tensor, nn

from flwr_gkt.core.split import average_states, server_step
from flwr_gkt.core.training import (
    TensorBatches,
    evaluate_logits,
    get_device,
    lr_factor,
    make_optimizer,
    predict,
    prepare_model,
    set_lr,
)
from flwr_gkt.flower.base import RunContext, WaveStrategy
from flwr_gkt.flower.split_client import EDGE_KEY
from flwr_gkt.flower.strategy_utils import sample_connected
from flwr_gkt.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FEATURE_DTYPES,
    GRADIENT_DTYPES,
    METRICS_KEY,
    NUM_EXAMPLES,
    Payload,
    PayloadError,
    PayloadSpec,
    decode_activations,
    decode_payload,
    decode_state,
    encode_gradient,
    encode_state,
    record_nbytes,
    scalar,
)
from flwr_gkt.wire.gate import EVALUATE_METRICS, ReplyGate

__all__ = ["MODES", "SPLIT_METRICS", "SplitLearning"]

#: The split-learning variants.
MODES = ("sl", "splitfed-v1", "splitfed-v2")
#: Metrics a split-learning train reply may carry.
SPLIT_METRICS = frozenset({NUM_EXAMPLES, "batch", "batches", "edge-seconds"})


@dataclass
class _Turn:
    """The server's view of one node's turn in a round."""

    batches: int = 0
    #: Index of the batch whose activations the next reply carries.
    batch: int = 0
    #: Samples the server trained on in this turn (the weight of the node's edge model
    #: in SplitFed's average; its weights reply must report exactly this many).
    samples: int = 0
    #: Whether the next reply carries the trained weights (the last gradient was sent).
    expects_weights: bool = False


class SplitLearning(WaveStrategy):
    """Split learning (``sl``) and SplitFed V1 / V2 over Flower's Message API.

    Parameters
    ----------
    server_model : nn.Module
        The server part ``f_s`` (takes the extractor's activations).
    extractor : nn.Module
        The edge extractor ``f_e`` with its initial weights (every node's
        model has the same keys and shapes).
    num_classes : int
        Number of classes.
    feature_shape : tuple[int, int, int]
        The extractor's output shape ``(C, H, W)`` per sample.
    mode : str
        ``sl``, ``splitfed-v1`` or ``splitfed-v2`` (module docstring).
    epochs : int
        Local epochs per node and round.
    batch_size : int
        Mini-batch size on the nodes (largest accepted activation batch).
    edge_optimizer, server_optimizer : str
        ``adam`` or ``sgd`` (:func:`flwr_gkt.core.training.make_optimizer`).
    edge_lr, server_lr : float
        Learning rates (scaled by ``lr_schedule``).
    weight_decay : float
        Weight decay of ``sgd``.
    lr_schedule : str
        ``constant`` or ``cosine`` over ``num_rounds``.
    feature_dtype : str
        Activations on the wire: ``float32``, ``float16`` or ``int8``.
    gradient_dtype : str
        Gradients on the wire: ``float32`` or ``float16``.
    device : str
        Where the server model trains.
    precision : str
        Autocast precision of the server steps (``fp32``: an exact split).
    seed : int
        Seed of the nodes' mini-batches.
    min_nodes : int
        Connected nodes to wait for before a round.
    node_wait_timeout : float
        Seconds to wait for them (``0``: forever).
    max_payload_bytes : int, optional
        Largest accepted reply.
    max_samples : int, optional
        Most training samples per node (bounds the number of batches a node
        may announce) and most test samples per evaluate reply.
    eval_batch_size : int
        Batch size of the nodes' test-split forward passes.
    poll_interval : float
        Seconds between pulls while a wave's replies are outstanding.
    outlier_threshold : float
        The gate's outlier check of each activation batch against the other
        nodes' latest accepted batches (:class:`~flwr_gkt.wire.gate.ReplyGate`);
        ``0``: off. Every batch also meets the gate's magnitude rule.
    max_weight_change : float, optional
        Edge weights a node returns may move at most this far from the weights
        it was sent, relative to their norm (:func:`flwr_gkt.wire.decode_state`);
        ``None``: not checked.

    Raises
    ------
    ValueError
        If ``mode`` or a dtype is unknown.
    """

    name = "SplitLearning"
    round_kind = "one message wave per mini-batch"
    constructor_gives = "takes its models and settings"

    def __init__(
        self,
        server_model: nn.Module,
        extractor: nn.Module,
        num_classes: int,
        feature_shape: tuple[int, int, int],
        *,
        mode: str = "sl",
        epochs: int = 1,
        batch_size: int = 32,
        edge_optimizer: str = "adam",
        edge_lr: float = 1e-3,
        server_optimizer: str = "adam",
        server_lr: float = 1e-3,
        weight_decay: float = 5e-4,
        lr_schedule: str = "constant",
        feature_dtype: str = "float32",
        gradient_dtype: str = "float32",
        device: str = "auto",
        precision: str = "fp32",
        seed: int = 0,
        min_nodes: int = 1,
        node_wait_timeout: float = 0.0,
        max_payload_bytes: int | None = None,
        max_samples: int | None = None,
        eval_batch_size: int = 256,
        poll_interval: float = 0.01,
        outlier_threshold: float = 10.0,
        max_weight_change: float | None = 10.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown split-learning mode {mode!r}; expected one of {MODES}")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype {feature_dtype!r} not in {FEATURE_DTYPES}")
        if gradient_dtype not in GRADIENT_DTYPES:
            raise ValueError(f"gradient dtype {gradient_dtype!r} not in {GRADIENT_DTYPES}")
        self.mode = mode
        self.device = get_device(device)
        self.model = prepare_model(server_model, self.device)
        self.server_optimizer, self.server_lr, self.weight_decay = (
            server_optimizer,
            server_lr,
            weight_decay,
        )
        self.optimizer = make_optimizer(
            server_optimizer, self.model.parameters(), server_lr, weight_decay
        )
        #: SplitFed V1: each node's server-side copy and its optimizer (kept across rounds).
        self.copies: dict[int, tuple[nn.Module, torch.optim.Optimizer]] = {}
        self.edge_state = {k: v.detach().cpu().clone() for k, v in extractor.state_dict().items()}
        self.num_classes = num_classes
        self.feature_shape = tuple(feature_shape)
        self.epochs, self.batch_size = max(1, epochs), max(2, batch_size)
        self.edge_optimizer, self.edge_lr = edge_optimizer, edge_lr
        self.lr_schedule = lr_schedule
        self.feature_dtype, self.gradient_dtype = feature_dtype, gradient_dtype
        self.precision = precision
        self.seed = seed
        self.min_nodes, self.node_wait_timeout = min_nodes, node_wait_timeout
        self.max_samples = max_samples
        self.eval_batch_size = eval_batch_size
        self.poll_interval = poll_interval
        self.max_weight_change = max_weight_change
        self.gate = ReplyGate(
            max_payload_bytes,
            outlier_threshold,
            name="SplitLearning",
            reference_stages=("begin", "step"),
        )
        self.spec = PayloadSpec(num_classes, self.feature_shape, self.batch_size)
        self.eval_spec = PayloadSpec(num_classes, self.feature_shape, max_samples)
        super().__init__()
        self.num_rounds = 1

    def summary(self) -> None:
        """Log the configuration."""
        log(
            INFO,
            "\t├──> %s: server model %s on %s, %d local epoch(s), batch %d",
            self.mode,
            type(self.model).__name__,
            self.device,
            self.epochs,
            self.batch_size,
        )
        log(
            INFO,
            "\t└──> activations %s, gradients %s on the wire",
            self.feature_dtype,
            self.gradient_dtype,
        )

    def _max_batches(self) -> int | None:
        if not self.max_samples:
            return None
        return math.ceil(self.max_samples / self.batch_size) * self.epochs

    def _server_for(self, node: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        if self.mode != "splitfed-v1":
            return self.model, self.optimizer
        if node not in self.copies:
            model = copy.deepcopy(self.model)
            self.copies[node] = (
                model,
                make_optimizer(
                    self.server_optimizer, model.parameters(), self.server_lr, self.weight_decay
                ),
            )
        return self.copies[node]

    def _turns(
        self,
        grid: Grid,
        server_round: int,
        nodes: list[int],
        tally: defaultdict[str, float],
        timeout: float,
    ) -> dict[int, tuple[dict[str, Tensor], int]]:
        """Run the nodes' turns in parallel (one node in SL); return the trained weights.

        Returns ``{node: (edge weights, samples trained)}`` for the nodes whose
        turn completed; the samples are those the server itself trained on for
        the node (a weights reply reporting another count is rejected).
        """
        turns = {n: _Turn() for n in nodes}
        begin = self._begin_config(server_round)
        messages = {
            n: Message(
                RecordDict({CONFIG_KEY: ConfigRecord(dict(begin)), EDGE_KEY: self._edge_record()}),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
            )
            for n in nodes
        }
        done: dict[int, tuple[dict[str, Tensor], int]] = {}
        stage = "begin"
        while messages:
            for msg in messages.values():
                kind = "edge-weights-down" if stage == "begin" else "gradients"
                tally[f"bytes-{kind}"] += record_nbytes(msg.content)
                tally["messages-down"] += 1
            tally["waves"] += 1
            expects = {n: turns[n].expects_weights for n in messages}
            accepted, result = self._exchange_wave(
                grid,
                messages,
                timeout,
                server_round,
                stage,
                lambda node, content: self.decode_turn_reply(turns[node], content),
                SPLIT_METRICS,
            )
            for row in result.records:
                node = row["node-id"]
                if node in expects and row.get("bytes-up"):
                    kind = "edge-weights-up" if expects[node] else "activations"
                    tally[f"bytes-{kind}"] += int(row["bytes-up"])
            tally["bytes-up-train"] += result.nbytes
            nxt: dict[int, Message] = {}
            for node in sorted(accepted):
                reply, turn = accepted[node], turns[node]
                if turn.expects_weights:
                    done[node] = (reply.payload, turn.samples)
                    tally["edge-seconds-max"] = max(
                        tally["edge-seconds-max"], reply.metrics.get("edge-seconds", 0.0)
                    )
                elif (nxt_msg := self.step(node, reply.payload, turn, tally, server_round)) is None:
                    self.gate.revoke(
                        result, node, "its activations made the server's step non-finite (undone)"
                    )
                else:
                    nxt[node] = nxt_msg
            tally["nodes-rejected"] += result.rejected
            messages, stage = nxt, "step"
        return done

    def _begin_config(self, server_round: int) -> ConfigRecord:
        """Return the config of a round's ``begin`` instructions."""
        lr = self.edge_lr * lr_factor(self.lr_schedule, server_round, self.num_rounds)
        return ConfigRecord(
            {
                "split-stage": "begin",
                "server-round": server_round,
                "seed": self.seed,
                "epochs": self.epochs,
                "batch-size": self.batch_size,
                "optimizer": self.edge_optimizer,
                "lr": lr,
                "weight-decay": self.weight_decay,
                "feature-dtype": self.feature_dtype,
            }
        )

    def decode_turn_reply(self, turn: _Turn, content: RecordDict) -> Any:
        """Decode one train reply of a node's turn (the gate's decoder; raises on a bad one).

        Activations (:func:`~flwr_gkt.wire.decode_activations`; the turn's
        first reply announces its ``batches``, at most what ``max_samples``
        allows), or, after the turn's last gradient, the edge weights
        (:func:`~flwr_gkt.wire.decode_state` against the weights the node was
        sent, with the bounded change) with ``num-examples`` equal to the
        samples the server trained on in the turn.
        """
        if turn.expects_weights:
            record = content.array_records.get(ARRAYS_KEY)
            if record is None:
                raise PayloadError(f"missing ArrayRecord '{ARRAYS_KEY}' (the edge weights)")
            claimed = scalar(content.metric_records[METRICS_KEY], NUM_EXAMPLES)
            if claimed != turn.samples:
                raise PayloadError(
                    f"'{NUM_EXAMPLES}' says {claimed:g} but the server trained on "
                    f"{turn.samples} samples of this node's turn"
                )
            return decode_state(record, self.edge_state, self.max_weight_change)
        payload = decode_activations(content, self.spec)
        if turn.batches == 0:  # the begin reply announces the turn's batches
            cap = self._max_batches()
            batches = int(scalar(content.metric_records[METRICS_KEY], "batches"))
            if batches < 1 or (cap is not None and batches > cap):
                raise PayloadError(f"'batches' is {batches}, expected 1..{cap or 'any'}")
            turn.batches = batches
        return payload

    def step(
        self,
        node: int,
        payload: Payload,
        turn: _Turn,
        tally: defaultdict[str, float],
        server_round: int,
    ) -> Message | None:
        """Train the server on one accepted activation batch; return the gradient's message.

        ``None`` when the training guard undid the step
        (:func:`~flwr_gkt.core.split.server_step`): nothing of it is counted
        and the node's turn ends.
        """
        model, optimizer = self._server_for(node)
        start = time.perf_counter()
        labels = payload.labels
        out = server_step(
            model, optimizer, payload.dense_features(), labels, self.device, self.precision
        )
        tally["server-seconds"] += time.perf_counter() - start
        if not out.ok:
            return None
        turn.samples += out.num_examples
        tally["loss-sum"] += out.loss * out.num_examples
        tally["correct"] += out.correct
        tally["examples"] += out.num_examples
        config = ConfigRecord(
            {"split-stage": "step", "server-round": server_round, "batch": turn.batch}
        )
        turn.batch += 1
        turn.expects_weights = turn.batch >= turn.batches
        return Message(
            RecordDict(
                {CONFIG_KEY: config, ARRAYS_KEY: encode_gradient(out.gradient, self.gradient_dtype)}
            ),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )

    def _edge_record(self) -> ArrayRecord:
        return encode_state(self.edge_state)

    # ------------------------------------------------------------------ round
    def run_round(self, server_round: int, run: RunContext) -> bool:
        """Run round ``server_round`` of split learning (called by :meth:`start`).

        The round is :meth:`train_round` then :meth:`evaluate_round` (the
        nodes' test splits); its row goes to :attr:`history`. Each wave waits
        up to the run's ``timeout`` seconds for its replies.
        """
        row = self.train_round(run.grid, server_round, run.timeout)
        row |= self.evaluate_round(run.grid, server_round, run.timeout)
        row["round-seconds"] = time.perf_counter() - self._round_start
        self.history.append(row)
        log(
            INFO,
            "%s round %d eval: accuracy %.4f, loss %.4f, train up %.2f MB, down %.2f MB, "
            "%d waves [%s]",
            self.mode,
            server_round,
            row.get("accuracy", float("nan")),
            row.get("loss", float("nan")),
            row["bytes-up-train"] / 2**20,
            row["bytes-down-train"] / 2**20,
            row["waves"],
            self.rounds.progress(server_round),
        )
        return True

    def train_round(self, grid: Grid, server_round: int, timeout: float) -> dict[str, float]:
        """Run round ``server_round``'s training (turns, then SplitFed's averaging); return its row.

        Each wave on ``grid`` waits up to ``timeout`` seconds for its replies.

        Returns
        -------
        dict[str, float]
            The train columns of the round's history row.
        """
        self._round_start = time.perf_counter()
        nodes = sample_connected(grid, 1.0, 1, self.min_nodes, self.node_wait_timeout)
        factor = lr_factor(self.lr_schedule, server_round, self.num_rounds)
        for _, optimizer in [(self.model, self.optimizer), *self.copies.values()]:
            set_lr(optimizer, self.server_lr * factor)
        tally: defaultdict[str, float] = defaultdict(float)
        done = self._train_turns(grid, server_round, nodes, tally, timeout, factor)
        examples = tally["examples"]
        bytes_down = tally["bytes-edge-weights-down"] + tally["bytes-gradients"]
        row: dict[str, float] = {
            "round": server_round,
            "nodes-sampled": len(nodes),
            "nodes-replied": len(done),
            "nodes-rejected": tally["nodes-rejected"],
            "server-train-loss": tally["loss-sum"] / max(examples, 1),
            "server-train-accuracy": tally["correct"] / max(examples, 1),
            "server-train-examples": examples,
            "server-lr-factor": factor,
            "server-seconds": tally["server-seconds"],
            "edge-seconds-max": tally["edge-seconds-max"],
            "waves": tally["waves"],
            "messages-down": tally["messages-down"],
            "bytes-activations": tally["bytes-activations"],
            "bytes-gradients": tally["bytes-gradients"],
            "bytes-edge-weights-up": tally["bytes-edge-weights-up"],
            "bytes-edge-weights-down": tally["bytes-edge-weights-down"],
            "bytes-up-train": tally["bytes-up-train"],
            "bytes-down-train": bytes_down,
        }
        train_seconds = time.perf_counter() - self._round_start
        row["train-seconds"] = train_seconds
        row["seconds-per-wave"] = train_seconds / max(tally["waves"], 1)
        log(
            INFO,
            "%s round %d train: %d/%d nodes finished their turn, %d samples, server loss %.4f, "
            "%d waves (%.2f s each)",
            self.mode,
            server_round,
            len(done),
            len(nodes),
            examples,
            row["server-train-loss"],
            row["waves"],
            row["seconds-per-wave"],
        )
        return row

    def _train_turns(
        self,
        grid: Grid,
        server_round: int,
        nodes: list[int],
        tally: defaultdict[str, float],
        timeout: float,
        factor: float,
    ) -> dict[int, tuple[dict[str, Tensor], int]]:
        """Run the round's turns in the mode's order; set the next edge (and V1 server) weights.

        SL: one node after the other, each starting from the weights the
        previous one returned. SplitFed: all at once, then the edge models
        (and V1's server copies) averaged by the samples the server trained on.
        """
        done: dict[int, tuple[dict[str, Tensor], int]] = {}
        if self.mode == "sl":  # one node after the other; the weights are relayed
            for node in nodes:
                finished = self._turns(grid, server_round, [node], tally, timeout)
                if node in finished:
                    self.edge_state = finished[node][0]
                    done.update(finished)
            return done
        if self.mode == "splitfed-v1":  # every node's copy starts from the global model
            for node in nodes:
                model, optimizer = self._server_for(node)
                model.load_state_dict(self.model.state_dict())
                set_lr(optimizer, self.server_lr * factor)
        done = self._turns(grid, server_round, nodes, tally, timeout)
        if done:
            weights = [float(n) for _, n in done.values()]
            self.edge_state = average_states([s for s, _ in done.values()], weights)
            if self.mode == "splitfed-v1":
                states = [self.copies[n][0].state_dict() for n in done]
                self.model.load_state_dict(average_states(states, weights))
        return done

    def evaluate_round(self, grid: Grid, server_round: int, timeout: float) -> dict[str, float]:
        """Classify the nodes' test activations under the round's edge weights; return the row.

        The nodes on ``grid`` get the edge weights of round ``server_round``;
        their replies are awaited up to ``timeout`` seconds.

        Returns
        -------
        dict[str, float]
            ``accuracy`` / ``loss`` (edge extractor + server model, weighted
            by examples), ``num-examples``, counts and eval bytes; without
            ``accuracy`` when no reply was accepted.
        """
        nodes = sorted(grid.get_node_ids())
        config = ConfigRecord(
            {
                "batch-size": self.eval_batch_size,
                "feature-dtype": self.feature_dtype,
                "server-round": server_round,
            }
        )
        messages = {
            n: Message(
                RecordDict({CONFIG_KEY: ConfigRecord(dict(config)), EDGE_KEY: self._edge_record()}),
                dst_node_id=n,
                message_type=MessageType.EVALUATE,
            )
            for n in nodes
        }
        down = sum(record_nbytes(m.content) for m in messages.values())
        sums = {"loss": 0.0, "correct": 0, "n": 0}

        def decode(node: int, content: RecordDict) -> Any:
            return decode_payload(content, self.eval_spec, with_logits=False)

        accepted, result = self._exchange_wave(
            grid, messages, timeout, server_round, "evaluate", decode, EVALUATE_METRICS
        )
        for node, reply in sorted(accepted.items()):
            payload = reply.payload
            batches = TensorBatches(payload.dense_features(), payload.labels, 256)
            loss_sum, correct = evaluate_logits(
                predict(self.model, batches, self.device), payload.labels
            )
            if not math.isfinite(loss_sum):
                self.gate.revoke(result, node, "its activations make the server's loss non-finite")
                continue
            sums["loss"] += loss_sum
            sums["correct"] += correct
            sums["n"] += len(payload.labels)
        row: dict[str, float] = {
            "eval-nodes": len(result.accepted),
            "eval-rejected": result.rejected,
            "bytes-up-eval": result.nbytes,
            "bytes-down-eval": down,
        }
        if sums["n"]:
            row |= {
                "accuracy": sums["correct"] / sums["n"],
                "loss": sums["loss"] / sums["n"],
                "num-examples": sums["n"],
            }
        return row
