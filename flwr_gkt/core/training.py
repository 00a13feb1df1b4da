"""The one training loop of flwr-gkt, shared by edge, server and baselines.

Batches are tuples ``(inputs, labels, index)`` where ``index`` holds each
sample's position in the dataset the batch came from. The index is how a
teacher's per-sample logits are found for the batch (edge: server logits of
the previous round; server: the client logits that came with the features) and
where the outputs of the last epoch are written back (server logits ``Z_s``,
Algorithm 1 lines 10-11).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from flwr_gkt.core.losses import gkt_loss
from flwr_gkt.core.payload import Features, QuantizedBatch, dequantize
from flwr_gkt.core.rectify import Rectifier

__all__ = [
    "PRECISIONS",
    "Batch",
    "DatasetBatches",
    "FitResult",
    "Plateau",
    "SizedDataset",
    "StepLoss",
    "TensorBatches",
    "all_finite",
    "autocast",
    "bf16_supported",
    "evaluate_logits",
    "fit",
    "fused_supported",
    "get_device",
    "lr_factor",
    "make_optimizer",
    "predict",
    "prepare_model",
    "set_lr",
    "to_device",
]

#: Any module type (:func:`prepare_model` returns the model it was given).
ModuleT = TypeVar("ModuleT", bound=nn.Module)

#: ``(inputs, labels, sample indices)`` of one mini-batch.
Batch = tuple[Features, Tensor, Tensor]
#: ``(model, inputs, labels, batch_teacher_logits) -> (loss, logits)``, see :func:`fit`.
StepLoss = Callable[[nn.Module, Tensor, Tensor, "Tensor | None"], "tuple[Tensor, Tensor]"]


def get_device(preference: str = "auto") -> torch.device:
    """Return the device to train on: for ``"auto"`` CUDA when available, else the CPU.

    Any other ``preference`` is passed to :class:`torch.device` as is
    (``"cpu"``, ``"cuda:1"``, ...).
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def to_device(x: Features, device: torch.device) -> Tensor:
    """Move a batch to ``device`` as float32; image-like batches go channels-last.

    Stored features are converted *there*: an int8 :class:`QuantizedBatch` is
    copied as int8 and dequantised on ``device``, float16 maps are upcast on
    ``device``. Channels-last convolutions are several times faster on the
    CPU (oneDNN) and no slower on GPUs; the logical shape is unchanged. The
    copies are non-blocking.
    """
    if isinstance(x, QuantizedBatch):
        q = x.q.to(device, memory_format=torch.channels_last, non_blocking=True)
        minimum = x.minimum.to(device, non_blocking=True)
        return dequantize(q, minimum, x.scale.to(device, non_blocking=True))
    if x.dim() == 4:
        x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
        return x.float() if x.dtype == torch.float16 else x
    return x.to(device, non_blocking=True)


def prepare_model(model: ModuleT, device: torch.device) -> ModuleT:
    """Move ``model`` to ``device`` in channels-last layout, in place; return ``model``."""
    model.to(device=device)
    model.to(memory_format=torch.channels_last)
    if device.type == "cuda":  # fixed input shapes: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    return model


class TensorBatches:
    """Iterate over in-memory tensors in (optionally shuffled) mini-batches.

    Yields ``(inputs, labels, index)``. Cheaper than a ``DataLoader`` over a
    ``TensorDataset`` because a batch is gathered with one indexing operation.

    Parameters
    ----------
    inputs, labels : Tensor
        Samples and labels, first dimension ``N``.
    batch_size : int
        Mini-batch size.
    shuffle : bool
        Draw a new permutation on every pass.
    generator : torch.Generator, optional
        Source of randomness for the permutation and the transform (for
        reproducibility).
    transform : Callable[[Tensor, torch.Generator | None], Tensor], optional
        ``transform(inputs, generator)`` applied to every batch of inputs (e.g.
        :class:`flwr_gkt.data.RandomCropFlip`); the index still names the
        original samples.
    drop_last : bool
        Skip a last, incomplete batch when there is at least one full one
        (batch-norm cannot train on a batch of one sample).

    Raises
    ------
    ValueError
        If ``inputs`` and ``labels`` differ in length.
    """

    def __init__(
        self,
        inputs: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        transform: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
        drop_last: bool = False,
    ) -> None:
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs = inputs
        self.labels = labels
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = generator
        self.transform = transform
        self.drop_last = drop_last and len(labels) >= self.batch_size

    def __len__(self) -> int:
        """Return the number of batches in one pass."""
        if self.drop_last:
            return len(self.labels) // self.batch_size
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        """Yield one pass of ``(inputs, labels, index)`` batches."""
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for start in range(0, n - (n % self.batch_size if self.drop_last else 0), self.batch_size):
            if order is None:
                idx = torch.arange(start, min(start + self.batch_size, n))
                inputs, labels = (
                    self.inputs[start : start + self.batch_size],
                    self.labels[start : start + self.batch_size],
                )
            else:
                idx = order[start : start + self.batch_size]
                inputs, labels = self.inputs[idx], self.labels[idx]
            if self.transform is not None:
                inputs = self.transform(inputs, self.generator)
            yield inputs, labels, idx


class SizedDataset(Protocol):
    """A map-style dataset: ``len(dataset)`` samples, ``dataset[i]`` for ``i`` in ``0..len-1``.

    Any :class:`torch.utils.data.Dataset` with a ``__len__`` (``TensorDataset``,
    ``Subset``, torchvision's datasets, your own class) is one.
    """

    def __len__(self) -> int:
        """Return the number of samples."""
        ...

    def __getitem__(self, index: int) -> Any:
        """Return sample ``index``."""
        ...


class _Indexed:
    """``dataset[i] -> (image, label, i)``: each sample carries the index it was read at."""

    def __init__(self, dataset: SizedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        image, label = self.dataset[index]
        return image, label, index


class _IndexedBatched(_Indexed):
    """:class:`_Indexed` of a dataset that reads a batch at once (``__getitems__``).

    The DataLoader then fetches a whole batch with one call (e.g. one batched
    read of a Hugging Face dataset, its transform applied to the batch).
    """

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any, int]]:
        samples = self.dataset.__getitems__(indices)  # type: ignore[attr-defined]
        return [(image, label, i) for (image, label), i in zip(samples, indices, strict=True)]


class _IndexBatches(Sampler[list[int]]):
    """Mini-batches of indices ``0..n-1``: in order, or a new seeded permutation per pass."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None,
        drop_last: bool,
    ) -> None:
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.generator, self.drop_last = generator, drop_last

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # The same permutation as TensorBatches draws from the same generator.
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else None
        end = self.n - (self.n % self.batch_size if self.drop_last else 0)
        for start in range(0, end, self.batch_size):
            stop = min(start + self.batch_size, self.n)
            yield order[start:stop].tolist() if order is not None else list(range(start, stop))


def _collate(samples: Sequence[tuple[Any, Any, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack ``(image, label, index)`` samples into ``(images, int64 labels, int64 indices)``."""
    images = torch.stack([torch.as_tensor(image) for image, _, _ in samples])
    if not images.is_floating_point():
        raise TypeError(
            f"the dataset returned {images.dtype} images; the edge model takes float "
            "C x H x W tensors: normalise them in the dataset's transform"
        )
    labels = torch.tensor([int(label) for _, label, _ in samples], dtype=torch.long)
    return images, labels, torch.tensor([i for _, _, i in samples], dtype=torch.long)


class DatasetBatches:
    """Stream a map-style dataset in (optionally shuffled) mini-batches through a ``DataLoader``.

    Yields ``(inputs, labels, index)`` like :class:`TensorBatches`, where
    ``index`` holds the dataset indices the batch's samples were read at
    (each sample carries its own index through the loader, so the index is
    right whatever the order, the workers or the dataset's transform). The
    dataset is never loaded whole: a batch is read when it is needed.

    Parameters
    ----------
    dataset : SizedDataset
        ``dataset[i] -> (image, label)``: a float ``C x H x W`` tensor (or
        array) and an integer label. A dataset with ``__getitems__`` is read a
        batch at a time.
    batch_size : int
        Mini-batch size.
    shuffle : bool
        Draw a new permutation of the indices on every pass (with
        ``generator``: the permutations :class:`TensorBatches` draws); without
        it, every pass reads indices ``0..n-1`` in order.
    generator : torch.Generator, optional
        Source of the permutations. The loader's workers are seeded from its
        initial seed (it is not drawn from), so ``shuffle`` consumes it exactly
        as :class:`TensorBatches` does.
    num_workers : int
        Loader worker processes (``0``: read in this process). Workers are kept
        across the passes of this object.
    pin_memory : bool
        Pin batches in page-locked memory (faster copies to a CUDA device).
    drop_last : bool
        Skip a last, incomplete batch when there is at least one full one.
    """

    def __init__(
        self,
        dataset: SizedDataset,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        self.dataset = dataset
        n = len(dataset)
        self.sampler = _IndexBatches(
            n, int(batch_size), shuffle, generator, drop_last and n >= int(batch_size)
        )
        seeds = (
            None if generator is None else torch.Generator().manual_seed(generator.initial_seed())
        )
        batched = callable(getattr(dataset, "__getitems__", None))
        indexed = _IndexedBatched(dataset) if batched else _Indexed(dataset)
        self.loader: DataLoader[Any] = DataLoader(
            indexed,  # type: ignore[arg-type]  # map-style: __len__ and __getitem__
            batch_sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            generator=seeds,
        )

    def __len__(self) -> int:
        """Return the number of batches in one pass."""
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        """Yield one pass of ``(inputs, labels, index)`` batches."""
        yield from self.loader


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 5e-4
) -> torch.optim.Optimizer:
    """Build the optimizers of the reference code.

    Parameters
    ----------
    name : str
        ``adam`` (any case): Adam with AMSGrad and a fixed weight decay 1e-4
        (the paper's choice for IID data); ``sgd``: SGD with Nesterov momentum
        0.9 and ``weight_decay`` (the paper's choice for non-IID data).
    params : Iterable[nn.Parameter]
        The parameters to optimize.
    lr : float
        Learning rate.
    weight_decay : float
        L2 penalty of ``sgd`` (``adam`` ignores it).

    Returns
    -------
    torch.optim.Optimizer
        The new optimizer: PyTorch's fused implementation (one kernel for all
        parameters) when every parameter is a floating-point tensor on the CPU
        or a CUDA device, the default one otherwise. Same update, up to
        floating-point rounding; on this project's CPU one Adam step of the
        server ResNet-10 takes 0.50 ms instead of 1.53 ms
        (``benchmarks/precision.py`` prints both).

    Raises
    ------
    ValueError
        If ``name`` is neither ``adam`` nor ``sgd``.
    """
    params = list(params)
    fused = fused_supported(params)
    key = name.lower()
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=1e-4, amsgrad=True, fused=fused)
    if key == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, fused=fused
        )
    raise ValueError(f"unknown optimizer {name!r} (expected 'adam' or 'sgd')")


def fused_supported(params: Sequence[Tensor]) -> bool | None:
    """Whether :func:`make_optimizer` can use the fused optimizer kernels for ``params``.

    ``True`` when every parameter is a floating-point tensor on the CPU or a
    CUDA device; ``None`` (PyTorch's default choice) otherwise.
    """
    ok = bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )
    return True if ok else None


def lr_factor(schedule: str, server_round: int, num_rounds: int) -> float:
    """Return the learning-rate multiplier of round ``server_round`` (1-based) of ``num_rounds``.

    ``constant``: 1. ``cosine``: ``0.5 * (1 + cos(pi * (round - 1) / num_rounds))``,
    from 1 in the first round towards 0 -- the fixed-budget counterpart of the
    paper's "reduce the learning rate once the accuracy has plateaued".
    ``plateau``: 1 here (the edge learning rate stays constant, as in the
    reference code); the server's factor comes from a :class:`Plateau`. With
    ``num_rounds <= 1`` the factor is 1.

    Raises
    ------
    ValueError
        If ``schedule`` is unknown.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r} (expected one of {LR_SCHEDULES})")
    if schedule != "cosine" or num_rounds <= 1:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / num_rounds))


#: The learning-rate schedules (the ``lr-schedule`` config key).
LR_SCHEDULES = ("constant", "cosine", "plateau")


class Plateau:
    """Reduce-on-plateau factor of the server learning rate (the reference's schedule).

    FedML's FedGKT server steps ``torch.optim.lr_scheduler.ReduceLROnPlateau``
    (mode ``max``) with each round's test accuracy. This is that scheduler,
    driving a learning-rate *factor* (it runs on a one-parameter stand-in
    optimizer whose base rate is 1), so the server's own optimizer keeps its
    base rate and per-update scaling.

    Parameters
    ----------
    factor : float
        Multiplier applied when the accuracy has not improved for
        ``patience`` rounds (PyTorch's default 0.1).
    patience : int
        Rounds without improvement tolerated (PyTorch's default 10).
    """

    def __init__(self, factor: float = 0.1, patience: int = 10) -> None:
        self._opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self._sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._opt, mode="max", factor=factor, patience=patience
        )

    @property
    def factor(self) -> float:
        """The current learning-rate multiplier (1 until the first reduction)."""
        return float(self._opt.param_groups[0]["lr"])

    def step(self, accuracy: float) -> float:
        """Record a round's test accuracy (higher is better); return the next round's factor."""
        self._sched.step(accuracy)
        return self.factor

    def state_dict(self) -> dict[str, Any]:
        """Return the scheduler state (for checkpoints)."""
        return {"factor": self.factor, "scheduler": self._sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._sched.load_state_dict(state["scheduler"])
        set_lr(self._opt, float(state["factor"]))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizer`` (in place)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class FitResult:
    """What :func:`fit` measured.

    Attributes
    ----------
    loss : float
        Mean training loss of the last epoch.
    accuracy : float
        Training accuracy of the last epoch (on the fly, train mode).
    num_examples : int
        Samples seen in the last epoch.
    seconds : float
        Wall time of the whole call.
    last_epoch_logits : Tensor | None
        Logits of every sample from the last epoch's forward passes, on the CPU,
        row ``i`` for dataset index ``i`` (only when ``capture_logits`` is set;
        rows of samples the epoch did not see are NaN).
    """

    loss: float
    accuracy: float
    num_examples: int
    seconds: float
    last_epoch_logits: Tensor | None = None


def fit(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    device: torch.device,
    teacher_logits: Tensor | None = None,
    temperature: float = 3.0,
    alpha: float = 1.0,
    capture_logits: int | None = None,
    rectify: Rectifier | None = None,
    loss_fn: StepLoss | None = None,
    precision: str = "fp32",
) -> FitResult:
    """Train ``model`` for ``epochs`` passes with CE (+ KD from a teacher).

    Each batch takes one optimizer step on
    :func:`~flwr_gkt.core.losses.gkt_loss` (``CE + alpha * KD_T`` against the
    batch's rows of ``teacher_logits``), or on ``loss_fn`` when given. The
    model is put in train mode first.

    Parameters
    ----------
    model : nn.Module
        Maps ``inputs`` to logits.
    batches : Iterable[Batch]
        Re-iterable source of ``(inputs, labels, index)`` batches.
    optimizer : torch.optim.Optimizer
        Optimizer over ``model``'s parameters.
    epochs : int
        Number of passes over ``batches``.
    device : torch.device
        Where the model lives; batches are moved there.
    teacher_logits : Tensor, optional
        Per-sample teacher logits ``(N, C)``, indexed by the batch ``index``;
        adds ``alpha * kd_loss`` to the loss when given.
    temperature, alpha : float
        KD temperature and weight.
    capture_logits : int, optional
        Number of samples ``N``; when given, the outputs of the last epoch are
        stored per sample index and returned.
    rectify : Rectifier, optional
        Rectification of the teacher's probabilities (FedEEC, see
        :mod:`flwr_gkt.core.rectify`).
    loss_fn : StepLoss, optional
        ``loss_fn(model, inputs, labels, batch_teacher) -> (loss, logits)``
        replaces the forward pass and :func:`~flwr_gkt.core.losses.gkt_loss` (e.g.
        FedAgg's leaf loss, which needs two forward passes); ``logits`` are
        what accuracy and ``capture_logits`` use.
    precision : str
        ``fp32``, ``bf16`` or ``fp16``: the forward pass and loss run under
        :func:`torch.autocast` (see :func:`autocast`); ``fp16`` scales the
        loss with a :class:`torch.amp.GradScaler`.

    Returns
    -------
    FitResult
        Loss, accuracy and sample count of the last epoch, the wall time and,
        with ``capture_logits``, the last epoch's logits.

    Notes
    -----
    Nothing in the batch loop waits for the device: the loss and correct
    counts are summed on the device and read once, after the last epoch, and
    captured logits are written into a tensor on the device.
    """
    start = time.perf_counter()
    teacher = teacher_logits.to(device) if teacher_logits is not None else None
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    captured: Tensor | None = None
    model.train()
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    loss_sum = correct = torch.zeros((), dtype=acc_dtype, device=device)
    seen = 0
    for epoch in range(epochs):
        capturing = capture_logits is not None and epoch == epochs - 1
        loss_sum = torch.zeros((), dtype=acc_dtype, device=device)
        correct = torch.zeros((), dtype=acc_dtype, device=device)
        seen = 0
        for inputs, labels, index in batches:
            inputs = to_device(inputs, device)
            labels = labels.to(device, non_blocking=True)
            index = index.to(device, non_blocking=True)
            batch_teacher = teacher[index] if teacher is not None else None
            with autocast(device, precision):
                if loss_fn is None:
                    logits = model(inputs)
                    loss = gkt_loss(
                        logits.float(), labels, batch_teacher, temperature, alpha, rectify
                    )
                else:
                    loss, logits = loss_fn(model, inputs, labels, batch_teacher)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            with torch.no_grad():  # summed on the device: no host synchronisation per step
                n = len(labels)
                loss_sum += loss.detach().to(acc_dtype) * n
                correct += (logits.argmax(1) == labels).sum()
                seen += n
                if capturing:
                    if captured is None:
                        captured = _nan_rows(capture_logits or 0, logits.shape[1], device)
                    captured[index] = logits.detach().float()
    return FitResult(
        loss=float(loss_sum) / max(seen, 1),
        accuracy=int(correct) / max(seen, 1),
        num_examples=seen,
        seconds=time.perf_counter() - start,
        last_epoch_logits=None if captured is None else captured.cpu(),
    )


def _nan_rows(rows: int, columns: int, device: torch.device) -> Tensor:
    """Return a ``rows x columns`` float32 tensor of NaN on ``device`` (captured logits)."""
    return torch.full((rows, columns), float("nan"), device=device)


@torch.inference_mode()
def predict(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, precision: str = "fp32"
) -> Tensor:
    """Return the logits of ``model`` in eval mode for every batch, concatenated on the CPU.

    Runs under :func:`torch.inference_mode` and :func:`autocast` of
    ``precision``; labels and indices of the batches are ignored. The float32
    rows ``(N, C)`` follow the batches (an empty tensor for no batches).
    """
    model.eval()
    outs = []
    with autocast(device, precision):
        for inputs, _, _ in batches:  # kept on the device; one copy to the host at the end
            outs.append(model(to_device(inputs, device)).float())
    return torch.cat(outs).cpu() if outs else torch.empty(0)


#: Training / inference precisions (``edge-precision``, ``server-precision``);
#: ``auto``: bf16 where the device runs it natively, else fp32 (:func:`resolve_precision`).
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def resolve_precision(device: torch.device, precision: str) -> str:
    """Return the precision ``precision`` (of :data:`PRECISIONS`) means on ``device``.

    ``auto`` is ``bf16`` where :func:`bf16_supported` and ``fp32`` elsewhere
    (measured on Fashion-MNIST over 3 seeds: the same accuracy as fp32,
    docs/benchmarks.md); any other precision is returned as is.
    """
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Return the autocast context of ``precision`` on ``device``.

    ``fp32``: disabled. ``bf16``: bfloat16 autocast, on CUDA devices and CPUs
    that support it (AVX512-BF16 / AMX). ``fp16``: float16 autocast, CUDA only
    (pair it with a gradient scaler, as :func:`fit` does). ``auto``: bf16
    where supported, else fp32.

    Raises
    ------
    ValueError
        If ``precision`` is unknown or not supported on ``device``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    precision = resolve_precision(device, precision)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 on the CPU")
    if precision == "bf16" and not bf16_supported(device):
        raise ValueError(f"precision bf16 is not supported on this {device.type} device; use fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def bf16_supported(device: torch.device) -> bool:
    """Return whether ``device`` runs bfloat16 autocast natively.

    CUDA: :func:`torch.cuda.is_bf16_supported`; CPU: oneDNN's bf16 support
    (AVX512-BF16 or AMX).
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every tensor (``None`` entries skipped) holds only finite values.

    Integer tensors are always finite. The training guards' test of a loss's
    gradients and of a model's state after a step (e.g.
    ``model.state_dict().values()``); ``False`` as soon as one value is NaN or
    infinite.
    """
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def evaluate_logits(logits: Tensor, labels: Tensor) -> tuple[float, int]:
    """Return ``(summed cross-entropy, number correct)`` of logits ``(N, C)`` vs labels ``(N,)``.

    The cross-entropy is summed over the samples (not averaged); ``(0.0, 0)``
    for no samples.
    """
    if len(labels) == 0:
        return 0.0, 0
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return float(loss), int((logits.argmax(1) == labels).sum())
