"""Distillation losses: CE, top-k KL in both directions, MMD (PRIDE), DPO (Xie et al.).

The teacher cache keeps only the top-k log-probabilities of each reply token, so the KL terms
compare (K+1)-bucket distributions: the K cached ids plus one "tail" bucket holding all the
remaining mass. At T = 1, grouping the other tokens into one bucket can only lower a KL (data
processing inequality), and when K equals the vocabulary size the bucketed KL is the full KL.

All functions are pure, accept any leading shape ``[...]`` (usually ``[B, T]``), and compute in
at least float32 so that bf16/fp16 logits do not lose the tail mass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

TAIL_FLOOR = 1e-12
"""Smallest tail probability, on both sides. It bounds the log-ratio of the tail bucket when one
side's tail is (numerically) empty, e.g. when the K ids cover the whole vocabulary or float32
top-k mass rounds to 1, and makes two empty tails cancel exactly."""

MIN_LOGPROB = -1e4
"""Stand-in for log(0). Log-probabilities are clamped here, so a -inf (padding, an empty tail
before its floor) never gives inf * 0 = NaN in a KL value or its gradient. exp(-1e4) is exactly
0 in float32 and float64, so real values are unchanged."""

MEDIAN_SCALES = (0.5, 1.0, 2.0, 4.0)
"""Default MMD bandwidths, as multiples of the median pairwise distance of the pooled set."""


def _upcast(x: Tensor) -> Tensor:
    """Half-precision log-softmax loses small probabilities; float32/float64 are kept as is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is nonzero; 0 (still differentiable) if nothing counts.

    ``torch.where`` (not multiplication) drops masked entries, so a NaN or inf computed at a
    padded position cannot leak into the result.
    """
    keep = mask.bool()
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    return total / keep.sum().clamp_min(1).to(values.dtype)


def cross_entropy(student_logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean of -log p_student(target) over the tokens where ``mask`` is nonzero.

    Targets at masked positions may hold any value (e.g. -100): they are replaced before the
    gather so they never index out of range.
    """
    logp = F.log_softmax(_upcast(student_logits), dim=-1)
    safe_targets = torch.where(mask.bool(), targets, torch.zeros_like(targets))
    nll = -logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return _masked_mean(nll, mask)


def _safe_log(p: Tensor) -> Tensor:
    """log(p) for p > 0 and MIN_LOGPROB for p <= 0, with finite gradients everywhere.

    The clamp before the log keeps the unused branch of ``torch.where`` finite, which is what
    stops a NaN gradient from coming back through it.
    """
    tiny = torch.finfo(p.dtype).tiny
    return torch.where(p > 0, torch.log(p.clamp_min(tiny)), torch.full_like(p, MIN_LOGPROB))


def _log_mass_outside(logp: Tensor, ids: Tensor) -> Tensor:
    """Exact log of the probability mass of ``logp`` [..., V] outside ``ids`` [..., K].

    A logsumexp over the non-top-k entries, rather than log(1 - sum of top-k), keeps tiny tails
    accurate (at the cost of one masked copy of ``logp``). An empty tail gives MIN_LOGPROB.
    """
    in_topk = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, ids, True)
    rest = logp.masked_fill(in_topk, float("-inf"))
    peak = rest.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).detach()
    total = torch.exp(rest - peak).sum(dim=-1, keepdim=True)  # >= 1 unless the tail is empty
    return _safe_log(total) + peak


def topk_with_tail(
    student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over K+1 buckets: the K cached ids, then the tail.

    Returns ``(student_logq, teacher_logq)``, both ``[..., K+1]``.

    Student: its logits are divided by ``temperature`` before the log-softmax over the full
    vocabulary, so its buckets are exact at any temperature; its tail is its exact mass outside
    the K ids. Teacher: the cache only has temperature-1 log-probabilities, so its tail is
    1 - sum(exp(topk_logprobs)), computed stably as -expm1(logsumexp(topk_logprobs)); 0 if float32
    rounding takes the top-k mass to 1 or above. The K+1 teacher buckets are then tempered as
    log p / T and renormalised: exact at T = 1, an approximation at T != 1 (the tail is tempered
    as if it were one token), forced by not having the teacher's full distribution.

    Both tails are finally floored at TAIL_FLOOR (the teacher's after tempering, so the floor is
    not raised to floor**(1/T)); each side may then sum to 1 + TAIL_FLOOR at most. The K ids of a
    token are assumed distinct.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = _upcast(student_logits)
    logp = F.log_softmax(logits / temperature, dim=-1)
    log_floor = math.log(TAIL_FLOOR)
    student_tail = _log_mass_outside(logp, topk_ids).clamp_min(log_floor)
    student = torch.cat([logp.gather(-1, topk_ids).clamp_min(MIN_LOGPROB), student_tail], dim=-1)

    teacher_top = topk_logprobs.to(logits.dtype).clamp_min(MIN_LOGPROB)
    covered = torch.logsumexp(teacher_top, dim=-1, keepdim=True)
    teacher_tail = _safe_log(-torch.expm1(covered))  # log(1 - covered), stable near covered = 0
    teacher = torch.cat([teacher_top, teacher_tail], dim=-1)
    teacher = F.log_softmax(teacher / temperature, dim=-1).clamp_min(MIN_LOGPROB)
    teacher_tail = teacher[..., -1:].clamp_min(log_floor)  # after tempering: floor**(1/T) > floor
    return student, torch.cat([teacher[..., :-1], teacher_tail], dim=-1)


def reverse_kl_topk(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """KL(student || teacher) over the K+1 buckets, averaged over masked tokens, times T^2.

    Reverse KL is mode-seeking: the student is penalised for mass where the teacher has little,
    which suits a small student that cannot cover every teacher mode. The T^2 factor (Hinton et
    al.) keeps gradient sizes comparable across temperatures.
    """
    student, teacher = topk_with_tail(student_logits, topk_ids, topk_logprobs, temperature)
    per_token = (student.exp() * (student - teacher)).sum(dim=-1)
    return _masked_mean(per_token, mask) * temperature**2


def forward_kl_topk(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """KL(teacher || student) over the K+1 buckets, averaged over masked tokens, times T^2.

    The mass-covering counterpart of :func:`reverse_kl_topk`, for ablations and monitoring.
    """
    student, teacher = topk_with_tail(student_logits, topk_ids, topk_logprobs, temperature)
    per_token = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return _masked_mean(per_token, mask) * temperature**2


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] | None = None) -> Tensor:
    """Squared maximum mean discrepancy between feature sets ``x`` [N, D] and ``y`` [M, D].

    Kernel: sum over sigma of exp(-||a - b||^2 / (2 sigma^2)). With ``bandwidths=None`` the sigmas
    are MEDIAN_SCALES times the median (the lower one, as ``torch.median``) pairwise distance
    between distinct points of the pooled set, detached so the bandwidth is not tuned to shrink
    the loss: this adapts to the feature scale, and several scales catch differences both near
    and far. Pass ``bandwidths`` for fixed sigmas.

    The biased (V-statistic) estimator is used: it includes the diagonal, so it is >= 0 (the
    kernel is positive definite; a final clamp only absorbs rounding), exactly 0 for identical
    sets, and defined for N = 1 or M = 1. An empty set gives 0 (still differentiable).
    """
    x, y = _upcast(x), _upcast(y)
    if x.shape[0] == 0 or y.shape[0] == 0:
        return (x.sum() + y.sum()) * 0.0
    pooled = torch.cat([x, y], dim=0)
    sq_norms = (pooled * pooled).sum(dim=-1)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * pooled @ pooled.T).clamp_min(0.0)

    if bandwidths is None:
        n = pooled.shape[0]
        off_diag = sq_dist.detach()[~torch.eye(n, dtype=torch.bool, device=pooled.device)]
        median = off_diag.sqrt().median() if off_diag.numel() else sq_dist.new_tensor(1.0)
        median = median.clamp_min(torch.finfo(pooled.dtype).eps)
        sigmas = [median * s for s in MEDIAN_SCALES]
    else:
        sigmas = [sq_dist.new_tensor(float(s)) for s in bandwidths]
    kernel = torch.stack([torch.exp(-sq_dist / (2.0 * s * s)) for s in sigmas]).sum(dim=0)

    nx = x.shape[0]
    k_xx, k_yy, k_xy = kernel[:nx, :nx], kernel[nx:, nx:], kernel[:nx, nx:]
    return (k_xx.mean() + k_yy.mean() - 2.0 * k_xy.mean()).clamp_min(0.0)


def sequence_logprobs(logits: Tensor, targets: Tensor, mask: Tensor, rows: Tensor, n_rows: int):
    """Sum of log p(target) over each sequence's tokens where ``mask`` is nonzero: [n_rows].

    Flattened layout (as stage2_distill/batch.py builds it): ``logits`` [N, V], ``targets``,
    ``mask`` and ``rows`` [N], ``rows[i]`` being the sequence token i belongs to. A sequence with
    no counted token gets 0.
    """
    logp = F.log_softmax(_upcast(logits), dim=-1)
    keep = mask.bool()
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    token = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    token = torch.where(keep, token, torch.zeros_like(token))
    return token.new_zeros(n_rows).index_add(0, rows, token)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """Sigmoid DPO (Rafailov et al.): mean of -log sigmoid(beta * ((pc - rc) - (pr - rr))).

    Arguments are summed sequence log-probabilities [B] of the chosen and rejected replies under
    the trained policy and the frozen reference. logsigmoid is used (not log of sigmoid), so a
    large negative margin gives a large finite loss instead of -log(0).
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()


__all__ = [
    "MEDIAN_SCALES",
    "MIN_LOGPROB",
    "TAIL_FLOOR",
    "cross_entropy",
    "dpo_loss",
    "forward_kl_topk",
    "mmd",
    "reverse_kl_topk",
    "sequence_logprobs",
    "topk_with_tail",
]
