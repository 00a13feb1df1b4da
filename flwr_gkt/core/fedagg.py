"""FedAgg / FedEEC node training in plain PyTorch: one BSBODP direction.

FedAgg (Wu et al., INFOCOM 2024) arranges nodes in a tree (end devices, edge
servers, cloud). After a one-time upload of bridge-sample embeddings and
labels (:mod:`flwr_gkt.core.bridge`), every round each parent-child pair teaches
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
teacher's probabilities, see :mod:`flwr_gkt.core.rectify`). Both use the library's
one training loop (:func:`flwr_gkt.core.training.fit`); the optimizer is created
anew for every call and an incomplete last batch is skipped, as in the
official code (``drop_last``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from flwr_gkt.core.losses import fedagg_leaf_loss
from flwr_gkt.core.rectify import Rectifier
from flwr_gkt.core.training import FitResult, TensorBatches, fit, make_optimizer, predict, to_device

__all__ = ["BSBODPConfig", "teacher_logits", "train_leaf", "train_nonleaf"]


@dataclass(frozen=True)
class BSBODPConfig:
    """Settings of one BSBODP direction (FedAgg paper defaults).

    Parameters
    ----------
    temperature : float
        KD temperature ``T``.
    beta : float
        Weight of the KD term on the bridge samples.
    gamma : float
        Weight of an end device's whole bridge-sample loss (leaves only).
    batch_size : int
        Mini-batch size; an incomplete last batch is skipped.
    optimizer : str
        ``sgd`` or ``adam`` (see :func:`flwr_gkt.core.training.make_optimizer`).
    lr : float
        Learning rate.
    weight_decay : float
        Weight decay of ``sgd`` (``adam`` uses a fixed 1e-4).
    epochs : int
        Passes over the samples per direction.
    """

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
    """Return the teacher's float32 logits ``(N, num_classes)`` on the CPU.

    ``model`` (on ``device``) is put in eval mode and runs without gradient on
    the decoded, normalised bridge samples ``N x C x H x W``, ``batch_size`` at
    a time; the rows keep the order of ``bridge``.
    """
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
    """Train an end device from its parent: real images plus their bridge samples (eq. 4).

    Each step computes the model's logits on a shuffled mini-batch of real
    images and on the bridge samples of the same images, and minimises
    :func:`~flwr_gkt.core.losses.fedagg_leaf_loss`::

        CE(f(x), y) + gamma * [CE(f(dec eps), y) + beta * T**2 * KL(teacher || f(dec eps))]

    Accuracy and loss in the result are those of the real images' logits.

    Parameters
    ----------
    model : nn.Module
        The end device's model (image -> logits), on ``device``; trained in
        place.
    real : Tensor
        Normalised real images ``N x C x H x W``.
    bridge : Tensor
        Their bridge samples ``dec(enc(x))``, same shape, row ``i`` for image
        ``i``.
    labels : Tensor
        Labels of the images, shape ``(N,)``.
    teacher : Tensor | None
        The parent's logits on the bridge samples ``(N, num_classes)``, or
        ``None`` for no KD term.
    cfg : BSBODPConfig
        Temperature, ``beta``, ``gamma``, optimizer and batch settings.
    device : torch.device
        Where ``model`` lives; batches are moved there.
    generator : torch.Generator, optional
        Source of randomness for shuffling.
    rectify : Rectifier, optional
        FedEEC rectification of the teacher's probabilities.

    Returns
    -------
    FitResult
        Loss, accuracy, sample count and wall time of the last epoch.

    Raises
    ------
    ValueError
        If ``real`` and ``bridge`` differ in shape.
    """
    if real.shape != bridge.shape:
        raise ValueError(
            f"real {list(real.shape)} and bridge {list(bridge.shape)} samples must pair up"
        )
    pairs = torch.stack([real, bridge], dim=1)
    return _fit(
        model,
        pairs,
        labels,
        teacher,
        cfg,
        device,
        generator,
        loss_fn=partial(_leaf_step, cfg, rectify),
    )


def _fit(
    model: nn.Module,
    samples: Tensor,
    labels: Tensor,
    teacher: Tensor | None,
    cfg: BSBODPConfig,
    device: torch.device,
    generator: torch.Generator | None,
    **loss: Any,
) -> FitResult:
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    return fit(
        model,
        TensorBatches(samples, labels, cfg.batch_size, True, generator, drop_last=True),
        optimizer,
        epochs=cfg.epochs,
        device=device,
        teacher_logits=teacher,
        **loss,
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
    """Train an edge or the cloud from a neighbour over the bridge samples of a subtree (eq. 2).

    Minimises :func:`~flwr_gkt.core.losses.fedagg_nonleaf_loss`::

        CE(f(dec eps), y) + beta * T**2 * KL(teacher || f(dec eps))

    on shuffled mini-batches of the bridge samples ``N x C x H x W`` of the
    subtree. The parameters and the result are those of :func:`train_leaf`
    without ``real`` (``teacher`` is the neighbour's logits; ``cfg.gamma`` is
    not used).
    """
    return _fit(
        model,
        bridge,
        labels,
        teacher,
        cfg,
        device,
        generator,
        temperature=cfg.temperature,
        alpha=cfg.beta,
        rectify=rectify,
    )
