"""Wire format: round trip, byte accounting, and rejection of bad payloads."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from flwr_gkt.wire import (
    ARRAYS_KEY,
    FLOAT16_TOLERANCE,
    METRICS_KEY,
    PayloadError,
    PayloadSpec,
    decode_payload,
    decode_server_logits,
    encode_payload,
    encode_server_logits,
    metrics_record,
    record_nbytes,
    resolve_feature_dtype,
)

SPEC = PayloadSpec(num_classes=10, feature_shape=(16, 8, 8))


def make(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 16, 8, 8, generator=g),
        torch.randint(0, 10, (n,), generator=g),
        torch.randn(n, 10, generator=g),
    )


def content(features, labels, logits, num_examples=None, feature_dtype="float32"):
    record = encode_payload(features, labels, logits, feature_dtype=feature_dtype)
    n = len(labels) if num_examples is None else num_examples
    return RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(n)})


def raw_content(arrays: dict, num_examples: int):
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return RecordDict(
        {ARRAYS_KEY: record, METRICS_KEY: MetricRecord({"num-examples": num_examples})}
    )


def test_round_trip_is_exact():
    h, y, z = make()
    p = decode_payload(content(h, y, z), SPEC, with_logits=True)
    assert torch.equal(p.features, h) and torch.equal(p.labels, y) and torch.equal(p.logits, z)
    p = decode_payload(content(h, y, None), SPEC, with_logits=False)
    assert p.logits is None and len(p) == 5


def test_float16_features_round_trip_within_half_precision():
    h, y, z = make()
    p = decode_payload(content(h, y, z, feature_dtype="float16"), SPEC, with_logits=True)
    assert p.features.dtype == torch.float16  # stored as it came: half the bytes
    assert p.dense_features().dtype == torch.float32
    assert torch.allclose(p.dense_features(), h, atol=1e-2, rtol=1e-3)


def test_bytes_counted_match_payload():
    h, y, z = make(n=7)
    c = content(h, y, z)
    npy = sum(len(a.data) for a in c.array_records[ARRAYS_KEY].values())
    assert record_nbytes(c) == npy
    raw = 7 * 16 * 8 * 8 * 4 + 7 * 8 + 7 * 10 * 4
    assert raw < record_nbytes(c) < raw + 3 * 256  # .npy header per array, no more
    half = content(h, y, z, feature_dtype="float16")
    assert record_nbytes(c) - record_nbytes(half) == 7 * 16 * 8 * 8 * 2


def _reject(c, match, with_logits=True, spec=SPEC):
    with pytest.raises(PayloadError, match=match):
        decode_payload(c, spec, with_logits=with_logits)


def test_rejects_non_finite_values():
    h, y, z = make()
    h[1, 2, 3, 4] = float("nan")
    _reject(content(h, y, z), "NaN or Inf")
    h, y, z = make()
    z[0, 0] = float("inf")
    _reject(content(h, y, z), "'logits' contain NaN or Inf")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_finite_check_agrees_with_numpy_on_every_kind_of_value(dtype):
    """Every special value, in the first, a middle and the last row of a many-chunk array."""
    from flwr_gkt.core.payload import chunk_rows
    from flwr_gkt.wire.validate import all_finite

    info = np.finfo(dtype)
    rows = 3 * chunk_rows((16, 28, 28), np.dtype(dtype).itemsize) + 5
    x = np.random.default_rng(0).standard_normal((rows, 16, 28, 28)).astype(dtype)
    edge_values = [info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 0.0]
    x.reshape(-1)[: len(edge_values)] = edge_values
    assert all_finite(x)
    for value in (np.inf, -np.inf, np.nan, -np.nan):
        for row in (0, rows // 2, rows - 1):
            bad = x.copy()
            bad[row, 15, 27, 27] = value
            assert not all_finite(bad) and not np.isfinite(bad).all(), (value, row)
    assert all_finite(x[:0]) and not all_finite(np.asarray(np.nan, dtype=dtype))
    assert not all_finite(np.full((4, 3), np.inf, dtype=dtype)[:, ::2])  # not contiguous


def test_rejects_wrong_shapes_and_counts():
    h, y, z = make()
    _reject(content(h[:, :, :4], y, z), r"maps have shape \[16, 4, 8\]")
    _reject(content(h.reshape(5, -1), y, z), "N x C x H x W")
    _reject(content(h, y[:4], z), "count mismatch")
    _reject(content(h, y, z[:, :9]), r"'logits' has shape \[5, 9\]")
    _reject(content(h, y, z[:3]), r"'logits' has shape \[3, 10\]")
    _reject(content(h, y, z, num_examples=6), "'num-examples' says 6")
    _reject(content(h[:0], y[:0], z[:0]), "no samples")
    _reject(
        content(h, y, z), "more than the limit", spec=PayloadSpec(10, (16, 8, 8), max_samples=4)
    )


def test_rejects_wrong_dtypes():
    h, y, z = make()
    arrays = {"features": h.numpy(), "labels": y.numpy(), "logits": z.numpy()}
    _reject(
        raw_content({**arrays, "features": h.double().numpy()}, 5), "'features' has dtype float64"
    )
    _reject(raw_content({**arrays, "labels": y.int().numpy()}, 5), "'labels' has dtype int32")
    _reject(raw_content({**arrays, "labels": y.float().numpy()}, 5), "'labels' has dtype float32")
    _reject(raw_content({**arrays, "logits": z.double().numpy()}, 5), "'logits' has dtype float64")


def test_rejects_out_of_range_labels():
    h, y, z = make()
    y[0] = 10
    _reject(content(h, y, z), r"outside \[0, 10\)")
    y[0] = -1
    _reject(content(h, y, z), r"outside \[0, 10\)")


def test_rejects_missing_parts_and_lying_metadata():
    h, y, z = make()
    _reject(RecordDict({METRICS_KEY: metrics_record(5)}), "missing ArrayRecord")
    _reject(RecordDict({ARRAYS_KEY: encode_payload(h, y, z)}), "missing MetricRecord")
    _reject(raw_content({"features": h.numpy(), "labels": y.numpy()}, 5), "missing array 'logits'")
    c = RecordDict(
        {ARRAYS_KEY: encode_payload(h, y, z), METRICS_KEY: MetricRecord({"num-examples": 5.0})}
    )
    _reject(c, "not an integer")
    c = content(h, y, z)
    c.array_records[ARRAYS_KEY]["features"].shape = [5, 16, 8, 9]  # header says otherwise
    _reject(c, "declares")
    c = content(h, y, z)
    c.array_records[ARRAYS_KEY]["labels"].data = b"garbage"
    _reject(c, "cannot be decoded")


def test_server_logits_round_trip_and_validation():
    z = torch.randn(6, 10)
    c = RecordDict({ARRAYS_KEY: encode_server_logits(z)})
    assert torch.equal(decode_server_logits(c, 6, 10), z)
    assert decode_server_logits(RecordDict(), 6, 10) is None
    with pytest.raises(PayloadError, match="expected"):
        decode_server_logits(c, 7, 10)


# --------------------------------------------------------------- feature codecs
def _relu_features(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, 16, 8, 8, generator=g)) * torch.linspace(0.1, 5.0, 16).view(
        1, -1, 1, 1
    )
    x[:, 3] = 0.7  # a constant channel
    return x


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_feature_codecs_round_trip_within_their_error_bound(dtype):
    x = _relu_features()
    labels, logits = torch.randint(0, 10, (64,)), torch.randn(64, 10)
    payload = decode_payload(content(x, labels, logits, feature_dtype=dtype), SPEC, True)
    wire = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}[dtype]
    assert payload.features.dtype == wire and payload.features.shape == x.shape  # kept as sent
    dense = payload.dense_features()
    assert dense.dtype == torch.float32
    err = (dense - x).abs()
    if dtype == "float32":
        assert err.max() == 0
    elif dtype == "float16":
        assert (err <= x.abs() * 2**-11 + 1e-7).all()  # half precision: 11 significant bits
    else:
        span = x.amax(dim=(0, 2, 3)) - x.amin(dim=(0, 2, 3))
        bound = (span / 255 / 2).view(1, -1, 1, 1) + 1e-6  # half a quantization step per channel
        assert (err <= bound).all()
        assert torch.equal(dense[:, 3], x[:, 3])  # constant channel decodes exactly
        assert err.max() > 0  # it is lossy
    assert torch.equal(payload.labels, labels)


def test_int8_features_cut_upload_bytes_four_fold():
    x, labels, logits = _relu_features(n=256), torch.randint(0, 10, (256,)), torch.randn(256, 10)
    fp32 = record_nbytes(content(x, labels, logits, feature_dtype="float32"))
    int8 = record_nbytes(content(x, labels, logits, feature_dtype="int8"))
    feature_bytes = 256 * 16 * 8 * 8
    # features 4x smaller; labels (int64) and logits (float32) unchanged; scales are 2 x 16 floats
    assert fp32 - int8 == pytest.approx(3 * feature_bytes - 2 * 16 * 4, abs=3 * 256)
    assert fp32 / int8 > 3.0


def test_float16_logits_both_directions():
    x, labels, logits = make()
    record = encode_payload(x, labels, logits, logit_dtype="float16")
    assert record["logits"].dtype == "float16"
    payload = decode_payload(
        RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(5)}), SPEC, True
    )
    assert payload.logits.dtype == torch.float32
    assert torch.allclose(payload.logits, logits, rtol=1e-3, atol=1e-3)
    down = RecordDict({ARRAYS_KEY: encode_server_logits(logits, "float16")})
    assert torch.allclose(decode_server_logits(down, 5, 10), logits, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError):
        encode_payload(x, labels, logits, logit_dtype="int8")


def _int8_arrays(**overrides):
    from flwr_gkt.wire import quantize_int8

    x, labels, logits = make()
    q, lo, scale = quantize_int8(x.numpy())
    arrays = {
        "features": q,
        "feature-min": lo,
        "feature-scale": scale,
        "labels": labels.numpy(),
        "logits": logits.numpy(),
    }
    arrays.update(overrides)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize(
    "overrides,reason",
    [
        ({"feature-scale": None}, "missing array 'feature-scale'"),
        ({"feature-min": None}, "missing array 'feature-min'"),
        ({"feature-scale": np.ones(15, np.float32)}, "one per channel"),
        ({"feature-min": np.zeros((16, 1), np.float32)}, "one per channel"),
        ({"feature-scale": np.full(16, np.nan, np.float32)}, "NaN or Inf"),
        ({"feature-scale": -np.ones(16, np.float32)}, "must be positive"),
        ({"feature-scale": np.zeros(16, np.float32)}, "must be positive"),
        ({"feature-scale": np.ones(16, np.float64)}, "dtype float64"),
        ({"features": np.zeros((5, 16, 8), np.int8)}, "N x C x H x W"),
    ],
)
def test_malformed_quantized_payloads_are_rejected(overrides, reason):
    with pytest.raises(PayloadError, match=reason.replace("(", r"\(")):
        decode_payload(raw_content(_int8_arrays(**overrides), 5), SPEC, True)


def test_int8_payload_with_wrong_channel_count_is_rejected():
    x = torch.rand(5, 8, 8, 8)
    c = content(x, torch.randint(0, 10, (5,)), torch.randn(5, 10), feature_dtype="int8")
    with pytest.raises(PayloadError, match="maps have shape"):
        decode_payload(c, SPEC, True)


def test_auto_sends_bf16_features_as_float16_with_the_same_values():
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-9, 4, 16).view(1, 16, 1, 1)  # channel magnitudes 1e-9 .. 1e4
    h = (torch.randn(5, 16, 8, 8, generator=g) * scale).bfloat16().float()  # bf16 values
    _, y, z = make()
    assert resolve_feature_dtype("auto", h) == "float16"
    c = content(h, y, z, feature_dtype="auto")  # encode_payload resolves it itself
    assert c.array_records[ARRAYS_KEY]["features"].dtype == "float16"
    assert record_nbytes(content(h, y, z)) - record_nbytes(c) == 5 * 16 * 8 * 8 * 2
    got = decode_payload(c, SPEC, with_logits=True).dense_features()
    normal = h.abs() >= 2.0**-14  # float16's normal range: every bf16 value there is exact
    assert 0.5 < normal.float().mean() < 1 and torch.equal(got[normal], h[normal])
    assert 0 < (got - h).abs().max() <= FLOAT16_TOLERANCE  # the rest: float16's finest grid


def test_auto_keeps_float32_where_float16_would_move_a_value_more():
    h = make()[0].bfloat16().float()
    assert resolve_feature_dtype("auto", h) == "float16"
    assert resolve_feature_dtype("float32", h) == "float32"  # an explicit codec is kept
    assert resolve_feature_dtype("int8", h) == "int8"
    assert resolve_feature_dtype("auto", make()[0]) == "float32"  # fp32 values: 24-bit mantissas
    f, y, z = make()
    sent = decode_payload(content(f, y, z, feature_dtype="auto"), SPEC, with_logits=True)
    assert sent.features.dtype == torch.float32 and torch.equal(sent.features, f)
    for value in (1.0 + 2.0**-12, -70000.0, float("nan")):  # between float16 values, too big, NaN
        bad = h.clone()
        bad[4, 15, 7, 7] = value  # the last value of the last chunk
        assert resolve_feature_dtype("auto", bad) == "float32", value
    with pytest.raises(ValueError, match="feature dtype"):
        resolve_feature_dtype("bfloat16", h)
