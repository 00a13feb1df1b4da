"""What a node's payload is once decoded: plain tensors and the checks' error.

Defined here, in the plain-PyTorch core, so that the server, the feature
store and the robust checks need nothing from Flower; :mod:`flwr_gkt.wire`
turns Flower records into these (and re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Payload", "PayloadError", "PayloadSpec"]


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


@dataclass
class Payload:
    """A decoded, validated payload (tensors on the CPU).

    Tensors may be read-only views of the message bytes: do not modify them
    in place.

    Parameters
    ----------
    features : Tensor
        Feature maps ``H`` (``N x C x H x W``, float32); empty in a
        logits-only payload.
    labels : Tensor
        Labels ``Y`` (``N``, int64); empty in a logits-only payload.
    logits : Tensor, optional
        Client logits ``Z_c`` (``N x num_classes``, float32); ``None`` in an
        evaluate reply.
    """

    features: Tensor
    labels: Tensor
    logits: Tensor | None = None

    def __len__(self) -> int:
        """Return the number of samples (labels); ``0`` for a logits-only payload."""
        return len(self.labels)

    @classmethod
    def logits_only(cls, logits: Tensor) -> Payload:
        """Build a replay-round payload: client logits for samples the server already holds.

        Parameters
        ----------
        logits : Tensor
            The client logits ``Z_c``, one row per stored sample.

        Returns
        -------
        Payload
            A payload with empty features and labels.
        """
        return cls(features=torch.empty(0), labels=torch.empty(0, dtype=torch.long), logits=logits)

    @property
    def has_features(self) -> bool:
        """Whether the payload carries feature maps (``False`` for :meth:`logits_only`)."""
        return self.features.dim() == 4
