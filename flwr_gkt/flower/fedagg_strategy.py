"""FedAgg / FedEEC as a Flower strategy: the cloud of an end-edge-cloud tree.

The ServerApp is the cloud; edge servers and end devices are SuperNodes that
say where they hang in their node config (``tier``, ``parent``,
``node-uid``), and every parent-child exchange is relayed by the cloud (Flower
nodes do not talk to each other). One round (``docs/fedagg.md``):

1. *topology*: a ``query`` to every node (uid, tier, parent), plus the
   configured migrations; moves are logged;
2. *init*: end devices whose embeddings the cloud lacks upload them once
   (validated, :func:`flwr_gkt.wire.decode_embeddings`);
3. *store*: each edge gets the embeddings of the leaves newly under it and
   drops those that left (migration);
4. *teach*: every node computes logits on the bridge samples its neighbours
   need (the cloud too, locally);
5. *learn*: every node trains one BSBODP pass per neighbour with the
   neighbour's logits; the cloud learns from each child;
6. the cloud model is evaluated on the test set.

After the first round only logits travel. Bytes are counted per stage and
per logical link (``end-edge``, ``edge-cloud``, ``end-cloud``): what a tree
without the cloud relay would send, once per transfer (``init-<link>``: the
embeddings; ``logits-up-<link>`` / ``logits-down-<link>``: child to parent /
parent to child). The training math is
in :mod:`flwr_gkt.core.fedagg` and :mod:`flwr_gkt.flower.fedagg_client`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import Tensor, nn

from flwr_gkt.core.bridge import BridgeAutoencoder
from flwr_gkt.core.fedagg import BSBODPConfig, teacher_logits, train_nonleaf
from flwr_gkt.core.rectify import get_rectifier
from flwr_gkt.core.training import (
    TensorBatches,
    evaluate_logits,
    get_device,
    predict,
    prepare_model,
)
from flwr_gkt.flower.base import RunContext, WaveStrategy
from flwr_gkt.flower.fedagg_client import EMB_PREFIX, TierRole
from flwr_gkt.flower.strategy_utils import RoundCallback
from flwr_gkt.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    decode_embeddings,
    decode_named_logits,
    encode_embeddings,
    encode_named_logits,
    record_nbytes,
    settings_record,
)
from flwr_gkt.wire.gate import Admitted, ReplyGate, clean_text

__all__ = ["FedAgg", "parse_migrations"]

CLOUD = "cloud"
#: Metrics a FedAgg learn reply may carry.
LEARN_METRICS = frozenset({"num-examples", "train-loss", "train-accuracy", "seconds"})


def parse_migrations(spec: str) -> list[tuple[str, str, int]]:
    """Parse a migration spec such as ``"end-3:edge-0@2, end-4:cloud@3"``.

    Parameters
    ----------
    spec : str
        Items ``uid:new-parent@round`` separated by ``,`` or ``;``; blank
        items are skipped.

    Returns
    -------
    list[tuple[str, str, int]]
        ``(node uid, new parent, from round)`` per item, e.g.
        ``[("end-3", "edge-0", 2), ("end-4", "cloud", 3)]``.

    Raises
    ------
    ValueError
        If an item is not of the form ``uid:new-parent@round``.
    """
    out = []
    for item in spec.replace(";", ",").split(","):
        item = item.strip()
        if item:
            try:
                uid, rest = item.split(":", 1)
                parent, rnd = rest.split("@", 1)
                out.append((uid.strip(), parent.strip(), int(rnd)))
            except ValueError:
                raise ValueError(
                    f"bad migration {item!r} (expected uid:new-parent@round)"
                ) from None
    return out


class _Tree:
    """The tree of one round: node ids, roles, children and leaves per node."""

    def __init__(self, roles: dict[str, tuple[int, TierRole]], with_embeddings: set[str]) -> None:
        self.node_id = {uid: nid for uid, (nid, _) in roles.items()}
        self.role = {uid: role for uid, (_, role) in roles.items()}
        children: dict[str, list[str]] = {CLOUD: []}
        for uid, role in sorted(self.role.items()):
            if role.tier == "end" and uid not in with_embeddings:
                continue
            if role.parent == uid:
                why = "is its own parent"
            elif role.parent != CLOUD and role.parent not in self.role:
                why = "is not connected"
            elif role.parent != CLOUD and self.role[role.parent].tier != "edge":
                why = "is not an edge"
            else:
                children.setdefault(role.parent, []).append(uid)
                continue
            log(
                WARNING,
                "FedAgg: node %s names parent %r, which %s; left out",
                uid,
                role.parent,
                why,
            )
        # Only nodes reachable from the cloud form the tree: a cycle (two edges
        # naming each other) hangs in the air and is left out.
        reachable, frontier = set(), [CLOUD]
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in reachable:
                    reachable.add(child)
                    frontier.append(child)
        for uid in sorted(c for kids in children.values() for c in kids if c not in reachable):
            log(WARNING, "FedAgg: node %s is not connected to the cloud (a cycle); left out", uid)
        self.children = {
            parent: kids
            for parent, kids in children.items()
            if parent == CLOUD or parent in reachable
        }
        #: The nodes in the tree this round (connected, placed under a parent), sorted.
        self.members = sorted(reachable)

    def leaves(self, uid: str) -> list[str]:
        if uid != CLOUD and self.role[uid].tier == "end":
            return [uid]
        return sorted(leaf for child in self.children.get(uid, []) for leaf in self.leaves(child))

    def link(self, uid: str) -> str:
        parent = self.role[uid].parent
        return f"{self.role[uid].tier}-{'cloud' if parent == CLOUD else 'edge'}"


class FedAgg(WaveStrategy):
    """The cloud of FedAgg (Wu et al., INFOCOM 2024), with FedEEC's rectification.

    Parameters
    ----------
    model : nn.Module
        The cloud model (an image classifier, e.g. ``resnet18``).
    autoencoder : BridgeAutoencoder
        The frozen bridge autoencoder (the same file on every node).
    num_classes : int
        Number of classes.
    test_x, test_y : Tensor
        The cloud's test set (normalised images, labels).
    bsbodp : BSBODPConfig
        Settings of every BSBODP pass, sent to the nodes too.
    rectify : str
        FedEEC rectification rule (:mod:`flwr_gkt.core.rectify`), ``none`` for FedAgg.
    migrations : iterable of (uid, new parent, round)
        Nodes that move to another parent from a round on (simulation).
    logit_dtype : str
        ``float32`` or ``float16`` logits on the wire.
    device : str
        Where the cloud model trains (``auto``: CUDA when available).
    seed : int
        Seed of the shuffling.
    max_payload_bytes : int, optional
        Largest accepted reply (all records); larger ones are rejected.
    max_samples : int, optional
        Largest number of embeddings one end device may upload.
    on_round : RoundCallback, optional
        Called at the end of every round with its :attr:`history` row and its
        :attr:`node_history` records (e.g. a
        :class:`~flwr_gkt.flower.tensorboard.TensorBoardWriter`).
    """

    name = "FedAgg"
    round_kind = "several message waves"
    constructor_gives = "keeps a model on every tree node and takes its settings"

    def __init__(
        self,
        model: nn.Module,
        autoencoder: BridgeAutoencoder,
        num_classes: int,
        test_x: Tensor,
        test_y: Tensor,
        *,
        bsbodp: BSBODPConfig | None = None,
        rectify: str = "none",
        migrations: Iterable[tuple[str, str, int]] = (),
        logit_dtype: str = "float32",
        device: str = "auto",
        seed: int = 0,
        max_payload_bytes: int | None = None,
        max_samples: int | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        super().__init__(on_round)
        self.device = get_device(device)
        self.max_samples = max_samples
        #: Node uids are bound to the first node id claiming them; the size limit.
        self.gate = ReplyGate(max_payload_bytes, outlier_threshold=0.0, name="FedAgg")
        self.model = prepare_model(model, self.device)
        self.autoencoder = autoencoder.freeze()
        self.num_classes = num_classes
        self.test_x, self.test_y = test_x, test_y
        self.bsbodp = bsbodp or BSBODPConfig()
        self.rectify_name = rectify
        self.rectify = get_rectifier(rectify)
        self.migrations = list(migrations)
        self.logit_dtype = logit_dtype
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        #: Embeddings and labels of every leaf, by uid (uploaded once).
        self.embeddings: dict[str, tuple[Tensor, Tensor]] = {}
        #: Leaves whose embeddings each edge holds.
        self.edge_holds: dict[str, set[str]] = {}
        self.parents: dict[str, str] = {}
        self.moves: list[tuple[int, str, str, str]] = []

    def summary(self) -> None:
        """Log the configuration."""
        log(
            INFO,
            "\t├──> FedAgg: cloud model %s on %s, rectification %s",
            type(self.model).__name__,
            self.device,
            self.rectify_name,
        )
        log(INFO, "\t└──> BSBODP: %s", self.bsbodp)

    # ------------------------------------------------------------------ helpers
    def _config(self, server_round: int, stage: str, **extra: Any) -> ConfigRecord:
        return settings_record(
            self.bsbodp,
            **{
                "fedagg-stage": stage,
                "server-round": server_round,
                "seed": self.seed,
                "num-classes": self.num_classes,
                "logit-dtype": self.logit_dtype,
                "rectify": self.rectify_name,
                **extra,
            },
        )

    def _exchange(
        self,
        grid: Grid,
        messages: dict[str, Message],
        timeout: float,
        server_round: int,
        stage: str,
        decode: Callable[[str, RecordDict], Any] | None = None,
        known: frozenset[str] = frozenset(),
    ) -> dict[str, Admitted]:
        """Send one wave; return the replies the gate accepted, by uid.

        Every reply passes :meth:`ReplyGate.admit` (attribution, errors, size,
        metric schema, then ``decode(uid, content)``); rejections and lost
        nodes get a node-history row and a log line.
        """
        if not messages:
            return {}
        accepted, _ = self._exchange_wave(
            grid,
            messages,
            timeout,
            server_round,
            stage,
            decode,
            known,
            required=frozenset(),
            node_column="node",
        )
        return accepted

    def _topology(
        self, grid: Grid, server_round: int, timeout: float
    ) -> dict[str, tuple[int, TierRole]]:
        ids = sorted(grid.get_node_ids())
        query = ConfigRecord({"query": "fedagg-topology"})
        messages = [
            Message(RecordDict({CONFIG_KEY: query}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in ids
        ]
        roles: dict[str, tuple[int, TierRole]] = {}
        replies = grid.send_and_receive(messages, timeout=timeout)
        for claim in self.gate.identities(replies, ("tier", "parent")):
            nid = claim.node
            try:
                role = TierRole(claim.uid, claim.extra.get("tier", ""), claim.extra["parent"])
            except Exception as err:
                log(WARNING, "FedAgg: node %d gave no valid tier/parent (%s)", nid, clean_text(err))
                continue
            owner = self.gate.uid_owner.setdefault(role.uid, nid)  # the first claim wins
            if owner != nid or role.uid in roles or role.uid == CLOUD:
                log(
                    WARNING,
                    "FedAgg: node %d claims node-uid %s, which belongs to another node; ignored",
                    nid,
                    role.uid,
                )
                continue
            roles[role.uid] = (nid, role)
        for uid, parent, first in self.migrations:
            if server_round >= first and uid in roles:
                nid, role = roles[uid]
                roles[uid] = (nid, TierRole(role.uid, role.tier, parent))
        for uid, (_, role) in sorted(roles.items()):
            old = self.parents.get(uid)
            if old is not None and old != role.parent:
                self.moves.append((server_round, uid, old, role.parent))
                log(
                    INFO,
                    "FedAgg round %d: node %s migrated from %s to %s (with its subtree)",
                    server_round,
                    uid,
                    old,
                    role.parent,
                )
            self.parents[uid] = role.parent
        return roles

    # ------------------------------------------------------------------ round
    def run_round(self, server_round: int, run: RunContext) -> bool:
        """Run FedAgg round ``server_round`` on the run's grid (called by :meth:`start`).

        The round queries the topology, then relays the teach and learn waves
        between the tree's nodes and evaluates the cloud model (every tree
        node builds and keeps its own model; the cloud model is evaluated on
        the test set given to the constructor). Its row goes to
        :attr:`history`. Each wave waits up to the run's ``timeout`` seconds
        for its replies.
        """
        grid, timeout, rnd = run.grid, run.timeout, server_round
        start = time.perf_counter()
        nbytes: Counter[str] = Counter()
        roles = self._topology(grid, rnd, timeout)
        self._init(grid, roles, rnd, timeout, nbytes)
        tree = _Tree(roles, set(self.embeddings))
        self._store(grid, tree, rnd, timeout, nbytes)
        teach = self._teach(grid, tree, rnd, timeout, nbytes)
        # The bridge samples of each cloud child's subtree, decoded once for the round.
        bridges = {c: self._bridge(tree.leaves(c)) for c in tree.children[CLOUD]}
        cloud_z = {c: teacher_logits(self.model, x, self.device) for c, x in bridges.items()}
        learned = self._learn(grid, tree, rnd, timeout, teach, cloud_z, nbytes)
        cloud_loss = self._cloud_learn(tree, teach, bridges)
        loss_sum, correct = self.evaluate()
        row: dict[str, float] = {
            "round": rnd,
            "accuracy": correct / len(self.test_y),
            "loss": loss_sum / len(self.test_y),
            "cloud-train-loss": cloud_loss,
            "nodes": len(tree.members),
            "leaves": len(tree.leaves(CLOUD)),
            "nodes-learned": learned,
            "migrations": sum(1 for m in self.moves if m[0] == rnd),
            "round-seconds": time.perf_counter() - start,
            **{f"bytes-{k}": float(v) for k, v in sorted(nbytes.items())},
            # totals in FedGKT's terms: towards the cloud (embeddings, logits up) / away from it
            "bytes-up-train": float(
                sum(v for k, v in nbytes.items() if "-up-" in k or k.startswith("init-"))
            ),
            "bytes-down-train": float(sum(v for k, v in nbytes.items() if "-down-" in k)),
        }
        self.history.append(row)
        log(
            INFO,
            "FedAgg round %d: cloud accuracy %.4f on %d test samples, %d nodes (%d leaves), "
            "%.1fs, %s",
            rnd,
            row["accuracy"],
            len(self.test_y),
            row["nodes"],
            row["leaves"],
            row["round-seconds"],
            ", ".join(f"{k} {v / 1024:.1f} KB" for k, v in sorted(nbytes.items())),
        )
        return True

    def _bridge(self, leaves: list[str]) -> Tensor:
        return self.autoencoder.bridge(torch.cat([self.embeddings[u][0] for u in leaves]))

    def _labels(self, leaves: list[str]) -> Tensor:
        return torch.cat([self.embeddings[u][1] for u in leaves])

    def _init(
        self,
        grid: Grid,
        roles: dict[str, tuple[int, TierRole]],
        rnd: int,
        timeout: float,
        nbytes: Counter[str],
    ) -> None:
        """End devices the cloud has no embeddings of upload them (once)."""
        todo = {
            uid: Message(
                RecordDict({CONFIG_KEY: self._config(rnd, "init")}),
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
            )
            for uid, (nid, role) in roles.items()
            if role.tier == "end" and uid not in self.embeddings
        }

        def decode(uid: str, content: RecordDict) -> tuple[Tensor, Tensor]:
            return decode_embeddings(content, self.num_classes, max_samples=self.max_samples)

        for uid, reply in self._exchange(grid, todo, timeout, rnd, "init", decode).items():
            link = f"end-{'cloud' if roles[uid][1].parent == CLOUD else 'edge'}"
            nbytes[f"init-{link}"] += reply.nbytes
            eps, labels = reply.payload
            self.embeddings[uid] = (eps.clone(), labels.clone())

    def _store(
        self, grid: Grid, tree: _Tree, rnd: int, timeout: float, nbytes: Counter[str]
    ) -> None:
        """Each edge holds the embeddings of exactly the leaves under it."""
        messages = {}
        for uid, role in tree.role.items():
            if role.tier != "edge" or uid not in tree.members:
                continue
            want, held = set(tree.leaves(uid)), self.edge_holds.get(uid, set())
            add, drop = sorted(want - held), sorted(held - want)
            if not add and not drop:
                continue
            content = RecordDict({CONFIG_KEY: self._config(rnd, "store", drop=",".join(drop))})
            for leaf in add:
                content[EMB_PREFIX + leaf] = encode_embeddings(*self.embeddings[leaf])
            nbytes[f"init-{tree.link(uid)}"] += record_nbytes(content)  # the subtree's embeddings
            messages[uid] = Message(
                content, dst_node_id=tree.node_id[uid], message_type=MessageType.TRAIN
            )
        for uid in self._exchange(grid, messages, timeout, rnd, "store"):
            self.edge_holds[uid] = set(tree.leaves(uid))

    def _teach(
        self, grid: Grid, tree: _Tree, rnd: int, timeout: float, nbytes: Counter[str]
    ) -> dict[tuple[str, str], Tensor]:
        """Every node's logits for its neighbours: ``{(teacher uid, name): logits}``."""
        messages, expected = {}, {}
        for uid in tree.members:
            if tree.role[uid].tier == "edge" and uid not in self.edge_holds:
                continue  # its embeddings did not arrive
            requests = {"parent": tree.leaves(uid)}
            if tree.role[uid].tier == "edge":
                requests.update({f"child/{c}": tree.leaves(c) for c in tree.children.get(uid, [])})
            requests = {k: v for k, v in requests.items() if v}
            if not requests:
                continue
            expected[uid] = {
                k: sum(len(self.embeddings[leaf][1]) for leaf in v) for k, v in requests.items()
            }
            config = self._config(
                rnd, "teach", **{f"teach/{k}": ",".join(v) for k, v in requests.items()}
            )
            messages[uid] = Message(
                RecordDict({CONFIG_KEY: config}),
                dst_node_id=tree.node_id[uid],
                message_type=MessageType.TRAIN,
            )

        def decode(uid: str, content: RecordDict) -> dict[str, tuple[Tensor, int]]:
            record = content.array_records.get(ARRAYS_KEY, ArrayRecord())
            logits = decode_named_logits(record, expected[uid], self.num_classes)
            return {name: (z, len(record[name].data)) for name, z in logits.items()}

        out: dict[tuple[str, str], Tensor] = {}
        for uid, reply in self._exchange(grid, messages, timeout, rnd, "teach", decode).items():
            for name, (z, size) in reply.payload.items():
                out[(uid, name)] = z.clone()
                # counted once per logical transfer (teacher -> student), not per relay hop
                link = tree.link(uid) if name == "parent" else tree.link(name.split("/", 1)[1])
                nbytes[f"logits-up-{link}" if name == "parent" else f"logits-down-{link}"] += size
        return out

    def _learn(
        self,
        grid: Grid,
        tree: _Tree,
        rnd: int,
        timeout: float,
        teach: dict[tuple[str, str], Tensor],
        cloud_z: dict[str, Tensor],
        nbytes: Counter[str],
    ) -> int:
        """Every node trains with its neighbours' logits; return how many did."""
        messages = {}
        for uid in tree.members:
            parent = tree.role[uid].parent
            lessons: dict[str, tuple[list[str], Tensor]] = {}
            z_parent = cloud_z.get(uid) if parent == CLOUD else teach.get((parent, f"child/{uid}"))
            if z_parent is not None:
                lessons["parent"] = (tree.leaves(uid), z_parent)
            for child in tree.children.get(uid, []):
                if (child, "parent") in teach:
                    lessons[f"child/{child}"] = (tree.leaves(child), teach[(child, "parent")])
            if not lessons:
                continue
            config = self._config(
                rnd, "learn", **{f"learn/{k}": ",".join(v[0]) for k, v in lessons.items()}
            )
            record = encode_named_logits({k: v[1] for k, v in lessons.items()}, self.logit_dtype)
            if parent == CLOUD and "parent" in record:  # the other lessons were counted in _teach
                nbytes[f"logits-down-{tree.link(uid)}"] += len(record["parent"].data)
            messages[uid] = Message(
                RecordDict({CONFIG_KEY: config, ARRAYS_KEY: record}),
                dst_node_id=tree.node_id[uid],
                message_type=MessageType.TRAIN,
            )
        return len(self._exchange(grid, messages, timeout, rnd, "learn", known=LEARN_METRICS))

    def _cloud_learn(
        self, tree: _Tree, teach: dict[tuple[str, str], Tensor], bridges: dict[str, Tensor]
    ) -> float:
        """Train the cloud on each child's logits over its subtree (eq. 2); return the loss.

        ``bridges``: each cloud child's bridge samples, as its logits were computed on.
        """
        loss, seen = 0.0, 0
        for child in tree.children[CLOUD]:
            z = teach.get((child, "parent"))
            if z is None:
                continue
            result = train_nonleaf(
                self.model,
                bridges[child],
                self._labels(tree.leaves(child)),
                z,
                self.bsbodp,
                self.device,
                self.generator,
                self.rectify,
            )
            loss, seen = loss + result.loss * result.num_examples, seen + result.num_examples
        return loss / max(seen, 1)

    def evaluate(self) -> tuple[float, int]:
        """Evaluate the cloud model on its test set.

        Returns
        -------
        tuple[float, int]
            ``(summed cross-entropy loss, number correct)`` over the test set.
        """
        logits = predict(self.model, TensorBatches(self.test_x, self.test_y, 256), self.device)
        return evaluate_logits(logits, self.test_y)
