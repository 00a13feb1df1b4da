"""Who the nodes of a FedGKT run are: identities, tokens, and finding them again.

Flower's node ids are not stable across restarts (a Ray simulation draws new
ones; a SuperNode that re-registers may get a new one). :class:`NodeRegistry`
keeps each node's stable ``node-uid`` and the secret token it was given with
its first instruction, and after a resume finds the checkpointed nodes under
their new ids, handing a node its state back only when it holds its token.
"""

from __future__ import annotations

import secrets
import time
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from flwr_gkt.wire import CONFIG_KEY, NODE_UID
from flwr_gkt.wire.gate import ReplyGate

__all__ = ["NodeRegistry"]


class NodeRegistry:
    """The nodes' identities (``node-uid``), tokens, and which of them have trained."""

    def __init__(self) -> None:
        #: Stable identity (``node-uid``) each node id sent with its replies.
        self.uids: dict[int, str] = {}
        #: Secret token each node gets with its first instruction; a resumed
        #: run hands a node's state back only to the node holding it.
        self.tokens: dict[int, str] = {}
        #: Nodes with an accepted train reply: the only ones asked to evaluate.
        self.trained: set[int] = set()

    def token(self, node: int) -> str:
        """Return ``node``'s token, drawn on first use."""
        return self.tokens.setdefault(node, secrets.token_hex(16))

    def order_key(self, node: int) -> tuple[str, int]:
        """Sort key of a node by its identity: Flower's node ids are random per run."""
        return self.uids.get(node, ""), node

    def uid_owner(self) -> dict[str, int]:
        """``node-uid -> node id`` of every known node (the gate's uid binding)."""
        return {uid: node for node, uid in self.uids.items()}

    def state_dict(self) -> dict[str, Any]:
        """Return the identities and tokens, as a checkpoint holds them."""
        return {"node-uids": dict(self.uids), "node-tokens": dict(self.tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (absent keys: none known)."""
        self.uids = {int(n): str(u) for n, u in state.get("node-uids", {}).items()}
        self.tokens = {int(n): str(t) for n, t in state.get("node-tokens", {}).items()}

    def reidentify(
        self, grid: Grid, gate: ReplyGate, min_nodes: int, timeout: float
    ) -> dict[int, int]:
        """Find the known nodes again under their current node ids; return ``{old: new}``.

        Waits up to ``timeout`` seconds for ``min_nodes`` connected nodes, then
        asks every connected node for its ``node-uid`` (a ``query`` message,
        see :func:`flwr_gkt.flower.client_app.handle_query`, answered within
        ``min(timeout, 60)`` seconds). A node whose uid is known under another
        id takes that id over, when it holds that id's token; nodes that do
        not answer, and uids that are not unique, keep nothing. The registry
        is remapped; the returned mapping has the nodes found under a new id.
        """
        deadline = time.monotonic() + timeout
        while len(ids := sorted(grid.get_node_ids())) < min_nodes and time.monotonic() < deadline:
            time.sleep(1.0)
        query = RecordDict({CONFIG_KEY: ConfigRecord({"query": NODE_UID})})
        messages = [Message(query, dst_node_id=n, message_type=MessageType.QUERY) for n in ids]
        found: dict[str, list[tuple[int, str | None]]] = {}
        for claim in gate.identities(grid.send_and_receive(messages, timeout=min(timeout, 60.0))):
            found.setdefault(claim.uid, []).append((claim.node, claim.token))
        mapping, ambiguous, refused = self._match(found)
        moved = {old: new for old, new in mapping.items() if old != new}
        self.uids = {moved.get(n, n): u for n, u in self.uids.items()}
        self.tokens = {moved.get(n, n): t for n, t in self.tokens.items()}
        log(
            INFO,
            "FedGKT: %d of %d checkpointed nodes found (%d under a new node id), %d uid(s) "
            "ambiguous, %d claim(s) without the node's token refused",
            len(mapping),
            len(self.uids),
            len(moved),
            ambiguous,
            refused,
        )
        return moved

    def _match(
        self, found: dict[str, list[tuple[int, str | None]]]
    ) -> tuple[dict[int, int], int, int]:
        """Match the uid claims ``found`` to the known nodes: mapping, ambiguous, refused."""
        known: dict[str, list[int]] = {}
        for node, uid in self.uids.items():
            known.setdefault(uid, []).append(node)
        mapping, ambiguous, refused = {}, 0, 0
        for uid, olds in known.items():
            news = found.get(uid, [])
            if len(olds) == 1 and len(news) == 1:
                new, token = news[0]
                # a bare uid claim is not enough: the node must hold the token it was given
                if self.tokens.get(olds[0]) not in (None, token):
                    refused += 1
                    log(
                        WARNING,
                        "FedGKT: node %d claims node-uid %s without its token: it gets no state",
                        new,
                        uid,
                    )
                    continue
                mapping[olds[0]] = new
            elif news:
                ambiguous += 1
        return mapping, ambiguous, refused
