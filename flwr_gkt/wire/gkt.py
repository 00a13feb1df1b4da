"""The FedGKT messages: features, labels and logits <-> Flower records.

Train instruction (server -> node), message type ``train``:
    ``RecordDict{"config": ConfigRecord, "gkt": ArrayRecord{"server-logits"}}``
    where ``server-logits`` (``N x C``) is present once the server has logits
    for this node.
Train reply (node -> server):
    ``RecordDict{"gkt": ArrayRecord{"features", "logits", "labels"},
    "metrics": MetricRecord{"num-examples", ...}}``
Evaluate reply (node -> server):
    ``RecordDict{"gkt": ArrayRecord{"features", "labels"}, "metrics": ...}``
Train and query replies may carry ``"node": ConfigRecord{"node-uid": str}``,
the node's stable identity (a checkpointed server finds its nodes again under
new node ids); a train reply's ``node`` record may also name the node's edge
model (``"edge-model": str``, recorded in the node history; heterogeneous
federations).
Logits-only train reply (replay rounds, EcoFed): the server asked with
``send-features = False`` because it still holds the node's features:
    ``RecordDict{"gkt": ArrayRecord{"logits"}, "metrics": ...}``

Decoding validates every payload (:func:`decode_payload`) and raises
:class:`PayloadError` with a one-line reason; the strategy turns that into a
rejected reply.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import Tensor

from flwr_gkt.core.payload import Payload, PayloadError, PayloadSpec
from flwr_gkt.wire.codecs import lossless_float16, quantize_int8, to_numpy, to_tensor
from flwr_gkt.wire.keys import (
    ARRAYS_KEY,
    FEATURE_DTYPE_CHOICES,
    FEATURE_DTYPES,
    LABEL_DTYPES,
    LOGIT_DTYPES,
    NUM_EXAMPLES,
)
from flwr_gkt.wire.validate import (
    array_record,
    load_array,
    read_int8_params,
    read_num_examples,
    validate_arrays,
    validate_server_logits,
)

__all__ = [
    "decode_logits",
    "decode_payload",
    "decode_server_logits",
    "encode_logits",
    "encode_payload",
    "encode_server_logits",
]


def encode_payload(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    logits: Tensor | np.ndarray | None = None,
    feature_dtype: str = "float32",
    logit_dtype: str = "float32",
) -> ArrayRecord:
    """Encode features ``H``, labels ``Y`` and optionally logits ``Z_c``.

    Parameters
    ----------
    features : Tensor | np.ndarray
        Feature maps ``N x C x H x W``.
    labels : Tensor | np.ndarray
        Labels (sent as int64).
    logits : Tensor | np.ndarray, optional
        Client logits ``N x num_classes``; left out of evaluate replies.
    feature_dtype : str
        ``float32``, ``float16``, ``int8`` (per-channel affine quantization,
        4x fewer bytes than float32, sent with ``feature-min`` and
        ``feature-scale``) or ``auto`` (float16 when that moves no value by
        more than :data:`~flwr_gkt.wire.codecs.FLOAT16_TOLERANCE`, else float32; see
        :func:`~flwr_gkt.wire.codecs.resolve_feature_dtype`).
    logit_dtype : str
        ``float32`` or ``float16``.

    Raises
    ------
    ValueError
        If a dtype is not one of the accepted ones.
    """
    if feature_dtype not in FEATURE_DTYPE_CHOICES:
        raise ValueError(f"feature dtype {feature_dtype!r} not in {FEATURE_DTYPE_CHOICES}")
    if logit_dtype not in LOGIT_DTYPES:
        raise ValueError(f"logit dtype {logit_dtype!r} not in {LOGIT_DTYPES}")
    if feature_dtype == "auto":  # converted once: the checked float16 copy is what is sent
        source = features if isinstance(features, Tensor) else torch.from_numpy(features)
        half = lossless_float16(source)
        features, feature_dtype = (source, "float32") if half is None else (half, "float16")
    arrays = {"labels": Array(np.ascontiguousarray(to_numpy(labels).astype(np.int64)))}
    if feature_dtype == "int8":
        q, lo, scale = quantize_int8(to_numpy(features))
        arrays.update(
            {"features": Array(q), "feature-min": Array(lo), "feature-scale": Array(scale)}
        )
    elif isinstance(features, Tensor):  # torch converts float32 -> float16 faster than numpy
        dtype = getattr(torch, feature_dtype)
        arrays["features"] = Array(to_numpy(features.detach().to(dtype).contiguous()))
    else:
        arrays["features"] = Array(np.ascontiguousarray(features.astype(feature_dtype)))
    if logits is not None:
        arrays["logits"] = Array(np.ascontiguousarray(to_numpy(logits).astype(logit_dtype)))
    return ArrayRecord(arrays)


def decode_payload(content: RecordDict, spec: PayloadSpec, with_logits: bool) -> Payload:
    """Decode and validate a train (``with_logits=True``) or evaluate reply.

    The payload's features keep their wire dtype.

    Raises
    ------
    PayloadError
        If a record or array is missing, cannot be decoded, or fails
        validation (see :func:`validate_arrays`).
    """
    record = array_record(content)
    num_examples = read_num_examples(content)
    features = load_array(record, "features", FEATURE_DTYPES)
    params = read_int8_params(features, record) if features.dtype == np.int8 else None
    labels = load_array(record, "labels", LABEL_DTYPES)
    logits = load_array(record, "logits", LOGIT_DTYPES) if with_logits else None
    return validate_arrays(features, labels, logits, spec, num_examples, params)


def encode_server_logits(logits: Tensor | np.ndarray, logit_dtype: str = "float32") -> ArrayRecord:
    """Encode the server logits ``Z_s`` (``N x num_classes``) of one node under ``server-logits``.

    ``logit_dtype`` is ``float32`` or ``float16``.

    Raises
    ------
    ValueError
        If ``logit_dtype`` is not one of the accepted ones.
    """
    return _logits_record("server-logits", logits, logit_dtype)


def decode_server_logits(content: RecordDict, num_samples: int, num_classes: int) -> Tensor | None:
    """Decode the float32 server logits of a train instruction; ``None`` when none were sent.

    ``num_samples`` is the size of the node's training set.

    Raises
    ------
    PayloadError
        If they do not match the training set (see
        :func:`validate_server_logits`) or cannot be decoded.
    """
    record = content.array_records.get(ARRAYS_KEY)
    if record is None or "server-logits" not in record:
        return None
    return validate_server_logits(
        load_array(record, "server-logits", LOGIT_DTYPES), num_samples, num_classes
    )


def encode_logits(logits: Tensor | np.ndarray, logit_dtype: str = "float32") -> ArrayRecord:
    """Encode a logits-only train reply (``Z_c`` without features, replay rounds).

    As :func:`encode_server_logits`, under the key ``logits``.

    Raises
    ------
    ValueError
        If ``logit_dtype`` is not one of the accepted ones.
    """
    return _logits_record("logits", logits, logit_dtype)


def _logits_record(key: str, logits: Tensor | np.ndarray, logit_dtype: str) -> ArrayRecord:
    if logit_dtype not in LOGIT_DTYPES:
        raise ValueError(f"logit dtype {logit_dtype!r} not in {LOGIT_DTYPES}")
    return ArrayRecord({key: Array(np.ascontiguousarray(to_numpy(logits).astype(logit_dtype)))})


def decode_logits(content: RecordDict, spec: PayloadSpec, num_samples: int) -> Tensor:
    """Decode and validate a logits-only train reply for a node holding ``num_samples``.

    A reply that carries features when none were asked for is rejected too: the
    server did not budget for them. The logits come back float32,
    ``num_samples x spec.num_classes``.

    Raises
    ------
    PayloadError
        If the reply carries features, lacks ``num-examples`` or ``logits``,
        or the logits have a wrong dtype, shape or count, or non-finite values.
    """
    record = array_record(content)
    if "features" in record:
        raise PayloadError("features sent in a logits-only round")
    num_examples = read_num_examples(content)
    logits = load_array(record, "logits", LOGIT_DTYPES)
    if logits.shape != (num_samples, spec.num_classes):
        raise PayloadError(
            f"'logits' has shape {list(logits.shape)}, expected [{num_samples}, {spec.num_classes}] "
            "(the stored samples of this node)"
        )
    if num_examples != num_samples:
        raise PayloadError(
            f"'{NUM_EXAMPLES}' says {num_examples} but {num_samples} samples are stored"
        )
    if not np.isfinite(logits).all():
        raise PayloadError("'logits' contain NaN or Inf")
    return to_tensor(logits.astype(np.float32, copy=False))
