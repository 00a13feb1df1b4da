"""FedGKT losses: cross-entropy plus temperature-scaled knowledge distillation.

Paper (He et al., 2020), Section 3.3:

* eq. (6), server: ``l_s = l_CE + sum_k D_KL(p_k || p_s)`` -- the client
  predictions ``p_k`` are the teacher of the server model;
* eq. (7), client: ``l_c = l_CE + D_KL(p_s || p_k)`` -- the server predictions
  ``p_s`` are the teacher of edge model ``k``;

with ``p = softmax(z / T)``. As in the reference implementation the KL term is
averaged over the batch and multiplied by ``T**2`` (Hinton et al.) so that its
gradient scale does not depend on ``T``. ``alpha`` weights the KD term
(``alpha = 1`` is the paper's equation).

FedAgg (Wu et al., INFOCOM 2024) distils over bridge samples with the same
KD term (:func:`fedagg_leaf_loss`, paper eq. 4; :func:`fedagg_nonleaf_loss`,
paper eq. 2); FedEEC's rectification of the teacher's probabilities plugs into
:func:`kd_loss` (``rectify``, see :mod:`flwr_gkt.core.rectify`).
"""

from __future__ import annotations

from enum import StrEnum

import torch.nn.functional as F
from torch import Tensor

from flwr_gkt.core.rectify import Rectifier

__all__ = ["KDMode", "fedagg_leaf_loss", "fedagg_nonleaf_loss", "gkt_loss", "kd_loss"]


class KDMode(StrEnum):
    """Which directions of knowledge transfer are on (paper Table 2).

    A string enum: the run config gives the value (``kd-mode = "both"``).

    Attributes
    ----------
    NONE : str
        ``"none"``: both sides train with CE only.
    SERVER_TO_EDGE : str
        ``"server_to_edge"``: only the edge distils from the server logits
        (S->E); the server trains with CE only.
    BOTH : str
        ``"both"``: the server also distils from the client logits (S<->E), the
        paper's default.
    """

    NONE = "none"
    SERVER_TO_EDGE = "server_to_edge"
    BOTH = "both"

    @property
    def edge_distills(self) -> bool:
        """Whether the edge uses the KD term."""
        return self is not KDMode.NONE

    @property
    def server_distills(self) -> bool:
        """Whether the server uses the KD term."""
        return self is KDMode.BOTH


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    rectify: Rectifier | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """Return the temperature-scaled KD term ``T**2 * D_KL(p_teacher || p_student)``.

    With ``p_student = softmax(z_student / T)`` and ``p_teacher =
    softmax(z_teacher / T)`` (row-wise softmax over the ``C`` classes), this is::

        L_KD = T**2 / B * sum_i sum_c p_teacher[i, c]
                          * (log p_teacher[i, c] - log p_student[i, c])

    i.e. the KL divergence between the softened distributions, averaged over
    the batch (``reduction="batchmean"``) and scaled by ``T**2`` (Hinton et
    al.) so that its gradient does not shrink with ``T``. It is the
    ``D_KL(p_s || p_k)`` term of the client loss (eq. 7, teacher = server) and
    the ``D_KL(p_k || p_s)`` term of the server loss (eq. 6, teacher = client).
    With ``rectify``, ``p_teacher`` is replaced by ``rectify(p_teacher, labels)``
    before the divergence is taken.

    Parameters
    ----------
    student_logits : Tensor
        Logits ``z_student`` of the model being trained, shape ``(B, C)``.
    teacher_logits : Tensor
        Logits ``z_teacher`` of the teacher, shape ``(B, C)``; they are
        detached, so no gradient flows into them.
    temperature : float
        Softmax temperature ``T > 0``.
    rectify : Rectifier, optional
        FedEEC self-knowledge rectification ``rectify(teacher_probs, labels)``
        applied to ``softmax(teacher/T)`` (see :mod:`flwr_gkt.core.rectify`); needs
        ``labels``.
    labels : Tensor, optional
        True classes, shape ``(B,)``; used only by ``rectify``.

    Returns
    -------
    Tensor
        The scalar loss ``L_KD`` (differentiable in ``student_logits``).

    Raises
    ------
    ValueError
        If ``rectify`` is given without ``labels``.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    if rectify is not None:
        if labels is None:
            raise ValueError("rectification needs the labels")
        p_teacher = rectify(log_p_teacher.exp(), labels)
        kl = F.kl_div(log_p_student, p_teacher, reduction="batchmean")
    else:
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def gkt_loss(
    logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    temperature: float,
    alpha: float,
    rectify: Rectifier | None = None,
) -> Tensor:
    """Return the FedGKT loss ``CE(logits, labels) + alpha * kd_loss(logits, teacher_logits, T)``.

    In the paper's notation, for a batch of ``B`` samples with labels ``y``::

        l = CE(z, y) + alpha * T**2 * D_KL(softmax(z_teacher / T) || softmax(z / T))

    where ``CE`` is the batch mean of the cross-entropy of the (unsoftened)
    logits ``z`` and the KD term is :func:`kd_loss`. With
    ``teacher_logits=None`` (no teacher yet, or KD switched off) or
    ``alpha == 0`` this is plain cross-entropy. The same function is the client
    loss (teacher = server logits, eq. 7) and the server loss (teacher = client
    logits, eq. 6). Shapes: ``logits`` and ``teacher_logits`` ``(B, C)``,
    ``labels`` ``(B,)``; ``rectify`` is that of :func:`kd_loss`.
    """
    loss = F.cross_entropy(logits, labels)
    if teacher_logits is not None and alpha != 0.0:
        loss = loss + alpha * kd_loss(logits, teacher_logits, temperature, rectify, labels)
    return loss


def fedagg_leaf_loss(
    real_logits: Tensor,
    bridge_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    temperature: float = 3.0,
    beta: float = 10.0,
    gamma: float = 1.0,
    rectify: Rectifier | None = None,
) -> Tensor:
    """Return FedAgg's end-device loss ``CE(f(x), y) + gamma * [CE(f(dec eps), y) + beta * KL_T]``.

    Written out::

        l = CE(z_real, y) + gamma * (CE(z_bridge, y)
              + beta * T**2 * D_KL(softmax(z_teacher / T) || softmax(z_bridge / T)))

    i.e. ``CE(real_logits, labels) + gamma * gkt_loss(bridge_logits, labels,
    teacher_logits, T, alpha=beta)``. ``real_logits`` are the device model's
    outputs on its real images, ``bridge_logits`` on the bridge samples of the
    *same* samples (index aligned, same ``labels``), ``teacher_logits`` the
    parent's logits on those bridge samples. Without a teacher (``None``) the
    KD term is dropped. The paper's defaults ``T = 3``, ``beta = 10``,
    ``gamma = 1`` (the official code uses ``beta = 1`` on leaves: we follow
    the paper).
    """
    bridge = gkt_loss(bridge_logits, labels, teacher_logits, temperature, beta, rectify)
    return F.cross_entropy(real_logits, labels) + gamma * bridge


def fedagg_nonleaf_loss(
    bridge_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    temperature: float = 3.0,
    beta: float = 10.0,
    rectify: Rectifier | None = None,
) -> Tensor:
    """Return FedAgg's edge/cloud loss ``CE(f(dec eps), y) + beta * KL_T(f(dec eps), z_teacher)``.

    Written out::

        l = CE(z_bridge, y) + beta * T**2 * D_KL(softmax(z_teacher / T) || softmax(z_bridge / T))

    i.e. :func:`gkt_loss` with ``alpha = beta``, on bridge samples only
    (``teacher_logits``: the neighbour's, on the same bridge samples).
    """
    return gkt_loss(bridge_logits, labels, teacher_logits, temperature, beta, rectify)
