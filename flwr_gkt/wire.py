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
new node ids).
Logits-only train reply (replay rounds, EcoFed): the server asked with
``send-features = False`` because it still holds the node's features:
    ``RecordDict{"gkt": ArrayRecord{"logits"}, "metrics": ...}``

FedAgg embeddings upload (end device -> cloud, once): ``RecordDict{"gkt":
ArrayRecord{"embeddings", "labels"}, "metrics": ...}``
(:func:`encode_embeddings` / :func:`decode_embeddings`); afterwards parents
and children exchange logits only (``encode_logits`` / ``decode_logits``).

Decoding validates every payload (:func:`decode_payload`) and raises
:class:`PayloadError` with a one-line reason; the strategy turns that into a
rejected reply.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from torch import Tensor

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "FEATURE_DTYPES",
    "LOGIT_DTYPES",
    "METRICS_KEY",
    "Payload",
    "PayloadError",
    "PayloadSpec",
    "decode_embeddings",
    "decode_logits",
    "decode_named_logits",
    "decode_payload",
    "decode_server_logits",
    "dequantize_int8",
    "encode_embeddings",
    "encode_logits",
    "encode_named_logits",
    "encode_payload",
    "encode_server_logits",
    "quantize_int8",
    "record_nbytes",
    "settings_from_config",
    "validate_arrays",
    "validate_server_logits",
]

T = TypeVar("T")

ARRAYS_KEY = "gkt"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES = "num-examples"
#: Optional ConfigRecord of a train or query reply naming the node: ``{"node-uid": str}``,
#: an identity that survives restarts (node ids may not; see ``FedGKT.resume``).
NODE_KEY = "node"
NODE_UID = "node-uid"

#: Accepted on-the-wire dtypes. ``int8`` features are the affine per-channel
#: quantization of :func:`quantize_int8`, sent with ``feature-min`` and
#: ``feature-scale`` (float32, one value per channel).
FEATURE_DTYPES = ("float32", "float16", "int8")
LOGIT_DTYPES = ("float32", "float16")
_FLOAT_DTYPES = ("float32", "float16")
LABEL_DTYPES = ("int64",)
_CHUNK = 4096  # samples quantized at a time (bounds temporary memory)


class PayloadError(ValueError):
    """A payload failed validation; the message says why in one line."""


@dataclass(frozen=True)
class PayloadSpec:
    """What a valid payload looks like.

    Parameters
    ----------
    num_classes : int
        Number of classes: logits have this many columns, labels are below it.
    feature_shape : tuple[int, int, int], optional
        Expected ``(C, H, W)`` of one feature map; ``None`` accepts any 3-D map.
    max_samples : int, optional
        Largest number of samples one payload may carry.
    """

    num_classes: int
    feature_shape: tuple[int, ...] | None = None
    max_samples: int | None = None


@dataclass
class Payload:
    """A decoded, validated payload (tensors on the CPU)."""

    features: Tensor
    labels: Tensor
    logits: Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def logits_only(cls, logits: Tensor) -> Payload:
        """A replay-round reply: client logits for samples the server already holds."""
        return cls(features=torch.empty(0), labels=torch.empty(0, dtype=torch.long), logits=logits)

    @property
    def has_features(self) -> bool:
        """``False`` for a :meth:`logits_only` payload."""
        return self.features.dim() == 4


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def quantize_int8(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine int8 quantization per channel of ``N x C x H x W`` features.

    Returns ``(q, minimum, scale)`` with ``x ~= (q + 128) * scale + minimum``;
    the error is at most ``scale / 2`` per channel (``scale = (max - min) / 255``).
    """
    x = np.asarray(features, dtype=np.float32)
    axes = (0, *range(2, x.ndim))
    lo = x.min(axis=axes) if x.size else np.zeros(x.shape[1], np.float32)
    hi = x.max(axis=axes) if x.size else np.zeros(x.shape[1], np.float32)
    scale = ((hi - lo) / 255.0).astype(np.float32)
    scale[scale == 0] = 1.0  # constant channel: any scale decodes to the minimum
    shape = (1, -1) + (1,) * (x.ndim - 2)
    q = np.empty(x.shape, dtype=np.int8)
    for start in range(0, len(x), _CHUNK):
        block = (x[start : start + _CHUNK] - lo.reshape(shape)) / scale.reshape(shape)
        q[start : start + _CHUNK] = np.clip(np.rint(block) - 128, -128, 127)
    return q, lo.astype(np.float32), scale


def dequantize_int8(q: np.ndarray, minimum: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8` (float32)."""
    shape = (1, -1) + (1,) * (q.ndim - 2)
    return (q.astype(np.float32) + 128.0) * scale.reshape(shape) + minimum.reshape(shape)


def encode_payload(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    logits: Tensor | np.ndarray | None = None,
    feature_dtype: str = "float32",
    logit_dtype: str = "float32",
) -> ArrayRecord:
    """Encode features ``H``, labels ``Y`` and optionally logits ``Z_c``.

    ``feature_dtype``: ``float32``, ``float16`` or ``int8`` (per-channel affine
    quantization, 4x fewer bytes than float32); ``logit_dtype``: ``float32``
    or ``float16``.
    """
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype {feature_dtype!r} not in {FEATURE_DTYPES}")
    if logit_dtype not in LOGIT_DTYPES:
        raise ValueError(f"logit dtype {logit_dtype!r} not in {LOGIT_DTYPES}")
    feats = _to_numpy(features)
    arrays = {"labels": Array(np.ascontiguousarray(_to_numpy(labels).astype(np.int64)))}
    if feature_dtype == "int8":
        q, lo, scale = quantize_int8(feats)
        arrays.update(
            {"features": Array(q), "feature-min": Array(lo), "feature-scale": Array(scale)}
        )
    else:
        arrays["features"] = Array(np.ascontiguousarray(feats.astype(feature_dtype)))
    if logits is not None:
        arrays["logits"] = Array(np.ascontiguousarray(_to_numpy(logits).astype(logit_dtype)))
    return ArrayRecord(arrays)


def encode_server_logits(logits: Tensor | np.ndarray, logit_dtype: str = "float32") -> ArrayRecord:
    """Encode the per-sample server logits ``Z_s`` sent to one node."""
    if logit_dtype not in LOGIT_DTYPES:
        raise ValueError(f"logit dtype {logit_dtype!r} not in {LOGIT_DTYPES}")
    return ArrayRecord(
        {"server-logits": Array(np.ascontiguousarray(_to_numpy(logits).astype(logit_dtype)))}
    )


def encode_logits(logits: Tensor | np.ndarray, logit_dtype: str = "float32") -> ArrayRecord:
    """Encode a logits-only train reply (``Z_c`` without features, replay rounds)."""
    if logit_dtype not in LOGIT_DTYPES:
        raise ValueError(f"logit dtype {logit_dtype!r} not in {LOGIT_DTYPES}")
    return ArrayRecord(
        {"logits": Array(np.ascontiguousarray(_to_numpy(logits).astype(logit_dtype)))}
    )


def decode_logits(content: RecordDict, spec: PayloadSpec, num_samples: int) -> Tensor:
    """Decode and validate a logits-only train reply for a node holding ``num_samples``.

    A reply that carries features when none were asked for is rejected too: the
    server did not budget for them.
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
    """Encode bridge-sample embeddings ``eps`` (``N x 4 x h x w``) and labels (FedAgg, sent once)."""
    return ArrayRecord(
        {
            "embeddings": Array(np.ascontiguousarray(_to_numpy(embeddings).astype(np.float32))),
            "labels": Array(np.ascontiguousarray(_to_numpy(labels).astype(np.int64))),
        }
    )


def decode_embeddings(
    content: RecordDict, num_classes: int, channels: int = 4, max_samples: int | None = None
) -> tuple[Tensor, Tensor]:
    """Decode and validate an embeddings upload; return ``(embeddings, labels)``.

    Checks dtypes, an ``N x channels x h x w`` shape, finite values, labels in
    ``[0, num_classes)``, ``N`` against ``num-examples`` and ``max_samples``.
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
    if not np.isfinite(eps).all():
        raise PayloadError("'embeddings' contain NaN or Inf")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise PayloadError(
            f"'labels' outside [0, {num_classes}): min {labels.min()}, max {labels.max()}"
        )
    return _tensor(eps), _tensor(labels)


def encode_named_logits(
    logits: Mapping[str, Tensor | np.ndarray], logit_dtype: str = "float32"
) -> ArrayRecord:
    """Several logit arrays in one record, by name (FedAgg: one per neighbour's subtree)."""
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
    """Decode the arrays named in ``expected`` (name -> number of rows), validated like ``Z_s``."""
    out = {}
    for name, rows in expected.items():
        try:
            out[name] = validate_server_logits(_load(record, name, LOGIT_DTYPES), rows, num_classes)
        except PayloadError as err:
            raise PayloadError(f"{name}: {err}") from None
    return out


def _npy_view(data: bytes) -> np.ndarray:
    """A read-only array over ``.npy`` bytes, without copying the data.

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
) -> Payload:
    """Validate decoded arrays against ``spec``; return them as tensors.

    Raises
    ------
    PayloadError
        On wrong dtypes, shapes or counts, non-finite values or labels outside
        ``[0, num_classes)``.
    """
    if str(features.dtype) not in _FLOAT_DTYPES:  # int8 arrives here dequantized
        raise PayloadError(f"'features' has dtype {features.dtype}, expected {list(_FLOAT_DTYPES)}")
    if str(labels.dtype) not in LABEL_DTYPES:
        raise PayloadError(f"'labels' has dtype {labels.dtype}, expected {list(LABEL_DTYPES)}")
    if features.ndim != 4:
        raise PayloadError(f"'features' must be N x C x H x W, got shape {list(features.shape)}")
    n = features.shape[0]
    if n == 0:
        raise PayloadError("payload has no samples")
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
    if not np.isfinite(features).all():
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
    return Payload(
        features=_tensor(features.astype(np.float32, copy=False)),
        labels=_tensor(labels),
        logits=logits_t,
    )


def decode_payload(content: RecordDict, spec: PayloadSpec, with_logits: bool) -> Payload:
    """Decode and validate a train (``with_logits=True``) or evaluate reply."""
    record = _record(content)
    num_examples = _num_examples(content)
    features = _load(record, "features", FEATURE_DTYPES)
    if features.dtype == np.int8:
        features = _dequantize(features, record)
    labels = _load(record, "labels", LABEL_DTYPES)
    logits = _load(record, "logits", LOGIT_DTYPES) if with_logits else None
    return validate_arrays(features, labels, logits, spec, num_examples)


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


def _dequantize(q: np.ndarray, record: ArrayRecord) -> np.ndarray:
    """Check the int8 codec's per-channel parameters, then dequantize."""
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
    if (params["feature-scale"] <= 0).any():
        raise PayloadError("'feature-scale' must be positive")
    return dequantize_int8(q, params["feature-min"], params["feature-scale"])


def decode_server_logits(content: RecordDict, num_samples: int, num_classes: int) -> Tensor | None:
    """Decode the server logits a node received; ``None`` when none were sent."""
    record = content.array_records.get(ARRAYS_KEY)
    if record is None or "server-logits" not in record:
        return None
    return validate_server_logits(
        _load(record, "server-logits", LOGIT_DTYPES), num_samples, num_classes
    )


def validate_server_logits(logits: np.ndarray, num_samples: int, num_classes: int) -> Tensor:
    """Check server logits against the node's training set; return them as a tensor."""
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
    """A settings dataclass from a ConfigRecord: field ``batch_size`` <- key ``batch-size``.

    Missing keys keep the field's default; present values are cast to the
    field's default's type (``int``, ``float``, ``bool``, ``str`` or an
    ``Enum``), so a ConfigRecord from any sender gives well-typed settings.
    """
    base = cls()
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f.name.replace("_", "-")
        if key in config:
            default = getattr(base, f.name)
            caster = type(default)
            values[f.name] = (
                caster(config[key])
                if not isinstance(default, enum.Enum)
                else caster(str(config[key]))
            )
    return dataclasses.replace(base, **values)  # type: ignore[type-var]


def record_nbytes(content: RecordDict | Mapping[str, ArrayRecord]) -> int:
    """Bytes of all array payloads in a message's content (serialized size)."""
    records = content.array_records if isinstance(content, RecordDict) else content
    return sum(len(array.data) for record in records.values() for array in record.values())


def metrics_record(num_examples: int, **metrics: float) -> MetricRecord:
    """A reply's MetricRecord with the ``num-examples`` weight first."""
    return MetricRecord(
        {NUM_EXAMPLES: int(num_examples), **{k: float(v) for k, v in metrics.items()}}
    )
