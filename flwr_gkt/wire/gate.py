"""The one trust boundary: every reply a node sends is checked here, once.

Strategies (:class:`~flwr_gkt.flower.strategy.FedGKT`,
:class:`~flwr_gkt.flower.async_strategy.AsyncFedGKT`, :class:`~flwr_gkt.flower.fedagg_strategy.FedAgg`)
never read a reply's records themselves: they hand the replies of a stage to
:meth:`ReplyGate.admit` and get typed results back. For each reply, in order:

1. **Attribution.** A reply answers one instruction of the stage
   (``reply_to``); one answering none (late, unknown) or answering one twice
   (duplicate) is ignored.
2. **Error replies** are rejected with the node's reason, made safe to log.
3. **Size** of *all* records (arrays, metrics, configs) against the limit,
   before anything is decoded.
4. **Metrics** against the stage's schema: known keys with finite numeric
   scalars are kept; anything else (unknown keys, lists, strings, NaN) is
   dropped and counted -- never merged into bookkeeping.
5. **Identity**: ``node-uid`` must be a short plain string
   (:func:`clean_uid`). An ``edge-model`` name beside it (heterogeneous
   federations) is recorded in the node's row when it is such a string too,
   and is never trusted for anything else: the feature shape is checked in 6.
6. **Arrays** decoded and validated by the wire format (:mod:`flwr_gkt.wire`),
   then the one **magnitude rule** for every array of every strategy
   (features, activations, logits, embeddings, edge weights): each float is
   finite and at most ``max_abs_value`` in absolute value
   (:func:`flwr_gkt.wire.magnitude_error`). It needs no other payload, so it
   holds from a run's first reply (async mode, split learning).
7. **Outlier check** against the round's other payloads *and* the stored
   payloads' statistics (:mod:`flwr_gkt.core.robust`), so a lone reply (async
   mode) is compared too: a payload scaled well within the bound of 6 but far
   from the honest population is rejected here.

Every rejection is one WARNING line naming the node and the reason, and one
row of the strategy's node history; a reply found out after it was admitted
(its data made a server step non-finite) is taken back with :meth:`ReplyGate.revoke`,
the same way. Nothing a node sends raises out of :meth:`ReplyGate.admit`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore import log

from flwr_gkt.core.robust import find_outliers, payload_stats
from flwr_gkt.wire import (
    ARRAYS_KEY,
    MAX_ABS_VALUE,
    METRICS_KEY,
    NODE_EDGE_MODEL,
    NODE_KEY,
    NODE_TOKEN,
    NODE_UID,
    NUM_EXAMPLES,
    Payload,
    PayloadError,
    magnitude_error,
    record_nbytes,
)

__all__ = [
    "EVALUATE_METRICS",
    "TRAIN_METRICS",
    "Admitted",
    "Claim",
    "GateResult",
    "Incoming",
    "ReplyGate",
    "clean_text",
    "clean_uid",
    "content_nbytes",
    "node_error",
    "read_metrics",
]

_MB = 1024 * 1024
#: Metrics a FedGKT train reply may carry (anything else is dropped).
TRAIN_METRICS = frozenset(
    {NUM_EXAMPLES, "edge-train-loss", "edge-train-accuracy", "edge-seconds", "used-server-logits"}
)
#: Metrics a FedGKT evaluate reply may carry.
EVALUATE_METRICS = frozenset({NUM_EXAMPLES, "edge-loss", "edge-accuracy"})
#: Ranges of the metrics whose meaning bounds them; a value outside is dropped
#: (counted as ``metrics-dropped``) like a non-finite one.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    **{
        key: (0.0, 1.0)
        for key in ("edge-train-accuracy", "edge-accuracy", "accuracy", "train-accuracy")
    },
    **{
        key: (0.0, math.inf)
        for key in ("edge-train-loss", "edge-loss", "loss", "train-loss", "edge-seconds", "seconds")
    },
}
#: Longest accepted ``node-uid``.
MAX_UID_CHARS = 128
_UID = re.compile(r"[A-Za-z0-9._:@+-]+")
_UNSAFE = re.compile(r"[^\x20-\x7e]")


def clean_text(value: object, limit: int = 200) -> str:
    """Return ``value`` as one printable line, safe for logs and CSV.

    Control characters and non-ASCII are escaped (no forged log lines), the
    text is cut to ``limit`` characters, and a leading ``= + - @`` gets a
    ``'`` in front (no spreadsheet formulas).

    Parameters
    ----------
    value : object
        A string a node sent (an error reason, a uid), or anything else.
    limit : int
        Most characters kept.

    Returns
    -------
    str
        The cleaned text.
    """
    text = value if isinstance(value, str) else repr(value)
    text = _UNSAFE.sub(
        lambda m: m.group().encode("unicode_escape").decode("ascii"), text[: 4 * limit]
    )
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def node_error(code: object, reason: object) -> str:
    """Return the rejection reason of a node's error reply (its reason made safe to log).

    Parameters
    ----------
    code : object
        The error code (Flower's ``Error.code``, a legacy ``Status.code``).
    reason : object
        What the node (or the SuperLink) gave as the reason.

    Returns
    -------
    str
        ``node error <code>: <reason>``, the reason cleaned (:func:`clean_text`).
    """
    return f"node error {code}: {clean_text(reason)}"


def clean_uid(value: object) -> str | None:
    """Return a node-uid if it is acceptable, else ``None``.

    Acceptable: a string of 1 to :data:`MAX_UID_CHARS` letters, digits and
    ``. _ : @ + -`` (no commas, spaces or control characters, so it can be
    listed, logged and written to CSV as it is).

    Parameters
    ----------
    value : object
        What the node sent as its ``node-uid``.

    Returns
    -------
    str | None
        The uid, or ``None`` when it is not acceptable.
    """
    if isinstance(value, str) and len(value) <= MAX_UID_CHARS and _UID.fullmatch(value):
        return value
    return None


def _value_nbytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, list):
        return sum(_value_nbytes(v) for v in value)
    return 8


def content_nbytes(content: RecordDict) -> int:
    """Return the size of *all* records of a message: arrays, metrics and configs.

    Arrays count their serialized bytes; other values their encoded length
    (strings, bytes, lists element by element) or 8 bytes (numbers), plus
    every key.

    Parameters
    ----------
    content : RecordDict
        A message's content.

    Returns
    -------
    int
        The number of bytes.
    """
    total = 0
    for name, record in content.items():
        total += len(name)
        for key, value in record.items():
            total += len(key)
            total += len(value.data) if hasattr(value, "data") else _value_nbytes(value)
    return total


def read_metrics(
    record: Mapping[str, Any] | None,
    known: frozenset[str],
    required: frozenset[str] = frozenset({NUM_EXAMPLES}),
) -> tuple[dict[str, float], int]:
    """Keep the known, finite, numeric scalar metrics of a reply (within :data:`METRIC_RANGES`).

    Parameters
    ----------
    record : Mapping[str, Any] | None
        The reply's MetricRecord.
    known : frozenset[str]
        The keys of the stage's schema.
    required : frozenset[str]
        Keys of ``known`` the reply must carry (``num-examples``, when the
        schema has it, as a non-negative integer).

    Returns
    -------
    tuple[dict[str, float], int]
        The kept metrics and how many entries were dropped.

    Raises
    ------
    PayloadError
        If a required key is missing, or ``num-examples`` is not a
        non-negative integer.
    """
    kept: dict[str, Any] = {}
    dropped = 0
    for key, value in (record or {}).items():
        low, high = METRIC_RANGES.get(key, (-math.inf, math.inf))
        ok = (
            key in known
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and low <= value <= high
        )
        if ok:
            kept[key] = value
        else:
            dropped += 1
    if NUM_EXAMPLES in required & known:
        n = kept.get(NUM_EXAMPLES)
        if not isinstance(n, int) or n < 0:
            raise PayloadError(f"'{NUM_EXAMPLES}' missing or not a non-negative integer")
    missing = sorted((required & known) - set(kept))
    if missing:
        raise PayloadError(f"metric(s) {', '.join(missing)} missing or not finite numbers")
    return kept, dropped


@dataclass
class Admitted:
    """One accepted reply.

    Attributes
    ----------
    node : int
        The node id the reply is attributed to (by its instruction).
    payload : Any
        The validated payload (what the strategy's decoder returned);
        ``None`` once handed to ``consume``.
    metrics : dict[str, float]
        The schema-checked metrics (``num-examples`` included).
    uid : str | None
        The node's clean ``node-uid``, if it sent one.
    nbytes : int
        Bytes of the reply's arrays.
    """

    node: int
    payload: Any
    metrics: dict[str, float]
    uid: str | None = None
    nbytes: int = 0


@dataclass(frozen=True)
class Claim:
    """A node's answer to an identity query: its id, clean uid and token (if any).

    ``extra`` holds the other fields asked for, each a clean short name
    (:func:`clean_uid`); a field missing or not clean is left out.
    """

    node: int
    uid: str
    token: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass
class GateResult:
    """What :meth:`ReplyGate.admit` found in one stage's replies.

    Attributes
    ----------
    accepted : list[Admitted]
        The accepted replies, in arrival order.
    records : list[dict[str, Any]]
        One node-history row per reply (accepted, rejected or ignored):
        ``round``, ``stage``, ``node-id``, ``status``, ``reason`` and, for
        accepted ones, ``bytes-up`` and the kept metrics; ``edge-model`` when
        the reply named its (clean) edge model.
    rejected : int
        Replies rejected (errors included).
    ignored : Counter[str]
        Replies ignored, by status (``late``, ``duplicate``).
    nbytes : int
        Bytes of the attributed replies' arrays (what the project counts as
        communicated; the size limit applies to all records).
    """

    accepted: list[Admitted] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0
    ignored: Counter[str] = field(default_factory=Counter)
    nbytes: int = 0


#: ``decode(node, content)``: a strategy's reading of a reply's arrays (a
#: :class:`~flwr_gkt.wire.Payload` for FedGKT; raises on a bad payload).
Decoder = Callable[[int, RecordDict], Any]


@dataclass
class Incoming:
    """One reply attributed to a node, before its checks (:meth:`ReplyGate.check`).

    Attributes
    ----------
    node : int
        The node the reply is attributed to.
    content : RecordDict
        What the node sent (empty for an error reply).
    error : str
        The node's error, when the reply is one.
    metrics : Mapping[str, Any], optional
        Metrics carried beside ``content`` (the legacy API's ``FitRes.metrics``);
        ``None``: read from ``content``.
    row : dict[str, Any], optional
        Its node-history row, when attribution made one already.
    """

    node: int
    content: RecordDict = field(default_factory=RecordDict)
    error: str = ""
    metrics: Mapping[str, Any] | None = None
    row: dict[str, Any] | None = None


class ReplyGate:
    """Check every reply of a stage before a strategy uses it.

    Parameters
    ----------
    max_payload_bytes : int, optional
        Largest size of all of a reply's records; larger replies are rejected
        before they are decoded.
    outlier_threshold : float
        Robust deviations from the median beyond which a payload is an
        outlier (:func:`flwr_gkt.core.robust.find_outliers`); ``0`` turns the
        check off.
    logit_clip : float
        Decoded client logits are clipped to ``[-logit_clip, logit_clip]``
        (``0``: not clipped) before the magnitude rule and the outlier check
        see them.
    name : str
        The strategy's name in log lines.
    max_abs_value : float
        Largest absolute value of any float a reply carries
        (:func:`flwr_gkt.wire.magnitude_error`); ``0`` turns the rule off
        (NaN/Inf are still refused by the wire's decoders).
    reference_stages : Iterable[str]
        Stages whose accepted payloads become the outlier check's reference
        for later replies (``train``; split learning: its activation stages).
    """

    def __init__(
        self,
        max_payload_bytes: int | None = None,
        outlier_threshold: float = 10.0,
        logit_clip: float = 0.0,
        name: str = "FedGKT",
        max_abs_value: float = MAX_ABS_VALUE,
        reference_stages: Iterable[str] = ("train",),
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.outlier_threshold = outlier_threshold
        self.logit_clip = logit_clip
        self.name = name
        self.max_abs_value = max_abs_value
        self.reference_stages = frozenset(reference_stages)
        #: Statistics of each node's latest accepted payload of a reference stage:
        #: the outlier check's reference when a stage has few replies (async mode).
        self.reference: dict[int, dict[str, float]] = {}
        #: ``node-uid -> node id``: the first node to claim a uid owns it; a
        #: reply of another node claiming it is rejected.
        self.uid_owner: dict[str, int] = {}

    def identities(self, replies: Iterable[Message], fields: Iterable[str] = ()) -> list[Claim]:
        """Read the identity claims of ``node-uid`` query replies.

        Error replies, replies without a clean uid and non-string tokens are
        skipped (one log line each); a node's second answer is ignored.

        Parameters
        ----------
        replies : Iterable[Message]
            The query replies.
        fields : Iterable[str]
            Other fields of the node record to read (e.g. FedAgg's ``tier``
            and ``parent``), each checked like a uid.

        Returns
        -------
        list[Claim]
            One claim per answering node.
        """
        fields = tuple(fields)
        claims: dict[int, Claim] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in claims:
                continue
            if reply.has_error():
                log(
                    WARNING,
                    "%s: node %d answered the identity query with an error: %s",
                    self.name,
                    node,
                    clean_text(reply.error.reason),
                )
                continue
            try:
                info = reply.content.config_records.get(NODE_KEY, ConfigRecord())
                uid, token = clean_uid(info.get(NODE_UID)), info.get(NODE_TOKEN)
                extra = {f: v for f in fields if (v := clean_uid(info.get(f))) is not None}
            except Exception as err:
                uid, token, extra = None, repr(err), {}
            if uid is None:
                log(
                    WARNING,
                    "%s: node %d answered the identity query without a valid node-uid",
                    self.name,
                    node,
                )
                continue
            token = token if isinstance(token, str) and len(token) <= 256 else None
            claims[node] = Claim(node, uid, token, extra)
        return list(claims.values())

    @staticmethod
    def vote_feature_shape(replies: Iterable[Message]) -> tuple[int, ...] | None:
        """Return the feature-map shape a strict majority of the replies carry, if any.

        Reads only the shape of each reply's ``features`` array (nothing is
        decoded); shapes with a zero dimension never count. Lets a strategy
        without a configured feature shape fix it from the honest majority
        instead of from whichever reply comes first.

        Parameters
        ----------
        replies : Iterable[Message]
            A round's train replies.

        Returns
        -------
        tuple[int, ...] | None
            ``(C, H, W)`` held by more than half of the replies, else ``None``.
        """
        votes: Counter[tuple[int, ...]] = Counter()
        total = 0
        for msg in replies:
            if msg.has_error():
                continue
            total += 1
            try:
                shape = tuple(
                    int(d) for d in msg.content.array_records[ARRAYS_KEY]["features"].shape
                )
            except Exception:
                continue
            if len(shape) == 4 and all(d > 0 for d in shape):
                votes[shape[1:]] += 1
        if not votes:
            return None
        shape, count = votes.most_common(1)[0]
        return shape if count * 2 > total else None

    def oversize(self, size: int) -> str:
        """Return why a reply of ``size`` bytes (all records) is too large, or ``""``.

        Parameters
        ----------
        size : int
            The reply's size (:func:`content_nbytes`).

        Returns
        -------
        str
            The reason, or ``""`` when it is within ``max_payload_bytes`` (or
            there is no limit).
        """
        if self.max_payload_bytes and size > self.max_payload_bytes:
            limit = self.max_payload_bytes / _MB
            return f"reply of {size / _MB:.2f} MB, over the limit of {limit:.2f} MB"
        return ""

    def forget(self, node: int) -> None:
        """Drop ``node``'s stored statistics (its payload left the store)."""
        self.reference.pop(node, None)

    def _reject(self, result: GateResult, record: dict[str, Any], status: str, why: str) -> None:
        result.rejected += 1
        record.update(status=status, reason=clean_text(why))
        log(
            WARNING,
            "%s round %d: %s reply of node %d rejected: %s",
            self.name,
            record["round"],
            record["stage"],
            record["node-id"],
            record["reason"],
        )

    def admit(
        self,
        server_round: int,
        stage: str,
        replies: Iterable[Message],
        instructions: list[Message],
        decode: Decoder | None,
        known_metrics: frozenset[str],
        consume: Callable[[Admitted, Any], None] | None = None,
        required: frozenset[str] = frozenset({NUM_EXAMPLES}),
    ) -> GateResult:
        """Check one stage's replies; return the accepted ones and a row per reply.

        Attribution first (late and duplicate replies are ignored), then
        :meth:`check`. With ``consume``, each accepted payload is handed to it
        as soon as it is validated and the reply's arrays are released (one
        decoded reply held at a time); :attr:`Admitted.payload` is then ``None``.

        Parameters
        ----------
        server_round : int
            The current round.
        stage : str
            The stage's name (log lines and rows): ``train``, ``evaluate``, ...
        replies : Iterable[Message]
            The replies, as the Grid returned them.
        instructions : list[Message]
            The stage's instructions (what a reply may answer).
        decode : Decoder, optional
            Reads and validates a reply's arrays (raises on a bad payload);
            ``None``: the stage carries no arrays.
        known_metrics : frozenset[str]
            The stage's metric schema.
        consume : Callable[[Admitted, Any], None], optional
            Takes each accepted payload at once; it may refuse one by raising
            :class:`~flwr_gkt.wire.PayloadError` (what only using the payload
            shows, e.g. a non-finite server loss): the reply is then rejected
            with that reason.
        required : frozenset[str]
            Metrics of the schema a reply must carry.

        Returns
        -------
        GateResult
            Accepted replies, rows, counts and bytes.
        """
        result = GateResult()
        incoming = self._attribute(server_round, stage, replies, instructions, result)
        return self.check(
            server_round, stage, incoming, decode, known_metrics, consume, required, result
        )

    def _attribute(
        self,
        server_round: int,
        stage: str,
        replies: Iterable[Message],
        instructions: list[Message],
        result: GateResult,
    ) -> list[Incoming]:
        """Attribute each reply to the instruction it answers; ignore late and duplicate ones."""
        # The Grid sets each instruction's message id when it sends it; an error
        # reply made by the SuperLink (e.g. node unavailable) names the
        # instruction it answers, not the node. Instructions that never went
        # through a Grid (tests driving a strategy by hand) have no id.
        sent = {
            m.metadata.message_id: m.metadata.dst_node_id
            for m in instructions
            if m.metadata.message_id
        }
        targets = {m.metadata.dst_node_id for m in instructions}
        answered: set[Any] = set()
        incoming: list[Incoming] = []
        for msg in replies:
            reply_to = msg.metadata.reply_to_message_id
            node = sent.get(reply_to, msg.metadata.src_node_id)
            key = reply_to if sent else node
            record: dict[str, Any] = {"round": server_round, "stage": stage, "node-id": node}
            result.records.append(record)
            status = ""
            if (reply_to not in sent) if sent else (node not in targets):
                status, reason = (
                    "late",
                    f"answers no {stage} instruction of this round (late or unknown)",
                )
            elif key in answered:
                status, reason = "duplicate", "a second reply to the same instruction"
            if status:
                result.ignored[status] += 1
                record.update(status=status, reason=reason)
                log(
                    WARNING,
                    "%s round %d: %s reply from node %d ignored: %s",
                    self.name,
                    server_round,
                    stage,
                    node,
                    reason,
                )
                continue
            answered.add(key)
            if msg.has_error():
                error = node_error(msg.error.code, msg.error.reason)
                incoming.append(Incoming(node, error=error, row=record))
            else:
                incoming.append(Incoming(node, msg.content, row=record))
        return incoming

    def check(
        self,
        server_round: int,
        stage: str,
        incoming: Iterable[Incoming],
        decode: Decoder | None,
        known_metrics: frozenset[str],
        consume: Callable[[Admitted, Any], None] | None = None,
        required: frozenset[str] = frozenset({NUM_EXAMPLES}),
        result: GateResult | None = None,
    ) -> GateResult:
        """Check attributed replies: errors, size, metrics, identity, arrays, outliers.

        The part of :meth:`admit` after attribution, for replies that come
        attributed already (the legacy API's ``(ClientProxy, FitRes)`` pairs).
        Parameters as in :meth:`admit`; ``result`` collects into an existing
        result.

        Returns
        -------
        GateResult
            Accepted replies, rows, counts and bytes.
        """
        result = result if result is not None else GateResult()
        decode = self._bounded(decode) if decode is not None else None
        candidates: list[tuple[Incoming, dict[str, Any], dict[str, float], str | None]] = []
        for item in incoming:
            if item.row is None:
                item.row = {"round": server_round, "stage": stage, "node-id": item.node}
                result.records.append(item.row)
            record = item.row
            if item.error:
                self._reject(result, record, "error", item.error)
                continue
            checked = self._check_records(item, result, known_metrics, required)
            if checked is not None:
                candidates.append((item, record, *checked))
        stats: dict[int, dict[str, float]] = {}  # of the payloads the outlier check decoded
        if self.outlier_threshold and decode is not None:
            candidates, stats = self._drop_outliers(stage, candidates, decode, result)
        for item, record, metrics, uid in candidates:
            try:
                payload = decode(item.node, item.content) if decode is not None else None
            except Exception as err:
                self._reject(
                    result, record, "rejected", _failed(err, model=record.get("edge-model"))
                )
                item.content.array_records.pop(ARRAYS_KEY, None)
                continue
            admitted = Admitted(item.node, payload, metrics, uid, record.get("bytes-up", 0))
            if consume is not None:
                try:
                    consume(admitted, payload)
                except PayloadError as err:  # what only using the payload shows
                    self._reject(result, record, "rejected", str(err))
                    continue
                finally:
                    item.content.array_records.pop(ARRAYS_KEY, None)
                admitted.payload = None
            record.update(status="accepted", reason="", **metrics)
            if uid:
                self.uid_owner.setdefault(uid, item.node)
            if stage in self.reference_stages and isinstance(payload, Payload):
                if payload.has_features:
                    self.reference[item.node] = stats.get(item.node) or payload_stats(payload)
            del payload
            result.accepted.append(admitted)
        return result

    def _bounded(self, decode: Decoder) -> Decoder:
        """``decode``, then the logit clip and the magnitude rule on what it returned."""

        def bounded(node: int, content: RecordDict) -> Any:
            payload = decode(node, content)
            if self.logit_clip and isinstance(payload, Payload) and payload.logits is not None:
                payload.logits = payload.logits.clamp(-self.logit_clip, self.logit_clip)
            if self.max_abs_value and (why := magnitude_error(payload, self.max_abs_value)):
                raise PayloadError(why)
            return payload

        return bounded

    def revoke(self, result: GateResult, node: int, why: str) -> None:
        """Take back ``node``'s accepted reply of ``result``: its row becomes a rejection.

        For what only using a reply shows (its activations made the server's
        step non-finite): one WARNING line and the row's status ``rejected``
        with ``why``, as for any rejection; the caller drops what it kept.

        Parameters
        ----------
        result : GateResult
            The stage's result holding the node's accepted row.
        node : int
            The node.
        why : str
            The reason.
        """
        for record in result.records:
            if record.get("node-id") == node and record.get("status") == "accepted":
                self._reject(result, record, "rejected", why)
                result.accepted = [a for a in result.accepted if a.node != node]
                self.reference.pop(node, None)
                return

    def _check_records(
        self,
        item: Incoming,
        result: GateResult,
        known_metrics: frozenset[str],
        required: frozenset[str],
    ) -> tuple[dict[str, float], str | None] | None:
        """Size, metric schema and node-uid of one reply; ``None`` when it is rejected."""
        record = item.row or {}
        try:
            size = content_nbytes(item.content)
            size += sum(len(k) + _value_nbytes(v) for k, v in (item.metrics or {}).items())
        except Exception as err:  # a record of an unexpected kind
            self._reject(result, record, "rejected", f"unreadable records: {err!r}")
            return None
        # bytes communicated: the arrays (as every byte count of the project); the
        # limit applies to all records
        record["bytes-up"] = record_nbytes(item.content)
        result.nbytes += record["bytes-up"]
        if why := self.oversize(size):
            self._reject(result, record, "rejected", why)
            item.content.array_records.pop(ARRAYS_KEY, None)
            return None
        try:
            raw = item.metrics
            if raw is None:
                raw = item.content.metric_records.get(METRICS_KEY)
            metrics, dropped = read_metrics(raw, known_metrics, required)
            info = item.content.config_records.get(NODE_KEY, ConfigRecord())
            uid_value, edge_model = info.get(NODE_UID), clean_uid(info.get(NODE_EDGE_MODEL))
        except Exception as err:
            self._reject(result, record, "rejected", _failed(err, "malformed records"))
            return None
        if edge_model is not None:  # informational: a name, not a promise about the features
            record["edge-model"] = edge_model
        uid = clean_uid(uid_value) if uid_value is not None else None
        if uid_value is not None and uid is None:
            self._reject(
                result, record, "rejected", f"invalid node-uid {clean_text(uid_value, 60)}"
            )
            return None
        owner = self.uid_owner.get(uid) if uid else None
        if owner is not None and owner != item.node:
            self._reject(result, record, "rejected", f"node-uid {uid} belongs to node {owner}")
            return None
        if dropped:
            record["metrics-dropped"] = dropped
        return metrics, uid

    def _drop_outliers(
        self,
        stage: str,
        candidates: list[tuple[Incoming, dict[str, Any], dict[str, float], str | None]],
        decode: Decoder,
        result: GateResult,
    ) -> tuple[
        list[tuple[Incoming, dict[str, Any], dict[str, float], str | None]],
        dict[int, dict[str, float]],
    ]:
        """Reject the payloads that are outliers among this stage's and the stored ones.

        Returns the candidates kept and their statistics, by node.
        """
        batch: list[dict[str, float] | None] = []
        for item, record, *_ in candidates:  # one decoded payload at a time
            try:
                payload = decode(item.node, item.content)
                batch.append(payload_stats(payload) if isinstance(payload, Payload) else {})
            except Exception as err:
                self._reject(
                    result, record, "rejected", _failed(err, model=record.get("edge-model"))
                )
                batch.append(None)
        # the stored payloads' statistics as context: a lone reply is compared too
        fresh = {c[0].node for c in candidates}
        context = list(batch)
        if stage in self.reference_stages:
            context.extend(s for n, s in self.reference.items() if n not in fresh)
        reasons = find_outliers(context, self.outlier_threshold)
        kept, stats = [], {}
        for candidate, s, outlier in zip(candidates, batch, reasons[: len(batch)], strict=True):
            item, record, *_ = candidate
            if s is not None and outlier is not None:
                self._reject(result, record, "rejected", outlier)
            if s is not None and outlier is None:
                kept.append(candidate)
                stats[item.node] = s
            else:
                item.content.array_records.pop(ARRAYS_KEY, None)
        return kept, stats


def _failed(err: Exception, what: str = "malformed payload", model: str | None = None) -> str:
    """Return the reason a reply failed: a payload error's own words, else the exception.

    ``model``: the edge model the reply named, added to the reason (a node whose
    model's extractor outputs maps of another shape is told apart at once).
    """
    why = str(err) if isinstance(err, PayloadError) else f"{what}: {err!r}"
    return f"{why} (edge model {model})" if model else why
