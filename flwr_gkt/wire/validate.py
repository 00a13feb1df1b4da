"""Reading and checking what a node sent, before anything uses it.

Arrays are parsed in place from their ``.npy`` bytes (:func:`load_array`,
their declared and actual dtype and shape checked), a reply's records are
looked up (:func:`array_record`, :func:`read_num_examples`), and the decoded
arrays are checked: a FedGKT payload (:func:`validate_arrays`), server logits
(:func:`validate_server_logits`), the int8 codec's parameters
(:func:`read_int8_params`). Every check raises :class:`PayloadError` with a
one-line reason.

The finite and magnitude checks read floats as integers of their width
(:func:`all_within`); :func:`magnitude_error` is the gate's one magnitude rule
(:data:`MAX_ABS_VALUE`) for every array a node sends.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import Tensor

from flwr_gkt.core.payload import Payload, PayloadError, PayloadSpec, chunk_rows
from flwr_gkt.wire.codecs import to_tensor
from flwr_gkt.wire.keys import (
    ARRAYS_KEY,
    FLOAT_DTYPES,
    LABEL_DTYPES,
    LOGIT_DTYPES,
    METRICS_KEY,
    NUM_EXAMPLES,
)

__all__ = [
    "MAX_ABS_VALUE",
    "all_finite",
    "all_within",
    "array_record",
    "load_array",
    "magnitude_error",
    "read_int8_params",
    "read_num_examples",
    "validate_arrays",
    "validate_server_logits",
]


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


def load_array(record: ArrayRecord, key: str, dtypes: tuple[str, ...]) -> np.ndarray:
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


def array_record(content: RecordDict) -> ArrayRecord:
    """Return the ``gkt`` ArrayRecord of a message's content (:class:`PayloadError` if absent)."""
    if ARRAYS_KEY not in content.array_records:
        raise PayloadError(f"missing ArrayRecord '{ARRAYS_KEY}'")
    return content.array_records[ARRAYS_KEY]


def read_num_examples(content: RecordDict) -> int:
    """Return a reply's integer ``num-examples`` (:class:`PayloadError` if absent or not one)."""
    if METRICS_KEY not in content.metric_records:
        raise PayloadError(f"missing MetricRecord '{METRICS_KEY}'")
    value = content.metric_records[METRICS_KEY].get(NUM_EXAMPLES)
    if not isinstance(value, int):
        raise PayloadError(f"'{NUM_EXAMPLES}' missing or not an integer")
    return value


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

    The payload's float32 logits and int64 labels may share (read-only)
    memory with the arrays.

    Raises
    ------
    PayloadError
        On wrong dtypes, shapes or counts, no samples or more than the
        limit, non-finite values or labels outside ``[0, num_classes)``.
    """
    int8 = features.dtype == np.int8 and int8_params is not None
    if str(features.dtype) not in FLOAT_DTYPES and not int8:
        raise PayloadError(f"'features' has dtype {features.dtype}, expected {list(FLOAT_DTYPES)}")
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
    if not int8 and not all_finite(features):  # int8 maps decode finite (checked parameters)
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
        logits_t = to_tensor(logits.astype(np.float32, copy=False))
    # Tensors may be read-only views of the message bytes: consumers must not
    # modify them in place (the server only reads them).
    minimum, scale = (None, None) if int8_params is None else int8_params
    return Payload(
        features=to_tensor(features),
        labels=to_tensor(labels),
        logits=logits_t,
        feature_min=None if minimum is None or not int8 else to_tensor(minimum),
        feature_scale=None if scale is None or not int8 else to_tensor(scale),
    )


def read_int8_params(q: np.ndarray, record: ArrayRecord) -> tuple[np.ndarray, np.ndarray]:
    """Check and return the int8 codec's per-channel ``(minimum, scale)``."""
    if q.ndim != 4:
        raise PayloadError(f"'features' must be N x C x H x W, got shape {list(q.shape)}")
    channels = q.shape[1]
    params = {}
    for key in ("feature-min", "feature-scale"):
        value = load_array(record, key, ("float32",))
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


def validate_server_logits(logits: np.ndarray, num_samples: int, num_classes: int) -> Tensor:
    """Check server logits ``num_samples x num_classes`` against the node's training set.

    Return them as a float32 tensor.

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
    return to_tensor(logits.astype(np.float32, copy=False))


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


def all_within(x: np.ndarray, bound: float = math.inf) -> bool:
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


def all_finite(x: np.ndarray) -> bool:
    """Whether every value of ``x`` is finite (:func:`all_within` without a bound)."""
    return all_within(x)


def _tensor_within(t: Tensor, bound: float) -> bool:
    """:func:`all_within` for a tensor (read in place where numpy can view it)."""
    t = t.detach()
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32, torch.float64):
        return all_within(t.numpy(), bound)
    t = t.float()
    return bool(torch.isfinite(t).all()) and (t.numel() == 0 or float(t.abs().max()) <= bound)


def magnitude_error(value: Any, bound: float, name: str = "") -> str | None:
    """Return why ``value`` holds a float beyond ``bound`` (or NaN/Inf), else ``None``.

    The gate's one magnitude rule for every array a node sends, whatever the
    strategy: ``value`` is what a strategy's decoder returned -- a
    :class:`Payload` (features, int8 maps by their decoded range, logits), a
    tensor, or mappings / sequences of them (edge weights, FedAgg's named
    logits, embeddings and labels). Integer tensors (labels, counters) are
    skipped: their ranges are checked where they are decoded. The reason
    reads ``"'<name>' holds values beyond +-<bound> (or NaN/Inf)"``.
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
