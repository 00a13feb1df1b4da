"""The feature codecs: int8 quantization and float16 resolution.

``int8`` features are the affine per-channel quantization of
:func:`quantize_int8` (sent with ``feature-min`` and ``feature-scale``);
``feature-dtype: auto`` sends float16 when that moves no value by more than
:data:`FLOAT16_TOLERANCE` (:func:`resolve_feature_dtype`). Also the array
conversions every encoder and decoder shares (:func:`to_numpy`,
:func:`to_tensor`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from flwr_gkt.core.payload import chunk_rows
from flwr_gkt.wire.keys import FEATURE_DTYPE_CHOICES

__all__ = [
    "FLOAT16_TOLERANCE",
    "dequantize_int8",
    "lossless_float16",
    "quantize_int8",
    "resolve_feature_dtype",
    "to_numpy",
    "to_tensor",
]


def to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    """Return ``x`` as a numpy array (a tensor detached and moved to the CPU)."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_tensor(x: np.ndarray) -> Tensor:
    """float32/int64 tensor sharing memory with ``x`` when possible (read-only views included)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


def quantize_int8(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``N x C x H x W`` features (cast to float32) to int8, per channel (affine).

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
    """Invert :func:`quantize_int8`: the float32 features ``(q + 128) * scale + minimum``."""
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
    time. The result is one of :data:`~flwr_gkt.wire.keys.FEATURE_DTYPES`.

    Raises
    ------
    ValueError
        If ``feature_dtype`` is not one of :data:`FEATURE_DTYPE_CHOICES`.
    """
    if feature_dtype not in FEATURE_DTYPE_CHOICES:
        raise ValueError(f"feature dtype {feature_dtype!r} not in {FEATURE_DTYPE_CHOICES}")
    if feature_dtype != "auto":
        return feature_dtype
    return "float16" if lossless_float16(features) is not None else "float32"


def lossless_float16(features: Tensor) -> Tensor | None:
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
