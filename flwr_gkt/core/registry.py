"""Name -> builder registry for edge and server models.

Built-in names: edge ``resnet4``, ``resnet6``, ``resnet8``; server
``resnet55``, ``resnet109`` and any ``resnet<9n+1>`` (e.g. ``resnet10``,
``resnet19``) for smaller servers.

Users plug in their own pair either by calling :func:`register_edge_model` /
:func:`register_server_model` before the run starts, or from an installed
package through the ``flwr_gkt.core.models`` entry-point group: each entry point is
a zero-argument callable that performs the registrations, and is loaded the
first time a name is not found.

Builders take ``(num_classes, in_channels)``: for an edge model ``in_channels``
is the image channels; for a server model it is the feature-map channels.

Tier models (FedAgg / FedEEC: every tier classifies images, bridge samples
included) are a third table: ``cnn`` (end device), ``resnet10``, ``resnet18``
(torchvision ResNets with the ImageNet stem), plus any edge model (used whole)
-- :func:`register_tier_model`, :func:`build_tier_model`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

from torch import nn

from flwr_gkt.core import models
from flwr_gkt.core.models import EdgeModel

__all__ = [
    "EdgeBuilder",
    "ServerBuilder",
    "available_models",
    "build_edge_model",
    "build_full_model",
    "build_server_model",
    "build_tier_model",
    "register_edge_model",
    "register_server_model",
    "register_tier_model",
]

#: ``(num_classes, image_channels) -> EdgeModel``.
EdgeBuilder = Callable[[int, int], EdgeModel]
#: ``(num_classes, input_channels) -> nn.Module``: a server (feature-map channels) or tier
#: (image channels) model.
ServerBuilder = Callable[[int, int], nn.Module]

_EDGE: dict[str, EdgeBuilder] = {
    "resnet4": models.resnet4,
    "resnet6": models.resnet6,
    "resnet8": models.resnet8,
}
_SERVER: dict[str, ServerBuilder] = {
    "resnet55": models.server_resnet55,
    "resnet109": models.server_resnet109,
}
_TIER: dict[str, ServerBuilder] = {
    "cnn": models.tier_cnn,
    "resnet10": models.tier_resnet10,
    "resnet18": models.tier_resnet18,
}
_ENTRY_POINT_GROUP = "flwr_gkt.core.models"
_entry_points_loaded = False


def register_edge_model(name: str, builder: EdgeBuilder) -> None:
    """Register an edge model builder under ``name`` (overrides an existing one).

    ``name`` is what the run config refers to (e.g. ``edge-model = "my-cnn"``);
    ``builder(num_classes, image_channels)`` returns an ``EdgeModel``.
    """
    _EDGE[name] = builder


def register_server_model(name: str, builder: ServerBuilder) -> None:
    """Register a server model builder under ``name`` (overrides an existing one).

    ``builder(num_classes, in_channels)`` takes the channels of the edge
    feature maps.
    """
    _SERVER[name] = builder


def register_tier_model(name: str, builder: ServerBuilder) -> None:
    """Register an image classifier for a FedAgg tier under ``name`` (overrides one).

    ``builder(num_classes, image_channels)`` returns a model of images to logits.
    """
    _TIER[name] = builder


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=_ENTRY_POINT_GROUP):
        ep.load()()


def _lookup(
    table: Mapping[str, Callable[[int, int], nn.Module]], name: str, kind: str
) -> Callable[[int, int], nn.Module]:
    if name not in table:
        _load_entry_points()
    if name in table:
        return table[name]
    raise KeyError(f"unknown {kind} model {name!r}; known: {sorted(table)}")


def build_edge_model(name: str, num_classes: int, in_channels: int) -> EdgeModel:
    """Build the edge model registered as ``name``.

    An unknown name first loads the ``flwr_gkt.core.models`` entry points.
    ``in_channels`` is the image channels.

    Raises
    ------
    KeyError
        If no edge model is registered as ``name``.
    TypeError
        If the builder does not return an :class:`~flwr_gkt.core.models.EdgeModel`.
    """
    model = _lookup(_EDGE, name, "edge")(num_classes, in_channels)
    if not isinstance(model, EdgeModel):
        raise TypeError(
            f"edge builder {name!r} must return flwr_gkt.core.models.EdgeModel, "
            f"got {type(model).__name__}"
        )
    return model


def build_server_model(
    name: str, num_classes: int, in_channels: int = models.FEATURE_CHANNELS
) -> nn.Module:
    """Build the server model registered as ``name``.

    ``resnet<depth>`` with ``depth = 9n + 1`` builds a server ResNet of that
    depth even when not registered explicitly. ``in_channels`` is the
    channels of the edge feature maps the server model takes.

    Raises
    ------
    KeyError
        If ``name`` is neither registered nor of the form ``resnet<digits>``.
    ValueError
        If ``name`` is ``resnet<depth>`` with a depth that is not ``9n + 1``.
    """
    match = re.fullmatch(r"resnet(\d+)", name)
    if name not in _SERVER and match:
        return models.server_resnet(int(match.group(1)), num_classes, in_channels)
    return _lookup(_SERVER, name, "server")(num_classes, in_channels)


def build_tier_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build the tier model (image -> logits) registered as ``name``.

    A name that is not a tier model but an edge model builds that edge model
    whole (extractor and classifier). ``in_channels`` is the image channels.

    Raises
    ------
    KeyError
        If ``name`` is neither a tier model nor an edge model.
    """
    if name not in _TIER and name in _EDGE:
        return _EDGE[name](num_classes, in_channels)
    return _lookup(_TIER, name, "tier")(num_classes, in_channels)


def build_full_model(server_name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build the full model (edge stem + server body) that FedAvg trains on every node.

    Defined for the built-in server ResNets ``resnet<9n+1>``: the result is the
    :class:`~flwr_gkt.core.models.FullResNet` of depth ``9n+2`` (``resnet55``
    -> ResNet-56). ``in_channels`` is the image channels.

    Raises
    ------
    KeyError
        If ``server_name`` is not of the form ``resnet<digits>``.
    ValueError
        If its depth is not ``9n + 1``.
    """
    match = re.fullmatch(r"resnet(\d+)", server_name)
    if not match:
        raise KeyError(f"no full model known for server model {server_name!r}")
    return models.full_resnet(int(match.group(1)) + 1, num_classes, in_channels)


def available_models() -> dict[str, list[str]]:
    """Return the registered edge, server and tier model names.

    The ``flwr_gkt.core.models`` entry points are loaded first. The names
    are sorted, under the keys ``"edge"``, ``"server"`` and ``"tier"``; server
    names of the form ``resnet<9n+1>`` that are built on demand are not listed.
    """
    _load_entry_points()
    return {"edge": sorted(_EDGE), "server": sorted(_SERVER), "tier": sorted(_TIER)}
