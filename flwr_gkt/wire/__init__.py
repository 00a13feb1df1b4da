"""The wire format: tensors <-> Flower records, with validation.

Everything that crosses the network goes through this package, one module per
concern: :mod:`~flwr_gkt.wire.keys` (record names, dtypes),
:mod:`~flwr_gkt.wire.codecs` (int8, float16), :mod:`~flwr_gkt.wire.validate`
(array checks, the magnitude rule), the messages of :mod:`~flwr_gkt.wire.gkt`
(FedGKT), :mod:`~flwr_gkt.wire.fedagg` and :mod:`~flwr_gkt.wire.split` (split
learning), :mod:`~flwr_gkt.wire.records` (config and metric records) and
:mod:`~flwr_gkt.wire.gate` (the reply gate). Every decoder validates what it
reads and raises :class:`PayloadError` with a one-line reason. This module only
re-exports.
"""

from flwr_gkt.core.payload import Payload, PayloadError, PayloadSpec

from .codecs import FLOAT16_TOLERANCE, dequantize_int8, quantize_int8, resolve_feature_dtype
from .fedagg import decode_embeddings, decode_named_logits, encode_embeddings, encode_named_logits
from .gkt import (
    decode_logits,
    decode_payload,
    decode_server_logits,
    encode_logits,
    encode_payload,
    encode_server_logits,
)
from .keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FEATURE_DTYPE_CHOICES,
    FEATURE_DTYPES,
    GRADIENT_DTYPES,
    LOGIT_DTYPES,
    METRICS_KEY,
)
from .keys import LABEL_DTYPES as LABEL_DTYPES
from .keys import NODE_EDGE_MODEL as NODE_EDGE_MODEL
from .keys import NODE_KEY as NODE_KEY
from .keys import NODE_TOKEN as NODE_TOKEN
from .keys import NODE_UID as NODE_UID
from .keys import NUM_EXAMPLES as NUM_EXAMPLES
from .records import metrics_record as metrics_record
from .records import record_nbytes, scalar, settings_from_config, settings_record
from .split import (
    decode_activations,
    decode_gradient,
    decode_state,
    encode_activations,
    encode_gradient,
    encode_state,
)
from .validate import MAX_ABS_VALUE, magnitude_error, validate_arrays, validate_server_logits

# fmt: off
__all__ = [
    "ARRAYS_KEY", "CONFIG_KEY", "FEATURE_DTYPES", "FEATURE_DTYPE_CHOICES", "FLOAT16_TOLERANCE",
    "GRADIENT_DTYPES", "LOGIT_DTYPES", "MAX_ABS_VALUE", "METRICS_KEY", "Payload", "PayloadError",
    "PayloadSpec", "decode_activations", "decode_embeddings", "decode_gradient", "decode_logits",
    "decode_named_logits", "decode_payload", "decode_server_logits", "decode_state",
    "dequantize_int8", "encode_activations", "encode_embeddings", "encode_gradient",
    "encode_logits", "encode_named_logits", "encode_payload", "encode_server_logits",
    "encode_state", "magnitude_error", "quantize_int8", "record_nbytes", "resolve_feature_dtype",
    "scalar", "settings_from_config", "settings_record", "validate_arrays",
    "validate_server_logits",
]
# fmt: on
