"""Distillation losses pinned against hand-computed references (numpy), closed forms and limits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from training.kd import ban_loss, ban_loss_fn, kd_loss, kd_loss_fn, kl_soft, soft_cross_entropy


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_kd(s: np.ndarray, y: np.ndarray, t: np.ndarray, alpha: float, T: float) -> float:
    """(1-α)·CE + α·T²·KL(p_t ‖ p_s), KL summed over classes and averaged over the batch."""
    ce = -_np_log_softmax(s)[np.arange(len(y)), y].mean()
    log_ps, log_pt = _np_log_softmax(s / T), _np_log_softmax(t / T)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean()
    return (1 - alpha) * ce + alpha * T * T * kl


def _logits(seed: int, n: int = 6, c: int = 5, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return s, y, t


@pytest.mark.parametrize("alpha,T", [(0.9, 4.0), (0.5, 1.0), (0.3, 20.0), (1.0, 2.5)])
def test_kd_loss_matches_numpy_reference(alpha, T):
    s, y, t = _logits(0)
    got = float(kd_loss(s, y, t, alpha, T))
    want = _np_kd(s.numpy(), y.numpy(), t.numpy(), alpha, T)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_kd_loss_closed_form_uniform_student():
    # Student logits all equal (uniform p_s = 1/C), teacher puts p on class 0 and (1-p)/(C-1) elsewhere:
    # KL = p·log(pC) + (1-p)·log((1-p)C/(C-1)) per sample, whatever the batch size (batchmean, not mean
    # over batch × classes). With T = 2 the teacher logits are 2·log(prob).
    C, p, T, n = 4, 0.7, 2.0, 3
    probs = torch.tensor([p] + [(1 - p) / (C - 1)] * (C - 1), dtype=torch.float64)
    t = (T * probs.log()).repeat(n, 1)
    s = torch.zeros(n, C, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    kl = p * math.log(p * C) + (1 - p) * math.log((1 - p) * C / (C - 1))
    assert float(kd_loss(s, y, t, 1.0, T)) == pytest.approx(T * T * kl, rel=1e-12)
    ce = math.log(C)
    assert float(kd_loss(s, y, t, 0.25, T)) == pytest.approx(0.75 * ce + 0.25 * T * T * kl, rel=1e-12)


def test_alpha_zero_equals_cross_entropy():
    s, y, t = _logits(1)
    assert float(kd_loss(s, y, t, 0.0, 7.0)) == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-14)
    fn = kd_loss_fn(0.0, 7.0)
    assert float(fn(s, y, t)) == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-14)


def test_soft_term_scaled_by_t_squared():
    s, y, t = _logits(2)
    for T in (1.0, 3.0, 10.0):
        assert float(kd_loss(s, y, t, 1.0, T)) == pytest.approx(T * T * float(kl_soft(s, t, T)), rel=1e-12)


def test_t_squared_keeps_gradient_scale_at_high_temperature():
    # Hinton et al.: for large T the gradient of T²·KL w.r.t. the student logits tends to (s - t)/(N·C)
    # for zero-mean logits, independent of T. Without the T² factor it would shrink like 1/T².
    s, y, t = _logits(3, n=4, c=6, scale=0.5)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    want = (s - t) / (s.shape[0] * s.shape[1])
    for T in (50.0, 100.0):
        s_ = s.clone().requires_grad_(True)
        kd_loss(s_, y, t, 1.0, T).backward()
        assert float((s_.grad - want).norm() / want.norm()) < 0.02


def test_identical_teacher_and_student_give_zero_soft_term():
    s, y, _ = _logits(4)
    assert float(kd_loss(s, y, s.clone(), 1.0, 3.0)) == pytest.approx(0.0, abs=1e-12)


def test_teacher_gets_no_gradient():
    s, y, t = _logits(5)
    t = t.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    kd_loss(s, y, t, 0.5, 4.0).backward()
    assert t.grad is None and s.grad is not None


def test_kd_factory_records_convention_and_validates():
    fn = kd_loss_fn(0.7, 3.0)
    conv = fn.convention
    assert conv["loss"] == "kd" and conv["alpha"] == 0.7 and conv["temperature"] == 3.0
    assert "batchmean" in conv["kl_reduction"] and conv["alpha_weights"] == "soft teacher term"
    s, y, t = _logits(6)
    assert float(fn(s, y, t)) == pytest.approx(_np_kd(s.numpy(), y.numpy(), t.numpy(), 0.7, 3.0), rel=1e-10)
    with pytest.raises(ValueError, match="teacher logits"):
        fn(s, y, None)
    with pytest.raises(UserError, match="alpha"):
        kd_loss_fn(1.5, 3.0)
    with pytest.raises(UserError, match="temperature"):
        kd_loss_fn(0.5, 0.0)


@pytest.mark.parametrize("lam,T", [(0.5, 1.0), (0.5, 4.0), (2.0, 3.0)])
def test_ban_loss_matches_reference(lam, T):
    s, y, t = _logits(7)
    sn, yn, tn = s.numpy(), y.numpy(), t.numpy()
    ce = -_np_log_softmax(sn)[np.arange(len(yn)), yn].mean()
    soft = -(np.exp(_np_log_softmax(tn / T)) * _np_log_softmax(sn / T)).sum(axis=1).mean()
    assert float(ban_loss(s, y, t, lam, T)) == pytest.approx(ce + lam * T * T * soft, rel=1e-10)
    assert float(ban_loss_fn(lam, T)(s, y, t)) == pytest.approx(ce + lam * T * T * soft, rel=1e-10)


def test_ban_temperature_is_applied():
    # A factory that ignored T would give the T = 1 value (times T² at most); both differ here.
    s, y, t = _logits(8)
    at1 = float(ban_loss_fn(0.5, 1.0)(s, y, t))
    at4 = float(ban_loss_fn(0.5, 4.0)(s, y, t))
    ce = float(F.cross_entropy(s, y))
    assert at4 != pytest.approx(at1, rel=1e-3)
    assert at4 != pytest.approx(ce + 16 * (at1 - ce), rel=1e-3)
    assert ban_loss_fn(0.5, 4.0).convention["temperature"] == 4.0


def test_soft_cross_entropy_is_kl_plus_teacher_entropy():
    s, _, t = _logits(9)
    T = 2.0
    p_t = torch.softmax(t / T, 1)
    entropy = float(-(p_t * p_t.log()).sum(1).mean())
    assert float(soft_cross_entropy(s, t, T)) == pytest.approx(float(kl_soft(s, t, T)) + entropy, rel=1e-12)
