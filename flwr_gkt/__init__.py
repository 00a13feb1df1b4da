"""flwr-gkt: Group Knowledge Transfer (FedGKT) as a Flower strategy plugin.

The names below, imported from ``flwr_gkt`` itself, are the stable API; the
modules they live in are not promised and may move::

    from flwr_gkt import FedGKT, GKTServer, handle_evaluate, handle_train

* FedGKT, server side: :class:`FedGKT` (the Message API strategy),
  :class:`AsyncFedGKT` (the server model trains as soon as any node's
  features arrive), :class:`GKTServer` (server model, feature store and
  training), :class:`EdgeRoundConfig` (the edge settings sent each round),
  and the strategies' grouped settings :class:`SamplingOptions`,
  :class:`WireOptions`, :class:`TrustOptions`, :class:`ScheduleOptions` and
  :class:`AsyncOptions`;
* FedGKT, node side: :func:`handle_train`, :func:`handle_evaluate` and
  :func:`handle_query` (the ClientApp handlers) over a node's
  :class:`ClientData` (in-memory tensors) or :class:`DatasetData` (its own
  torch or Hugging Face dataset, streamed in batches); :func:`client_data`
  and :func:`load_dataset` read the built-in datasets from local files;
* models: :class:`EdgeModel` (extractor + classifier),
  :func:`build_edge_model` / :func:`build_server_model` /
  :func:`build_tier_model` and :func:`register_edge_model` /
  :func:`register_server_model` / :func:`register_tier_model` (the name
  registry), :func:`available_models`;
* configuration: :class:`RunConfig`, :func:`resolve_config`,
  :func:`bf16_supported` (what ``precision: auto`` decides on);
* FedAgg / FedEEC on an end-edge-cloud tree: :class:`FedAgg` and
  :func:`handle_fedagg`;
* split learning and SplitFed: :class:`SplitLearning`,
  :func:`handle_split_train` and :func:`handle_split_evaluate`;
* the legacy Strategy API: :class:`FedGKTLegacy` and :class:`GKTNumPyClient`.

``import flwr_gkt`` is cheap: each name imports its module (and torch,
Flower) on first use.
"""

from __future__ import annotations

import importlib

#: ``typing.TYPE_CHECKING`` without importing :mod:`typing` (most of this module's
#: import time); type checkers treat any ``TYPE_CHECKING`` as true.
TYPE_CHECKING = False

__version__ = "0.1.0"

#: Public name -> the module that defines it (an implementation detail).
_EXPORTS: dict[str, str] = {
    "FedGKT": "flwr_gkt.flower.strategy",
    "AsyncFedGKT": "flwr_gkt.flower.async_strategy",
    "GKTServer": "flwr_gkt.core.server",
    "EdgeRoundConfig": "flwr_gkt.core.edge",
    "SamplingOptions": "flwr_gkt.flower.options",
    "WireOptions": "flwr_gkt.flower.options",
    "TrustOptions": "flwr_gkt.flower.options",
    "ScheduleOptions": "flwr_gkt.flower.options",
    "AsyncOptions": "flwr_gkt.flower.options",
    "handle_train": "flwr_gkt.flower.client_app",
    "handle_evaluate": "flwr_gkt.flower.client_app",
    "handle_query": "flwr_gkt.flower.client_app",
    "ClientData": "flwr_gkt.data",
    "client_data": "flwr_gkt.data",
    "load_dataset": "flwr_gkt.data",
    "DatasetData": "flwr_gkt.data.streaming",
    "EdgeModel": "flwr_gkt.core.models",
    "available_models": "flwr_gkt.core.registry",
    "build_edge_model": "flwr_gkt.core.registry",
    "build_server_model": "flwr_gkt.core.registry",
    "build_tier_model": "flwr_gkt.core.registry",
    "register_edge_model": "flwr_gkt.core.registry",
    "register_server_model": "flwr_gkt.core.registry",
    "register_tier_model": "flwr_gkt.core.registry",
    "RunConfig": "flwr_gkt.config",
    "resolve_config": "flwr_gkt.config",
    "bf16_supported": "flwr_gkt.core.training",
    "FedAgg": "flwr_gkt.flower.fedagg_strategy",
    "handle_fedagg": "flwr_gkt.flower.fedagg_client",
    "SplitLearning": "flwr_gkt.flower.split_strategy",
    "handle_split_train": "flwr_gkt.flower.split_client",
    "handle_split_evaluate": "flwr_gkt.flower.split_client",
    "FedGKTLegacy": "flwr_gkt.flower.legacy",
    "GKTNumPyClient": "flwr_gkt.flower.legacy",
}

__all__ = [
    "AsyncFedGKT",
    "AsyncOptions",
    "ClientData",
    "DatasetData",
    "EdgeModel",
    "EdgeRoundConfig",
    "FedAgg",
    "FedGKT",
    "FedGKTLegacy",
    "GKTNumPyClient",
    "GKTServer",
    "RunConfig",
    "SamplingOptions",
    "ScheduleOptions",
    "SplitLearning",
    "TrustOptions",
    "WireOptions",
    "__version__",
    "available_models",
    "bf16_supported",
    "build_edge_model",
    "build_server_model",
    "build_tier_model",
    "client_data",
    "handle_evaluate",
    "handle_fedagg",
    "handle_query",
    "handle_split_evaluate",
    "handle_split_train",
    "handle_train",
    "load_dataset",
    "register_edge_model",
    "register_server_model",
    "register_tier_model",
    "resolve_config",
]

if TYPE_CHECKING:
    from typing import Any

    from flwr_gkt.config import RunConfig, resolve_config
    from flwr_gkt.core.edge import EdgeRoundConfig
    from flwr_gkt.core.models import EdgeModel
    from flwr_gkt.core.registry import (
        available_models,
        build_edge_model,
        build_server_model,
        build_tier_model,
        register_edge_model,
        register_server_model,
        register_tier_model,
    )
    from flwr_gkt.core.server import GKTServer
    from flwr_gkt.core.training import bf16_supported
    from flwr_gkt.data import ClientData, client_data, load_dataset
    from flwr_gkt.data.streaming import DatasetData
    from flwr_gkt.flower.async_strategy import AsyncFedGKT
    from flwr_gkt.flower.client_app import handle_evaluate, handle_query, handle_train
    from flwr_gkt.flower.fedagg_client import handle_fedagg
    from flwr_gkt.flower.fedagg_strategy import FedAgg
    from flwr_gkt.flower.legacy import FedGKTLegacy, GKTNumPyClient
    from flwr_gkt.flower.options import (
        AsyncOptions,
        SamplingOptions,
        ScheduleOptions,
        TrustOptions,
        WireOptions,
    )
    from flwr_gkt.flower.split_client import handle_split_evaluate, handle_split_train
    from flwr_gkt.flower.split_strategy import SplitLearning
    from flwr_gkt.flower.strategy import FedGKT


if not TYPE_CHECKING:  # type checkers see the imports above; an unknown name is an error

    def __getattr__(name: str) -> Any:
        """Import a public name's module on first use (PEP 562)."""
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip this function
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
