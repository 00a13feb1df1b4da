"""Server side of FedGKT in plain PyTorch (no Flower): store, train, logits.

:class:`GKTServer` implements lines 6-12 of Algorithm 1: it keeps the latest
accepted features ``H^(k)``, client logits ``Z_c^(k)`` and labels ``Y^(k)`` of
every node, trains the server model ``f_s`` for ``E_s`` epochs on all nodes'
features shuffled together with ``CE + alpha * KD(client logits)`` (eq. 6),
and records the per-sample server logits ``Z_s^(k)`` of the last epoch, which
go back to the nodes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flwr_gkt.core.distributed import DistributedTrainer
from flwr_gkt.core.losses import KDMode, gkt_loss
from flwr_gkt.core.payload import Payload
from flwr_gkt.core.store import FeatureStore, StoreBatches
from flwr_gkt.core.training import (
    FitResult,
    TensorBatches,
    all_finite,
    autocast,
    evaluate_logits,
    fit,
    get_device,
    make_optimizer,
    predict,
    prepare_model,
    resolve_precision,
    set_lr,
)

#: Log to Flower's logger (``flwr``), without importing Flower: the core is plain PyTorch.
log = logging.getLogger("flwr").log

__all__ = ["EVAL_BATCH_SIZE", "GKTServer", "ServerRoundResult"]

#: Default mini-batch size of the server's inference (see :class:`GKTServer`).
EVAL_BATCH_SIZE = 256


@dataclass
class ServerRoundResult:
    """Metrics of one round (or one asynchronous update) of server training.

    Parameters
    ----------
    loss : float
        Mean training loss; always finite (``0`` when nothing was trained: no
        samples, or the update was undone because it left the model non-finite).
    accuracy : float
        Training accuracy on the samples seen.
    num_examples : int
        Number of samples trained on (``0``: no training happened, or it was
        undone).
    num_nodes : int
        Number of nodes whose features were trained on.
    seconds : float
        Wall-clock seconds of the training.
    """

    loss: float
    accuracy: float
    num_examples: int
    num_nodes: int
    seconds: float


class GKTServer:
    """The server model with its optimizer and the per-node feature store.

    Parameters
    ----------
    model : nn.Module
        Server model ``f_s`` mapping feature maps to logits.
    epochs : int
        Server epochs ``E_s`` per round.
    batch_size : int
        Mini-batch size of server training.
    eval_batch_size : int
        Mini-batch size of inference (evaluation, per-node logits outside
        training). The model is in eval mode there, so the batch size changes
        no result beyond float rounding; larger batches run faster (ResNet-10
        in bf16 on the 2-core CPU: 3,970 samples/s at 256 against 2,308 at 32).
    optimizer : str
        ``"adam"`` or ``"sgd"`` (see :func:`flwr_gkt.core.training.make_optimizer`).
    lr, weight_decay : float
        Optimizer settings.
    temperature, alpha : float
        KD temperature ``T`` and weight of the KD term.
    kd_mode : KDMode or str
        The server distils from client logits only in mode ``both``.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
    precision : str
        Autocast precision of training and inference: ``fp32``, ``bf16`` or
        ``fp16`` (see :func:`flwr_gkt.core.training.autocast`).
    seed : int
        Seed of the shuffling generator.
    memory_budget : int, optional
        Bytes of node payloads the feature store keeps in memory; beyond it,
        features spill to ``spill_dir`` and training streams them from disk
        (see :class:`flwr_gkt.core.store.FeatureStore`). ``None``: no limit.
    spill_dir : str or Path, optional
        Directory of spilled features (a temporary one when not given).
    device_memory_budget : int, optional
        Bytes of stored features kept resident on a CUDA training device
        (:meth:`flwr_gkt.core.store.FeatureStore.make_resident`); batches of
        the other nodes are gathered on the host into pinned memory, one batch
        ahead. ``None``: on CUDA, what is resident plus three quarters of the
        free device memory; nothing on the CPU. ``0``: nothing resident.
    compile_backend : str, optional
        Compile the model in place with :meth:`torch.nn.Module.compile` and
        this backend (e.g. ``"inductor"``); ``None``: eager. Measured on the
        2-core CPU (``benchmarks/gpu.py --compile``): bf16 server steps 1.12x to
        1.22x faster, fp32 none, after about 20 s of compilation per process.
    devices : Sequence[str]
        Train the epochs with DistributedDataParallel, one worker process
        (rank) per device (:class:`flwr_gkt.core.distributed.DistributedTrainer`;
        ``["cpu", "cpu"]``: two gloo ranks). ``batch_size`` stays the global
        batch: each rank trains on ``batch_size / len(devices)`` of it. Empty
        (default): the epochs run in this process on ``device``. Call
        :meth:`close` to stop the workers.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        epochs: int = 1,
        batch_size: int = 64,
        eval_batch_size: int = EVAL_BATCH_SIZE,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        temperature: float = 3.0,
        alpha: float = 1.0,
        kd_mode: KDMode | str = KDMode.BOTH,
        device: str = "auto",
        precision: str = "fp32",
        seed: int = 0,
        memory_budget: int | None = None,
        spill_dir: str | Path | None = None,
        device_memory_budget: int | None = None,
        compile_backend: str | None = None,
        devices: Sequence[str] = (),
    ) -> None:
        if compile_backend and devices:
            raise ValueError("a compiled server model cannot be trained on several devices")
        self.device = get_device(device)
        self.device_memory_budget = device_memory_budget
        autocast(self.device, precision)  # raises where the precision is not supported
        self.precision = resolve_precision(self.device, precision)
        self.model = prepare_model(model, self.device)
        if compile_backend:  # in place: the state_dict keys stay the model's own
            self.model.compile(backend=compile_backend)
        self.optimizer = make_optimizer(optimizer, self.model.parameters(), lr, weight_decay)
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.kd_mode = KDMode(kd_mode)
        self.generator = torch.Generator().manual_seed(seed)
        self.store = FeatureStore(memory_budget, spill_dir)
        self.logits: dict[int, Tensor] = {}
        self.stored_round: dict[int, int] = {}
        #: Nodes whose payload the training guard found responsible and evicted.
        self.evicted: list[int] = []
        #: Sort key of the nodes whose samples are concatenated (then shuffled
        #: together) for training; ``None``: the node id. Flower draws node ids
        #: at random per run, so the strategies sort by the node's stable
        #: identity: the same seed then trains on the same order.
        self.node_key: Callable[[int], Any] | None = None
        #: The distributed training's workers (``None``: the epochs run in this process).
        self.trainer = DistributedTrainer(self.model, devices, optimizer) if devices else None

    def close(self) -> None:
        """Stop the distributed training's workers, if any (the store is left as it is)."""
        if self.trainer is not None:
            self.trainer.close()

    def put(self, node_id: int, payload: Payload, server_round: int = 0) -> None:
        """Store (replace) the latest validated payload of ``node_id``, of ``server_round``.

        The round is what :meth:`evict` compares.
        """
        self.store.put(node_id, payload)
        self.stored_round[node_id] = server_round

    def evict(self, before_round: int) -> list[int]:
        """Drop the payloads (and logits) of nodes last stored before ``before_round``.

        A node that left -- or came back under a new node id -- stops being
        trained on once its features are older than the strategy's limit.
        Return the node ids dropped.
        """
        gone = [n for n, r in self.stored_round.items() if r < before_round]
        for node in gone:
            self.drop(node)
        return gone

    def state_dict(self) -> dict[str, Any]:
        """Return the state a checkpoint needs.

        The feature store is not included: features are re-sent by the nodes
        (the strategy asks a node for its features whenever it holds none).
        The state holds the model's and optimizer's state, the base learning
        rate, the per-node server logits ``Z_s`` and stored rounds, and the
        state of the shuffling generator.
        """
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.lr,
            "logits": {int(n): t.clone() for n, t in self.logits.items()},
            "stored-round": {int(n): int(r) for n, r in self.stored_round.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        The store stays as it is; stored rounds are kept only for nodes it
        holds.
        """
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr = float(state["lr"])
        self.logits = {int(n): t for n, t in state["logits"].items()}
        self.stored_round = {
            int(n): int(r) for n, r in state["stored-round"].items() if int(n) in self.store
        }
        self.generator.set_state(state["generator"])

    def server_logits(self, node_id: int) -> Tensor | None:
        """Return the server logits ``Z_s`` of ``node_id``'s samples, in its sample order.

        ``None`` when none were computed yet.
        """
        return self.logits.get(node_id)

    def train_round(
        self, lr_scale: float = 1.0, nodes: Iterable[int] | None = None
    ) -> ServerRoundResult:
        """Train ``E_s`` epochs on every stored node's features, then set ``Z_s``.

        All nodes' samples are shuffled together. The logits returned to each
        node are the outputs of the last epoch's forward passes, per sample
        (Algorithm 1, lines 10-11); with ``E_s = 0`` they are the model's
        eval-mode outputs. A round that leaves the model non-finite is undone
        (model, optimizer and ``Z_s`` restored); the nodes whose samples caused
        it are evicted and the round trains again without them. A round that
        still cannot train reports ``num_examples = 0`` and a loss of ``0``.

        Parameters
        ----------
        lr_scale : float
            Multiplies the base learning rate for this round (learning-rate
            schedule).
        nodes : Iterable[int], optional
            Restricts the round to these stored nodes (asynchronous training:
            the node whose reply just arrived); only their ``Z_s`` are updated.
            ``None``: every stored node.

        Returns
        -------
        ServerRoundResult
            The round's loss, accuracy, examples, nodes and seconds; all zero
            when no stored node is to be trained on.
        """
        set_lr(self.optimizer, self.lr * lr_scale)
        nodes = self._ordered(self.store if nodes is None else set(nodes) & set(self.store))
        if not nodes:
            return ServerRoundResult(0.0, 0.0, 0, 0, 0.0)
        return self._guarded(nodes, self._train_round)

    def _ordered(self, nodes: Iterable[int]) -> list[int]:
        """``nodes`` in training order (see :attr:`node_key`)."""
        return sorted(nodes, key=self.node_key)

    def _guarded(
        self, nodes: list[int], run: Callable[[list[int]], ServerRoundResult]
    ) -> ServerRoundResult:
        """Run ``run(nodes)`` under the training guard; on a trip, evict the culprits and rerun.

        Returns ``run``'s result when the (re)run trained, else one of no
        examples and a finite loss: a tripped guard never reports a ``NaN``.
        """
        with self._guard() as guard:
            result = run(nodes)
        if not guard.ok and (culprits := self.find_culprits(nodes)):
            for node in culprits:  # evicted, and the round trained again without them
                self.drop(node)
                log(
                    WARNING,
                    "GKTServer: payload of node %d evicted: its samples make the server loss "
                    "non-finite or extreme",
                    node,
                )
            self.evicted += culprits
            nodes = [n for n in nodes if n not in culprits]
            if nodes:
                with self._guard() as guard:
                    result = run(nodes)
        return result if guard.ok else ServerRoundResult(0.0, 0.0, 0, len(nodes), result.seconds)

    def drop(self, node: int) -> None:
        """Forget ``node``'s stored payload, server logits and stored round."""
        self.store.remove(node)
        self.logits.pop(node, None)
        self.stored_round.pop(node, None)

    @torch.no_grad()
    def find_culprits(self, nodes: list[int], factor: float = 100.0) -> list[int]:
        """Find the stored payloads that make the server's loss non-finite or extreme.

        Called when the training guard undid an update: each node's samples
        go through the (restored) model once, in eval mode, with the round's
        loss (CE + KD from its stored client logits). A node whose mean loss
        is non-finite, or more than ``factor`` times the median node's (and
        above ``factor``), is a culprit. The list is empty when the update
        itself diverged.
        """
        losses: dict[int, float] = {}
        for node in nodes:
            logits = predict(self.model, self._batches([node], self.eval_batch_size), self.device)
            teacher = self.store.logits([node]) if self.kd_mode.server_distills else None
            loss = gkt_loss(
                logits, self.store.labels([node]), teacher, self.temperature, self.alpha
            )
            losses[node] = float(loss)
        finite = sorted(v for v in losses.values() if math.isfinite(v))
        median = finite[len(finite) // 2] if finite else 0.0
        bound = factor * max(median, 1.0)
        return [n for n, v in losses.items() if not math.isfinite(v) or v > bound]

    @contextlib.contextmanager
    def _guard(self) -> Iterator[types.SimpleNamespace]:
        """Undo a training step that left the model non-finite (a hostile payload got through).

        The model and optimizer are copied before and restored when the loss or
        any weight is NaN/Inf afterwards; ``Z_s`` are then left as they were.
        """
        saved_model = copy.deepcopy(self.model.state_dict())
        saved_opt = copy.deepcopy(self.optimizer.state_dict())
        saved_logits = dict(self.logits)
        guard = types.SimpleNamespace(ok=True)
        self._last_loss = 0.0  # a run that trains sets it; one that does not is no failure
        yield guard
        finite = all_finite(self.model.state_dict().values())
        if finite and math.isfinite(self._last_loss):
            return
        guard.ok = False
        self.model.load_state_dict(saved_model)
        self.optimizer.load_state_dict(saved_opt)
        self.logits = saved_logits
        log(
            WARNING,
            "GKTServer: server training produced non-finite %s; model, optimizer and server "
            "logits restored to their state before the update",
            "weights" if not finite else "loss",
        )

    def _fit(
        self, nodes: list[int], size: int | None = None, capture_logits: int | None = None
    ) -> FitResult:
        """Run ``E_s`` epochs of CE (+ KD from the stored ``Z_c``) over ``nodes``' stored samples.

        ``size``: samples per epoch drawn from them (default: all);
        ``capture_logits``: keep the last epoch's logits of that many samples.
        """
        teacher = self.store.logits(nodes) if self.kd_mode.server_distills else None
        if self.trainer is not None:
            return self._fit_distributed(nodes, teacher, size, capture_logits)
        return fit(
            self.model,
            self._batches(nodes, self.batch_size, shuffle=True, size=size),
            self.optimizer,
            epochs=self.epochs,
            device=self.device,
            teacher_logits=teacher,
            temperature=self.temperature,
            alpha=self.alpha,
            capture_logits=capture_logits,
            precision=self.precision,
        )

    def _fit_distributed(
        self,
        nodes: list[int],
        teacher: Tensor | None,
        size: int | None,
        capture_logits: int | None,
    ) -> FitResult:
        """:meth:`_fit` on the trainer's ranks, over the orders :class:`StoreBatches` would draw."""
        assert self.trainer is not None
        total = sum(self.store.num_samples(n) for n in nodes)
        orders = [
            torch.randperm(total, generator=self.generator)[:size] for _ in range(self.epochs)
        ]
        return self.trainer.fit(
            self.model,
            self.optimizer,
            self.store,
            nodes,
            orders,
            batch_size=self.batch_size,
            teacher_logits=teacher,
            temperature=self.temperature,
            alpha=self.alpha,
            capture_logits=capture_logits,
            precision=self.precision,
            device_memory_budget=self.device_memory_budget,
        )

    def _batches(
        self, nodes: list[int], batch_size: int, shuffle: bool = False, size: int | None = None
    ) -> StoreBatches:
        """Return batches of ``nodes``' stored samples for the training device.

        On CUDA, features are first made resident on the device up to
        ``device_memory_budget`` and the rest is prefetched into pinned memory.
        """
        cuda = self.device.type == "cuda"
        budget = self.device_memory_budget
        if budget is None and cuda:  # what is resident already, plus 3/4 of what is free
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = self.store.resident_bytes + int(free * 0.75)
        if budget:
            self.store.make_resident(self.device, budget)
        generator = self.generator if shuffle else None
        return self.store.batches(nodes, batch_size, shuffle, generator, size, prefetch=cuda)

    def _train_round(self, nodes: list[int]) -> ServerRoundResult:
        labels = self.store.labels(nodes)
        total = len(labels)
        if self.epochs > 0:
            result = self._fit(nodes, capture_logits=total)
            assert result.last_epoch_logits is not None
            all_logits, loss, acc, secs = (
                result.last_epoch_logits,
                result.loss,
                result.accuracy,
                result.seconds,
            )
        else:
            all_logits = predict(
                self.model, self._batches(nodes, self.eval_batch_size), self.device, self.precision
            )
            loss_sum, correct = evaluate_logits(all_logits, labels)
            loss, acc, secs = loss_sum / total, correct / total, 0.0
        self._last_loss = loss
        sizes = [self.store.num_samples(n) for n in nodes]
        for node, part in zip(nodes, torch.split(all_logits, sizes), strict=True):
            self.logits[node] = part.clone()
        return ServerRoundResult(loss, acc, total, len(nodes), secs)

    def train_update(self, node: int, lr_scale: float = 1.0) -> ServerRoundResult:
        """Make one asynchronous server update after ``node``'s reply and set its ``Z_s``.

        ``E_s`` passes, each over as many samples as ``node`` holds, drawn at
        random from *every* stored node's features (the fresh ones of ``node``
        included), with ``CE + alpha * KD``; then ``Z_s`` of ``node`` is the
        model's output (eval mode) on its features. Over one update per node,
        the server sees the same number of samples, from the same mixture of
        nodes, as one synchronous :meth:`train_round`. An update that leaves
        the model non-finite is undone, as in :meth:`train_round`.
        ``num_examples`` of the result is ``node``'s sample count; the result
        is all zero when ``node`` is not stored.
        """
        if node not in self.store:
            return ServerRoundResult(0.0, 0.0, 0, 0, 0.0)
        return self._guarded(
            self._ordered(self.store),
            lambda nodes: (
                self._train_update(node, lr_scale, nodes)
                if node in nodes
                else ServerRoundResult(0.0, 0.0, 0, 0, 0.0)
            ),
        )

    def _train_update(self, node: int, lr_scale: float, nodes: list[int]) -> ServerRoundResult:
        start = time.perf_counter()
        set_lr(self.optimizer, self.lr * lr_scale)
        size = self.store.num_samples(node)
        loss = accuracy = 0.0
        if self.epochs > 0:
            result = self._fit(nodes, size=size)
            loss, accuracy = result.loss, result.accuracy
        logits = predict(
            self.model, self._batches([node], self.eval_batch_size), self.device, self.precision
        )
        self.logits[node] = logits
        if self.epochs == 0:
            loss_sum, correct = evaluate_logits(logits, self.store.labels([node]))
            loss, accuracy = loss_sum / size, correct / size
        self._last_loss = loss
        return ServerRoundResult(loss, accuracy, size, len(nodes), time.perf_counter() - start)

    def predict(self, features: Tensor) -> Tensor:
        """Return the server model's logits ``(N, num_classes)`` (eval mode, on the CPU).

        ``features`` are feature maps ``(N, C, H, W)``.
        """
        labels = torch.zeros(len(features), dtype=torch.long)
        batches = TensorBatches(features, labels, self.eval_batch_size)
        return predict(self.model, batches, self.device, self.precision)

    def evaluate(self, features: Tensor, labels: Tensor) -> tuple[float, int]:
        """Return ``(summed cross-entropy loss, number correct)`` on feature maps and labels."""
        return evaluate_logits(self.predict(features), labels)
