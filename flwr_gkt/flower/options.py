"""The settings of :class:`~flwr_gkt.flower.strategy.FedGKT`, grouped by concern.

Each group is a frozen dataclass with defaults, so a strategy takes only what
it changes, e.g. ``FedGKT(server, 10, sampling=SamplingOptions(min_available_nodes=1))``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr_gkt.core.training import Plateau
from flwr_gkt.wire import MAX_ABS_VALUE

__all__ = ["AsyncOptions", "SamplingOptions", "ScheduleOptions", "TrustOptions", "WireOptions"]


@dataclass(frozen=True)
class SamplingOptions:
    """Which nodes a round asks, as in Flower's ``FedAvg``.

    Parameters
    ----------
    fraction_train, fraction_evaluate : float
        Fraction of connected nodes sampled for training / evaluation.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        Lower bounds for sampling.
    node_wait_timeout : float
        Seconds to wait for ``min_available_nodes`` before a round goes on with
        the connected nodes (``0``: forever, Flower's behaviour).
    """

    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    node_wait_timeout: float = 0.0


@dataclass(frozen=True)
class WireOptions:
    """What travels, and how large it may be.

    Parameters
    ----------
    feature_dtype, logit_dtype : str
        Wire codecs (:mod:`flwr_gkt.wire`): features ``float32``, ``float16``,
        ``int8`` or ``auto`` (each reply float16 when that moves no value by
        more than 2^-25, float32 otherwise:
        :func:`~flwr_gkt.wire.resolve_feature_dtype`); logits ``float32`` or
        ``float16`` (both directions).
    max_payload_bytes : int, optional
        Largest reply (all records); larger ones are rejected undecoded.
    max_samples : int, optional
        Largest number of samples one reply may carry.
    """

    feature_dtype: str = "float32"
    logit_dtype: str = "float32"
    max_payload_bytes: int | None = None
    max_samples: int | None = None


@dataclass(frozen=True)
class TrustOptions:
    """How far the server trusts what the nodes send (:mod:`flwr_gkt.wire.gate`).

    Parameters
    ----------
    outlier_threshold : float
        Robust deviations from the median beyond which a payload is rejected
        (:mod:`flwr_gkt.core.robust`); ``0``: off.
    logit_clip : float
        Client logits are clipped to ``[-logit_clip, logit_clip]`` (``0``: off).
    max_abs_value : float
        Largest magnitude a received value may have.
    min_train_replies : int
        Fewest accepted train replies for the server model to train in a round
        (otherwise the previous server logits stay in place).
    store_max_age : int
        Rounds a node's stored features stay in use without a fresh reply
        (``0``: forever).
    """

    outlier_threshold: float = 10.0
    logit_clip: float = 0.0
    max_abs_value: float = MAX_ABS_VALUE
    min_train_replies: int = 1
    store_max_age: int = 0


@dataclass(frozen=True)
class ScheduleOptions:
    """The learning-rate schedule of the server and the edges.

    Parameters
    ----------
    lr_schedule : str
        ``constant``, ``cosine`` (per-round multiplier of the server and edge
        learning rates, :func:`flwr_gkt.core.training.lr_factor`) or ``plateau``
        (the reference's: the server's is cut by ``plateau`` when the test
        accuracy stops improving).
    plateau : Plateau, optional
        The plateau schedule (default: PyTorch's factor 0.1, patience 10).
    """

    lr_schedule: str = "constant"
    plateau: Plateau | None = None


@dataclass(frozen=True)
class AsyncOptions:
    """The settings of :class:`~flwr_gkt.flower.async_strategy.AsyncFedGKT`.

    Parameters
    ----------
    max_staleness : int or None
        Largest accepted staleness (server updates made between sending a
        node its instruction and handling its reply); staler replies are
        rejected and the node gets a fresh instruction. ``None``: no bound.
    update_scope : str
        What one server update trains on: ``"store"`` (``E_s`` passes of
        ``n_k`` samples drawn from every node's stored features) or ``"node"``
        (``E_s`` epochs on the replying node's features only).
    max_node_failures : int
        A node whose replies are rejected this many times in a row (node error
        or invalid payload) is dropped from the run.
    poll_interval : float
        Seconds to sleep between two polls of the Grid that brought nothing.

    Raises
    ------
    ValueError
        If ``update_scope`` is unknown, ``max_staleness`` negative or
        ``max_node_failures`` below 1.
    """

    max_staleness: int | None = 4
    update_scope: str = "store"
    max_node_failures: int = 3
    poll_interval: float = 0.1

    def __post_init__(self) -> None:
        if self.update_scope not in ("store", "node"):
            raise ValueError(f"update_scope must be 'store' or 'node', got {self.update_scope!r}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {self.max_staleness}")
        if self.max_node_failures < 1:
            raise ValueError(f"max_node_failures must be >= 1, got {self.max_node_failures}")
