"""Checkpoint, resume and node identity of the FedGKT strategies.

Kept apart from :class:`flwr_gkt.flower.strategy.FedGKT` so that the strategy
reads like Algorithm 1: these functions run Flower's round loop from the last
checkpointed round (:func:`run_rounds`), turn a strategy into a checkpoint
state and back (:func:`strategy_state`, :func:`load_strategy_state`), and find
the checkpointed nodes again under their new node ids, handing a node its
state back only when it holds the token it was given
(:func:`reidentify_nodes`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log

from flwr_gkt.core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flwr_gkt.wire import CONFIG_KEY, NODE_UID

if TYPE_CHECKING:
    from flwr_gkt.flower.strategy import FedGKT

__all__ = [
    "Resumable",
    "load_strategy_state",
    "reidentify_nodes",
    "resume_from",
    "run_rounds",
    "strategy_state",
]


def run_rounds(
    strategy: FedGKT,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int = 3,
    timeout: float = 3600,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
) -> Result:
    """Run rounds ``completed_round + 1 .. num_rounds`` (see :meth:`Strategy.start`).

    The same loop as Flower's (train, evaluate, centralized evaluation), but
    it starts after the last completed round -- ``1`` unless :meth:`resume`
    loaded a checkpoint -- and writes a checkpoint at the end of every round
    when ``checkpoint_path`` is set, then hands the round to the strategy's
    ``on_round`` callback (:meth:`FedGKT.round_done`). A resumed run first
    finds the checkpointed nodes again (:meth:`reidentify_nodes`) and starts
    from the restored server model's weights instead of ``initial_arrays``.

    Parameters
    ----------
    strategy : FedGKT
        The strategy.
    grid : Grid
        The Grid used to send messages to and receive replies from the nodes.
    initial_arrays : ArrayRecord
        Initial server model weights (see :meth:`initial_arrays`); nodes
        never receive them, they are what ``evaluate_fn`` gets in round 0.
    num_rounds : int
        Total number of rounds, the resumed ones included; also sets the
        length of the learning-rate schedule.
    timeout : float
        Seconds to wait for the replies of each train / evaluate stage.
    train_config : ConfigRecord, optional
        Entries added to every train instruction, over the edge settings.
        If unset, an empty ConfigRecord is used.
    evaluate_config : ConfigRecord, optional
        Entries added to every evaluate instruction. If unset, an empty
        ConfigRecord is used.
    evaluate_fn : Callable[[int, ArrayRecord], MetricRecord | None], optional
        Centralized evaluation of the server model weights; called before
        the first round (not on a resumed run) and after each round.

    Returns
    -------
    Result
        The final server model weights and the train, evaluate and
        centralized-evaluation metrics of the rounds run by this call.
    """
    strategy.num_rounds = num_rounds
    strategy.run_start = time.perf_counter()
    log(INFO, "Starting %s strategy:", strategy.__class__.__name__)
    log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
    strategy.summary()
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    result = Result()
    arrays = initial_arrays
    first = strategy.completed_round + 1
    if first > 1:
        log(INFO, "FedGKT: resuming after round %d of %d", strategy.completed_round, num_rounds)
        arrays = ArrayRecord(strategy.server.model.state_dict())
        strategy.reidentify_nodes(grid, timeout)
    elif evaluate_fn and (res := evaluate_fn(0, initial_arrays)) is not None:
        result.evaluate_metrics_serverapp[0] = res
    for server_round in range(first, num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        replies = grid.send_and_receive(
            messages=strategy.configure_train(server_round, arrays, train_config, grid),
            timeout=timeout,
        )
        agg_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        del replies
        if agg_arrays is not None:
            result.arrays = arrays = agg_arrays
        if train_metrics is not None:
            result.train_metrics_clientapp[server_round] = train_metrics
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(server_round, arrays, evaluate_config, grid),
            timeout=timeout,
        )
        eval_metrics = strategy.aggregate_evaluate(server_round, replies)
        del replies
        if eval_metrics is not None:
            result.evaluate_metrics_clientapp[server_round] = eval_metrics
        if evaluate_fn and (res := evaluate_fn(server_round, arrays)) is not None:
            result.evaluate_metrics_serverapp[server_round] = res
        strategy.completed_round = server_round
        if strategy.checkpoint_path is not None:
            save_checkpoint(strategy.checkpoint_path, strategy.state_dict())
        strategy.round_done(server_round)
    log(INFO, "Strategy execution finished in %.2fs", time.perf_counter() - strategy.run_start)
    return result


def strategy_state(strategy: FedGKT) -> dict[str, Any]:
    """Return everything a resumed run needs.

    Parameters
    ----------
    strategy : FedGKT
        The strategy.

    Returns
    -------
    dict[str, Any]
        The last completed round, the server's state (model, optimizer,
        per-node server logits), the feature shape, the learning-rate
        schedule's position, the RNG states, the round and node histories
        and the nodes' ``node-uid`` (see :meth:`load_state_dict`). The
        stored features are not included: nodes send them again.
    """
    return {
        "format": 1,
        "round": strategy.completed_round,
        "num-rounds": strategy.num_rounds,
        "server": strategy.server.state_dict(),
        "feature-shape": list(strategy.spec.feature_shape) if strategy.spec.feature_shape else None,
        "scheduler": {
            "lr-schedule": strategy.lr_schedule,
            "round": strategy.completed_round,
            "num-rounds": strategy.num_rounds,
            "next-lr-factor": strategy.lr_factor(strategy.completed_round + 1),
            "plateau": strategy.plateau.state_dict() if strategy.plateau else None,
        },
        "rng": rng_state(),
        "history": strategy.history,
        "node-history": strategy.node_history,
        "node-uids": dict(strategy.node_uids),
        "node-tokens": dict(strategy.node_tokens),
    }


def load_strategy_state(strategy: FedGKT, state: dict[str, Any]) -> None:
    """Restore what :meth:`state_dict` returned.

    The feature store stays empty: every node is asked for its features
    again in its next train round.

    Parameters
    ----------
    strategy : FedGKT
        The strategy.
    state : dict[str, Any]
        A state returned by :meth:`state_dict` (e.g. read back by
        :func:`flwr_gkt.core.checkpoint.load_checkpoint`).

    Raises
    ------
    CheckpointError
        If the state has an unknown format or was written with another
        learning-rate schedule.
    """
    if state.get("format") != 1:
        raise CheckpointError(f"unknown checkpoint format {state.get('format')!r}")
    if state["scheduler"]["lr-schedule"] != strategy.lr_schedule:
        raise CheckpointError(
            f"checkpoint was written with lr-schedule "
            f"{state['scheduler']['lr-schedule']!r}, this run uses {strategy.lr_schedule!r}"
        )
    strategy.server.load_state_dict(state["server"])
    if strategy.plateau is not None and state["scheduler"].get("plateau"):
        strategy.plateau.load_state_dict(state["scheduler"]["plateau"])
    if state["feature-shape"] is not None:
        strategy.spec = replace(strategy.spec, feature_shape=tuple(state["feature-shape"]))
    set_rng_state(state["rng"])
    strategy.history = list(state["history"])
    strategy.node_history = list(state["node-history"])
    strategy.completed_round = int(state["round"])
    strategy.node_uids = {int(n): str(u) for n, u in state.get("node-uids", {}).items()}
    strategy.node_tokens = {int(n): str(t) for n, t in state.get("node-tokens", {}).items()}
    strategy.gate.uid_owner = {uid: node for node, uid in strategy.node_uids.items()}
    strategy.feature_round.clear()  # the store is empty: every node sends its features again


def reidentify_nodes(strategy: FedGKT, grid: Grid, timeout: float = 60.0) -> dict[int, int]:
    """Find the checkpointed nodes again under their current node ids.

    Node ids are not stable across restarts (a Ray simulation draws new
    ones; a SuperNode that re-registers may get a new one). Every connected
    node is asked for its ``node-uid`` (a ``query`` message, see
    :func:`flwr_gkt.flower.client_app.handle_query`); a node whose uid the
    checkpoint knows under another id takes over that id's per-node state
    (server logits ``Z_s``). Nodes that do not answer, and uids that are
    not unique, keep nothing.

    Parameters
    ----------
    strategy : FedGKT
        The strategy.
    grid : Grid
        The Grid used to list the connected nodes and query them.
    timeout : float
        Upper bound, in seconds, on each of the two waits: for
        ``min_available_nodes`` nodes to connect (otherwise at most
        ``max(node_wait_timeout, 60)``), and for the query replies
        (otherwise at most 60).

    Returns
    -------
    dict[int, int]
        ``{old node id: new node id}`` of the nodes found under a new id;
        empty when the checkpoint knows no ``node-uid``.
    """
    if not strategy.node_uids:
        return {}
    deadline = time.monotonic() + min(timeout, max(strategy.node_wait_timeout, 60.0))
    while (
        len(ids := sorted(grid.get_node_ids())) < strategy.min_available_nodes
        and time.monotonic() < deadline
    ):
        time.sleep(1.0)
    query = ConfigRecord({"query": NODE_UID})
    messages = [
        Message(RecordDict({CONFIG_KEY: query}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in ids
    ]
    found: dict[str, list[tuple[int, str | None]]] = {}
    for claim in strategy.gate.identities(
        grid.send_and_receive(messages, timeout=min(timeout, 60.0))
    ):
        found.setdefault(claim.uid, []).append((claim.node, claim.token))
    known: dict[str, list[int]] = {}
    for node, uid in strategy.node_uids.items():
        known.setdefault(uid, []).append(node)
    mapping, ambiguous, refused = {}, 0, 0
    for uid, olds in known.items():
        news = found.get(uid, [])
        if len(olds) == 1 and len(news) == 1:
            new, token = news[0]
            # a bare uid claim is not enough: the node must hold the token it was given
            if strategy.node_tokens.get(olds[0]) not in (None, token):
                refused += 1
                log(
                    WARNING,
                    "FedGKT: node %d claims node-uid %s without its token: it gets no state",
                    new,
                    uid,
                )
                continue
            mapping[olds[0]] = new
        elif news:
            ambiguous += 1
    moved = {old: new for old, new in mapping.items() if old != new}
    if moved:
        server = strategy.server
        server.logits = {moved.get(n, n): t for n, t in server.logits.items()}
        server.stored_round = {moved.get(n, n): r for n, r in server.stored_round.items()}
        strategy.node_uids = {moved.get(n, n): u for n, u in strategy.node_uids.items()}
        strategy.node_tokens = {moved.get(n, n): t for n, t in strategy.node_tokens.items()}
    strategy.gate.uid_owner = {uid: node for node, uid in strategy.node_uids.items()}
    log(
        INFO,
        "FedGKT: %d of %d checkpointed nodes found (%d under a new node id), %d uid(s) "
        "ambiguous, %d claim(s) without the node's token refused",
        len(mapping),
        len(strategy.node_uids),
        len(moved),
        ambiguous,
        refused,
    )
    return moved


def resume_from(strategy: FedGKT, path: str | Path | None = None) -> int:
    """Load the checkpoint at ``path`` and return its round.

    Call it before :meth:`start`, which then goes on after that round.

    Parameters
    ----------
    strategy : FedGKT
        The strategy.
    path : str or Path, optional
        The checkpoint file; defaults to ``checkpoint_path``.

    Returns
    -------
    int
        The last completed round of the checkpoint; ``0`` when there is
        none (or no path): the run starts from the beginning.

    Raises
    ------
    CheckpointError
        If the checkpoint cannot be read or does not fit this strategy
        (see :meth:`load_state_dict`).
    """
    path = Path(path) if path else strategy.checkpoint_path
    state = load_checkpoint(path) if path else None
    if state is None:
        log(INFO, "FedGKT: no checkpoint at %s, starting from round 1", path)
        return 0
    strategy.load_state_dict(state)
    log(
        INFO,
        "FedGKT: resumed from %s after round %d (%d nodes with server logits)",
        path,
        strategy.completed_round,
        len(strategy.server.logits),
    )
    return strategy.completed_round


class Resumable:
    """The run loop, checkpoint and resume methods of the FedGKT strategies.

    A mixin of :class:`~flwr_gkt.flower.strategy.FedGKT`: each method hands
    the strategy to the function of this module that does the work.
    """

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Result:
        """Run rounds ``completed_round + 1 .. num_rounds``.

        Takes :meth:`flwr.serverapp.strategy.Strategy.start`'s arguments
        (``num_rounds``, ``timeout``, ``train_config``, ``evaluate_config``,
        ``evaluate_fn``); see :func:`run_rounds`.
        """
        return run_rounds(cast("FedGKT", self), grid, initial_arrays, *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Return everything a resumed run needs (see :func:`strategy_state`)."""
        return strategy_state(cast("FedGKT", self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (see :func:`load_strategy_state`)."""
        load_strategy_state(cast("FedGKT", self), state)

    def reidentify_nodes(self, grid: Grid, timeout: float = 60.0) -> dict[int, int]:
        """Find the checkpointed nodes again (see :func:`reidentify_nodes`)."""
        return reidentify_nodes(cast("FedGKT", self), grid, timeout)

    def resume(self, path: str | Path | None = None) -> int:
        """Load the checkpoint at ``path``; return its round (see :func:`resume_from`)."""
        return resume_from(cast("FedGKT", self), path)
