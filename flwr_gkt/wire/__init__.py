"""The FedGKT wire format: tensors <-> Flower records, with validation.

Everything that crosses the network goes through this module.

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

FedAgg embeddings upload (end device -> cloud, once): ``RecordDict{"gkt":
ArrayRecord{"embeddings", "labels"}, "metrics": ...}``
(:func:`encode_embeddings` / :func:`decode_embeddings`); afterwards parents
and children exchange logits only (``encode_logits`` / ``decode_logits``).

Split learning (:mod:`flwr_gkt.flower.split_strategy`), per mini-batch:
the node's activations ``RecordDict{"gkt": ArrayRecord{"features", "labels"},
"metrics": ...}`` (:func:`encode_activations`, the feature codecs), the
server's gradient ``RecordDict{"config": ..., "gkt": ArrayRecord{"gradient"}}``
(:func:`encode_gradient`, float32 or float16) and the edge weights relayed
through the server (:func:`encode_state` / :func:`decode_state`, checked
against the receiving model).

Decoding validates every payload (:func:`decode_payload`) and raises
:class:`PayloadError` with a one-line reason; the strategy turns that into a
rejected reply.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from flwr_gkt.core.payload import Payload, PayloadError, PayloadSpec, chunk_rows
from flwr_gkt.core.split import state_change

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "FEATURE_DTYPES",
    "FEATURE_DTYPE_CHOICES",
    "FLOAT16_TOLERANCE",
    "GRADIENT_DTYPES",
    "LOGIT_DTYPES",
    "MAX_ABS_VALUE",
    "METRICS_KEY",
    "Payload",
    "PayloadError",
    "PayloadSpec",
    "decode_activations",
    "decode_embeddings",
    "decode_gradient",
    "decode_logits",
    "decode_named_logits",
    "decode_payload",
    "decode_server_logits",
    "decode_state",
    "dequantize_int8",
    "encode_activations",
    "encode_embeddings",
    "encode_gradient",
    "encode_logits",
    "encode_named_logits",
    "encode_payload",
    "encode_server_logits",
    "encode_state",
    "magnitude_error",
    "quantize_int8",
    "record_nbytes",
    "resolve_feature_dtype",
    "scalar",
    "settings_from_config",
    "settings_record",
    "validate_arrays",
    "validate_server_logits",
]

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

#: Record names in a message's RecordDict: the arrays (features, logits, labels),
#: the metrics of a reply and the config of an instruction.
ARRAYS_KEY = "gkt"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
#: The MetricRecord key of a reply's sample count (Flower's weighting key).
NUM_EXAMPLES = "num-examples"
#: Optional ConfigRecord of a train or query reply naming the node: ``{"node-uid": str}``,
#: an identity that survives restarts (node ids may not; see ``FedGKT.resume``).
NODE_KEY = "node"
NODE_UID = "node-uid"
#: Key of that ConfigRecord naming the node's edge model (informational: the
#: server checks the features' shape, not the name).
NODE_EDGE_MODEL = "edge-model"
#: Config key of the secret the server gives each node (and asks back on resume).
NODE_TOKEN = "node-token"

#: Accepted on-the-wire dtypes. ``int8`` features are the affine per-channel
#: quantization of :func:`quantize_int8`, sent with ``feature-min`` and
#: ``feature-scale`` (float32, one value per channel).
FEATURE_DTYPES = ("float32", "float16", "int8")
#: What a strategy may ask for as ``feature-dtype``: a codec, or ``auto``, which
#: each node resolves for its own features (:func:`resolve_feature_dtype`).
FEATURE_DTYPE_CHOICES = (*FEATURE_DTYPES, "auto")
LOGIT_DTYPES = ("float32", "float16")
_FLOAT_DTYPES = ("float32", "float16")
LABEL_DTYPES = ("int64",)


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def quantize_int8(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``N x C x H x W`` features to int8, per channel (affine).

    Parameters
    ----------
    features : np.ndarray
        Feature maps, channels on axis 1 (cast to float32).

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        ``(q, minimum, scale)`` with ``x ~= (q + 128) * scale + minimum``:
        int8 ``q`` of the features' shape, float32 ``minimum`` and ``scale``
        with one value per channel. The error is at most ``scale / 2`` per
        channel (``scale = (max - min) / 255``; ``1`` for a constant channel).
    """
    x = np.asarray(features, dtype=np.float32)
    axes = (0, *range(2, x.ndim))
    lo = x.min(axis=axes) if x.size else np.zeros(x.shape[1], np.float32)
    hi = x.max(axis=axes) if x.size else np.zeros(x.shape[1], np.float32)
    scale = ((hi - lo) / 255.0).astype(np.float32)
    scale[scale == 0] = 1.0  # constant channel: any scale decodes to the minimum
    shape = (1, -1) + (1,) * (x.ndim - 2)
    q = np.empty(x.shape, dtype=np.int8)
    step = chunk_rows(x.shape[1:], 4)  # one reused float32 buffer bounds the temporaries
    buf = np.empty((min(step, len(x)), *x.shape[1:]), dtype=np.float32)
    for start in range(0, len(x), step):
        block = buf[: min(step, len(x) - start)]
        np.subtract(x[start : start + len(block)], lo.reshape(shape), out=block)
        np.divide(block, scale.reshape(shape), out=block)
        np.rint(block, out=block)
        block -= 128
        np.clip(block, -128, 127, out=block)
        q[start : start + len(block)] = block
    return q, lo.astype(np.float32), scale


def dequantize_int8(q: np.ndarray, minimum: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Invert :func:`quantize_int8`.

    Parameters
    ----------
    q : np.ndarray
        Quantized int8 features, channels on axis 1.
    minimum : np.ndarray
        Per-channel minimum.
    scale : np.ndarray
        Per-channel scale.

    Returns
    -------
    np.ndarray
        The float32 features ``(q + 128) * scale + minimum``.
    """
    shape = (1, -1) + (1,) * (q.ndim - 2)
    out: np.ndarray = (q.astype(np.float32) + 128.0) * scale.reshape(shape) + minimum.reshape(shape)
    return out


#: The most ``feature-dtype: auto`` lets float16 move a value: half of float16's
#: finest step (its subnormal spacing 2^-24). Values of magnitude 2^-14 and more
#: must come through unchanged.
FLOAT16_TOLERANCE = 2.0**-25


def resolve_feature_dtype(feature_dtype: str, features: Tensor) -> str:
    """Return the codec a node sends ``features`` with (``auto`` resolved).

    ``auto`` means float16 when float16 moves no value by more than
    :data:`FLOAT16_TOLERANCE` (about 3e-8), float32 otherwise: half the bytes
    for the same numbers. Features an edge computed in bf16 autocast are such
    values. A bfloat16 value has 8 significant bits and float16 holds 11, so
    float16 keeps every bf16 value from 2^-14 up to 65,504 exactly and rounds
    smaller ones onto its finest grid (docs/benchmarks.md counts them on the
    default run). float32 features from an fp32 edge change by up to 2^-11 of
    their value, so they stay float32, as does a reply with a value float16
    cannot hold or a NaN. The check reads the features a chunk of rows at a
    time.

    Parameters
    ----------
    feature_dtype : str
        A value of :data:`FEATURE_DTYPE_CHOICES`.
    features : Tensor
        The features about to be sent.

    Returns
    -------
    str
        One of :data:`FEATURE_DTYPES`.

    Raises
    ------
    ValueError
        If ``feature_dtype`` is not one of :data:`FEATURE_DTYPE_CHOICES`.
    """
    if feature_dtype not in FEATURE_DTYPE_CHOICES:
        raise ValueError(f"feature dtype {feature_dtype!r} not in {FEATURE_DTYPE_CHOICES}")
    if feature_dtype != "auto":
        return feature_dtype
    return "float16" if _lossless_float16(features) is not None else "float32"


def _lossless_float16(features: Tensor) -> Tensor | None:
    """``features`` as float16 when that moves no value by more than :data:`FLOAT16_TOLERANCE`.

    One pass: a chunk of about 4M values at a time is converted into the result
    and checked; the first chunk that fails ends it. ``None`` when one does.
    """
    if features.dtype == torch.float16:
        return features
    source = features.detach()
    rows = source.reshape(len(source), -1) if source.dim() else source.reshape(1, 1)
    half = torch.empty(rows.shape, dtype=torch.float16, device=rows.device)
    step = max(1, (1 << 22) // max(rows.shape[1], 1))
    for i in range(0, len(rows), step):
        chunk, out = rows[i : i + step], half[i : i + step]
        out.copy_(chunk)
        moved = (out.to(chunk.dtype) - chunk).abs_().max()
        if not float(moved) <= FLOAT16_TOLERANCE:  # NaN or Inf: not <=
            return None
    return half.view(source.shape)


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
        more than :data:`FLOAT16_TOLERANCE`, else float32; see
        :func:`resolve_feature_dtype`).
    logit_dtype : str
        ``float32`` or ``float16``.

    Returns
    -------
    ArrayRecord
        ``features``, ``labels`` and, when given, ``logits``.

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
        half = _lossless_float16(source)
        features, feature_dtype = (source, "float32") if half is None else (half, "float16")
    arrays = {"labels": Array(np.ascontiguousarray(_to_numpy(labels).astype(np.int64)))}
    if feature_dtype == "int8":
        q, lo, scale = quantize_int8(_to_numpy(features))
        arrays.update(
            {"features": Array(q), "feature-min": Array(lo), "feature-scale": Array(scale)}
        )
    elif isinstance(features, Tensor):  # torch converts float32 -> float16 faster than numpy
        dtype = getattr(torch, feature_dtype)
        arrays["features"] = Array(_to_numpy(features.detach().to(dtype).contiguous()))
    else:
        arrays["features"] = Array(np.ascontiguousarray(features.astype(feature_dtype)))
    if logits is not None:
        arrays["logits"] = Array(np.ascontiguousarray(_to_numpy(logits).astype(logit_dtype)))
    return ArrayRecord(arrays)


def encode_server_logits(logits: Tensor | np.ndarray, logit_dtype: str = "float32") -> ArrayRecord:
    """Encode the per-sample server logits ``Z_s`` sent to one node.

    Parameters
    ----------
    logits : Tensor | np.ndarray
        The node's server logits, ``N x num_classes``.
    logit_dtype : str
        ``float32`` or ``float16``.

    Returns
    -------
    ArrayRecord
        The logits under ``server-logits``.

    Raises
    ------
    ValueError
        If ``logit_dtype`` is not one of the accepted ones.
    """
    return _logits_record("server-logits", logits, logit_dtype)


def encode_logits(logits: Tensor | np.ndarray, logit_dtype: str = "float32") -> ArrayRecord:
    """Encode a logits-only train reply (``Z_c`` without features, replay rounds).

    Parameters
    ----------
    logits : Tensor | np.ndarray
        The client logits, ``N x num_classes``.
    logit_dtype : str
        ``float32`` or ``float16``.

    Returns
    -------
    ArrayRecord
        The logits under ``logits``.

    Raises
    ------
    ValueError
        If ``logit_dtype`` is not one of the accepted ones.
    """
    return _logits_record("logits", logits, logit_dtype)


def _logits_record(key: str, logits: Tensor | np.ndarray, logit_dtype: str) -> ArrayRecord:
    if logit_dtype not in LOGIT_DTYPES:
        raise ValueError(f"logit dtype {logit_dtype!r} not in {LOGIT_DTYPES}")
    return ArrayRecord({key: Array(np.ascontiguousarray(_to_numpy(logits).astype(logit_dtype)))})


def decode_logits(content: RecordDict, spec: PayloadSpec, num_samples: int) -> Tensor:
    """Decode and validate a logits-only train reply for a node holding ``num_samples``.

    A reply that carries features when none were asked for is rejected too: the
    server did not budget for them.

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    spec : PayloadSpec
        Gives the number of classes.
    num_samples : int
        Number of samples the server stores for the node.

    Returns
    -------
    Tensor
        The client logits as float32, ``num_samples x num_classes``.

    Raises
    ------
    PayloadError
        If the reply carries features, lacks ``num-examples`` or ``logits``,
        or the logits have a wrong dtype, shape or count, or non-finite values.
    """
    record = _record(content)
    if "features" in record:
        raise PayloadError("features sent in a logits-only round")
    num_examples = _num_examples(content)
    logits = _load(record, "logits", LOGIT_DTYPES)
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
    return _tensor(logits.astype(np.float32, copy=False))


def encode_embeddings(embeddings: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> ArrayRecord:
    """Encode bridge-sample embeddings and labels (FedAgg, sent once).

    Parameters
    ----------
    embeddings : Tensor | np.ndarray
        Embeddings ``eps`` of the bridge samples (``N x 4 x h x w``), sent
        as float32.
    labels : Tensor | np.ndarray
        Their labels, sent as int64.

    Returns
    -------
    ArrayRecord
        ``embeddings`` and ``labels``.
    """
    return ArrayRecord(
        {
            "embeddings": Array(np.ascontiguousarray(_to_numpy(embeddings).astype(np.float32))),
            "labels": Array(np.ascontiguousarray(_to_numpy(labels).astype(np.int64))),
        }
    )


def decode_embeddings(
    content: RecordDict, num_classes: int, channels: int = 4, max_samples: int | None = None
) -> tuple[Tensor, Tensor]:
    """Decode and validate an embeddings upload.

    Checks dtypes, an ``N x channels x h x w`` shape, finite values, labels in
    ``[0, num_classes)``, ``N`` against ``num-examples`` and ``max_samples``.

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    num_classes : int
        Labels must be below it.
    channels : int
        Expected number of embedding channels.
    max_samples : int, optional
        Largest accepted number of samples.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``(embeddings, labels)``, float32 and int64.

    Raises
    ------
    PayloadError
        If any check fails.
    """
    record = _record(content)
    num_examples = _num_examples(content)
    eps = _load(record, "embeddings", ("float32",))
    labels = _load(record, "labels", LABEL_DTYPES)
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
    if not _all_finite(eps):  # as features: chunked, no array-sized temporary
        raise PayloadError("'embeddings' contain NaN or Inf")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise PayloadError(
            f"'labels' outside [0, {num_classes}): min {labels.min()}, max {labels.max()}"
        )
    return _tensor(eps), _tensor(labels)


def encode_named_logits(
    logits: Mapping[str, Tensor | np.ndarray], logit_dtype: str = "float32"
) -> ArrayRecord:
    """Encode several logit arrays in one record, by name (FedAgg: one per neighbour's subtree).

    Parameters
    ----------
    logits : Mapping[str, Tensor | np.ndarray]
        The logit arrays, by name.
    logit_dtype : str
        ``float32`` or ``float16``.

    Returns
    -------
    ArrayRecord
        One array per name.

    Raises
    ------
    ValueError
        If ``logit_dtype`` is not one of the accepted ones.
    """
    if logit_dtype not in LOGIT_DTYPES:
        raise ValueError(f"logit dtype {logit_dtype!r} not in {LOGIT_DTYPES}")
    return ArrayRecord(
        {
            k: Array(np.ascontiguousarray(_to_numpy(v).astype(logit_dtype)))
            for k, v in logits.items()
        }
    )


def decode_named_logits(
    record: ArrayRecord, expected: Mapping[str, int], num_classes: int
) -> dict[str, Tensor]:
    """Decode the arrays named in ``expected``, validated like ``Z_s``.

    Parameters
    ----------
    record : ArrayRecord
        The record of named logits (see :func:`encode_named_logits`).
    expected : Mapping[str, int]
        Name -> number of rows of each array to decode; other arrays are
        ignored.
    num_classes : int
        Number of columns of every array.

    Returns
    -------
    dict[str, Tensor]
        The float32 logits, by name.

    Raises
    ------
    PayloadError
        If an expected array is missing or fails validation (the message
        starts with its name).
    """
    out = {}
    for name, rows in expected.items():
        try:
            out[name] = validate_server_logits(_load(record, name, LOGIT_DTYPES), rows, num_classes)
        except PayloadError as err:
            raise PayloadError(f"{name}: {err}") from None
    return out


def _npy_view(data: bytes) -> np.ndarray:
    """Return a read-only array over ``.npy`` bytes, without copying the data.

    ``Array.numpy()`` goes through ``np.load`` and copies every payload; a
    round's features are hundreds of MB, so the server reads them in place.
    The header is parsed with numpy's own reader; object dtypes and a size
    that does not match the header are refused.
    """
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    offset = buf.tell()
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes for {count} x {dtype} items")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(
        shape, order="F" if fortran else "C"
    )


def _load(record: ArrayRecord, key: str, dtypes: tuple[str, ...]) -> np.ndarray:
    """Check an array's declared dtype, then deserialize and check it again."""
    if key not in record:
        raise PayloadError(f"missing array '{key}'")
    array = record[key]
    if array.dtype not in dtypes:
        raise PayloadError(f"'{key}' has dtype {array.dtype}, expected one of {list(dtypes)}")
    try:
        value = _npy_view(array.data) if array.stype == "numpy.ndarray" else array.numpy()
    except Exception as err:  # corrupt bytes, unsupported stype, ...
        raise PayloadError(f"'{key}' cannot be decoded: {err}") from None
    if str(value.dtype) != array.dtype or list(value.shape) != list(array.shape):
        raise PayloadError(
            f"'{key}' declares {array.dtype}{list(array.shape)} "
            f"but holds {value.dtype}{list(value.shape)}"
        )
    return value


def _tensor(x: np.ndarray) -> Tensor:
    """float32/int64 tensor sharing memory with ``x`` when possible (read-only views included)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


def validate_arrays(
    features: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray | None,
    spec: PayloadSpec,
    num_examples: int | None = None,
    int8_params: tuple[np.ndarray, np.ndarray] | None = None,
) -> Payload:
    """Validate decoded arrays against ``spec``; return them as tensors.

    Features keep their wire dtype (no float32 copy is made): the store
    keeps them so and converts a batch at a time.

    Parameters
    ----------
    features : np.ndarray
        Feature maps ``N x C x H x W``: float32, float16, or int8 with
        ``int8_params``.
    labels : np.ndarray
        Labels ``N``, int64.
    logits : np.ndarray, optional
        Client logits ``N x num_classes``, float32 or float16; ``None`` for an
        evaluate reply.
    spec : PayloadSpec
        Number of classes, expected feature shape and sample limit.
    num_examples : int, optional
        The count the node reported; must equal ``N`` when given.
    int8_params : tuple[np.ndarray, np.ndarray], optional
        The int8 codec's checked per-channel ``(minimum, scale)``.

    Returns
    -------
    Payload
        Features in their wire dtype (int8 with their parameters), float32
        logits and int64 labels, possibly sharing (read-only) memory with the
        arrays.

    Raises
    ------
    PayloadError
        On wrong dtypes, shapes or counts, no samples or more than the
        limit, non-finite values or labels outside ``[0, num_classes)``.
    """
    int8 = features.dtype == np.int8 and int8_params is not None
    if str(features.dtype) not in _FLOAT_DTYPES and not int8:
        raise PayloadError(f"'features' has dtype {features.dtype}, expected {list(_FLOAT_DTYPES)}")
    if str(labels.dtype) not in LABEL_DTYPES:
        raise PayloadError(f"'labels' has dtype {labels.dtype}, expected {list(LABEL_DTYPES)}")
    if features.ndim != 4:
        raise PayloadError(f"'features' must be N x C x H x W, got shape {list(features.shape)}")
    n = features.shape[0]
    if n == 0:
        raise PayloadError("payload has no samples")
    if 0 in features.shape[1:]:
        raise PayloadError(f"'features' maps have an empty dimension: {list(features.shape[1:])}")
    if spec.max_samples is not None and n > spec.max_samples:
        raise PayloadError(f"payload has {n} samples, more than the limit {spec.max_samples}")
    if spec.feature_shape is not None and tuple(features.shape[1:]) != tuple(spec.feature_shape):
        raise PayloadError(
            f"'features' maps have shape {list(features.shape[1:])}, "
            f"expected {list(spec.feature_shape)}"
        )
    if labels.shape != (n,):
        raise PayloadError(
            f"'labels' has shape {list(labels.shape)}, expected [{n}] (count mismatch)"
        )
    if num_examples is not None and num_examples != n:
        raise PayloadError(f"'{NUM_EXAMPLES}' says {num_examples} but the payload has {n} samples")
    if not int8 and not _all_finite(features):  # int8 maps decode finite (checked parameters)
        raise PayloadError("'features' contain NaN or Inf")
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        raise PayloadError(
            f"'labels' outside [0, {spec.num_classes}): min {labels.min()}, max {labels.max()}"
        )
    logits_t = None
    if logits is not None:
        if str(logits.dtype) not in LOGIT_DTYPES:
            raise PayloadError(f"'logits' has dtype {logits.dtype}, expected {list(LOGIT_DTYPES)}")
        if logits.shape != (n, spec.num_classes):
            raise PayloadError(
                f"'logits' has shape {list(logits.shape)}, expected [{n}, {spec.num_classes}]"
            )
        if not np.isfinite(logits).all():
            raise PayloadError("'logits' contain NaN or Inf")
        logits_t = _tensor(logits.astype(np.float32, copy=False))
    # Tensors may be read-only views of the message bytes: consumers must not
    # modify them in place (the server only reads them).
    minimum, scale = (None, None) if int8_params is None else int8_params
    return Payload(
        features=_tensor(features),
        labels=_tensor(labels),
        logits=logits_t,
        feature_min=None if minimum is None or not int8 else _tensor(minimum),
        feature_scale=None if scale is None or not int8 else _tensor(scale),
    )


#: IEEE float dtype -> (unsigned view, bits below the sign, exponent bits): a value is
#: NaN or infinite exactly when all its exponent bits are set.
_FLOAT_BITS: dict[np.dtype[Any], tuple[type[np.unsignedinteger[Any]], int, int]] = {
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    np.dtype(np.float64): (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}

#: The gate's default bound on the absolute value of every float a node sends
#: (features, activations, logits, embeddings, edge weights). Batch-normalised
#: ResNet features, logits and weights stay orders of magnitude below it; values
#: that make a server model overflow (``1e30``, ``3e38``) are far above it.
MAX_ABS_VALUE = 1e4


def _all_within(x: np.ndarray, bound: float = math.inf) -> bool:
    """Whether every value of ``x`` is finite and at most ``bound`` in absolute value.

    Checked a chunk of rows at a time. A float array is read as unsigned
    integers of its width: with the sign bit masked off, IEEE floats order as
    their bits do, and NaN / Inf have all exponent bits set, above every finite
    value. So one integer maximum per chunk answers both questions; for float16
    this is about 7x faster than ``np.isfinite``, which converts every value to
    float32 first. Integer arrays are finite; only their magnitude is checked.
    """
    if x.size == 0:
        return True
    if x.dtype.kind in "iu":
        return bool(bound == math.inf or np.abs(x.astype(np.float64)).max() <= bound)
    bits = _FLOAT_BITS.get(x.dtype)
    if bits is None or not x.flags.c_contiguous:
        finite = bool(np.isfinite(x).all())
        return finite and (bound == math.inf or float(np.abs(x).max()) <= bound)
    uint, magnitude, _ = bits
    with np.errstate(over="ignore"):  # a bound beyond the dtype's range: the largest finite
        limit_value = np.asarray(min(bound, float(np.finfo(x.dtype).max)), dtype=x.dtype)
    limit = int(limit_value.view(uint))
    rows = x.reshape(len(x), -1).view(uint) if x.ndim else x.reshape(1, 1).view(uint)
    step = chunk_rows(rows.shape[1:], rows.itemsize)
    buf = np.empty((min(step, len(rows)), *rows.shape[1:]), dtype=uint)  # reused: no heap growth
    for i in range(0, len(rows), step):
        k = min(step, len(rows) - i)
        chunk = np.bitwise_and(rows[i : i + k], magnitude, out=buf[:k])
        if int(chunk.max()) > limit:
            return False
    return True


def _all_finite(x: np.ndarray) -> bool:
    """Whether every value of ``x`` is finite (:func:`_all_within` without a bound)."""
    return _all_within(x)


def _tensor_within(t: Tensor, bound: float) -> bool:
    """:func:`_all_within` for a tensor (read in place where numpy can view it)."""
    t = t.detach()
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32, torch.float64):
        return _all_within(t.numpy(), bound)
    t = t.float()
    return bool(torch.isfinite(t).all()) and (t.numel() == 0 or float(t.abs().max()) <= bound)


def magnitude_error(value: Any, bound: float, name: str = "") -> str | None:
    """Return why ``value`` holds a float beyond ``bound`` (or NaN/Inf), else ``None``.

    The gate's one magnitude rule for every array a node sends, whatever the
    strategy: ``value`` is what a strategy's decoder returned -- a
    :class:`Payload` (features, int8 maps by their decoded range, logits), a
    tensor, or mappings / sequences of them (edge weights, FedAgg's named
    logits, embeddings and labels). Integer tensors (labels, counters) are
    skipped: their ranges are checked where they are decoded.

    Parameters
    ----------
    value : Any
        A decoded payload.
    bound : float
        Largest accepted absolute value.
    name : str
        What ``value`` is called in the reason.

    Returns
    -------
    str | None
        ``"'<name>' holds values beyond +-<bound> (or NaN/Inf)"``, or ``None``.
    """
    if isinstance(value, Payload):
        parts: dict[str, Any] = {"logits": value.logits}
        if value.feature_min is not None and value.feature_scale is not None:  # int8 maps
            top = value.feature_min + 255.0 * value.feature_scale
            parts["features"] = torch.stack([value.feature_min, top])
        elif value.has_features:
            parts["features"] = value.features
        return magnitude_error(parts, bound, name)
    if isinstance(value, Tensor):
        if not value.is_floating_point() or _tensor_within(value, bound):
            return None
        return f"'{name or 'array'}' holds values beyond +-{bound:g} (or NaN/Inf)"
    if isinstance(value, Mapping):
        pairs = [(f"{name}.{k}" if name else str(k), v) for k, v in value.items()]
    elif isinstance(value, tuple | list):
        pairs = [(f"{name or 'array'}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for label, item in pairs:
        if (why := magnitude_error(item, bound, label)) is not None:
            return why
    return None


def decode_payload(content: RecordDict, spec: PayloadSpec, with_logits: bool) -> Payload:
    """Decode and validate a train (``with_logits=True``) or evaluate reply.

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    spec : PayloadSpec
        What a valid payload looks like.
    with_logits : bool
        Whether the reply must carry client logits (train replies).

    Returns
    -------
    Payload
        The validated payload (features in their wire dtype).

    Raises
    ------
    PayloadError
        If a record or array is missing, cannot be decoded, or fails
        validation (see :func:`validate_arrays`).
    """
    record = _record(content)
    num_examples = _num_examples(content)
    features = _load(record, "features", FEATURE_DTYPES)
    params = _int8_params(features, record) if features.dtype == np.int8 else None
    labels = _load(record, "labels", LABEL_DTYPES)
    logits = _load(record, "logits", LOGIT_DTYPES) if with_logits else None
    return validate_arrays(features, labels, logits, spec, num_examples, params)


def _record(content: RecordDict) -> ArrayRecord:
    if ARRAYS_KEY not in content.array_records:
        raise PayloadError(f"missing ArrayRecord '{ARRAYS_KEY}'")
    return content.array_records[ARRAYS_KEY]


def _num_examples(content: RecordDict) -> int:
    if METRICS_KEY not in content.metric_records:
        raise PayloadError(f"missing MetricRecord '{METRICS_KEY}'")
    value = content.metric_records[METRICS_KEY].get(NUM_EXAMPLES)
    if not isinstance(value, int):
        raise PayloadError(f"'{NUM_EXAMPLES}' missing or not an integer")
    return value


def _int8_params(q: np.ndarray, record: ArrayRecord) -> tuple[np.ndarray, np.ndarray]:
    """Check and return the int8 codec's per-channel ``(minimum, scale)``."""
    if q.ndim != 4:
        raise PayloadError(f"'features' must be N x C x H x W, got shape {list(q.shape)}")
    channels = q.shape[1]
    params = {}
    for key in ("feature-min", "feature-scale"):
        value = _load(record, key, ("float32",))
        if value.shape != (channels,):
            raise PayloadError(
                f"'{key}' has shape {list(value.shape)}, expected [{channels}] (one per channel)"
            )
        if not np.isfinite(value).all():
            raise PayloadError(f"'{key}' contains NaN or Inf")
        params[key] = value
    minimum, scale = params["feature-min"], params["feature-scale"]
    if (scale <= 0).any():
        raise PayloadError("'feature-scale' must be positive")
    with np.errstate(over="ignore"):
        top = minimum + np.float32(255.0) * scale
    if not np.isfinite(top).all():
        raise PayloadError("'feature-min' + 255 * 'feature-scale' overflows float32")
    return minimum, scale


def decode_server_logits(content: RecordDict, num_samples: int, num_classes: int) -> Tensor | None:
    """Decode the server logits a node received.

    Parameters
    ----------
    content : RecordDict
        The train instruction's content.
    num_samples : int
        Number of samples of the node's training set.
    num_classes : int
        Number of classes.

    Returns
    -------
    Tensor | None
        The float32 server logits; ``None`` when none were sent.

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
        _load(record, "server-logits", LOGIT_DTYPES), num_samples, num_classes
    )


def validate_server_logits(logits: np.ndarray, num_samples: int, num_classes: int) -> Tensor:
    """Check server logits against the node's training set; return them as a tensor.

    Parameters
    ----------
    logits : np.ndarray
        The server logits.
    num_samples : int
        Expected number of rows.
    num_classes : int
        Expected number of columns.

    Returns
    -------
    Tensor
        The logits as float32.

    Raises
    ------
    PayloadError
        If the dtype is not float32/float16, the shape is not
        ``num_samples x num_classes`` or a value is not finite.
    """
    if str(logits.dtype) not in LOGIT_DTYPES:
        raise PayloadError(
            f"'server-logits' has dtype {logits.dtype}, expected {list(LOGIT_DTYPES)}"
        )
    if logits.shape != (num_samples, num_classes):
        raise PayloadError(
            f"'server-logits' has shape {list(logits.shape)}, "
            f"expected [{num_samples}, {num_classes}]"
        )
    if not np.isfinite(logits).all():
        raise PayloadError("'server-logits' contain NaN or Inf")
    return _tensor(logits.astype(np.float32, copy=False))


def settings_from_config(cls: type[T], config: Mapping[str, Any]) -> T:
    """Build a settings dataclass from a ConfigRecord.

    Field ``batch_size`` is read from key ``batch-size``, and so on. Missing
    keys keep the field's default; present values are cast to the field's
    default's type (``int``, ``float``, ``bool``, ``str`` or an ``Enum``), so
    a ConfigRecord from any sender gives well-typed settings.

    Parameters
    ----------
    cls : type[T]
        The dataclass; every field must have a default.
    config : Mapping[str, Any]
        The ConfigRecord (or any mapping); keys that are not fields are
        ignored.

    Returns
    -------
    T
        The settings.
    """
    base = cls()
    values = {}
    for f in dataclasses.fields(cls):
        key = f.name.replace("_", "-")
        if key in config:
            default = getattr(base, f.name)
            caster = type(default)
            values[f.name] = (
                caster(config[key])
                if not isinstance(default, enum.Enum)
                else caster(str(config[key]))
            )
    return dataclasses.replace(base, **values)


def settings_record(settings: DataclassInstance, **extra: Any) -> ConfigRecord:
    """Build the ConfigRecord of a settings dataclass (the inverse of :func:`settings_from_config`).

    Parameters
    ----------
    settings : dataclass instance
        The settings; each field ``a_b`` becomes the key ``a-b`` and an
        ``Enum`` value is sent as its value.
    **extra : Any
        Further entries, added as given (they override the settings' keys).

    Returns
    -------
    ConfigRecord
        The record to send.
    """
    values: dict[str, Any] = {
        f.name.replace("_", "-"): _plain(getattr(settings, f.name))
        for f in dataclasses.fields(settings)
    }
    return ConfigRecord({**values, **extra})


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def record_nbytes(content: RecordDict | Mapping[str, ArrayRecord]) -> int:
    """Count the bytes of all array payloads in a message's content.

    Parameters
    ----------
    content : RecordDict | Mapping[str, ArrayRecord]
        A message's content, or its ArrayRecords by name.

    Returns
    -------
    int
        The serialized size of every array.
    """
    records = content.array_records if isinstance(content, RecordDict) else content
    return sum(len(array.data) for record in records.values() for array in record.values())


def scalar(record: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """Read one numeric value from a MetricRecord or ConfigRecord.

    Parameters
    ----------
    record : Mapping[str, Any]
        The record to read (a MetricRecord, a ConfigRecord or a dict).
    key : str
        The key of the value.
    default : float | None
        Returned when ``key`` is absent; ``None`` makes a missing key an error.

    Returns
    -------
    float
        The value (integers and booleans converted).

    Raises
    ------
    PayloadError
        If the key is missing (and there is no default) or the value is not a number.
    """
    if key not in record:
        if default is None:
            raise PayloadError(f"'{key}' missing")
        return default
    value = record[key]
    if not isinstance(value, int | float):
        raise PayloadError(f"'{key}' is not a number: {type(value).__name__}")
    return float(value)


def metrics_record(num_examples: int, **metrics: float) -> MetricRecord:
    """Build a reply's MetricRecord with the ``num-examples`` weight first.

    Parameters
    ----------
    num_examples : int
        The weight of the reply (stored as an int).
    **metrics : float
        Further metrics (stored as floats).

    Returns
    -------
    MetricRecord
        ``num-examples`` followed by ``metrics``.
    """
    return MetricRecord(
        {NUM_EXAMPLES: int(num_examples), **{k: float(v) for k, v in metrics.items()}}
    )


# ----------------------------------------------------------------- split learning
#: Dtypes of the activation gradients ``dL/dH`` the server sends (split learning).
GRADIENT_DTYPES = ("float32", "float16")


def encode_activations(
    activations: Tensor | np.ndarray, labels: Tensor | np.ndarray, dtype: str = "float32"
) -> ArrayRecord:
    """Encode one batch's activations ``H`` and labels (split learning, node -> server).

    The same arrays and codecs as a FedGKT payload's features and labels
    (``features``, ``labels``; int8 with ``feature-min`` / ``feature-scale``),
    so that :func:`decode_activations` validates them as the gate validates
    every payload.

    Parameters
    ----------
    activations : Tensor | np.ndarray
        The extractor's output on the batch, ``N x C x H x W``.
    labels : Tensor | np.ndarray
        The batch's labels (sent as int64).
    dtype : str
        ``float32``, ``float16`` or ``int8`` (see :func:`encode_payload`).

    Returns
    -------
    ArrayRecord
        ``features`` and ``labels`` (and the int8 parameters).

    Raises
    ------
    ValueError
        If ``dtype`` is not one of :data:`FEATURE_DTYPES`.
    """
    return encode_payload(activations, labels, feature_dtype=dtype)


def decode_activations(content: RecordDict, spec: PayloadSpec) -> Payload:
    """Decode and validate one batch's activations (a split-learning reply).

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    spec : PayloadSpec
        Classes, the extractor's output shape and the batch size
        (``max_samples``).

    Returns
    -------
    Payload
        Activations (``features``) in their wire dtype and labels.

    Raises
    ------
    PayloadError
        As :func:`decode_payload` (no logits expected), or if the reply
        carries logits or model weights too.
    """
    record = _record(content)
    extra = sorted(set(record) - {"features", "labels", "feature-min", "feature-scale"})
    if extra:
        raise PayloadError(f"unexpected arrays {extra} with the activations")
    return decode_payload(content, spec, with_logits=False)


def encode_gradient(gradient: Tensor | np.ndarray, dtype: str = "float32") -> ArrayRecord:
    """Encode the activations' gradient ``dL/dH`` (split learning, server -> node).

    Parameters
    ----------
    gradient : Tensor | np.ndarray
        ``N x C x H x W``, shaped like the activations it answers.
    dtype : str
        ``float32`` or ``float16``.

    Returns
    -------
    ArrayRecord
        The gradient under ``gradient``.

    Raises
    ------
    ValueError
        If ``dtype`` is not one of :data:`GRADIENT_DTYPES`.
    """
    if dtype not in GRADIENT_DTYPES:
        raise ValueError(f"gradient dtype {dtype!r} not in {GRADIENT_DTYPES}")
    return ArrayRecord({"gradient": Array(np.ascontiguousarray(_to_numpy(gradient).astype(dtype)))})


def decode_gradient(
    content: RecordDict, shape: tuple[int, ...], max_abs: float = MAX_ABS_VALUE
) -> Tensor:
    """Decode and validate the gradient a node received for its last activations.

    Parameters
    ----------
    content : RecordDict
        The instruction's content.
    shape : tuple[int, ...]
        The shape of the activations it answers.
    max_abs : float
        Largest accepted absolute value (the gate's bound on what nodes send,
        :data:`MAX_ABS_VALUE`, applied to what they receive).

    Returns
    -------
    Tensor
        The gradient as float32.

    Raises
    ------
    PayloadError
        If it is missing, has another dtype or shape, or values that are
        non-finite or beyond ``max_abs``.
    """
    value = _load(_record(content), "gradient", GRADIENT_DTYPES)
    if tuple(value.shape) != tuple(shape):
        raise PayloadError(f"'gradient' has shape {list(value.shape)}, expected {list(shape)}")
    if not _all_within(value, max_abs):
        raise PayloadError(f"'gradient' contains NaN or Inf, or values beyond +-{max_abs:g}")
    return _tensor(value.astype(np.float32, copy=True))


def encode_state(state: Mapping[str, Tensor]) -> ArrayRecord:
    """Encode model weights (a state dict) for the wire: split learning's edge relay.

    Parameters
    ----------
    state : Mapping[str, Tensor]
        The state dict (weights and buffers), in its own dtypes.

    Returns
    -------
    ArrayRecord
        One array per entry, in order.
    """
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
        weights must have.
    max_change : float, optional
        Largest accepted change from ``reference`` (its values: the weights
        the sender started from), relative to their size:
        ``||state - reference|| <= max_change * max(||reference||, 1)`` over
        all float entries (:func:`flwr_gkt.core.split.state_change`).
        ``None``: not checked.

    Returns
    -------
    dict[str, Tensor]
        The weights, as tensors of the reference's dtypes.

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
        value = _load(record, key, (str(ref.dtype).removeprefix("torch."),))
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
