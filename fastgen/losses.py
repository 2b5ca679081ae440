"""Every training loss of fastgen, each a small pure function over tensors (float32 maths).

Methods compose these; a method that reuses another's objective calls its loss function here
instead of subclassing it (RG-LCD = :func:`consistency_loss` + :func:`reward_loss`).

======================================  ==================================================
:func:`consistency_loss`                 LCD/LCM: pseudo-Huber or L2 between f(x_s) and the target
:func:`reward_loss`                      RG-LCD: ``-beta * mean reward``
:func:`pairwise_preference_kl`           RG-LCD's LRM alignment: KL of pairwise preferences
:func:`label_aware_info_nce`             LRM pre-training: CLIP InfoNCE, same label = positive
:func:`flow_matching_loss`               flow matching: ``mse(v, eps - x0)``
:func:`output_distillation_loss`         output KD: ``mse(student, teacher)``
:func:`attention_alignment_loss`         CLEAR: mean over layers of ``mse(A_student, A_teacher)``
:func:`discriminator_loss`               GAN discriminator: hinge or non-saturating (SCott)
:func:`generator_loss`                   GAN generator side of the same objective
:func:`r1_penalty`                       R1: ``mean ||grad_x D(x_real)||^2`` (zero-centred)
======================================  ==================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastgen.errors import ConfigError, DataError

__all__ = [
    "PREFERENCE_PAIRS",
    "attention_alignment_loss",
    "consistency_loss",
    "discriminator_loss",
    "generator_loss",
    "flow_matching_loss",
    "label_aware_info_nce",
    "output_distillation_loss",
    "pairwise_preference_kl",
    "r1_penalty",
    "reward_loss",
]

#: candidate pairs of the LRM alignment over (student, target, real) = (0, 1, 2)
PREFERENCE_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2))
_REAL = 2
#: GAN objectives of :func:`discriminator_loss` / :func:`generator_loss`
ADVERSARIAL_LOSSES: tuple[str, ...] = ("hinge", "non-saturating")


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", huber_c: float = 0.001) -> torch.Tensor:
    """Mean pseudo-Huber ``sqrt(d^2 + c^2) - c`` (``kind="huber"``) or mean squared error (``"l2"``)."""
    diff = pred.float() - target.float()
    if kind == "huber":
        return (torch.sqrt(diff**2 + huber_c**2) - huber_c).mean()
    if kind == "l2":
        return (diff**2).mean()
    raise ConfigError(f"unknown consistency loss {kind!r}; use 'huber' or 'l2'")


def reward_loss(reward: torch.Tensor, beta: float) -> torch.Tensor:
    """``-beta * mean(reward)``: minimising it raises the reward."""
    return -float(beta) * reward.float().mean()


def pairwise_preference_kl(
    expert_logits: torch.Tensor, lrm_logits: torch.Tensor, smooth_gt_label: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL between the expert's and a proxy's pairwise preferences over three candidates.

    Args:
        expert_logits: ``[B, 3]`` expert rewards times its preference scale (no gradient taken).
        lrm_logits: ``[B, 3]`` proxy logits; candidates are (student, target, real).
        smooth_gt_label: for the pairs with the real latent where the expert prefers the generated
            candidate, use the target (0.5, 0.5) instead.

    Returns:
        ``(loss, agreement)``: the sum over pairs of ``KL(p || q)`` (batch mean), ``p`` the expert's
        two-way softmax and ``q`` the proxy's; and the fraction of (row, pair) where the sign of the
        expert's difference equals the proxy's.
    """
    if expert_logits.shape != lrm_logits.shape or expert_logits.ndim != 2 or expert_logits.shape[1] != 3:
        raise DataError(
            "pairwise_preference_kl takes expert and proxy logits of shape [B, 3], got "
            f"{list(expert_logits.shape)} and {list(lrm_logits.shape)}"
        )
    e = expert_logits.detach().float().to(lrm_logits.device)
    s = lrm_logits.float()
    loss = s.new_zeros(())
    agree = []
    for i, j in PREFERENCE_PAIRS:
        p = torch.softmax(torch.stack([e[:, i], e[:, j]], 1), 1)
        if smooth_gt_label and j == _REAL:
            gen_better = (e[:, i] > e[:, j])[:, None]
            p = torch.where(gen_better, torch.full_like(p, 0.5), p)
        log_q = F.log_softmax(torch.stack([s[:, i], s[:, j]], 1), 1)
        loss = loss + F.kl_div(log_q, p, reduction="batchmean")
        same = torch.sign(e[:, i] - e[:, j]) == torch.sign(s[:, i] - s[:, j]).detach()
        agree.append(same.float().mean())
    return loss, torch.stack(agree).mean()


def label_aware_info_nce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP InfoNCE where every pair with the same label is a positive.

    ``logits[i, j]`` scores item ``i`` against caption ``j``; the target of each row and of each
    column is uniform over the items of its class.
    """
    pos = (labels[:, None] == labels[None, :]).to(logits.dtype)
    target = pos / pos.sum(1, keepdim=True)
    img_to_txt = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    txt_to_img = -(target * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (img_to_txt + txt_to_img)


def flow_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``mse(v, eps - x0)`` for the path ``x_t = (1 - sigma) x0 + sigma eps``."""
    return F.mse_loss(velocity.float(), noise.float() - x0.float())


def output_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mse(student output, teacher output)`` (the teacher's side is not differentiated)."""
    return F.mse_loss(student.float(), teacher.detach().float())


def attention_alignment_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Mean over aligned layers of ``mse(A_student, A_teacher)``; ``None`` when no layer is aligned."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student attention outputs but {len(teacher)} teacher ones")
    if not student:
        return None
    return torch.stack([F.mse_loss(a.float(), b.detach().float()) for a, b in zip(student, teacher)]).mean()


def _check_adversarial(kind: str) -> None:
    if kind not in ADVERSARIAL_LOSSES:
        raise ConfigError(f"unknown adversarial loss {kind!r}; use one of {', '.join(ADVERSARIAL_LOSSES)}")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The discriminator's loss on real and generated logits.

    hinge: ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``;
    non-saturating: ``mean(softplus(-D(real))) + mean(softplus(D(fake)))`` (binary cross-entropy).
    """
    _check_adversarial(kind)
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The generator's loss on the discriminator's logits of its samples: hinge ``-mean(D(fake))``,
    non-saturating ``mean(softplus(-D(fake)))``."""
    _check_adversarial(kind)
    fake = fake_logits.float()
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty ``mean_i ||d D(x_i) / d x_i||^2`` on real inputs (``real_inputs`` must require grad
    and ``real_logits`` be computed from them); differentiable (``create_graph``) so it trains the discriminator."""
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()
