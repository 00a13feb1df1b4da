"""Feature privacy on the edge: per-sample clipping and Gaussian noise.

What a node uploads -- feature maps ``H``, logits ``Z_c`` -- is computed from
its private images; the server (or anyone who reads the traffic past TLS) can
try to invert ``H`` back to the image. :func:`privatize` bounds each sample's
contribution (L2 clipping to ``clip``) and adds Gaussian noise of standard
deviation ``noise * clip`` to every coordinate, the Gaussian mechanism of
differential privacy applied per sample and per upload.

The noise comes from the operating system's entropy (:func:`os.urandom`), never
from the run's seed: the server knows the seed, and noise it can regenerate it
can subtract. Runs with noise are therefore not bit-for-bit reproducible.

Labels travel in the clear (the server needs them for its cross-entropy).
See ``docs/privacy.md`` for the threat model and measured accuracy costs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor

__all__ = ["PrivacyConfig", "apply_privacy", "clip_per_sample", "privatize", "secure_generator"]


@dataclass(frozen=True)
class PrivacyConfig:
    """Node-side privacy settings (``privacy-*`` keys of the run or node config).

    Parameters
    ----------
    clip : float
        Largest L2 norm of one sample's feature map ``H_i`` (all ``C*H*W``
        values); ``0``: features are not clipped.
    logit_clip : float
        Largest L2 norm of one sample's logit vector ``Z_c,i``; ``0``: not clipped.
    noise : float
        Noise multiplier ``sigma``: every uploaded value gets Gaussian noise of
        standard deviation ``sigma * clip`` (features) or ``sigma * logit_clip``
        (logits). Needs the matching clip to be set; ``0``: no noise.

    Raises
    ------
    ValueError
        If a setting is negative, or ``noise`` is set without a clip.
    """

    clip: float = 0.0
    logit_clip: float = 0.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        """Check the settings."""
        if min(self.clip, self.logit_clip, self.noise) < 0:
            raise ValueError(f"privacy settings must be >= 0, got {self}")
        if self.noise > 0 and not (self.clip > 0 or self.logit_clip > 0):
            raise ValueError(
                "privacy-noise needs privacy-clip and/or privacy-logit-clip: "
                "the noise scale is noise * clip"
            )

    @property
    def enabled(self) -> bool:
        """Whether anything is clipped (and so possibly noised) before upload."""
        return self.clip > 0 or self.logit_clip > 0

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: PrivacyConfig | None = None
    ) -> PrivacyConfig:
        """Read ``privacy-clip`` / ``privacy-logit-clip`` / ``privacy-noise`` from a config.

        Missing keys keep the settings of ``base`` (default: no privacy);
        empty or falsy values read as ``0``.

        Raises
        ------
        ValueError
            If the settings are invalid (see :class:`PrivacyConfig`).
        """
        base = base or cls()
        return cls(
            clip=float(values.get("privacy-clip", base.clip) or 0.0),
            logit_clip=float(values.get("privacy-logit-clip", base.logit_clip) or 0.0),
            noise=float(values.get("privacy-noise", base.noise) or 0.0),
        )


def secure_generator() -> torch.Generator:
    """Return a CPU generator with a 63-bit seed from :func:`os.urandom` (not the run's seed)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def clip_per_sample(x: Tensor, max_norm: float) -> Tensor:
    """Scale each sample (row of dim 0, all its values) down to L2 norm ``max_norm`` if larger.

    Returns a new tensor; samples within the norm are unchanged.
    """
    norms = x.detach().flatten(1).norm(dim=1)
    scale = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    clipped: Tensor = x * scale.view(-1, *([1] * (x.dim() - 1)))
    return clipped


def privatize(
    x: Tensor, clip: float, noise: float, generator: torch.Generator | None = None
) -> Tensor:
    """Clip each sample to L2 norm ``clip``, then add ``N(0, (noise * clip)^2)`` to every value.

    ``x`` has samples on dim 0 and is clipped as float32; ``clip <= 0`` returns
    it unchanged, ``noise == 0`` only clips. The noise comes from
    ``generator`` (default: :func:`secure_generator`).
    """
    if clip <= 0:
        return x
    out = clip_per_sample(x.float(), clip)
    if noise > 0:
        gen = generator or secure_generator()
        out = out + torch.randn(out.shape, generator=gen, dtype=out.dtype) * (noise * clip)
    return out


@overload
def apply_privacy(
    features: Tensor,
    logits: Tensor,
    cfg: PrivacyConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]: ...


@overload
def apply_privacy(
    features: Tensor,
    logits: None,
    cfg: PrivacyConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, None]: ...


def apply_privacy(
    features: Tensor,
    logits: Tensor | None,
    cfg: PrivacyConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Return the features and logits to upload, privatized (see :func:`privatize`).

    Features are clipped to ``cfg.clip``, logits (``None`` in evaluate
    replies) to ``cfg.logit_clip``; when nothing is clipped the inputs are
    returned unchanged. One ``generator`` (default: :func:`secure_generator`)
    noises both.
    """
    if not cfg.enabled:
        return features, logits
    gen = generator or secure_generator()
    features = privatize(features, cfg.clip, cfg.noise, gen)
    if logits is not None:
        logits = privatize(logits, cfg.logit_clip, cfg.noise, gen)
    return features, logits
