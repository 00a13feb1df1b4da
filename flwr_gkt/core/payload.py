"""What a node's payload is once decoded: plain tensors and the checks' error.

Defined here, in the plain-PyTorch core, so that the server, the feature
store and the robust checks need nothing from Flower; :mod:`flwr_gkt.wire`
turns Flower records into these (and re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Features",
    "Payload",
    "PayloadError",
    "PayloadSpec",
    "QuantizedBatch",
    "chunk_rows",
    "dequantize",
    "to_dense",
]

#: Bytes of temporary memory a whole-payload pass (checks, statistics, quantization)
#: may use at a time.
CHUNK_BYTES = 16 * 1024 * 1024


def chunk_rows(row_shape: tuple[int, ...] | torch.Size, itemsize: int = 8) -> int:
    """Rows of ``row_shape`` per chunk of a pass over a payload that converts them.

    A fixed number of rows is not a bound: 4,096 rows of 16x28x28 maps are
    411 MB in float64. This keeps each chunk's temporary near
    :data:`CHUNK_BYTES`, whatever the feature-map size; ``itemsize`` is the
    bytes per element of the pass's widest temporary (8: float64). At least 1.
    """
    numel = 1
    for d in row_shape:
        numel *= int(d)
    return max(1, CHUNK_BYTES // max(1, numel * itemsize))


class PayloadError(ValueError):
    """A payload failed validation; the message says why in one line."""


@dataclass(frozen=True)
class PayloadSpec:
    """What a valid payload looks like.

    Parameters
    ----------
    num_classes : int
        Number of classes: logits have this many columns, labels are below it.
    feature_shape : tuple[int, ...], optional
        Expected ``(C, H, W)`` of one feature map; ``None`` accepts any 3-D map.
    max_samples : int, optional
        Largest number of samples one payload may carry.
    """

    num_classes: int
    feature_shape: tuple[int, ...] | None = None
    max_samples: int | None = None


def dequantize(q: Tensor, minimum: Tensor, scale: Tensor) -> Tensor:
    """Invert the wire's per-channel int8 codec: ``(q + 128) * scale + minimum``, float32.

    Runs wherever ``q`` is (on the training device for a batch), in the same
    float32 operations as :func:`flwr_gkt.wire.dequantize_int8`, keeping
    ``q``'s memory format. ``q`` is ``N x C x H x W``; ``minimum`` and
    ``scale`` are ``(C,)`` for one node's maps, or ``(N, C)`` (one row per
    map, for a batch mixing nodes).
    """
    shape = (*minimum.shape, 1, 1) if minimum.dim() == 2 else (1, -1, 1, 1)
    return (q.float() + 128.0) * scale.reshape(shape) + minimum.reshape(shape)


@dataclass
class QuantizedBatch:
    """A batch of int8 feature maps with each map's codec parameters.

    The feature store yields these for int8-stored features so that they are
    dequantised on the training device
    (:func:`flwr_gkt.core.training.to_device`), not in host memory.

    Parameters
    ----------
    q : Tensor
        int8 feature maps ``B x C x H x W``.
    minimum, scale : Tensor
        ``B x C`` float32: the parameters of each map's node.
    """

    q: Tensor
    minimum: Tensor
    scale: Tensor

    def __len__(self) -> int:
        """Return the number of feature maps."""
        return len(self.q)


#: A batch of feature maps as the store yields it: float32 / float16, or int8 with parameters.
Features = Tensor | QuantizedBatch


def to_dense(features: Tensor, minimum: Tensor | None, scale: Tensor | None) -> Tensor:
    """Return feature maps as float32: dequantised (int8 with parameters) or upcast (float16).

    ``minimum`` / ``scale`` are the int8 codec's per-channel parameters
    (``None`` for float maps); float32 ``features`` are returned themselves.
    """
    if minimum is not None and scale is not None:
        return dequantize(features, minimum, scale)
    return features.float()


@dataclass
class Payload:
    """A decoded, validated payload (tensors on the CPU).

    Tensors may be read-only views of the message bytes: do not modify them
    in place. Features stay in their wire dtype (float32, float16, or int8
    with the codec's per-channel ``feature_min`` / ``feature_scale``): the
    server stores them so and converts a batch at a time.

    Parameters
    ----------
    features : Tensor
        Feature maps ``H`` (``N x C x H x W``); empty in a logits-only payload.
    labels : Tensor
        Labels ``Y`` (``N``, int64); empty in a logits-only payload.
    logits : Tensor, optional
        Client logits ``Z_c`` (``N x num_classes``, float32); ``None`` in an
        evaluate reply.
    feature_min, feature_scale : Tensor, optional
        int8 features: the codec's per-channel minimum and scale (``(C,)``,
        float32); ``None`` for float features.
    """

    features: Tensor
    labels: Tensor
    logits: Tensor | None = None
    feature_min: Tensor | None = None
    feature_scale: Tensor | None = None

    def dense_features(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Return feature rows ``start:stop`` (default: all) as float32 (see :func:`to_dense`)."""
        return to_dense(self.features[start:stop], self.feature_min, self.feature_scale)

    def __len__(self) -> int:
        """Return the number of samples (labels); ``0`` for a logits-only payload."""
        return len(self.labels)

    @classmethod
    def logits_only(cls, logits: Tensor) -> Payload:
        """Build a replay-round payload: client logits for samples the server already holds.

        ``logits`` has one row per stored sample; features and labels are empty.
        """
        return cls(features=torch.empty(0), labels=torch.empty(0, dtype=torch.long), logits=logits)

    @property
    def has_features(self) -> bool:
        """Whether the payload carries feature maps (``False`` for :meth:`logits_only`)."""
        return self.features.dim() == 4
