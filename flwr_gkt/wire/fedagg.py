"""The FedAgg messages: bridge-sample embeddings and named logits.

FedAgg embeddings upload (end device -> cloud, once): ``RecordDict{"gkt":
ArrayRecord{"embeddings", "labels"}, "metrics": ...}``
(:func:`encode_embeddings` / :func:`decode_embeddings`); afterwards parents
and children exchange logits only (``encode_named_logits`` / ``decode_named_logits``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from torch import Tensor

from flwr_gkt.core.payload import PayloadError
from flwr_gkt.wire.codecs import to_numpy, to_tensor
from flwr_gkt.wire.keys import LABEL_DTYPES, LOGIT_DTYPES, NUM_EXAMPLES
from flwr_gkt.wire.validate import (
    all_finite,
    array_record,
    load_array,
    read_num_examples,
    validate_server_logits,
)

__all__ = [
    "decode_embeddings",
    "decode_named_logits",
    "encode_embeddings",
    "encode_named_logits",
]


def encode_embeddings(embeddings: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> ArrayRecord:
    """Encode bridge-sample embeddings ``N x 4 x h x w`` (float32) and labels (int64), sent once."""
    return ArrayRecord(
        {
            "embeddings": Array(np.ascontiguousarray(to_numpy(embeddings).astype(np.float32))),
            "labels": Array(np.ascontiguousarray(to_numpy(labels).astype(np.int64))),
        }
    )


def decode_embeddings(
    content: RecordDict, num_classes: int, channels: int = 4, max_samples: int | None = None
) -> tuple[Tensor, Tensor]:
    """Decode and validate an embeddings upload.

    Checks dtypes, an ``N x channels x h x w`` shape, finite values, labels in
    ``[0, num_classes)``, ``N`` against ``num-examples`` and ``max_samples``;
    returns float32 embeddings and int64 labels.

    Raises
    ------
    PayloadError
        If any check fails.
    """
    record = array_record(content)
    num_examples = read_num_examples(content)
    eps = load_array(record, "embeddings", ("float32",))
    labels = load_array(record, "labels", LABEL_DTYPES)
    if eps.ndim != 4 or eps.shape[1] != channels:
        raise PayloadError(
            f"'embeddings' must be N x {channels} x h x w, got shape {list(eps.shape)}"
        )
    n = eps.shape[0]
    if n == 0:
        raise PayloadError("payload has no samples")
    if max_samples is not None and n > max_samples:
        raise PayloadError(f"payload has {n} samples, more than the limit {max_samples}")
    if labels.shape != (n,):
        raise PayloadError(
            f"'labels' has shape {list(labels.shape)}, expected [{n}] (count mismatch)"
        )
    if num_examples != n:
        raise PayloadError(f"'{NUM_EXAMPLES}' says {num_examples} but the payload has {n} samples")
    if not all_finite(eps):  # as features: chunked, no array-sized temporary
        raise PayloadError("'embeddings' contain NaN or Inf")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise PayloadError(
            f"'labels' outside [0, {num_classes}): min {labels.min()}, max {labels.max()}"
        )
    return to_tensor(eps), to_tensor(labels)


def encode_named_logits(
    logits: Mapping[str, Tensor | np.ndarray], logit_dtype: str = "float32"
) -> ArrayRecord:
    """Encode several logit arrays in one record, by name (FedAgg: one per neighbour's subtree).

    ``logit_dtype`` is ``float32`` or ``float16``.

    Raises
    ------
    ValueError
        If ``logit_dtype`` is not one of the accepted ones.
    """
    if logit_dtype not in LOGIT_DTYPES:
        raise ValueError(f"logit dtype {logit_dtype!r} not in {LOGIT_DTYPES}")
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(to_numpy(v).astype(logit_dtype))) for k, v in logits.items()}
    )


def decode_named_logits(
    record: ArrayRecord, expected: Mapping[str, int], num_classes: int
) -> dict[str, Tensor]:
    """Decode the float32 logits named in ``expected``, validated like ``Z_s``.

    ``expected`` maps a name to the number of rows of its array (other arrays
    are ignored); every array has ``num_classes`` columns.

    Raises
    ------
    PayloadError
        If an expected array is missing or fails validation (the message
        starts with its name).
    """
    out = {}
    for name, rows in expected.items():
        try:
            out[name] = validate_server_logits(
                load_array(record, name, LOGIT_DTYPES), rows, num_classes
            )
        except PayloadError as err:
            raise PayloadError(f"{name}: {err}") from None
    return out
