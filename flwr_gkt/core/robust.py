"""Robust checks of the nodes' payloads against each other (median-based).

A payload can pass every format check -- right shapes and dtypes, finite
values -- and still be hostile: features scaled by ``1e6`` make the server's
loss explode, logits of ``1e4`` dominate the KD term. :func:`payload_stats`
summarises a payload in a few scale statistics (the median per-sample L2 norm
of its feature maps and of its logits); :func:`find_outliers` compares each
payload's statistics with the median over the round's payloads and flags those
more than ``threshold`` robust deviations away::

    scale = max(1.4826 * MAD, rel_floor * |median|)
    outlier  <=>  |stat - median| > threshold * scale

MAD is the median absolute deviation (``1.4826 * MAD`` estimates the standard
deviation of normal data); the floor keeps honest payloads from being flagged
for the differences label skew makes: with the defaults (``threshold = 10``,
``rel_floor = 1``) a payload is an outlier only when a statistic is more than
11 times the median. (The floor was 10 % of the median, "twice the median",
until the ``paper-table1-fmnist`` experiment showed an honest node with
one-class-heavy Dirichlet(0.5) data sending logits of 2.2 times the median
norm.) Scaling attacks change these statistics by orders of magnitude. A median needs a majority of honest
payloads, so the check runs only with at least ``min_payloads`` (3) of them.

A median hides a *minority* of extreme samples (say 5 % of the rows at
``3e38``), so each payload is also summarised by its largest per-sample norm
(``feature-norm-max``, ``logit-norm-max``). Those are checked as ratios: a
payload whose largest sample norm is more than ``max_ratio`` (100) times the
round's median largest norm is an outlier. Label skew changes these scales
by small factors (``benchmarks/outlier_false_rejections.py``), poison by
orders of magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from flwr_gkt.core.payload import Payload, chunk_rows

__all__ = ["find_outliers", "payload_stats"]


def _norms(rows: Callable[[int, int], torch.Tensor], n: int) -> torch.Tensor:
    """Per-sample L2 norms (float64) of ``rows(start, stop)``, a bounded chunk at a time.

    Each chunk is upcast into one reused buffer: a fresh temporary per chunk
    fragments the heap (700 MB of resident memory for a 360 MB payload).
    """
    first = rows(0, 1).detach().flatten(1)
    step = chunk_rows(first.shape[1:])
    buf = torch.empty(min(step, n), first.shape[1], dtype=torch.float64)
    out = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, step):
        k = min(step, n - i)
        buf[:k].copy_(rows(i, i + k).detach().flatten(1))
        torch.linalg.vector_norm(buf[:k], dim=1, out=out[i : i + k])
    return out


def payload_stats(payload: Payload) -> dict[str, float]:
    """Summarise a payload's scale for :func:`find_outliers`.

    Features are read a chunk at a time, in float32 (int8 maps dequantised),
    so no copy of the whole payload is made.

    Returns
    -------
    dict[str, float]
        ``feature-norm`` (when it has features) and ``logit-norm`` (when it
        has logits): the median over samples of the per-sample L2 norm;
        ``feature-norm-max`` / ``logit-norm-max``: the largest one.
    """
    stats = {}
    logits = payload.logits
    sources: list[tuple[str, Callable[[int, int], torch.Tensor], int]] = []
    if payload.has_features:
        sources.append(("feature-norm", payload.dense_features, len(payload.features)))
    if logits is not None:
        sources.append(("logit-norm", lambda a, b: logits[a:b], len(logits)))
    for key, rows, n in sources:
        if n:
            norms = _norms(rows, n)
            stats[key] = float(norms.median())
            stats[f"{key}-max"] = float(norms.max())
    return stats


def find_outliers(
    stats: Sequence[dict[str, float] | None],
    threshold: float,
    rel_floor: float = 1.0,
    min_payloads: int = 3,
    max_ratio: float = 100.0,
) -> list[str | None]:
    """Flag the payloads whose statistics are far from the round's median.

    Each statistic is checked on its own (see the module docstring); a
    non-finite value is always an outlier once the statistic is checked.

    Parameters
    ----------
    stats : Sequence[dict[str, float] | None]
        The :func:`payload_stats` of each payload; ``None`` entries (payloads
        already rejected) are skipped.
    threshold : float
        Largest accepted distance from the median, in robust deviations.
    rel_floor : float
        Smallest robust deviation, as a fraction of ``|median|``.
    min_payloads : int
        With fewer payloads having a statistic (or fewer finite values of it),
        that statistic is not checked.
    max_ratio : float
        ``*-max`` statistics: largest accepted ratio to their median.

    Returns
    -------
    list[str | None]
        For each entry of ``stats``, ``None`` or why it is an outlier.
    """
    reasons: list[str | None] = [None] * len(stats)
    keys = sorted({k for s in stats if s for k in s})
    for key in keys:
        values = [(i, s[key]) for i, s in enumerate(stats) if s and key in s]
        finite = [v for _, v in values if math.isfinite(v)]
        if len(values) < min_payloads or len(finite) < min_payloads:
            continue
        med = float(torch.tensor(finite, dtype=torch.float64).median())
        mad = float(torch.tensor([abs(v - med) for v in finite], dtype=torch.float64).median())
        scale = max(1.4826 * mad, rel_floor * abs(med), 1e-12)
        ratio_rule = key.endswith("-max")
        for i, value in values:
            far = (
                value > max_ratio * max(med, 1e-12)
                if ratio_rule
                else abs(value - med) > threshold * scale
            )
            if reasons[i] is None and (not math.isfinite(value) or far):
                if ratio_rule:
                    reasons[i] = (
                        f"outlier: {key} {value:.4g}, more than {max_ratio:g} x the median "
                        f"{med:.4g} of {len(values)} payloads"
                    )
                    continue
                reasons[i] = (
                    f"outlier: {key} {value:.4g} vs median {med:.4g} of {len(values)} payloads "
                    f"(more than {threshold:g} x {scale:.3g} away)"
                )
    return reasons
