"""The split-learning messages: activations, gradients and edge weights.

Split learning (:mod:`flwr_gkt.flower.split_strategy`), per mini-batch:
the node's activations ``RecordDict{"gkt": ArrayRecord{"features", "labels"},
"metrics": ...}`` (:func:`encode_activations`, the feature codecs), the
server's gradient ``RecordDict{"config": ..., "gkt": ArrayRecord{"gradient"}}``
(:func:`encode_gradient`, float32 or float16) and the edge weights relayed
through the server (:func:`encode_state` / :func:`decode_state`, checked
against the receiving model).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import Tensor

from flwr_gkt.core.payload import Payload, PayloadError, PayloadSpec
from flwr_gkt.core.split import state_change
from flwr_gkt.wire.codecs import to_numpy, to_tensor
from flwr_gkt.wire.gkt import decode_payload, encode_payload
from flwr_gkt.wire.keys import GRADIENT_DTYPES
from flwr_gkt.wire.validate import MAX_ABS_VALUE, all_within, array_record, load_array

__all__ = [
    "decode_activations",
    "decode_gradient",
    "decode_state",
    "encode_activations",
    "encode_gradient",
    "encode_state",
]


def encode_activations(
    activations: Tensor | np.ndarray, labels: Tensor | np.ndarray, dtype: str = "float32"
) -> ArrayRecord:
    """Encode one batch's activations ``H`` and labels (split learning, node -> server).

    The same arrays and codecs as a FedGKT payload's features and labels
    (``features``, ``labels``; int8 with ``feature-min`` / ``feature-scale``),
    so that :func:`decode_activations` validates them as the gate validates
    every payload. ``dtype`` is ``float32``, ``float16`` or ``int8`` (see
    :func:`encode_payload`).

    Raises
    ------
    ValueError
        If ``dtype`` is not one of :data:`~flwr_gkt.wire.keys.FEATURE_DTYPES`.
    """
    return encode_payload(activations, labels, feature_dtype=dtype)


def decode_activations(content: RecordDict, spec: PayloadSpec) -> Payload:
    """Decode and validate one batch's activations (a split-learning reply).

    ``spec`` gives the classes, the extractor's output shape and the batch
    size (``max_samples``); the activations keep their wire dtype.

    Raises
    ------
    PayloadError
        As :func:`decode_payload` (no logits expected), or if the reply
        carries logits or model weights too.
    """
    record = array_record(content)
    extra = sorted(set(record) - {"features", "labels", "feature-min", "feature-scale"})
    if extra:
        raise PayloadError(f"unexpected arrays {extra} with the activations")
    return decode_payload(content, spec, with_logits=False)


def encode_gradient(gradient: Tensor | np.ndarray, dtype: str = "float32") -> ArrayRecord:
    """Encode the activations' gradient ``dL/dH`` (split learning, server -> node).

    The gradient (shaped like the activations it answers) goes under
    ``gradient``, as ``float32`` or ``float16``.

    Raises
    ------
    ValueError
        If ``dtype`` is not one of :data:`GRADIENT_DTYPES`.
    """
    if dtype not in GRADIENT_DTYPES:
        raise ValueError(f"gradient dtype {dtype!r} not in {GRADIENT_DTYPES}")
    return ArrayRecord({"gradient": Array(np.ascontiguousarray(to_numpy(gradient).astype(dtype)))})


def decode_gradient(
    content: RecordDict, shape: tuple[int, ...], max_abs: float = MAX_ABS_VALUE
) -> Tensor:
    """Decode and validate, as float32, the gradient a node received for its last activations.

    ``shape`` is that of the activations; ``max_abs`` the largest accepted
    absolute value (the gate's bound on what nodes send, applied to what
    they receive).

    Raises
    ------
    PayloadError
        If it is missing, has another dtype or shape, or values that are
        non-finite or beyond ``max_abs``.
    """
    value = load_array(array_record(content), "gradient", GRADIENT_DTYPES)
    if tuple(value.shape) != tuple(shape):
        raise PayloadError(f"'gradient' has shape {list(value.shape)}, expected {list(shape)}")
    if not all_within(value, max_abs):
        raise PayloadError(f"'gradient' contains NaN or Inf, or values beyond +-{max_abs:g}")
    return to_tensor(value.astype(np.float32, copy=True))


def encode_state(state: Mapping[str, Tensor]) -> ArrayRecord:
    """Encode a state dict for split learning's edge relay: one array per entry, own dtypes."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state.items()})


def decode_state(
    record: ArrayRecord, reference: Mapping[str, Tensor], max_change: float | None = None
) -> dict[str, Tensor]:
    """Decode and validate model weights against the model they are meant for.

    Parameters
    ----------
    record : ArrayRecord
        The encoded weights (:func:`encode_state`).
    reference : Mapping[str, Tensor]
        A state dict of the receiving model: the keys, dtypes and shapes the
        weights must have (and get).
    max_change : float, optional
        Largest accepted change from ``reference`` (its values: the weights
        the sender started from), relative to their size:
        ``||state - reference|| <= max_change * max(||reference||, 1)`` over
        all float entries (:func:`flwr_gkt.core.split.state_change`).
        ``None``: not checked.

    Raises
    ------
    PayloadError
        If a key is missing or extra, a dtype or shape differs, a float
        value is not finite, or the weights moved further than ``max_change``.
    """
    missing = [k for k in reference if k not in record]
    extra = [k for k in record if k not in reference]
    if missing or extra:
        raise PayloadError(
            f"weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    out = {}
    for key, ref in reference.items():
        value = load_array(record, key, (str(ref.dtype).removeprefix("torch."),))
        if tuple(value.shape) != tuple(ref.shape):
            raise PayloadError(f"'{key}' has shape {list(value.shape)}, expected {list(ref.shape)}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise PayloadError(f"'{key}' contains NaN or Inf")
        out[key] = torch.from_numpy(np.array(value))  # writable copy: loaded into a model
    if max_change is not None:
        change, size = state_change(out, reference)
        if change > max_change * max(size, 1.0):
            raise PayloadError(
                f"weights moved by {change:.4g} from the {size:.4g} they started from, "
                f"more than {max_change:g} x max(that, 1)"
            )
    return out
