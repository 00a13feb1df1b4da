"""KD loss against a hand computation, and the KD-mode switches."""

import math

import pytest
import torch
import torch.nn.functional as F

from flwr_gkt.core.losses import KDMode, gkt_loss, kd_loss


def _hand_kd(student, teacher, t):
    """T^2 * mean over the batch of sum_c p_t * (log p_t - log p_s), written out."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        zs = [v / t for v in s_row]
        zt = [v / t for v in t_row]
        log_norm_s = math.log(sum(math.exp(v) for v in zs))
        log_norm_t = math.log(sum(math.exp(v) for v in zt))
        for a, b in zip(zs, zt, strict=True):
            log_ps, log_pt = a - log_norm_s, b - log_norm_t
            total += math.exp(log_pt) * (log_pt - log_ps)
    return t * t * total / len(student)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 7.5])
def test_kd_loss_matches_hand_computation(temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    got = kd_loss(student, teacher, temperature).item()
    assert got == pytest.approx(_hand_kd(student, teacher, temperature), rel=1e-9)
    assert got > 0


def test_kd_loss_small_case_exact_value():
    # student uniform over 2 classes, teacher (ln 3, 0) -> p_t = (3/4, 1/4), T = 1
    student = torch.zeros(1, 2, dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-12)
    # T^2 scaling at T=2: probabilities of (ln3/2, 0) -> sqrt(3)/(1+sqrt(3))
    pt = math.sqrt(3) / (1 + math.sqrt(3))
    expected_t2 = 4 * (pt * math.log(pt / 0.5) + (1 - pt) * math.log((1 - pt) / 0.5))
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(expected_t2, rel=1e-12)


def test_kd_loss_is_zero_for_identical_logits_and_has_no_teacher_gradient():
    student = torch.randn(3, 10, requires_grad=True)
    teacher = student.detach().clone().requires_grad_(True)
    loss = kd_loss(student, teacher, 3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss2 = kd_loss(student, teacher * 2, 3.0)
    loss2.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_gkt_loss_is_ce_plus_alpha_kd():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 10, generator=g)
    teacher = torch.randn(6, 10, generator=g)
    labels = torch.randint(0, 10, (6,), generator=g)
    ce = F.cross_entropy(logits, labels)
    assert gkt_loss(logits, labels, None, 3.0, 1.0).item() == pytest.approx(ce.item())
    for alpha in (0.0, 0.5, 2.0):
        expected = ce + alpha * kd_loss(logits, teacher, 3.0)
        assert gkt_loss(logits, labels, teacher, 3.0, alpha).item() == pytest.approx(
            expected.item()
        )


def test_kd_modes():
    assert not KDMode("none").edge_distills and not KDMode("none").server_distills
    assert KDMode("server_to_edge").edge_distills and not KDMode("server_to_edge").server_distills
    assert KDMode("both").edge_distills and KDMode("both").server_distills
    with pytest.raises(ValueError):
        KDMode("sideways")
