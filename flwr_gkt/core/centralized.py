"""Centralized training on pooled data: Table 1's baselines and the ``pooled`` extractor.

Plain PyTorch on the one training loop (:func:`flwr_gkt.core.training.fit`), no
Flower. The FedGKT paper's Table 1 compares FedGKT with a centralized model
trained on all the data -- the full model (``Centralized (ResNet-56)``) and the
edge model alone (``Centralized (ResNet-8)``). The same loop trains the full
model whose stem the reference code copies into every edge
(``extractor-init: pooled``, see :func:`flwr_gkt.data.pretrain.pretrain_pooled`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flwr_gkt.core.training import (
    Plateau,
    TensorBatches,
    evaluate_logits,
    fit,
    lr_factor,
    make_optimizer,
    predict,
    set_lr,
)

__all__ = ["CentralizedConfig", "train_centralized"]


@dataclass(frozen=True)
class CentralizedConfig:
    """Settings of :func:`train_centralized`.

    Parameters
    ----------
    rounds : int
        Evaluation points; each trains ``epochs_per_round`` epochs.
    epochs_per_round : int
        Epochs between two evaluations (a federated run's ``edge-epochs``, so
        that the baseline sees its data as often as a node does).
    batch_size : int
        Mini-batch size.
    optimizer : str
        ``adam`` or ``sgd``.
    lr : float
        Base learning rate.
    weight_decay : float
        Weight decay of ``sgd``.
    lr_schedule : str
        ``constant``, ``cosine`` (over ``rounds``) or ``plateau`` (stepped with
        each round's test accuracy).
    plateau_factor, plateau_patience : float, int
        The ``plateau`` schedule's factor and patience.
    seed : int
        Seed of the shuffling (and augmentation) generator.
    """

    rounds: int = 1
    epochs_per_round: int = 1
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    lr_schedule: str = "constant"
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    seed: int = 0


def train_centralized(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor] | None,
    cfg: CentralizedConfig,
    device: torch.device,
    augment: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
    on_round: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on pooled data, evaluating after every round.

    Parameters
    ----------
    model : nn.Module
        Maps inputs to logits, already on ``device``; trained in place. Only
        parameters that require gradients are optimized (a frozen stem stays).
    train : tuple[Tensor, Tensor]
        Pooled training inputs and labels.
    test : tuple[Tensor, Tensor], optional
        Test inputs and labels; without them no accuracy is reported.
    cfg : CentralizedConfig
        Rounds, epochs, optimizer and schedule.
    device : torch.device
        Where to train.
    augment : Callable, optional
        Transform of every training batch (random crop + flip).
    on_round : Callable[[dict[str, float]], None], optional
        Called with each round's row as soon as it is measured (progress).

    Returns
    -------
    list[dict[str, float]]
        One row per round: ``round``, ``train-loss``, ``train-accuracy``,
        ``accuracy`` / ``loss`` (test), ``lr-factor``, ``round-seconds`` and
        zero bytes (nothing is communicated), in the columns of the federated
        runs' histories.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    plateau = (
        Plateau(cfg.plateau_factor, cfg.plateau_patience) if cfg.lr_schedule == "plateau" else None
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = TensorBatches(*train, cfg.batch_size, True, gen, augment, drop_last=True)
    history: list[dict[str, float]] = []
    for rnd in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        factor = plateau.factor if plateau else lr_factor(cfg.lr_schedule, rnd, cfg.rounds)
        set_lr(optimizer, cfg.lr * factor)
        res = fit(model, batches, optimizer, epochs=cfg.epochs_per_round, device=device)
        row = {
            "round": float(rnd),
            "train-loss": res.loss,
            "train-accuracy": res.accuracy,
            "lr-factor": factor,
            "bytes-up-train": 0.0,
            "bytes-down-train": 0.0,
        }
        if test is not None:
            logits = predict(model, TensorBatches(*test, 256), device)
            loss_sum, correct = evaluate_logits(logits, test[1])
            row.update(accuracy=correct / len(test[1]), loss=loss_sum / len(test[1]))
            if plateau is not None:
                plateau.step(row["accuracy"])
        row["round-seconds"] = time.perf_counter() - start
        history.append(row)
        if on_round is not None:
            on_round(row)
    return history
