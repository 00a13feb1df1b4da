"""FedAgg / FedEEC node training in plain PyTorch: one BSBODP direction.

FedAgg (Wu et al., INFOCOM 2024) arranges nodes in a tree (end devices, edge
servers, cloud). After a one-time upload of bridge-sample embeddings and
labels (:mod:`flwr_gkt.bridge`), every round each parent-child pair teaches
each other in both directions over the bridge samples of the child's subtree
(*bridge sample based online distillation protocol*, BSBODP): the teacher
computes its logits on the decoded bridge samples (:func:`teacher_logits`),
only those logits cross the link, and the student trains one pass with

* end device (leaf, :func:`train_leaf`): ``CE(f(x), y) + gamma * [CE(f(dec eps), y)
  + beta * KL_T(f(dec eps), z_teacher)]`` on its real images ``x`` and the
  bridge samples of the same images (paper eqs. 4 and 5),
* edge or cloud (:func:`train_nonleaf`): ``CE(f(dec eps), y) + beta *
  KL_T(f(dec eps), z_teacher)`` on the bridge samples of the child's subtree
  (paper eq. 2),

with the paper's ``T = 3``, ``beta = 10``, ``gamma = 1`` as defaults. FedEEC's
self-knowledge rectification is the ``rectify`` argument (applied to the
teacher's probabilities, see :mod:`flwr_gkt.rectify`). Both use the library's
one training loop (:func:`flwr_gkt.training.fit`); the optimizer is created
anew for every call and an incomplete last batch is skipped, as in the
official code (``drop_last``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from .losses import fedagg_leaf_loss
from .rectify import Rectifier
from .training import FitResult, TensorBatches, fit, make_optimizer, predict, to_device

__all__ = ["BSBODPConfig", "teacher_logits", "train_leaf", "train_nonleaf"]


@dataclass(frozen=True)
class BSBODPConfig:
    """Settings of one BSBODP direction (FedAgg paper defaults)."""

    temperature: float = 3.0
    beta: float = 10.0
    gamma: float = 1.0
    batch_size: int = 8
    optimizer: str = "sgd"
    lr: float = 0.001
    weight_decay: float = 0.0
    epochs: int = 1


def teacher_logits(
    model: nn.Module, bridge: Tensor, device: torch.device, batch_size: int = 256
) -> Tensor:
    """The teacher's logits on bridge samples (eval mode, no gradient), on the CPU."""
    labels = torch.zeros(len(bridge), dtype=torch.long)
    return predict(model, TensorBatches(bridge, labels, batch_size), device)


def _leaf_step(
    cfg: BSBODPConfig,
    rectify: Rectifier | None,
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    teacher: Tensor | None,
) -> tuple[Tensor, Tensor]:
    real, bridge = inputs[:, 0], inputs[:, 1]  # index-aligned pairs: image and its bridge sample
    real_logits = model(to_device(real.contiguous(), labels.device))
    bridge_logits = model(to_device(bridge.contiguous(), labels.device))
    loss = fedagg_leaf_loss(
        real_logits, bridge_logits, labels, teacher, cfg.temperature, cfg.beta, cfg.gamma, rectify
    )
    return loss, real_logits


def train_leaf(
    model: nn.Module,
    real: Tensor,
    bridge: Tensor,
    labels: Tensor,
    teacher: Tensor | None,
    cfg: BSBODPConfig,
    device: torch.device,
    generator: torch.Generator | None = None,
    rectify: Rectifier | None = None,
) -> FitResult:
    """An end device learns from its parent: real images plus their bridge samples (eq. 4)."""
    if real.shape != bridge.shape:
        raise ValueError(
            f"real {list(real.shape)} and bridge {list(bridge.shape)} samples must pair up"
        )
    pairs = torch.stack([real, bridge], dim=1)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    return fit(
        model,
        TensorBatches(pairs, labels, cfg.batch_size, True, generator, drop_last=True),
        optimizer,
        epochs=cfg.epochs,
        device=device,
        teacher_logits=teacher,
        loss_fn=partial(_leaf_step, cfg, rectify),
    )


def train_nonleaf(
    model: nn.Module,
    bridge: Tensor,
    labels: Tensor,
    teacher: Tensor | None,
    cfg: BSBODPConfig,
    device: torch.device,
    generator: torch.Generator | None = None,
    rectify: Rectifier | None = None,
) -> FitResult:
    """An edge or the cloud learns from a neighbour over the bridge samples of a subtree (eq. 2)."""
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    return fit(
        model,
        TensorBatches(bridge, labels, cfg.batch_size, True, generator, drop_last=True),
        optimizer,
        epochs=cfg.epochs,
        device=device,
        teacher_logits=teacher,
        temperature=cfg.temperature,
        alpha=cfg.beta,
        rectify=rectify,
    )
