"""Edge side of FedGKT in plain PyTorch (no Flower): local training, extraction.

Implements ``ClientTrain`` of Algorithm 1 (lines 17-30): ``E_c`` epochs of
``CE + alpha * KD(server logits)`` (eq. 7) on the local data, then one pass in
a fixed order that extracts, for every local training sample, the feature map
``H``, the edge logits ``Z_c`` and the label ``Y``.

The local data is either in-memory tensors (:func:`train_edge`,
:func:`extract`) or any source of ``(inputs, labels, index)`` batches, e.g. a
dataset streamed by :class:`~flwr_gkt.core.training.DatasetBatches`
(:func:`train_edge_batches`, :func:`extract_batches`). Either way row ``i`` of
the server logits is the teacher of sample ``i``, looked up by the batch's
index, and the extraction pass returns row ``i`` for sample ``i``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from flwr_gkt.core.losses import KDMode
from flwr_gkt.core.models import EdgeModel
from flwr_gkt.core.training import (
    Batch,
    FitResult,
    TensorBatches,
    autocast,
    fit,
    make_optimizer,
    to_device,
)

__all__ = ["EdgeRoundConfig", "extract", "extract_batches", "train_edge", "train_edge_batches"]

#: ``augment(inputs, generator) -> inputs``, e.g. :class:`flwr_gkt.data.RandomCropFlip`.
Augment = Callable[[Tensor, "torch.Generator | None"], Tensor]


@dataclass
class EdgeRoundConfig:
    """Per-round edge settings, sent by the server in the train instruction.

    Parameters
    ----------
    epochs : int
        Local epochs ``E_c`` per round.
    batch_size : int
        Mini-batch size of local training and of feature extraction.
    optimizer : str
        ``adam`` or ``sgd`` (see :func:`flwr_gkt.core.training.make_optimizer`).
    lr : float
        Learning rate of the edge optimizer.
    weight_decay : float
        Weight decay of ``sgd`` (``adam`` uses a fixed 1e-4).
    temperature : float
        KD temperature ``T``.
    alpha : float
        Weight of the KD term in ``CE + alpha * KD``.
    kd_mode : KDMode
        Directions of knowledge transfer; a string value (``"both"``) is
        converted to :class:`~flwr_gkt.core.losses.KDMode`.
    freeze_extractor : bool
        EcoFed: train only the classifier ``f_c`` on top of a frozen ``f_e``.
    precision : str
        Autocast precision of training and extraction (``fp32``, ``bf16``,
        ``fp16``; see :func:`flwr_gkt.core.training.autocast`).
    extract_augment : bool
        Whether the extraction pass after training sees augmented inputs (as
        the reference's loader does). The strategy turns it off with replay
        (``feature-upload-every`` != 1): the logits of a replay round must come
        from the very inputs the stored features came from.

    Raises
    ------
    ValueError
        If ``kd_mode`` is not a valid :class:`~flwr_gkt.core.losses.KDMode` value.
    """

    epochs: int = 1
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    temperature: float = 3.0
    alpha: float = 1.0
    kd_mode: KDMode = KDMode.BOTH
    #: EcoFed: train only the classifier ``f_c`` on top of a frozen ``f_e``.
    freeze_extractor: bool = False
    #: Augment the inputs of the extraction pass too (off with replay).
    extract_augment: bool = True
    #: Autocast precision of training and extraction.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        """Convert ``kd_mode`` to :class:`~flwr_gkt.core.losses.KDMode`."""
        self.kd_mode = KDMode(self.kd_mode)


def train_edge(
    model: EdgeModel,
    x: Tensor,
    y: Tensor,
    server_logits: Tensor | None,
    cfg: EdgeRoundConfig,
    device: torch.device,
    generator: torch.Generator | None = None,
    augment: Augment | None = None,
) -> FitResult:
    """Train the edge model ``E_c`` epochs on ``(x, y)``.

    KD towards ``server_logits`` (row ``i`` for sample ``i``) is used when they
    are given and the KD mode lets the edge distil; otherwise CE only (the
    first round, or the ``none`` ablation). ``augment`` transforms every
    training batch (random crop + flip for CIFAR/CINIC). With
    ``cfg.freeze_extractor`` only the classifier is trained.

    Parameters
    ----------
    model : EdgeModel
        The edge model, already on ``device``; trained in place.
    x, y : Tensor
        Local training inputs ``N x C x H x W`` and their labels ``(N,)``.
    server_logits : Tensor | None
        Server logits ``Z_s`` of the previous round, shape ``(N, num_classes)``,
        or ``None`` when there are none yet.
    cfg : EdgeRoundConfig
        Epochs, optimizer, learning rate, KD temperature, weight and mode.
    device : torch.device
        Where ``model`` lives; batches are moved there.
    generator : torch.Generator, optional
        Source of randomness for shuffling and augmentation.
    augment : Augment, optional
        ``augment(inputs, generator) -> inputs`` applied to every batch.
    """
    # A node's data fits a GPU: batches are gathered there (augmentation draws on the host).
    if device.type == "cuda" and augment is None:
        x, y = x.to(device), y.to(device)
    batches = TensorBatches(
        x, y, cfg.batch_size, shuffle=True, generator=generator, transform=augment
    )
    return train_edge_batches(model, batches, server_logits, cfg, device)


def train_edge_batches(
    model: EdgeModel,
    batches: Iterable[Batch],
    server_logits: Tensor | None,
    cfg: EdgeRoundConfig,
    device: torch.device,
) -> FitResult:
    """Train the edge model ``E_c`` epochs on ``(inputs, labels, index)`` batches.

    As :func:`train_edge`, for data that is not in memory: each batch's
    teacher rows are ``server_logits[index]``, so the batches may come in any
    order (a shuffled :class:`~flwr_gkt.core.training.DatasetBatches`, say).
    ``batches`` is re-iterable, one pass per epoch.
    """
    teacher = server_logits if cfg.kd_mode.edge_distills else None
    if cfg.freeze_extractor:
        model.freeze_extractor()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    return fit(
        model,
        batches,
        optimizer,
        epochs=cfg.epochs,
        device=device,
        teacher_logits=teacher,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        precision=cfg.precision,
    )


@torch.inference_mode()
def extract(
    model: EdgeModel,
    x: Tensor,
    batch_size: int,
    device: torch.device,
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """Return the features ``H`` and logits ``Z_c`` of every sample, in order, in eval mode.

    With ``augment``, each sample is seen through one random augmented view
    (a new one every round), as the reference implementation extracts from its
    augmenting training loader: the server then trains on augmented features.
    ``x`` (``N x C x H x W``) is processed in order, ``batch_size`` at a time,
    under autocast of ``precision``. The feature maps ``H`` (``N x C' x H' x
    W'``, contiguous) and logits ``Z_c`` (``N x num_classes``) come back
    float32 on the CPU.
    """
    model.eval()
    feats, logits = [], []
    with autocast(device, precision):
        for start in range(0, len(x), batch_size):
            inputs = x[start : start + batch_size]
            if augment is not None:
                inputs = augment(inputs, generator)
            z, h = model.forward_with_features(to_device(inputs, device))
            feats.append(h.float().contiguous())  # on the device: one copy to the host at the end
            logits.append(z.float())
    return torch.cat(feats).cpu(), torch.cat(logits).cpu()


@torch.inference_mode()
def extract_batches(
    model: EdgeModel,
    batches: Iterable[Batch],
    device: torch.device,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``H``, ``Z_c`` and the labels of every sample of one pass, in eval mode.

    As :func:`extract`, for ``(inputs, labels, index)`` batches (e.g. a
    :class:`~flwr_gkt.core.training.DatasetBatches` without shuffling). The
    pass must read the samples in index order, ``0..N-1``: that order is the
    order of the rows uploaded, and row ``i`` of the server logits that come
    back is then sample ``i``'s. The labels come back int64, as the batches
    gave them.

    Raises
    ------
    ValueError
        If the batches do not hold the indices ``0..N-1`` in order (the rows
        would not line up with the samples), or hold no sample at all.
    """
    model.eval()
    feats, logits, labels, indices = [], [], [], []
    with autocast(device, precision):
        for inputs, batch_labels, index in batches:
            z, h = model.forward_with_features(to_device(inputs, device))
            feats.append(h.float().contiguous())  # on the device: one copy to the host at the end
            logits.append(z.float())
            labels.append(batch_labels.cpu())
            indices.append(index.cpu())
    if not indices:
        raise ValueError("the extraction pass got no samples")
    order = torch.cat(indices)
    if not torch.equal(order, torch.arange(len(order))):
        raise ValueError(
            "the extraction pass must read the samples in index order 0..N-1 "
            "(an unshuffled DatasetBatches); the uploaded rows would not match the samples"
        )
    return torch.cat(feats).cpu(), torch.cat(logits).cpu(), torch.cat(labels).long()
