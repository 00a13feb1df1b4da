"""Asynchronous FedGKT: the server trains as soon as any node's features arrive.

The paper (He et al., NeurIPS 2020, Sec. 4 and Table 3): "Since the server
does not need to wait for updates from all clients to start training, FedGKT
naturally supports asynchronous training ... The server model can immediately
start training when it receives inputs from any client."
:class:`AsyncFedGKT` does exactly that with its own event loop on the Grid's
``push_messages`` / ``pull_messages``, polled inside the family's round loop
(:meth:`~flwr_gkt.flower.base.RoundStrategy.start`).

The training nodes are sampled once; each train reply is validated and stored
as it arrives, the server model makes one *update* that sets that node's
``Z_s^(k)`` (``update_scope``: ``"store"``, ``E_s`` passes of ``n_k`` samples
drawn from every node's stored features, or ``"node"``, that node's features
alone) and the node is sent its next instruction at once. Every node has at
most one instruction in flight. A reply's *staleness* is the number of server
updates made since its instruction was sent; replies staler than
``max_staleness`` are rejected. A *round* is as many accepted updates as there
are training nodes: the unit of ``num_rounds``, of the learning-rate
schedule, of ``store_max_age`` and of the history rows. When a round ends its
evaluation nodes are sent evaluate instructions as soon as they are idle;
their replies go through :meth:`FedGKT.aggregate_evaluate` when all are in.
The details (server update, staleness, rounds, evaluation, the differences
from the synchronous strategy) are in ``docs/features.md``, *Asynchronous
FedGKT*.
"""

from __future__ import annotations

import io
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore import log

from flwr_gkt.core.server import GKTServer, ServerRoundResult
from flwr_gkt.flower.base import RunContext
from flwr_gkt.flower.options import AsyncOptions
from flwr_gkt.flower.strategy import FedGKT
from flwr_gkt.flower.strategy_utils import MB, edge_train_metrics
from flwr_gkt.wire import NUM_EXAMPLES, Payload, record_nbytes, scalar

__all__ = ["AsyncFedGKT"]


@dataclass
class _Flight:
    """An instruction sent and not yet answered."""

    message: Message
    kind: str  # "train" or "evaluate"
    node: int
    sent_at: float  # time.monotonic()
    version: int  # server model version when sent
    rounds: list[_EvalRound] = field(default_factory=list)  # evaluate: rounds it serves


@dataclass
class _Tally:
    """What happened in one round, for its history row."""

    start: float
    updates: int = 0
    rejected: int = 0
    stale: int = 0
    lost: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    loss_sum: float = 0.0
    correct_sum: float = 0.0
    examples: int = 0
    server_seconds: float = 0.0
    with_features: int = 0
    staleness: list[int] = field(default_factory=list)
    edge: list[tuple[float, Mapping[str, float]]] = field(default_factory=list)

    def add(
        self,
        res: ServerRoundResult,
        staleness: int,
        with_features: int,
        metrics: Mapping[str, float],
    ) -> None:
        """Count one accepted reply and the server update it made."""
        self.updates += 1
        self.staleness.append(staleness)
        self.with_features += with_features
        self.edge.append((scalar(metrics, NUM_EXAMPLES), metrics))
        self.loss_sum += res.loss * res.num_examples
        self.correct_sum += res.accuracy * res.num_examples
        self.examples += res.num_examples
        self.server_seconds += res.seconds


@dataclass
class _EvalRound:
    """The evaluation of one finished round, waiting for its nodes."""

    server_round: int
    row: dict[str, float]
    start: float
    end: float
    waiting: set[int]
    messages: list[Message] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)


@dataclass
class _Run:
    """The state of one :meth:`AsyncFedGKT.start`: what is in flight, due and counted."""

    #: The arguments of :meth:`AsyncFedGKT.start` and its result.
    ctx: RunContext
    #: Training nodes sampled (a round is ``k`` accepted updates).
    k: int
    #: Accepted updates the run needs (``num_rounds - completed`` rounds of ``k``).
    needed: int
    server_round: int
    tally: _Tally
    #: Training nodes sampled, in sampling order (the order of the first instructions).
    train_nodes: list[int]
    #: Training nodes still in the run.
    active: set[int]
    #: Rejected replies in a row, by node.
    failures: dict[int, int]
    #: Lost or failing nodes: no more instructions.
    dropped: set[int] = field(default_factory=set)
    flights: dict[str, _Flight] = field(default_factory=dict)
    busy: set[int] = field(default_factory=set)
    pending_eval: dict[int, list[_EvalRound]] = field(default_factory=dict)
    evals: deque[_EvalRound] = field(default_factory=deque)
    accepted: int = 0
    #: Replies pulled but not yet handled: a round ended before them.
    inbox: list[Message] = field(default_factory=list)

    def outstanding_train(self) -> int:
        """Train instructions in flight."""
        return sum(f.kind == "train" for f in self.flights.values())


def _view(reply: Message, instruction: Message) -> Message:
    """Return a reply with the same records in a new RecordDict (arrays are not copied)."""
    if reply.has_error():
        return reply
    return Message(RecordDict(dict(reply.content.items())), reply_to=instruction)


class AsyncFedGKT(FedGKT):
    """FedGKT without waiting for the slowest node (see the module docstring).

    Takes every argument of :class:`~flwr_gkt.flower.strategy.FedGKT`, plus
    ``asynchronous`` (:class:`~flwr_gkt.flower.options.AsyncOptions`: the
    staleness bound, the update scope, the failures a node may have and the
    poll interval). A round of :meth:`start` is as many accepted server
    updates as there are training nodes; ``timeout`` is the longest wait for
    the reply to any one instruction (a node that does not answer in time is
    recorded as lost and dropped); ``evaluate_fn`` gets the server model's
    weights at the end of every round.
    """

    #: Replies come one at a time: nothing to stage out.
    stage_out = False

    def __init__(
        self,
        server: GKTServer,
        num_classes: int,
        *,
        asynchronous: AsyncOptions | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(server, num_classes, **kwargs)
        self.asynchronous = asynchronous or AsyncOptions()
        #: Server model version: the number of server updates made so far.
        self.version = 0
        self._run: _Run | None = None

    def summary(self) -> None:
        """Log the strategy's configuration."""
        super().summary()
        options = self.asynchronous
        log(
            INFO,
            "\t└──> Asynchronous: max staleness %s, update scope %s, poll every %.2fs",
            "unbounded" if options.max_staleness is None else options.max_staleness,
            options.update_scope,
            options.poll_interval,
        )

    # ------------------------------------------------------------ the round loop
    def begin(self, run: RunContext) -> RunContext:
        """Sample the training nodes once and send each its first instruction."""
        train_nodes = self._sample(
            run.grid, self.sampling.fraction_train, self.sampling.min_train_nodes
        )
        k, staleness = len(train_nodes), self.asynchronous.max_staleness
        log(
            INFO,
            "AsyncFedGKT: %d training nodes, %d rounds of %d server updates",
            k,
            self.num_rounds,
            k,
        )
        if staleness is not None and k > 1 and staleness < k - 1:
            log(
                WARNING,
                "AsyncFedGKT: max-staleness %d is below %d: with %d nodes of similar speed "
                "most replies are about %d updates stale and will be rejected",
                staleness,
                k - 1,
                k,
                k - 1,
            )
        self._run = _Run(
            ctx=run,
            k=k,
            needed=max(self.num_rounds - self.completed_round, 0) * k,
            server_round=self.completed_round + 1,
            tally=_Tally(start=time.perf_counter()),
            train_nodes=list(train_nodes),
            active=set(train_nodes),
            failures=dict.fromkeys(train_nodes, 0),
        )
        for node in train_nodes:
            self._dispatch(self._run, node)
        return run

    def run_round(self, server_round: int, run: RunContext) -> bool:
        """Poll until round ``server_round``'s updates are in; ``False`` when the run ends early."""
        assert self._run is not None
        while self._run.server_round <= server_round:
            if not self._poll(self._run):
                return False
        return True

    def finish(self, run: RunContext) -> None:
        """Drain the evaluations still in flight; return the server model's weights."""
        assert self._run is not None
        while self._poll(self._run):
            pass
        run.result.arrays = self.initial_arrays()
        log(INFO, "AsyncFedGKT: %d server updates", self.version)
        for line in io.StringIO(str(run.result)):
            log(INFO, "\t%s", line.strip("\n"))

    def round_done(self, server_round: int) -> None:
        """Nothing: a round goes to the round callback when its evaluation is in."""

    def checkpoint_state(self, run: RunContext) -> dict[str, Any]:
        """Return the state, with the rows whose evaluation is still in flight as they are."""
        state = self.state_dict()
        evals = self._run.evals if self._run is not None else ()
        state["history"] = [*self.history, *(e.row for e in evals)]
        return state

    def _poll(self, run: _Run) -> bool:
        """One pass of the event loop: pull, handle, time out, dispatch; ``False`` when done."""
        if run.accepted < run.needed and not run.active and not run.outstanding_train():
            log(
                WARNING,
                "AsyncFedGKT: no training node left; stopping after %d of %d rounds",
                run.server_round - 1,
                self.num_rounds,
            )
            run.needed = run.accepted
        if run.accepted >= run.needed and not run.flights and not run.inbox:
            for er in run.evals:  # nothing more can answer
                er.waiting.clear()
            self._flush_evals(run)
            return False
        grid, server_round = run.ctx.grid, run.server_round
        replies = run.inbox or (list(grid.pull_messages(list(run.flights))) if run.flights else [])
        run.inbox = []
        for i, reply in enumerate(replies):
            self._on_reply(run, reply)
            if run.server_round != server_round:  # the round loop closes the round first
                run.inbox = replies[i + 1 :]
                return True
        now = time.monotonic()
        for msg_id, flight in list(run.flights.items()):
            if now - flight.sent_at > run.ctx.timeout:
                del run.flights[msg_id]
                run.busy.discard(flight.node)
                self._on_timeout(run, flight)
        self._flush_evals(run)
        for node in sorted(run.active | set(run.pending_eval)):
            self._dispatch(run, node)  # idle nodes with work: new evaluations, freed train slots
        if run.flights and not replies:
            time.sleep(self.asynchronous.poll_interval)
        return True

    def _on_reply(self, run: _Run, reply: Message) -> None:
        """Hand a pulled reply to its handler and give its node its next instruction."""
        flight = run.flights.pop(reply.metadata.reply_to_message_id, None)
        if flight is None:  # late (given up on) or a second copy: never used twice
            log(
                WARNING,
                "AsyncFedGKT: reply from node %d ignored: it answers no instruction "
                "in flight (late or duplicate)",
                reply.metadata.src_node_id,
            )
            return
        run.busy.discard(flight.node)
        if flight.kind == "train":
            self._on_train_reply(run, flight, reply)
        else:
            for i, er in enumerate(flight.rounds):
                # aggregate_evaluate releases a reply's arrays: each round its own view
                er.replies.append(
                    reply if i == len(flight.rounds) - 1 else _view(reply, flight.message)
                )
                er.waiting.discard(flight.node)
        self._flush_evals(run)
        self._dispatch(run, flight.node)

    def _push(self, run: _Run, message: Message, flight: _Flight) -> bool:
        """Send one instruction; record it in flight. ``False`` when it could not be sent."""
        ids = list(run.ctx.grid.push_messages([message]))
        self.rounds.sent_at = time.perf_counter()
        if not ids:
            log(
                WARNING,
                "AsyncFedGKT: the %s instruction to node %d could not be sent",
                flight.kind,
                flight.node,
            )
            return False
        run.flights[str(ids[0])] = flight
        run.busy.add(flight.node)
        return True

    def _drop(self, run: _Run, node: int, why: str) -> None:
        """Take ``node`` out of the run: no more instructions, its features leave the store."""
        run.active.discard(node)
        run.dropped.add(node)
        for er in run.pending_eval.pop(node, []):
            er.waiting.discard(node)
            self.node_history.append(
                {
                    "round": er.server_round,
                    "stage": "evaluate",
                    "node-id": node,
                    "status": "lost",
                    "reason": f"node dropped ({why})",
                }
            )
        self.forget_node(node)
        log(WARNING, "AsyncFedGKT: node %d takes no further part in the run (%s)", node, why)

    def _dispatch(self, run: _Run, node: int) -> None:
        """Send an idle node its next instruction, if it has one (evaluations first)."""
        if node in run.busy:
            return
        if run.pending_eval.get(node):
            rounds = run.pending_eval.pop(node)
            msg = self.evaluate_instruction(node, rounds[-1].server_round, run.ctx.evaluate_config)
            flight = _Flight(msg, "evaluate", node, time.monotonic(), self.version, rounds)
            sent = self._push(run, msg, flight)
            for er in rounds:
                if sent:
                    er.messages.append(msg)
                else:
                    er.waiting.discard(node)
            return
        if node in run.active and run.accepted + run.outstanding_train() < run.needed:
            msg = self.train_instruction(node, run.server_round, run.ctx.train_config)
            if self._push(run, msg, _Flight(msg, "train", node, time.monotonic(), self.version)):
                run.tally.bytes_down += record_nbytes(msg.content)
            else:
                self._drop(run, node, "its instruction could not be sent")

    def _end_round(self, run: _Run) -> None:
        """Close the round: its train row, its evaluation due; start the next."""
        now = time.perf_counter()
        server_round = run.server_round
        row = self._train_row(server_round, run.tally, now)
        run.ctx.result.train_metrics_clientapp[server_round] = MetricRecord(
            {k: float(v) for k, v in row.items()}
        )
        eval_nodes = [n for n in self._eval_nodes(run.ctx.grid) if n not in run.dropped]
        er = _EvalRound(server_round, row, run.tally.start, now, set(eval_nodes))
        run.evals.append(er)
        for node in eval_nodes:
            run.pending_eval.setdefault(node, []).append(er)
        if run.ctx.evaluate_fn:  # the round loop evaluates the weights of this moment
            run.ctx.arrays = self.initial_arrays()
        run.server_round += 1
        run.tally = _Tally(start=now)

    def _flush_evals(self, run: _Run) -> None:
        """Aggregate, in round order, the evaluations whose replies are all in."""
        while run.evals and not run.evals[0].waiting:
            er = run.evals.popleft()
            metrics = self._finish_evaluation(er)
            if metrics is not None:
                run.ctx.result.evaluate_metrics_clientapp[er.server_round] = metrics

    def _reject_stale(self, run: _Run, flight: _Flight, reply: Message, staleness: int) -> bool:
        """Reject a reply staler than ``max_staleness`` (one log line, a ``stale`` row)."""
        bound = self.asynchronous.max_staleness
        if reply.has_error() or bound is None or staleness <= bound:
            return False
        size = record_nbytes(reply.content)
        run.tally.rejected += 1
        run.tally.stale += 1
        run.tally.bytes_up += size
        reason = f"stale (staleness {staleness} > max-staleness {bound})"
        self.node_history.append(
            {
                "round": run.server_round,
                "stage": "train",
                "node-id": flight.node,
                "status": "stale",
                "reason": reason,
                "staleness": staleness,
                "bytes-up": size,
            }
        )
        log(
            WARNING,
            "FedGKT round %d: train reply of node %d rejected: %s",
            run.server_round,
            flight.node,
            reason,
        )
        return True

    def _on_train_reply(self, run: _Run, flight: _Flight, reply: Message) -> None:
        """Gate and store a train reply, then make one server update (module docstring)."""
        node, server_round = flight.node, run.server_round
        staleness = self.version - flight.version
        if self._reject_stale(run, flight, reply, staleness):
            return
        with_features = []

        def store(node_: int, payload: Payload, _: Mapping[str, float]) -> None:
            with_features.append(payload.has_features)
            self._store(node_, payload, server_round)

        ok, nbytes, rejected = self._accept(server_round, "train", [reply], [flight.message], store)
        self.node_history[-1]["staleness"] = staleness
        run.tally.bytes_up += nbytes
        if rejected:
            run.tally.rejected += 1
            run.failures[node] = run.failures.get(node, 0) + 1
            if run.failures[node] >= self.asynchronous.max_node_failures:
                self._drop(run, node, f"{run.failures[node]} rejected replies in a row")
            return
        run.failures[node] = 0
        self._evict_old(server_round)
        res = self._train_update(node, self.server_lr_factor(server_round))
        self._book_evictions(server_round)
        self.version += 1
        run.accepted += 1
        run.tally.add(res, staleness, sum(with_features), ok[0][2])
        log(
            INFO,
            "FedGKT round %d update %d/%d: node %d (staleness %d), server loss %.4f acc %.4f "
            "on %d samples (%.1fs)",
            server_round,
            run.tally.updates,
            run.k,
            node,
            staleness,
            res.loss,
            res.accuracy,
            res.num_examples,
            res.seconds,
        )
        if run.accepted % run.k == 0:
            self._end_round(run)

    def _evict_old(self, server_round: int) -> None:
        """Drop the stored features of nodes silent for ``store_max_age`` rounds."""
        age = self.trust.store_max_age
        if age <= 0:
            return
        for gone in self.server.evict(server_round - age + 1):
            self.feature_round.pop(gone, None)
            self.gate.forget(gone)
            log(
                WARNING,
                "FedGKT round %d: features of node %d dropped (no reply for %d rounds)",
                server_round,
                gone,
                age,
            )

    def _on_timeout(self, run: _Run, flight: _Flight) -> None:
        """Record a node that did not answer in time as lost and drop it."""
        node = flight.node
        if flight.kind != "train":  # recorded as lost by aggregate_evaluate (no reply)
            for er in flight.rounds:
                er.waiting.discard(node)
            self._drop(run, node, "lost while evaluating")
            return
        run.tally.lost += 1
        reason = f"no reply within the {run.ctx.timeout:.0f}s timeout"
        self.rounds.lost(run.server_round, "train", node, reason)
        self._drop(run, node, "lost")

    # ------------------------------------------------------------- server
    def _train_update(self, node: int, lr_scale: float) -> ServerRoundResult:
        """One server update after ``node``'s reply; sets that node's ``Z_s``.

        ``update_scope="store"``: :meth:`GKTServer.train_update` (``E_s``
        passes of ``n_k`` samples drawn from every node's stored features).
        ``"node"``: :meth:`GKTServer.train_round` on the node's features only.
        """
        if self.asynchronous.update_scope == "node":
            return self.server.train_round(lr_scale=lr_scale, nodes=[node])
        return self.server.train_update(node, lr_scale=lr_scale)

    # ------------------------------------------------------------ metrics
    def _train_row(self, server_round: int, t: _Tally, now: float) -> dict[str, float]:
        """Build the train part of a round's history row (keys of ``aggregate_train``'s)."""
        n = max(t.examples, 1)
        row: dict[str, float] = {
            "round": server_round,
            "nodes-replied": t.updates,
            "nodes-rejected": t.rejected,
            "nodes-lost": t.lost,
            "nodes-sent-features": t.with_features,
            "store-memory-mb": self.server.store.memory_bytes / MB,
            "store-disk-mb": self.server.store.disk_bytes / MB,
            "server-train-loss": t.loss_sum / n,
            "server-train-accuracy": t.correct_sum / n,
            "server-train-examples": t.examples,
            "server-seconds": t.server_seconds,
            "bytes-up-train": t.bytes_up,
            "bytes-down-train": t.bytes_down,
        }
        row.update(edge_train_metrics(t.edge))
        row["replies-stale"] = t.stale
        row["staleness-max"] = max(t.staleness, default=0)
        row["staleness-mean"] = sum(t.staleness) / max(len(t.staleness), 1)
        row["server-version"] = self.version
        row["round-seconds"] = now - t.start
        log(
            INFO,
            "FedGKT round %d train: %d updates (%d rejected, %d stale, %d lost), staleness max %d "
            "mean %.1f, server loss %.4f acc %.4f on %d samples (%.1fs), edge acc %.4f, up %.2f MB, "
            "down %.2f MB",
            server_round,
            t.updates,
            t.rejected,
            t.stale,
            t.lost,
            row["staleness-max"],
            row["staleness-mean"],
            row["server-train-loss"],
            row["server-train-accuracy"],
            t.examples,
            t.server_seconds,
            row.get("edge-train-accuracy", float("nan")),
            t.bytes_up / MB,
            t.bytes_down / MB,
        )
        return row

    def _finish_evaluation(self, er: _EvalRound) -> MetricRecord | None:
        """Aggregate a round's evaluation into its row and append the row to the history."""
        self.history.append(er.row)  # aggregate_evaluate fills history[-1] of this round
        self._sent_eval = er.messages
        self.rounds.round_start = er.start
        metrics = self.aggregate_evaluate(er.server_round, er.replies)
        er.row["round-seconds"] = er.end - er.start
        er.row["eval-seconds"] = time.perf_counter() - er.end
        if metrics is not None:
            metrics["round-seconds"] = er.row["round-seconds"]
        self.rounds.round_done(er.server_round)
        return metrics
