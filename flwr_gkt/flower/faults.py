"""Fault injection: a Grid that makes chosen nodes crash, time out, reply late or twice.

:class:`FaultyGrid` wraps any Flower :class:`~flwr.serverapp.Grid` -- the
simulation's, a deployment's, :class:`flwr_gkt.app.inprocess.InProcessGrid` --
and, for each instruction a strategy sends, asks a :class:`FaultPlan` whether
the destination node misbehaves in that round:

``crash``
    The instruction never reaches the node; the strategy gets the error reply
    a SuperLink gives for a node that is gone (``NODE_UNAVAILABLE``).
``timeout``
    The node gets the instruction and answers, but the answer never arrives:
    the strategy waits until the round's timeout and goes on without it.
``late``
    The answer arrives after its round's deadline: it is held back during the
    request it answers and handed out with the next request's replies (the
    evaluation of the same round, or the next round) -- the strategy must
    recognise it as an answer to an older instruction.
``duplicate``
    The answer arrives twice (two messages answering one instruction).

Faults apply per node and round (the ``server-round`` of the instruction's
config), to train and evaluate instructions alike; a node is healthy again in
the next round. Nodes are named by their index in the sorted node ids seen
first (``0`` = the smallest id), so a plan reads the same in every runtime.

A plan comes from a string, ``"crash:1@2, late:0@3-4"`` (kind, node index,
round or round range), and/or a rate: each (node, round) independently gets a
random fault with probability ``rate`` (seeded, so a plan is reproducible).
Every injected fault is logged and counted in :attr:`FaultyGrid.injected`.
"""

from __future__ import annotations

import copy
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from logging import WARNING

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.run import Run

from flwr_gkt.wire import CONFIG_KEY, scalar

__all__ = ["FAULT_KINDS", "Fault", "FaultPlan", "FaultyGrid", "parse_faults"]

#: The injectable faults (see :class:`FaultyGrid`).
FAULT_KINDS = ("crash", "timeout", "late", "duplicate")


@dataclass(frozen=True)
class Fault:
    """Node ``node`` (index in the sorted node ids) shows ``kind`` in rounds ``first..last``.

    Parameters
    ----------
    kind : str
        One of :data:`FAULT_KINDS`: ``crash``, ``timeout``, ``late`` or
        ``duplicate``.
    node : int
        Index of the node in the sorted node ids seen first (``0`` = the
        smallest id).
    first : int
        First round of the fault (from 1).
    last : int
        Last round of the fault (inclusive, at least ``first``).

    Raises
    ------
    ValueError
        If the kind is unknown, ``node`` is negative, ``first`` is below 1
        or ``last`` is below ``first``.
    """

    kind: str
    node: int
    first: int
    last: int

    def __post_init__(self) -> None:
        """Check the kind, the node index and the rounds."""
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.node < 0 or self.first < 1 or self.last < self.first:
            raise ValueError(f"invalid fault {self}")


def parse_faults(spec: str) -> list[Fault]:
    """Parse a fault spec such as ``"crash:1@2-3, late:0@2"``.

    Parameters
    ----------
    spec : str
        Items ``kind:node@round`` or ``kind:node@first-last`` separated by
        ``,`` or ``;``; blank items are skipped.

    Returns
    -------
    list[Fault]
        One fault per item.

    Raises
    ------
    ValueError
        If an item is malformed or describes an invalid fault.
    """
    faults = []
    for item in spec.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            kind, rest = item.split(":", 1)
            node, rounds = rest.split("@", 1)
            first, _, last = rounds.partition("-")
            faults.append(Fault(kind.strip(), int(node), int(first), int(last or first)))
        except ValueError as err:
            raise ValueError(
                f"bad fault {item!r} (expected kind:node@round[-round]): {err}"
            ) from None
    return faults


class FaultPlan:
    """Which node misbehaves how in which round.

    Parameters
    ----------
    faults : Sequence[Fault]
        Explicit faults (they take precedence over random ones).
    rate : float
        Probability that a (node, round) without an explicit fault gets a
        random one from ``kinds``.
    kinds : Sequence[str]
        The kinds random faults are drawn from.
    seed : int
        Seed of the random faults (the same seed, the same faults).

    Raises
    ------
    ValueError
        If ``rate`` is outside ``[0, 1]`` or ``kinds`` is empty or holds an
        unknown kind.
    """

    def __init__(
        self,
        faults: Sequence[Fault] = (),
        rate: float = 0.0,
        kinds: Sequence[str] = FAULT_KINDS,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be in [0, 1], got {rate}")
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds:
            raise ValueError(
                f"fault kinds must be a non-empty subset of {FAULT_KINDS}, got {list(kinds)}"
            )
        self.faults = list(faults)
        self.rate = rate
        self.kinds = tuple(kinds)
        self.seed = seed

    @classmethod
    def from_config(cls, spec: str, rate: float = 0.0, kinds: str = "", seed: int = 0) -> FaultPlan:
        """Build a plan from the run config's ``faults`` / ``fault-rate`` / ``fault-kinds``.

        Parameters
        ----------
        spec : str
            Explicit faults (see :func:`parse_faults`).
        rate : float
            Probability of a random fault per (node, round).
        kinds : str
            Comma-separated kinds of the random faults; empty: all kinds.
        seed : int
            Seed of the random faults.

        Returns
        -------
        FaultPlan
            The plan.

        Raises
        ------
        ValueError
            If the spec, the rate or the kinds are invalid.
        """
        names = [k.strip() for k in kinds.split(",") if k.strip()] or list(FAULT_KINDS)
        return cls(parse_faults(spec), rate, names, seed)

    def __bool__(self) -> bool:
        """Return whether the plan can inject any fault."""
        return bool(self.faults) or self.rate > 0

    def fault(self, node: int, server_round: int) -> str | None:
        """Return the fault of node index ``node`` in ``server_round``, if any.

        Parameters
        ----------
        node : int
            Index of the node in the sorted node ids seen first.
        server_round : int
            The round.

        Returns
        -------
        str | None
            The kind of fault: the first matching explicit fault, else a
            random one drawn with probability ``rate`` (the same for the same
            seed, node and round); ``None`` when the node is healthy.
        """
        for f in self.faults:
            if f.node == node and f.first <= server_round <= f.last:
                return f.kind
        if self.rate > 0:
            rng = random.Random(f"{self.seed}/{node}/{server_round}")
            if rng.random() < self.rate:
                return rng.choice(self.kinds)
        return None


class FaultyGrid(Grid):
    """A :class:`~flwr.serverapp.Grid` that injects the faults of ``plan`` (see the module doc).

    Parameters
    ----------
    grid : Grid
        The Grid to wrap; everything not faulted goes through it.
    plan : FaultPlan
        Which node misbehaves how in which round.
    pull_interval : float, optional
        Seconds between two pulls in :meth:`send_and_receive`; defaults to
        the wrapped grid's ``pull_interval``, else 0.1.
    """

    def __init__(self, grid: Grid, plan: FaultPlan, pull_interval: float | None = None) -> None:
        self.grid = grid
        self.plan = plan
        self.pull_interval = (
            pull_interval if pull_interval is not None else getattr(grid, "pull_interval", 0.1)
        )
        #: Faults injected so far, by kind.
        self.injected: Counter[str] = Counter()
        self._order: list[int] = []
        self._kind: dict[str, str] = {}  # message id -> fault of its reply
        self._instructions: dict[str, Message] = {}
        self._crashed: dict[str, Message] = {}  # message id -> error reply to hand out
        self._synthetic: set[str] = set()  # ids of instructions that never reached the grid
        self._held: list[Message] = []  # late replies waiting for a later request

    # --------------------------------------------------------- delegation
    def set_run(self, run: Run) -> None:
        """Set the run on the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """Run information of the wrapped grid."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a new message (not sent yet).

        Parameters
        ----------
        content : RecordDict
            The records to send.
        message_type : str
            The type of the message (``train``, ``evaluate``, ``query``...).
        dst_node_id : int
            The destination node.
        group_id : str
            The group of the message (e.g. the round).
        ttl : float, optional
            Time-to-live of the round trip in seconds; Flower's default when
            unset.

        Returns
        -------
        Message
            The new message.
        """
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Return the wrapped grid's node ids.

        Returns
        -------
        Iterable[int]
            The ids of the connected nodes.
        """
        return self.grid.get_node_ids()

    # ------------------------------------------------------------ faults
    def _index(self, node_id: int) -> int:
        if node_id not in self._order:
            known = set(self._order)
            self._order += sorted(n for n in self.grid.get_node_ids() if n not in known)
            if node_id not in self._order:
                self._order.append(node_id)
        return self._order.index(node_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages, injecting the plan's faults for their node and round.

        The round is the ``server-round`` of each message's config (messages
        without one are never faulted). A ``crash`` message is not pushed: it
        gets a made-up id and a ``NODE_UNAVAILABLE`` error reply; the replies
        of the other faulted messages are altered by :meth:`pull_messages`.

        Parameters
        ----------
        messages : Iterable[Message]
            The instructions to send.

        Returns
        -------
        Iterable[str]
            The ids of the messages, crashed ones first, to pull replies with.
        """
        ids: list[str] = []
        to_push: list[Message] = []
        kinds: list[str | None] = []  # the fault of each pushed message's reply
        for msg in messages:
            config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
            server_round = int(scalar(config, "server-round", 0))
            node = msg.metadata.dst_node_id
            kind = self.plan.fault(self._index(node), server_round) if server_round > 0 else None
            if kind is not None:
                self.injected[kind] += 1
                log(
                    WARNING,
                    "fault injection: %s of node %d (index %d) in round %d (%s instruction)",
                    kind,
                    node,
                    self._index(node),
                    server_round,
                    msg.metadata.message_type,
                )
            if kind == "crash":  # never delivered; the link answers for the node
                msg_id = str(uuid.uuid4())
                msg.metadata.__dict__["_message_id"] = msg_id
                self._crashed[msg_id] = Message(
                    Error(
                        code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable (injected crash)"
                    ),
                    reply_to=msg,
                )
                self._synthetic.add(msg_id)
                ids.append(msg_id)
                continue
            to_push.append(msg)
            kinds.append(kind)
        pushed = list(self.grid.push_messages(to_push))
        for msg, msg_id, kind in zip(to_push, pushed, kinds, strict=True):
            if kind is not None:
                self._kind[msg_id] = kind
                self._instructions[msg_id] = msg
        return ids + pushed

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull the replies to ``message_ids``, with the faults applied.

        Returned: the error replies of crashed messages, late replies held
        back from earlier requests (those that answer none of
        ``message_ids``), and the wrapped grid's replies -- less those of
        ``timeout`` messages (dropped) and ``late`` ones (held back for a
        later call), plus a second copy of those of ``duplicate`` ones.

        Parameters
        ----------
        message_ids : Iterable[str]
            Ids returned by :meth:`push_messages`.

        Returns
        -------
        Iterable[Message]
            The replies.
        """
        wanted = set(message_ids)
        out = [self._crashed.pop(i) for i in list(wanted) if i in self._crashed]
        # Late replies of earlier requests arrive now, with the replies of another request.
        still_held: list[Message] = []
        for reply in self._held:
            (still_held if reply.metadata.reply_to_message_id in wanted else out).append(reply)
        self._held = still_held
        for reply in self.grid.pull_messages([i for i in wanted if i not in self._synthetic]):
            answered = reply.metadata.reply_to_message_id
            kind = self._kind.pop(answered, None)
            instruction = self._instructions.pop(answered, None)
            if kind == "timeout":
                continue  # lost on the way
            if kind == "late":
                self._held.append(reply)
                continue
            out.append(reply)
            if kind == "duplicate" and instruction is not None:
                twin = (
                    Message(copy.deepcopy(reply.content), reply_to=instruction)
                    if not reply.has_error()
                    else Message(reply.error, reply_to=instruction)
                )
                out.append(twin)
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every instruction is answered or ``timeout`` passes.

        Parameters
        ----------
        messages : Iterable[Message]
            The instructions to send.
        timeout : float, optional
            Seconds to wait for the replies; ``None``: until all are answered.

        Returns
        -------
        Iterable[Message]
            The replies received, late replies of earlier requests included.
        """
        msg_ids = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(msg_ids))
            replies += got
            msg_ids -= {m.metadata.reply_to_message_id for m in got}
            if not msg_ids:
                break
            time.sleep(self.pull_interval)
        return replies
