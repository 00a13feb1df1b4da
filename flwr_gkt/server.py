"""Server side of FedGKT in plain PyTorch (no Flower): store, train, logits.

:class:`GKTServer` implements lines 6-12 of Algorithm 1: it keeps the latest
accepted features ``H^(k)``, client logits ``Z_c^(k)`` and labels ``Y^(k)`` of
every node, trains the server model ``f_s`` for ``E_s`` epochs on all nodes'
features shuffled together with ``CE + alpha * KD(client logits)`` (eq. 6),
and records the per-sample server logits ``Z_s^(k)`` of the last epoch, which
go back to the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .losses import KDMode
from .training import (
    TensorBatches,
    evaluate_logits,
    fit,
    get_device,
    make_optimizer,
    predict,
    prepare_model,
    set_lr,
)
from .wire import Payload

__all__ = ["GKTServer", "ServerRoundResult"]


@dataclass
class ServerRoundResult:
    """Metrics of one round of server training."""

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
    optimizer : str
        ``"adam"`` or ``"sgd"`` (see :func:`flwr_gkt.training.make_optimizer`).
    lr, weight_decay : float
        Optimizer settings.
    temperature, alpha : float
        KD temperature ``T`` and weight of the KD term.
    kd_mode : KDMode or str
        The server distils from client logits only in mode ``both``.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
    seed : int
        Seed of the shuffling generator.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        epochs: int = 1,
        batch_size: int = 64,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        temperature: float = 3.0,
        alpha: float = 1.0,
        kd_mode: KDMode | str = KDMode.BOTH,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        self.device = get_device(device)
        self.model = prepare_model(model, self.device)
        self.optimizer = make_optimizer(optimizer, self.model.parameters(), lr, weight_decay)
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.kd_mode = KDMode(kd_mode)
        self.generator = torch.Generator().manual_seed(seed)
        self.store: dict[int, Payload] = {}
        self.logits: dict[int, Tensor] = {}
        self.stored_round: dict[int, int] = {}

    def put(self, node_id: int, payload: Payload, server_round: int = 0) -> None:
        """Store (replace) the latest validated payload of ``node_id``."""
        self.store[node_id] = payload
        self.stored_round[node_id] = server_round

    def evict(self, before_round: int) -> list[int]:
        """Drop the payloads (and logits) of nodes last stored before ``before_round``.

        A node that left -- or came back under a new node id -- stops being
        trained on once its features are older than the strategy's limit.
        """
        gone = [n for n, r in self.stored_round.items() if r < before_round]
        for node in gone:
            self.store.pop(node, None)
            self.logits.pop(node, None)
            self.stored_round.pop(node, None)
        return gone

    def server_logits(self, node_id: int) -> Tensor | None:
        """The server logits ``Z_s`` computed for ``node_id``'s samples, if any."""
        return self.logits.get(node_id)

    def train_round(self, lr_scale: float = 1.0) -> ServerRoundResult:
        """Train ``E_s`` epochs on every stored node's features, then set ``Z_s``.

        All nodes' samples are shuffled together. The logits returned to each
        node are the outputs of the last epoch's forward passes, per sample
        (Algorithm 1, lines 10-11). ``lr_scale`` multiplies the base learning
        rate for this round (learning-rate schedule).
        """
        set_lr(self.optimizer, self.lr * lr_scale)
        nodes = sorted(self.store)
        if not nodes:
            return ServerRoundResult(0.0, 0.0, 0, 0, 0.0)
        payloads = [self.store[n] for n in nodes]
        features = torch.cat([p.features for p in payloads])
        labels = torch.cat([p.labels for p in payloads])
        teacher = None
        if self.kd_mode.server_distills and all(p.logits is not None for p in payloads):
            teacher = torch.cat([p.logits for p in payloads if p.logits is not None])
        total = len(labels)
        if self.epochs > 0:
            batches = TensorBatches(features, labels, self.batch_size, True, self.generator)
            result = fit(
                self.model,
                batches,
                self.optimizer,
                epochs=self.epochs,
                device=self.device,
                teacher_logits=teacher,
                temperature=self.temperature,
                alpha=self.alpha,
                capture_logits=total,
            )
            assert result.last_epoch_logits is not None
            all_logits, loss, acc, secs = (
                result.last_epoch_logits,
                result.loss,
                result.accuracy,
                result.seconds,
            )
        else:
            all_logits = self.predict(features)
            loss_sum, correct = evaluate_logits(all_logits, labels)
            loss, acc, secs = loss_sum / total, correct / total, 0.0
        for node, part in zip(nodes, torch.split(all_logits, [len(p) for p in payloads]), strict=True):
            self.logits[node] = part.clone()
        return ServerRoundResult(loss, acc, total, len(nodes), secs)

    def predict(self, features: Tensor) -> Tensor:
        """Server logits for feature maps, eval mode, on the CPU."""
        labels = torch.zeros(len(features), dtype=torch.long)
        return predict(self.model, TensorBatches(features, labels, self.batch_size), self.device)

    def evaluate(self, features: Tensor, labels: Tensor) -> tuple[float, int]:
        """Return ``(summed CE loss, correct)`` of the server model on features."""
        return evaluate_logits(self.predict(features), labels)
