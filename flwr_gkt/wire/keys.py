"""Record names and on-the-wire dtypes of the wire format.

The keys of a message's RecordDict (its ArrayRecord, MetricRecord and
ConfigRecord, and the optional ``node`` record), and the dtypes each array may
have on the wire. The messages built from them are described where they are
encoded: :mod:`flwr_gkt.wire.gkt` (FedGKT), :mod:`flwr_gkt.wire.fedagg`
(FedAgg) and :mod:`flwr_gkt.wire.split` (split learning).
"""

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "FEATURE_DTYPES",
    "FEATURE_DTYPE_CHOICES",
    "FLOAT_DTYPES",
    "GRADIENT_DTYPES",
    "LABEL_DTYPES",
    "LOGIT_DTYPES",
    "METRICS_KEY",
    "NODE_EDGE_MODEL",
    "NODE_KEY",
    "NODE_TOKEN",
    "NODE_UID",
    "NUM_EXAMPLES",
]


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
#: quantization of :func:`~flwr_gkt.wire.codecs.quantize_int8`, sent with ``feature-min`` and
#: ``feature-scale`` (float32, one value per channel).
FEATURE_DTYPES = ("float32", "float16", "int8")
#: What a strategy may ask for as ``feature-dtype``: a codec, or ``auto``, which
#: each node resolves for its own features (:func:`~flwr_gkt.wire.codecs.resolve_feature_dtype`).
FEATURE_DTYPE_CHOICES = (*FEATURE_DTYPES, "auto")
LOGIT_DTYPES = ("float32", "float16")
FLOAT_DTYPES = ("float32", "float16")
LABEL_DTYPES = ("int64",)

#: Dtypes of the activation gradients ``dL/dH`` the server sends (split learning).
GRADIENT_DTYPES = ("float32", "float16")
