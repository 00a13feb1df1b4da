"""The Flower layer of flwr-gkt.

Message API strategies, the legacy adapter, the node handlers of a ClientApp
and the fault-injecting Grid; the strategies' grouped settings
(:mod:`flwr_gkt.flower.options`) load on first use, as in the front door.

Every reply a node sends is read by :mod:`flwr_gkt.wire.gate` before a
strategy uses it; the training math is in :mod:`flwr_gkt.core`.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False

__all__ = ["AsyncOptions", "SamplingOptions", "ScheduleOptions", "TrustOptions", "WireOptions"]

if TYPE_CHECKING:
    from typing import Any

    from flwr_gkt.flower.options import (
        AsyncOptions,
        SamplingOptions,
        ScheduleOptions,
        TrustOptions,
        WireOptions,
    )

if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        """Import the options module on first use of one of its names (PEP 562)."""
        if name not in __all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return getattr(importlib.import_module("flwr_gkt.flower.options"), name)
