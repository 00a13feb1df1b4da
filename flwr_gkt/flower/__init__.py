"""The Flower layer of flwr-gkt.

Message API strategies, the legacy adapter, the node handlers of a ClientApp
and the fault-injecting Grid.

Every reply a node sends is read by :mod:`flwr_gkt.wire.gate` before a
strategy uses it; the training math is in :mod:`flwr_gkt.core`.
"""

from flwr_gkt.flower.options import (
    AsyncOptions,
    SamplingOptions,
    ScheduleOptions,
    TrustOptions,
    WireOptions,
)

__all__ = ["AsyncOptions", "SamplingOptions", "ScheduleOptions", "TrustOptions", "WireOptions"]
