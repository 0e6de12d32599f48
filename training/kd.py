"""Distillation losses (pure tensor math): Hinton KD and the Born-Again soft cross-entropy.

Both plug into the one training loop as ``loss_fn(logits, targets, teacher_logits)``; the loop runs
the frozen teacher on the exact augmented batch the student sees. Each factory attaches a
``.convention`` dict that ``run_training`` records in ``config.json`` (peers disagree on which term
α weights and on the KL reduction, so every run says which one it used).

    KD:   (1 − α)·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))
    BAN:  CE(s, y) + λ·T²·H(softmax(t/T), softmax(s/T))

KL and the soft cross-entropy H are summed over classes and averaged over the batch ('batchmean'),
not averaged over batch × classes (which makes the soft term C times too weak). The T² factor keeps
the soft term's gradient magnitude roughly independent of T (Hinton et al. 2015, §2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import UserError


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise UserError(f"--temperature must be > 0, got {temperature}")


def check_weight(value: float, name: str, upper: float | None = 1.0) -> None:
    if value < 0 or (upper is not None and value > upper):
        rng = f"[0, {upper}]" if upper is not None else ">= 0"
        raise UserError(f"--{name} must be in {rng}, got {value}")


def kl_soft(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)): logits (N, C) -> scalar, summed over classes, mean over N."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)  # (N, C)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)  # (N, C)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """H(softmax(t/T), softmax(s/T)) = −Σ_c p_t log p_s: (N, C) -> scalar, mean over N.

    Differs from :func:`kl_soft` by the teacher's entropy, a constant for the student (same gradient).
    """
    p_t = F.softmax(teacher_logits / temperature, dim=1)          # (N, C)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)  # (N, C)
    return -(p_t * log_p_s).sum(dim=1).mean()


def kd_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
            alpha: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 − α)·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T)); α weights the soft (teacher) term."""
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    soft = kl_soft(student_logits, teacher_logits.detach(), temperature)
    return (1.0 - alpha) * hard + alpha * temperature ** 2 * soft


def ban_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
             lam: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Born-Again: CE(s, y) + λ·T²·H(softmax(t/T), softmax(s/T))."""
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if lam == 0:
        return hard
    return hard + lam * temperature ** 2 * soft_cross_entropy(student_logits, teacher_logits.detach(), temperature)


def _need_teacher(teacher_logits: torch.Tensor | None, what: str) -> torch.Tensor:
    if teacher_logits is None:
        raise ValueError(f"the {what} loss needs teacher logits; pass a teacher to the training loop")
    return teacher_logits


def kd_loss_fn(alpha: float, temperature: float, label_smoothing: float = 0.0):
    """A loop ``loss_fn(logits, targets, teacher_logits)`` computing :func:`kd_loss`."""
    check_weight(alpha, "alpha")
    check_temperature(temperature)

    def loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None):
        return kd_loss(logits, targets, _need_teacher(teacher_logits, "KD"), alpha, temperature, label_smoothing)

    loss.convention = {  # type: ignore[attr-defined]
        "loss": "kd",
        "formula": "(1-alpha)*CE(s,y) + alpha*T^2*KL(softmax(t/T) || softmax(s/T))",
        "alpha_weights": "soft teacher term",
        "kl_reduction": "sum over classes, mean over batch (batchmean)",
        "teacher_batch": "teacher run in eval mode without grad on the student's augmented batch",
        "alpha": alpha, "temperature": temperature, "label_smoothing": label_smoothing,
    }
    return loss


def ban_loss_fn(lam: float, temperature: float, label_smoothing: float = 0.0):
    """A loop ``loss_fn`` computing :func:`ban_loss` (Born-Again generation g+1 from generation g)."""
    check_weight(lam, "lambda", upper=None)
    check_temperature(temperature)

    def loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None):
        return ban_loss(logits, targets, _need_teacher(teacher_logits, "Born-Again"), lam, temperature,
                        label_smoothing)

    loss.convention = {  # type: ignore[attr-defined]
        "loss": "born_again",
        "formula": "CE(s,y) + lambda*T^2*H(softmax(t/T), softmax(s/T))",
        "soft_reduction": "sum over classes, mean over batch",
        "teacher_batch": "teacher run in eval mode without grad on the student's augmented batch",
        "lambda": lam, "temperature": temperature, "label_smoothing": label_smoothing,
    }
    return loss
