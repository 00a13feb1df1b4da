"""ResNet builders for FedGKT, in the style of ``torchvision.models.resnet``.

The architectures follow the FedGKT reference implementation (FedML,
``model/cv/resnet56_gkt``): a CIFAR-style ResNet with 16 stem channels is cut
right after its stem.

* The **edge model** (ResNet-4/6/8) is the stem ``conv3x3 -> BN -> ReLU`` as the
  feature extractor ``f_e`` (output ``16 x H x W``, the input resolution) and a
  classifier ``f_c`` made of one stage of residual blocks, global average
  pooling and a linear layer. ResNet-8 uses two bottleneck blocks (8 layers with
  weights, ~11K parameters as in the paper); ResNet-4 and ResNet-6 use one and
  two basic blocks (paper, Section 4.4).
* The **server model** ``f_s`` (ResNet-55/109) is the rest of a bottleneck
  ResNet-56/110: three stages of bottleneck blocks (16/32/64 planes, strides
  1/2/2) taking the 16-channel feature map, pooling and a linear layer.
* The **full models** ResNet-56/110 (stem + server body) are what FedAvg trains
  on every client; they are the same total architecture as edge stem + server.

The residual blocks are torchvision's own :class:`~torchvision.models.resnet.BasicBlock`
and :class:`~torchvision.models.resnet.Bottleneck`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3

__all__ = [
    "FEATURE_CHANNELS",
    "BasicBlock",
    "Bottleneck",
    "EdgeModel",
    "FullResNet",
    "ServerResNet",
    "TierCNN",
    "full_resnet",
    "load_pretrained",
    "resnet4",
    "resnet6",
    "resnet8",
    "resnet56",
    "resnet110",
    "server_resnet",
    "server_resnet55",
    "server_resnet109",
    "tier_cnn",
    "tier_resnet10",
    "tier_resnet18",
]

#: Channels of the feature map the edge extractor outputs (16 in the paper).
FEATURE_CHANNELS = 16

#: A residual block class of the ResNet builders.
Block = type[BasicBlock] | type[Bottleneck]


def _make_stage(
    block: Block, inplanes: int, planes: int, blocks: int, stride: int
) -> tuple[nn.Sequential, int]:
    """Build one stage of ``blocks`` residual blocks; return it and its width."""
    downsample = None
    outplanes = planes * block.expansion
    if stride != 1 or inplanes != outplanes:
        downsample = nn.Sequential(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))
    layers: list[nn.Module] = [block(inplanes, planes, stride, downsample)]
    layers += [block(outplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), outplanes


def _init_weights(module: nn.Module) -> None:
    """He initialisation for convolutions, unit/zero BatchNorm (as torchvision)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _stem(in_channels: int, out_channels: int = FEATURE_CHANNELS) -> nn.Sequential:
    return nn.Sequential(
        conv3x3(in_channels, out_channels),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class EdgeModel(nn.Module):
    """An edge model split into a feature extractor and a classifier.

    Any pair of modules can be wrapped, so a user can bring their own edge CNN:
    ``extractor`` maps an input batch to the feature maps ``H`` that are sent to
    the server, ``classifier`` maps ``H`` to the edge logits ``Z_c``.

    Parameters
    ----------
    extractor : nn.Module
        The feature extractor ``f_e``.
    classifier : nn.Module
        The classifier ``f_c`` on top of the extractor's output.

    See Also
    --------
    resnet4, resnet6, resnet8 : The edge models of the paper.
    """

    def __init__(self, extractor: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.classifier = classifier
        self.extractor_frozen = False

    def freeze_extractor(self) -> EdgeModel:
        """Freeze ``f_e`` in place (EcoFed): no gradients, eval mode even in training.

        Batch-norm statistics stay fixed too, so the features of a sample no
        longer change from round to round (they can be uploaded once).
        """
        self.extractor_frozen = True
        self.extractor.requires_grad_(False)
        self.extractor.eval()
        return self

    def train(self, mode: bool = True) -> EdgeModel:
        """Set training mode like :meth:`nn.Module.train`; a frozen extractor stays in eval mode."""
        super().train(mode)
        if self.extractor_frozen:
            self.extractor.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Return the edge logits ``Z_c = f_c(f_e(x))`` of a batch ``N x C x H x W``."""
        logits: Tensor = self.classifier(self.extractor(x))
        return logits

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the logits ``f_c(H)`` and the feature maps ``H = f_e(x)`` of one batch."""
        features = self.extractor(x)
        return self.classifier(features), features


def _edge_resnet(block: Block, blocks: int, num_classes: int, in_channels: int) -> EdgeModel:
    stage, width = _make_stage(block, FEATURE_CHANNELS, FEATURE_CHANNELS, blocks, 1)
    classifier = nn.Sequential(
        stage,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(width, num_classes),
    )
    model = EdgeModel(_stem(in_channels), classifier)
    _init_weights(model)
    return model


def resnet8(num_classes: int = 10, in_channels: int = 3) -> EdgeModel:
    """Build the ResNet-8 edge model of the paper: stem + 2 bottleneck blocks + FC.

    The extractor ``f_e`` is the ``conv3x3 -> BN -> ReLU`` stem (16 channels,
    input resolution kept); the classifier ``f_c`` is two bottleneck blocks,
    global average pooling and a linear layer (~11K parameters in all).

    Parameters
    ----------
    num_classes : int
        Number of output classes.
    in_channels : int
        Channels of the input images (3 for RGB, 1 for grayscale).

    Returns
    -------
    EdgeModel
        The edge model, He-initialised.

    See Also
    --------
    resnet6, resnet4 : The smaller edge models, built alike.
    """
    return _edge_resnet(Bottleneck, 2, num_classes, in_channels)


def resnet6(num_classes: int = 10, in_channels: int = 3) -> EdgeModel:
    """Build the ResNet-6 edge model (paper Table 5): stem + 2 basic blocks + FC, as :func:`resnet8`."""
    return _edge_resnet(BasicBlock, 2, num_classes, in_channels)


def resnet4(num_classes: int = 10, in_channels: int = 3) -> EdgeModel:
    """Build the ResNet-4 edge model (paper Table 5): stem + 1 basic block + FC, as :func:`resnet8`."""
    return _edge_resnet(BasicBlock, 1, num_classes, in_channels)


class ServerResNet(nn.Module):
    """Server-side ResNet ``f_s``: three bottleneck stages on edge feature maps.

    Parameters
    ----------
    layers : Sequence[int]
        Number of bottleneck blocks in each of the three stages.
    num_classes : int
        Number of output classes.
    in_channels : int
        Channels of the incoming feature maps (the edge extractor's output).

    Raises
    ------
    ValueError
        If ``layers`` does not have exactly three entries.
    """

    def __init__(
        self,
        layers: Sequence[int] = (6, 6, 6),
        num_classes: int = 10,
        in_channels: int = FEATURE_CHANNELS,
    ) -> None:
        super().__init__()
        if len(layers) != 3:
            raise ValueError(f"ServerResNet takes 3 stages, got {list(layers)}")
        width = in_channels
        stages = []
        for planes, blocks, stride in zip((16, 32, 64), layers, (1, 2, 2), strict=True):
            stage, width = _make_stage(Bottleneck, width, planes, blocks, stride)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, h: Tensor) -> Tensor:
        """Return the server logits ``Z_s`` of edge feature maps ``N x in_channels x H x W``."""
        out = self.layer3(self.layer2(self.layer1(h)))
        logits: Tensor = self.fc(torch.flatten(self.avgpool(out), 1))
        return logits


class FullResNet(nn.Module):
    """A complete bottleneck ResNet (stem + :class:`ServerResNet` body).

    This is the model FedAvg trains on every client; with ``layers=(6, 6, 6)`` it
    is ResNet-56 and equals the ResNet-8 stem followed by the ResNet-55 server.

    Parameters
    ----------
    layers : Sequence[int]
        Number of bottleneck blocks in each of the three stages.
    num_classes : int
        Number of output classes.
    in_channels : int
        Channels of the input images (3 for RGB, 1 for grayscale).

    Raises
    ------
    ValueError
        If ``layers`` does not have exactly three entries.
    """

    def __init__(
        self,
        layers: Sequence[int] = (6, 6, 6),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = _stem(in_channels)
        self.body = ServerResNet(layers, num_classes, FEATURE_CHANNELS)
        _init_weights(self.stem)
        self.stem_frozen = False

    def freeze_stem(self) -> FullResNet:
        """Freeze the stem in place, as :meth:`EdgeModel.freeze_extractor` does ``f_e``.

        Lets FedAvg and the centralized baseline share a FedGKT run's frozen,
        pre-trained extractor.
        """
        self.stem_frozen = True
        self.stem.requires_grad_(False)
        self.stem.eval()
        return self

    def train(self, mode: bool = True) -> FullResNet:
        """Set training mode like :meth:`nn.Module.train`; a frozen stem stays in eval mode."""
        super().train(mode)
        if self.stem_frozen:
            self.stem.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits ``N x num_classes`` of images ``N x in_channels x H x W``."""
        logits: Tensor = self.body(self.stem(x))
        return logits


def _blocks_for_depth(depth: int, offset: int) -> int:
    blocks, rest = divmod(depth - offset, 9)
    if rest or blocks < 1:
        raise ValueError(f"depth {depth} is not 9n+{offset} for a 3-stage bottleneck ResNet")
    return blocks


def server_resnet(
    depth: int = 55, num_classes: int = 10, in_channels: int = FEATURE_CHANNELS
) -> ServerResNet:
    """Build a server ResNet of depth ``9n + 1`` (10, 19, 28, ..., 55, ..., 109).

    The server model has ``n`` bottleneck blocks in each of its three stages.

    Parameters
    ----------
    depth : int
        Number of layers with weights, ``9n + 1`` with ``n >= 1``.
    num_classes : int
        Number of output classes.
    in_channels : int
        Channels of the incoming feature maps (the edge extractor's output).

    Returns
    -------
    ServerResNet
        The server model ``f_s``.

    Raises
    ------
    ValueError
        If ``depth`` is not of the form ``9n + 1`` with ``n >= 1``.
    """
    n = _blocks_for_depth(depth, 1)
    return ServerResNet((n, n, n), num_classes, in_channels)


def server_resnet55(num_classes: int = 10, in_channels: int = FEATURE_CHANNELS) -> ServerResNet:
    """Build the ResNet-55 server model (ResNet-56 without its stem): ``server_resnet(55)``."""
    return server_resnet(55, num_classes, in_channels)


def server_resnet109(num_classes: int = 10, in_channels: int = FEATURE_CHANNELS) -> ServerResNet:
    """Build the ResNet-109 server model (ResNet-110 without its stem): ``server_resnet(109)``."""
    return server_resnet(109, num_classes, in_channels)


def full_resnet(depth: int = 56, num_classes: int = 10, in_channels: int = 3) -> FullResNet:
    """Build a full bottleneck ResNet of depth ``9n + 2`` (56, 110, ...).

    Parameters
    ----------
    depth : int
        Number of layers with weights, ``9n + 2`` with ``n >= 1``.
    num_classes : int
        Number of output classes.
    in_channels : int
        Channels of the input images (3 for RGB, 1 for grayscale).

    Returns
    -------
    FullResNet
        The stem plus an ``n``-blocks-per-stage server body.

    Raises
    ------
    ValueError
        If ``depth`` is not of the form ``9n + 2`` with ``n >= 1``.
    """
    n = _blocks_for_depth(depth, 2)
    return FullResNet((n, n, n), num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> FullResNet:
    """Build the full ResNet-56, the FedAvg baseline: the ResNet-8 stem + the ResNet-55 body."""
    return full_resnet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> FullResNet:
    """Build the full ResNet-110: the edge stem + the ResNet-109 server body."""
    return full_resnet(110, num_classes, in_channels)


def load_pretrained(model: EdgeModel, path: str | Path, part: str = "extractor") -> EdgeModel:
    """Load pre-trained weights from a local file (no download) into ``model``.

    The file holds a ``state_dict`` (``torch.save``) of a whole edge model
    (keys ``extractor.*`` / ``classifier.*``) or of its extractor alone. It is
    read onto the CPU with ``weights_only=True``.

    Parameters
    ----------
    model : EdgeModel
        The edge model to load into, modified in place.
    path : str | Path
        The local ``state_dict`` file.
    part : str
        ``"extractor"`` loads only ``f_e`` (EcoFed: a pre-trained, frozen
        extractor); ``"all"`` loads both parts.

    Returns
    -------
    EdgeModel
        ``model`` itself, with the loaded weights.

    Raises
    ------
    ValueError
        If ``part`` is neither ``"extractor"`` nor ``"all"``.
    RuntimeError
        If the file's keys or shapes do not match the model (strict loading).
    """
    if part not in ("extractor", "all"):
        raise ValueError(f"part must be 'extractor' or 'all', got {part!r}")
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not any(k.startswith(("extractor.", "classifier.")) for k in state):
        state = {f"extractor.{k}": v for k, v in state.items()}
    if part == "extractor":
        prefix = "extractor."
        model.extractor.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
    else:
        model.load_state_dict(state)
    return model


# --------------------------------------------------------------- FedAgg tiers
class TierCNN(nn.Module):
    """FedAgg's end-device CNN (``Net`` in the official code).

    Conv 7x7 (stride 2, no bias) + BN + ReLU + max-pool 3 (stride 2) to 64
    maps, global average pooling, FC 64 -> 48 + ReLU, FC 48 -> classes: 13,146
    parameters for RGB and 10 classes.

    Parameters
    ----------
    num_classes : int
        Number of output classes.
    in_channels : int
        Channels of the input images (3 for RGB, 1 for grayscale).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 48),
            nn.ReLU(inplace=True),
            nn.Linear(48, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits ``N x num_classes`` of images ``N x in_channels x H x W``."""
        logits: Tensor = self.head(self.stem(x))
        return logits


def tier_cnn(num_classes: int = 10, in_channels: int = 3) -> TierCNN:
    """Build FedAgg's end-device model M1, a :class:`TierCNN`."""
    return TierCNN(num_classes, in_channels)


def _torchvision_resnet(layers: list[int], num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models.resnet import ResNet

    model: nn.Module = ResNet(BasicBlock, layers, num_classes=num_classes)
    if in_channels != 3:  # the ImageNet stem, for other image channels
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def tier_resnet10(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build FedAgg's edge model M2: torchvision ResNet with BasicBlocks [1, 1, 1, 1].

    Parameters
    ----------
    num_classes : int
        Number of output classes.
    in_channels : int
        Channels of the input images; other than 3, the 7x7 ImageNet stem
        convolution is rebuilt for them.

    Returns
    -------
    nn.Module
        A :class:`torchvision.models.resnet.ResNet` (ResNet-10).

    See Also
    --------
    tier_resnet18 : The cloud model M3, built alike.
    """
    return _torchvision_resnet([1, 1, 1, 1], num_classes, in_channels)


def tier_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build FedAgg's cloud model M3, torchvision ResNet-18, as :func:`tier_resnet10`."""
    return _torchvision_resnet([2, 2, 2, 2], num_classes, in_channels)
