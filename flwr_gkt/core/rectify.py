"""Self-knowledge rectification (FedEEC): fix the teacher's wrong predictions before KD.

FedEEC (Wu et al., arXiv 2501.00693) adds a *self-knowledge rectification*
step that "refines the transferred knowledge": the teacher's probabilities are
corrected on the samples it gets wrong before the student distils from them.
The exact rule is not public (the paper's full text was not available to us);
the rules below are our readings. A rule is a function
``rectify(teacher_probs (B, C), labels (B,)) -> probs (B, C)`` that changes
only the rows whose argmax is not the label and keeps every row a probability
distribution:

``swap`` (default, our reading of "correct propagated probabilities")
    Exchange the probability of the wrong top class with the true class's:
    the label becomes the top class, the shape of the distribution (the "dark
    knowledge") is kept. This is the knowledge-adjustment idea of Wen et al.
    (2019).
``peak``
    Label-aware version of FedDKC's knowledge congruence: move mass linearly
    so that the true class gets probability ``max(p)`` (the former peak) and
    the rest keeps its relative order, ``p' = a*p`` on the other classes with
    ``a = (1 - max(p)) / sum_{j != y} p_j``.
``self``
    Replace the wrong row by the one-hot label (the student then learns the
    label there, as with cross-entropy).
``none``
    No rectification.

:func:`flwr_gkt.core.losses.kd_loss` takes a rule through its ``rectify``
argument; :data:`RECTIFIERS` maps the names above to the functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RECTIFIERS",
    "Rectifier",
    "get_rectifier",
    "rectify_peak",
    "rectify_self",
    "rectify_swap",
]

#: ``rectify(teacher_probs, labels) -> probs``: a self-knowledge rectification rule.
Rectifier = Callable[[Tensor, Tensor], Tensor]


def _on_wrong_rows(probs: Tensor, labels: Tensor, fix: Rectifier) -> Tensor:
    """Return a copy of ``probs`` whose wrong rows are ``fix(probs[rows], labels[rows])``."""
    out = probs.clone()
    wrong = probs.argmax(dim=1) != labels
    if wrong.any():
        rows = wrong.nonzero(as_tuple=True)[0]
        out[rows] = fix(probs[rows], labels[rows])
    return out


def _swap(p: Tensor, true: Tensor) -> Tensor:
    idx = torch.arange(len(true))
    top = p.argmax(dim=1)
    new = p.clone()
    new[idx, top] = p[idx, true]
    new[idx, true] = p[idx, top]
    return new


def _peak(p: Tensor, true: Tensor) -> Tensor:
    idx = torch.arange(len(true))
    peak = p.max(dim=1).values
    others = p.clone()
    others[idx, true] = 0.0
    mass = others.sum(dim=1, keepdim=True).clamp_min(1e-12)
    new = others / mass * (1.0 - peak).unsqueeze(1)
    new[idx, true] = peak
    return new


def rectify_swap(probs: Tensor, labels: Tensor) -> Tensor:
    """Swap the top probability with the true class's on the rows the teacher gets wrong.

    On a wrong row ``i`` with top class ``k = argmax p[i]`` and label ``y``,
    ``p'[i, y] = p[i, k]`` and ``p'[i, k] = p[i, y]``; other rows and entries
    are unchanged, so every row still sums to one.

    Parameters
    ----------
    probs : Tensor
        The teacher's probabilities, shape ``(B, C)``.
    labels : Tensor
        True classes, shape ``(B,)``.

    Returns
    -------
    Tensor
        The rectified probabilities, a new tensor of shape ``(B, C)``.
    """
    return _on_wrong_rows(probs, labels, _swap)


def rectify_peak(probs: Tensor, labels: Tensor) -> Tensor:
    """Give the true class the peak probability, rescaling the others to sum to ``1 - peak``.

    On a wrong row ``i`` with label ``y`` and ``peak = max p[i]``,
    ``p'[i, y] = peak`` and ``p'[i, c] = p[i, c] * (1 - peak) / sum_{j != y} p[i, j]``
    for ``c != y``: the other classes keep their relative order and ratios.
    Parameters and result as :func:`rectify_swap`.
    """
    return _on_wrong_rows(probs, labels, _peak)


def rectify_self(probs: Tensor, labels: Tensor) -> Tensor:
    """Replace the rows the teacher gets wrong by the one-hot label, as :func:`rectify_swap`."""
    return _on_wrong_rows(probs, labels, lambda p, true: F.one_hot(true, p.shape[1]).to(p.dtype))


#: The rules by name (the ``rectify`` config key); ``none`` is no rectification.
RECTIFIERS: dict[str, Rectifier | None] = {
    "none": None,
    "swap": rectify_swap,
    "peak": rectify_peak,
    "self": rectify_self,
}


def get_rectifier(name: str) -> Rectifier | None:
    """Return the rule named ``name``, a key of :data:`RECTIFIERS` (``none`` gives ``None``).

    Raises
    ------
    ValueError
        If ``name`` is not a known rule.
    """
    if name not in RECTIFIERS:
        raise ValueError(f"unknown rectification {name!r}; known: {sorted(RECTIFIERS)}")
    return RECTIFIERS[name]
