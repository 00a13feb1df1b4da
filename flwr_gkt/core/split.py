"""Split learning in plain PyTorch (no Flower): the two halves of one mini-batch step.

Vanilla split learning (Gupta & Raskar, 2018) and SplitFed (Thapa et al.,
AAAI 2022) cut one network -- here FedGKT's edge extractor ``f_e`` (e.g. the
ResNet-8 stem) and the server model ``f_s`` (e.g. ResNet-55 on the feature
maps) -- and train it jointly, one mini-batch at a time:

1. the edge computes the activations ``H = f_e(x)`` (:func:`edge_activations`)
   and sends them with the labels;
2. the server runs ``f_s`` on ``H``, the loss and the backward pass, steps its
   optimizer and returns ``dL/dH`` (:func:`server_step`);
3. the edge back-propagates ``dL/dH`` through ``f_e`` and steps its optimizer
   (:func:`edge_backward`).

The edge does not keep the autograd graph between 1 and 3 (in a deployment
the two happen in different ClientApp processes): it recomputes ``f_e(x)``
with the same weights and the same batch, which gives the same ``H`` and
hence exactly the gradients of the unsplit model (batch-norm running
statistics are updated once, by step 1). :func:`average_states` is the
weighted average SplitFed applies to the edge models (V1 and V2) and to the
server-side copies (V1).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flwr_gkt.core.training import all_finite, autocast, to_device

__all__ = [
    "ServerStep",
    "average_states",
    "batch_indices",
    "edge_activations",
    "edge_backward",
    "kept_buffers",
    "server_step",
    "state_change",
]


@dataclass
class ServerStep:
    """The server's half of one split-learning step.

    Parameters
    ----------
    gradient : Tensor
        ``dL/dH``, the gradient of the mean cross-entropy with respect to the
        activations, float32 on the CPU, contiguous, shaped like ``H``.
    loss : float
        The batch's mean cross-entropy (before the update).
    correct : int
        Correctly classified samples of the batch (before the update).
    num_examples : int
        Samples in the batch.
    """

    gradient: Tensor
    loss: float
    correct: int
    num_examples: int
    #: ``False``: the step would have left the model non-finite (a loss, gradient or
    #: weight NaN/Inf) and was undone: model, buffers and optimizer are as before.
    ok: bool = True


def server_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    activations: Tensor,
    labels: Tensor,
    device: torch.device,
    precision: str = "fp32",
) -> ServerStep:
    """Train ``model`` on one batch of edge activations; return ``dL/dH``.

    Parameters
    ----------
    model : nn.Module
        The server model ``f_s`` (on ``device``); put in training mode.
    optimizer : torch.optim.Optimizer, optional
        Steps ``model`` after the backward pass; ``None``: gradients are
        computed and left in ``model``'s ``.grad`` (tests of the split).
    activations : Tensor
        The edge's ``H`` (any float dtype; used as float32), ``N x C x H x W``.
    labels : Tensor
        Their labels, ``N``.
    device : torch.device
        Where ``model`` lives.
    precision : str
        Autocast precision of the forward pass (``fp32`` for an exact split).

    Returns
    -------
    ServerStep
        The activations' gradient and the batch's loss / accuracy; with
        ``ok=False`` (the training guard) when the loss, the gradients or the
        updated weights were not finite: the step is then undone (weights,
        batch-norm statistics and optimizer state restored) and the loss
        reported as ``0``.
    """
    model.train()
    h = to_device(activations, device).float().detach().requires_grad_(True)
    y = labels.to(device)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    with autocast(device, precision):
        logits = model(h)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    assert h.grad is not None  # h is a leaf that requires grad
    value = float(loss.detach())
    ok = math.isfinite(value) and all_finite([h.grad, *(p.grad for p in model.parameters())])
    if ok and optimizer is not None:
        saved_opt = copy.deepcopy(optimizer.state_dict())
        optimizer.step()
        if not all_finite(model.state_dict().values()):
            optimizer.load_state_dict(saved_opt)
            ok = False
    if not ok:  # the guard: nothing of this step stays
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        return ServerStep(torch.zeros(h.shape), 0.0, 0, len(y), ok=False)
    correct = int((logits.detach().argmax(1) == y).sum())
    return ServerStep(h.grad.detach().float().contiguous().cpu(), value, correct, len(y))


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s buffers (batch-norm running statistics) on exit.

    The edge recomputes a batch's forward pass to back-propagate the server's
    gradient; the running statistics were already updated when the
    activations were first computed, and must not be updated twice.
    """
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])


def edge_activations(
    extractor: nn.Module, x: Tensor, device: torch.device, precision: str = "fp32"
) -> Tensor:
    """Return ``H = f_e(x)`` of one training batch, to send to the server.

    Runs in training mode (batch statistics; the running statistics are
    updated, once per batch) without recording a graph, under autocast of
    ``precision`` (``fp32`` for an exact split). ``extractor`` lives on
    ``device``; the activations are returned float32, contiguous, on the CPU.
    """
    extractor.train()
    with torch.no_grad(), autocast(device, precision):
        h = extractor(to_device(x, device))
    out: Tensor = h.float().contiguous().cpu()
    return out


def edge_backward(
    extractor: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    x: Tensor,
    gradient: Tensor,
    device: torch.device,
    precision: str = "fp32",
) -> None:
    """Back-propagate the server's ``dL/dH`` through ``f_e`` and step the optimizer.

    Recomputes ``H = f_e(x)`` (same weights, same batch: the ``H`` the server
    saw) with its running statistics kept (:func:`kept_buffers`): ``extractor``,
    ``x``, ``device`` and ``precision`` are those :func:`edge_activations` had,
    the weights unchanged since. ``optimizer`` ``None`` leaves the gradients
    in ``.grad``.
    """
    extractor.train()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        extractor.zero_grad(set_to_none=True)
    with kept_buffers(extractor):  # restored after the backward pass, which reads them
        with autocast(device, precision):
            h = extractor(to_device(x, device))
        h.float().backward(to_device(gradient, device).float())
    if optimizer is not None:
        optimizer.step()


def batch_indices(
    num_samples: int, batch_size: int, epochs: int, generator: torch.Generator
) -> list[Tensor]:
    """Return the sample indices of every mini-batch of ``epochs`` shuffled passes.

    A pass's last batch is dropped when it holds a single sample (batch norm
    needs two) and the pass has another batch. ``generator`` draws the
    permutations (seeded: the same batches on recomputation).
    """
    out: list[Tensor] = []
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator)
        chunks = list(order.split(batch_size))
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks.pop()
        out += chunks
    return out


def average_states(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """Return the weighted average of model states (FedAvg; SplitFed's aggregation).

    Floating-point entries are averaged with ``weights`` (normalised);
    integer entries (batch norm's ``num_batches_tracked``) are taken from the
    state of the largest weight. The states have the same keys and shapes,
    the weights (e.g. samples trained) are non-negative; the average is on
    the CPU.

    Raises
    ------
    ValueError
        If there are no states, the counts differ or the weights sum to 0.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"{len(states)} states for {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights sum to 0")
    top = max(range(len(states)), key=lambda i: weights[i])
    out: dict[str, Tensor] = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float64, device="cpu")
            for state, w in zip(states, weights, strict=True):
                acc += state[key].detach().cpu().double() * (float(w) / total)
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = states[top][key].detach().cpu().clone()
    return out


def state_change(
    state: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> tuple[float, float]:
    """Return how far ``state`` moved from ``reference``, and the size of ``reference``.

    Both are L2 norms over every floating-point entry (weights and batch-norm
    statistics; integer counters are left out), in float64:
    ``(||state - reference||, ||reference||)``. The wire's check of relayed and
    averaged edge weights (:func:`flwr_gkt.wire.decode_state`) bounds the first
    by a multiple of the second. ``reference`` has the keys and shapes of
    ``state``.
    """
    change = size = 0.0
    for key, ref in reference.items():
        if not ref.is_floating_point():
            continue
        r = ref.detach().cpu().double()
        change += float((state[key].detach().cpu().double() - r).square().sum())
        size += float(r.square().sum())
    return change**0.5, size**0.5
