"""An in-process Flower runtime: a real ``ClientApp`` behind a ``Grid``, no Ray, no SuperLink.

:class:`InProcessGrid` is a :class:`flwr.serverapp.Grid` whose nodes are
simulated in the calling process: a message pushed to node ``n`` is queued
and, when its reply is pulled, handed to the ``ClientApp`` with node ``n``'s
:class:`~flwr.app.Context` (one per node, kept across messages as a SuperNode
keeps it). :func:`run_inprocess` runs a ``ServerApp`` (or any
``main(grid, context)``) against such a grid, so the whole ServerApp main body
runs fast and deterministically: for tests, benchmarks and kill-and-resume
checks::

    run_inprocess(make_server_app(cfg), make_client_app(cfg), cfg.num_clients)

What it keeps from Flower's runtimes (the Ray simulation / SuperLink +
SuperNode):

* node ``i`` (default id ``1001 + i``, stable across processes) has the node
  config ``{"partition-id": i, "num-partitions": num_nodes}``, like a Ray
  simulation's nodes;
* instructions get a fresh message id when pushed; a reply has
  ``reply_to_message_id`` = the instruction's id, ``src_node_id`` = the node,
  ``dst_node_id`` = the instruction's source (the SuperLink) and its own
  message id;
* the ClientApp sees a copy of the instruction and of its node's context, as
  if they had crossed a process boundary; the context is kept only when the
  ClientApp returns normally (a SuperNode does not keep the state of a failed
  ClientApp);
* a ClientApp that raises, or returns something that is not a reply to its
  instruction, yields an error reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``,
  reason ``"<class 'E'>:<'text'>"`` as a SuperNode writes it), logged at
  WARNING; the grid never raises for it.

Unlike the real runtimes, messages are handled lazily and one at a time: a
pull runs the ClientApp on every requested, not yet handled message, in push
order, before it returns. The ClientApp runs with the server's
:class:`~flwr.supercore.task_identity.TaskIdentity` (process-wide), so a
ClientApp that builds *instruction* messages would get the server's ids.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1
FIRST_NODE_ID = 1001


def default_node_ids(num_nodes: int) -> list[int]:
    """``[1001, 1002, ...]``: the same ids in every process (a restarted run finds its nodes)."""
    return [FIRST_NODE_ID + i for i in range(num_nodes)]


def _ensure_task_identity(run_id: int) -> None:
    """Messages take their run/source/task ids from ``TaskIdentity``: set what is unset.

    As ``run_simulation`` does for a ServerApp: run ``run_id``, the SuperLink's
    node id, task 1. An identity already set (e.g. by a test) is kept.
    """
    if not _identity_set(lambda: TaskIdentity.run_id):
        TaskIdentity.run_id = run_id
    if not _identity_set(lambda: TaskIdentity.node_id):
        TaskIdentity.node_id = SUPERLINK_NODE_ID
    if not _identity_set(lambda: TaskIdentity.task_id):
        TaskIdentity.task_id = 1


def _identity_set(read: Callable[[], int]) -> bool:
    """Whether a ``TaskIdentity`` property is set: its getter raises ``RuntimeError`` until then.

    (Its private ``_run_id`` & co. are ``None`` until set, but the metaclass's
    setters make type checkers see them as ``int``; the public getters say it.)
    """
    try:
        read()
    except RuntimeError:
        return False
    return True


def _exception_reason(ex: BaseException) -> str:
    # The SuperNode's format, e.g. "<class 'ZeroDivisionError'>:<'division by zero'>"
    return str(type(ex)) + ":<'" + str(ex) + "'>"


class InProcessGrid(Grid):
    """A ``Grid`` whose ``num_nodes`` nodes run ``client_app`` in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs (anything called as ``client_app(message, context)``).
    num_nodes : int
        How many nodes.
    run_config : dict, optional
        The run config in every node's ``Context``.
    node_configs : list of dict, optional
        Per node, merged over the default ``{"partition-id": i, "num-partitions": num_nodes}``.
    node_ids : list of int, optional
        The nodes' ids (default ``[1001, 1002, ...]``).
    pull_interval : float
        Sleep between pulls in :meth:`send_and_receive`.
    """

    def __init__(
        self,
        client_app: ClientApp | Callable[[Message, Context], Message],
        num_nodes: int,
        run_config: Mapping[str, Any] | None = None,
        node_configs: list[Mapping[str, Any]] | None = None,
        node_ids: list[int] | None = None,
        pull_interval: float = 0.05,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        node_ids = default_node_ids(num_nodes) if node_ids is None else [int(n) for n in node_ids]
        if len(node_ids) != num_nodes or len(set(node_ids)) != num_nodes:
            raise ValueError(f"need {num_nodes} distinct node ids, got {node_ids}")
        if SUPERLINK_NODE_ID in node_ids or 0 in node_ids:
            raise ValueError(f"node ids 0 and {SUPERLINK_NODE_ID} are reserved")
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError(f"need {num_nodes} node configs, got {len(node_configs)}")
        self.client_app = client_app
        self.pull_interval = pull_interval
        self.run_config = dict(run_config or {})
        self._run = Run.create_empty(run_id=RUN_ID)
        _ensure_task_identity(RUN_ID)
        self._lock = threading.RLock()
        self._contexts: dict[int, Context] = {}
        for i, node_id in enumerate(node_ids):
            node_config: dict[str, bool | float | int | str] = {
                "partition-id": i,
                "num-partitions": num_nodes,
            }
            node_config.update(node_configs[i] if node_configs is not None else {})
            self._contexts[node_id] = Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
        self._queue: dict[str, Message] = {}  # message id -> pushed, not yet handled (push order)
        self.handled = 0  # messages the ClientApp ran on (replies and error replies)

    # -- run ---------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Set the run (its ``run_id`` goes into new node contexts only)."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        """Run information (a copy)."""
        return Run(**vars(self._run))

    # -- nodes -------------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        """The current nodes' ids."""
        with self._lock:
            return list(self._contexts)

    def context(self, node_id: int) -> Context:
        """Node ``node_id``'s context (the live object)."""
        return self._contexts[node_id]

    def add_node(self, node_id: int, node_config: Mapping[str, Any] | None = None) -> None:
        """Connect a node with a fresh context."""
        with self._lock:
            if node_id in self._contexts or node_id in (0, SUPERLINK_NODE_ID):
                raise ValueError(f"node id {node_id} is taken or reserved")
            self._contexts[node_id] = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config=dict(node_config or {}),
                state=RecordDict(),
                run_config=dict(self.run_config),
            )

    def remove_node(self, node_id: int) -> None:
        """Disconnect a node: its pending messages get ``NODE_UNAVAILABLE`` error replies."""
        with self._lock:
            del self._contexts[node_id]

    # -- messages ----------------------------------------------------------
    def create_message(  # pylint: disable=too-many-arguments,too-many-positional-arguments
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A new instruction message (``Message(...)`` does the same)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    @staticmethod
    def _check_message(message: Message) -> None:
        if not (
            message.metadata.message_id != ""
            and message.metadata.reply_to_message_id == ""
            and message.metadata.ttl > 0
            and message.metadata.delivered_at == ""
        ):
            raise ValueError(f"Invalid message: {message}")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue ``messages`` (each gets a fresh message id); return their ids."""
        ids: list[str] = []
        with self._lock:
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = str(uuid4())
                self._check_message(msg)
                if msg.metadata.dst_node_id not in self._contexts:
                    raise ValueError(
                        f"Invalid destination node ID for Message: {msg.metadata.dst_node_id}"
                    )
                self._queue[msg.metadata.message_id] = msg
                ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the ClientApp on the requested queued messages (push order); return the replies."""
        wanted = set(message_ids)
        replies: list[Message] = []
        with self._lock:
            for msg_id in [m for m in self._queue if m in wanted]:
                replies.append(self._handle(self._queue.pop(msg_id)))
        return replies

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
    ) -> Iterable[Message]:
        """Push ``messages``, then pull until every reply is in or ``timeout`` passes."""
        msg_ids = set(self.push_messages(messages))
        del messages
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        ret: list[Message] = []
        while timeout is None or time.time() < end_time:
            res_msgs = list(self.pull_messages(msg_ids))
            ret.extend(res_msgs)
            msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in res_msgs})
            if len(msg_ids) == 0:
                break
            time.sleep(self.pull_interval)
        return ret

    # -- the node side -----------------------------------------------------
    def _handle(self, msg: Message) -> Message:
        """Node ``dst_node_id`` runs the ClientApp on ``msg``; the reply, or an error reply."""
        node_id = msg.metadata.dst_node_id
        context = self._contexts.get(node_id)
        if context is None:
            reply = Message(
                Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"node {node_id} is not connected"),
                reply_to=msg,
            )
        elif msg.metadata.created_at + msg.metadata.ttl < now().timestamp():
            reply = Message(
                Error(
                    code=ErrorCode.MESSAGE_UNAVAILABLE,
                    reason=f"message {msg.metadata.message_id} has expired",
                ),
                reply_to=msg,
            )
        else:
            reply = self._run_client_app(msg, context)
        self.handled += 1
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        reply.metadata.delivered_at = now().isoformat()
        return reply

    def _run_client_app(self, msg: Message, context: Context) -> Message:
        node_id = context.node_id
        delivered = copy.deepcopy(msg)  # what a node receives is a copy
        delivered.metadata.delivered_at = now().isoformat()
        work = copy.deepcopy(context)
        threads = torch.get_num_threads()  # a ClientApp's thread setting must not reach the server
        try:
            reply = self.client_app(delivered, work)
            if not isinstance(reply, Message):
                raise TypeError(f"the ClientApp returned {type(reply).__name__}, not a Message")
            meta = reply.metadata
            if meta.reply_to_message_id != msg.metadata.message_id or meta.src_node_id != node_id:
                raise ValueError(
                    f"the ClientApp's reply (reply_to_message_id={meta.reply_to_message_id!r}, "
                    f"src_node_id={meta.src_node_id}) is not a reply to message "
                    f"{msg.metadata.message_id!r} from node {node_id}; use Message(content, reply_to=msg)"
                )
        except Exception as ex:
            log(
                WARNING,
                "In-process node %d: the ClientApp raised on a %r message: %s",
                node_id,
                msg.metadata.message_type,
                _exception_reason(ex),
                exc_info=ex,
            )
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=_exception_reason(ex)),
                reply_to=msg,
            )
        finally:
            torch.set_num_threads(threads)
        self._contexts[node_id] = work  # kept only when the ClientApp succeeded, as on a SuperNode
        return copy.deepcopy(reply)  # the server gets its own copy, too


def run_inprocess(
    server_main: Callable[[Grid, Context], None],
    client_app: ClientApp | Callable[[Message, Context], Message],
    num_nodes: int,
    run_config: Mapping[str, Any] | None = None,
    node_configs: list[Mapping[str, Any]] | None = None,
) -> None:
    """Run ``server_main(grid, context)`` (e.g. a ``ServerApp``) against ``num_nodes`` in-process nodes.

    The server's ``Context`` has node id 0, an empty node config and ``run_config``,
    as ``run_simulation`` gives a ServerApp.
    """
    grid = InProcessGrid(client_app, num_nodes, run_config=run_config, node_configs=node_configs)
    context = Context(
        run_id=grid.run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )
    server_main(grid, context)
