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
"""

from __future__ import annotations

from enum import Enum

import torch.nn.functional as F
from torch import Tensor

__all__ = ["KDMode", "kd_loss", "gkt_loss"]


class KDMode(str, Enum):
    """Which directions of knowledge transfer are on (paper Table 2).

    ``none``: both sides train with CE only. ``server_to_edge``: only the edge
    distils from the server logits (S->E). ``both``: the server also distils
    from the client logits (S<->E), the paper's default.
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


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T**2 * D_KL(softmax(teacher/T) || softmax(student/T))``, batch mean.

    Parameters
    ----------
    student_logits : Tensor
        Logits of the model being trained, shape ``(B, C)``.
    teacher_logits : Tensor
        Logits of the teacher, shape ``(B, C)``; no gradient flows into them.
    temperature : float
        Softmax temperature ``T > 0``.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def gkt_loss(
    logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    temperature: float,
    alpha: float,
) -> Tensor:
    """``CE(logits, labels) + alpha * kd_loss(logits, teacher_logits, T)``.

    With ``teacher_logits=None`` (no teacher yet, or KD switched off) this is
    plain cross-entropy. The same function is the client loss (teacher = server
    logits, eq. 7) and the server loss (teacher = client logits, eq. 6).
    """
    loss = F.cross_entropy(logits, labels)
    if teacher_logits is not None and alpha != 0.0:
        loss = loss + alpha * kd_loss(logits, teacher_logits, temperature)
    return loss
