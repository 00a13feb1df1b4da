"""Helpers of the FedGKT strategies, kept out of the classes (as Flower's ``strategy_utils``).

Node sampling with a bounded wait, the round callback, progress notes, the
edge side of a train round's row, the edge settings record and
:func:`send_wave`, one wave of messages with its replies.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, TypeAlias

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from flwr_gkt.core.edge import EdgeRoundConfig
from flwr_gkt.wire import scalar, settings_record

__all__ = [
    "MB",
    "RoundCallback",
    "call_on_round",
    "edge_config_record",
    "edge_train_metrics",
    "progress",
    "sample_connected",
    "sample_trained",
    "send_wave",
]

#: Bytes in a megabyte, as the rows and log lines count them.
MB = 1024 * 1024

#: Called once per completed round with the round's history row (a line of
#: ``metrics.csv``) and the round's node-history records (lines of
#: ``nodes.csv``; empty for strategies that keep none), e.g.
#: :class:`flwr_gkt.flower.tensorboard.TensorBoardWriter`.
RoundCallback: TypeAlias = Callable[[Mapping[str, float], Sequence[Mapping[str, Any]]], None]


def call_on_round(
    on_round: RoundCallback | None,
    history: Sequence[Mapping[str, float]],
    node_history: Sequence[Mapping[str, Any]],
    server_round: int,
) -> None:
    """Hand round ``server_round``'s history row and node records to ``on_round``.

    Nothing happens without a callback or without a row of that round. The
    callback is a side channel: an exception it raises is logged as a
    warning and the run goes on.

    Parameters
    ----------
    on_round : RoundCallback | None
        The callback.
    history : Sequence[Mapping[str, float]]
        The strategy's per-round rows (the round's is looked up from the end).
    node_history : Sequence[Mapping[str, Any]]
        The strategy's node records; those with ``round == server_round`` are passed.
    server_round : int
        The completed round.
    """
    if on_round is None:
        return
    row = next((r for r in reversed(history) if r.get("round") == server_round), None)
    if row is None:
        return
    records = [r for r in node_history if r.get("round") == server_round]
    try:
        on_round(row, records)
    except Exception as error:  # a metrics sink must not end a training run
        log(WARNING, "round %d: the round callback failed: %r", server_round, error)


def progress(server_round: int, num_rounds: int, elapsed: float) -> str:
    """Format a progress note for long runs.

    Parameters
    ----------
    server_round : int
        The round that just ended.
    num_rounds : int
        Total number of rounds; ``0`` or less when unknown (no estimate of the
        time left is given then).
    elapsed : float
        Seconds since the run started.

    Returns
    -------
    str
        For example ``"round 3/10, 42s elapsed, ~98s left"``; the time left is
        extrapolated from the mean time per round so far.
    """
    if num_rounds <= 0:
        return f"round {server_round}, {elapsed:.0f}s elapsed"
    left = elapsed / max(server_round, 1) * max(num_rounds - server_round, 0)
    return f"round {server_round}/{num_rounds}, {elapsed:.0f}s elapsed, ~{left:.0f}s left"


def edge_train_metrics(replies: Iterable[tuple[float, Mapping[str, Any]]]) -> dict[str, float]:
    """Summarise the edge side of a round's train replies.

    Parameters
    ----------
    replies : Iterable[tuple[float, Mapping[str, Any]]]
        ``(num_examples, metrics)`` of each accepted reply.

    Returns
    -------
    dict[str, float]
        ``edge-train-loss`` / ``edge-train-accuracy`` weighted by the examples
        (absent when no examples were reported), ``edge-seconds-max`` and
        ``edge-seconds-mean``.
    """
    replies = list(replies)
    row: dict[str, float] = {}
    n_edge = sum(size for size, _ in replies)
    for key in ("edge-train-loss", "edge-train-accuracy"):
        if n_edge:
            row[key] = sum(scalar(m, key) * size for size, m in replies if key in m) / n_edge
    seconds = [scalar(m, "edge-seconds", 0.0) for _, m in replies]
    row["edge-seconds-max"] = max(seconds, default=0.0)
    row["edge-seconds-mean"] = sum(seconds) / max(len(seconds), 1)
    return row


def edge_config_record(cfg: EdgeRoundConfig, **extra: Any) -> ConfigRecord:
    """Build the ConfigRecord of edge settings sent with each train instruction.

    Parameters
    ----------
    cfg : EdgeRoundConfig
        The edge settings; each field ``a_b`` becomes the key ``a-b`` and the
        KD mode is sent as its string value.
    **extra : Any
        Further entries, added as given (they override the settings' keys).

    Returns
    -------
    ConfigRecord
        The record sent to the nodes.
    """
    return settings_record(cfg, **extra)


def sample_connected(
    grid: Grid, fraction: float, min_nodes: int, min_available: int, wait_timeout: float
) -> list[int]:
    """Sample ``fraction`` of the connected nodes (at least ``min_nodes``), sorted.

    Waits for ``min_available`` connected nodes as Flower's ``sample_nodes``
    does, but with ``wait_timeout`` > 0 only that long: then it goes on with
    the nodes that are connected (at least one), with a warning.

    Parameters
    ----------
    grid : Grid
        The Grid to list and sample the nodes.
    fraction : float
        Share of the connected nodes to sample (``0``: none).
    min_nodes : int
        Fewest nodes to sample.
    min_available : int
        Connected nodes to wait for.
    wait_timeout : float
        Seconds to wait for them (``0``: forever).

    Returns
    -------
    list[int]
        The sampled node ids.
    """
    if fraction == 0.0:
        return []
    wanted = min_available
    if wait_timeout > 0:
        deadline = time.monotonic() + wait_timeout
        while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            time.sleep(min(1.0, wait_timeout))
        connected = len(list(grid.get_node_ids()))
        if connected < wanted:
            log(
                WARNING,
                "FedGKT: %d node(s) connected after %.0fs, fewer than the %d wanted; "
                "going on with them",
                connected,
                wait_timeout,
                wanted,
            )
            wanted = max(connected, 1)
            min_nodes = min(min_nodes, wanted)
    num_nodes = int(len(list(grid.get_node_ids())) * fraction)
    node_ids, _ = sample_nodes(grid, wanted, max(num_nodes, min_nodes))
    return sorted(node_ids)


def sample_trained(
    connected: list[int], trained: list[int], fraction: float, min_nodes: int, rng: random.Random
) -> list[int]:
    """Sample ``fraction`` of the ``trained`` nodes (at least ``min_nodes``), sorted.

    The connected nodes that have not trained are left out with one log line:
    their edge extractor would send features of an untrained model.

    Parameters
    ----------
    connected : list[int]
        The connected nodes.
    trained : list[int]
        Those of them whose edge model has trained.
    fraction : float
        Share of ``trained`` to sample.
    min_nodes : int
        Fewest nodes to sample (all of ``trained`` when it has fewer).
    rng : random.Random
        The sampling generator.

    Returns
    -------
    list[int]
        The sampled node ids.
    """
    if len(trained) < len(connected):
        log(
            INFO,
            "FedGKT: %d connected node(s) not evaluated: their edge model has not trained yet",
            len(connected) - len(trained),
        )
    want = max(int(len(trained) * fraction), min_nodes)
    if want >= len(trained):
        return trained
    return sorted(rng.sample(trained, want))


def send_wave(
    grid: Grid, messages: list[Message], timeout: float, poll_interval: float | None = None
) -> list[Message]:
    """Push one wave of messages and pull its replies until all are in or ``timeout`` passes.

    Parameters
    ----------
    grid : Grid
        The Flower grid.
    messages : list[Message]
        The wave.
    timeout : float
        Seconds to wait for the replies.
    poll_interval : float, optional
        Seconds between pulls while replies are outstanding (doubling up to
        1 s while nothing arrives); ``None``: ``Grid.send_and_receive``, whose
        deployment Grid sleeps 3 s between pulls.

    Returns
    -------
    list[Message]
        The replies, in arrival order.
    """
    if poll_interval is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    delay = poll_interval
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        if got:
            delay = poll_interval
        else:
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
    return replies
