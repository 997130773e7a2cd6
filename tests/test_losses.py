"""Tests for stage2_distill.losses against naive float64 references written from the definitions.

The references below loop over tokens and vocabulary entries in plain Python and share no code
with the implementation.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from empathy_distill.stage2_distill.losses import (
    TAIL_FLOOR,
    cross_entropy,
    dpo_loss,
    forward_kl_topk,
    mmd,
    reverse_kl_topk,
    sequence_logprobs,
    topk_with_tail,
)

B, T, V, K = 2, 5, 11, 4
KL_FUNCS = {"reverse": reverse_kl_topk, "forward": forward_kl_topk}


# ----------------------------------------------------------------------------- references
def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def ref_topk_kl(student_logits, teacher_logits, ids, mask, temperature, direction) -> float:
    """(K+1)-bucket KL from full logits: tail = sum over ids not in the top-k list."""
    total, count = 0.0, 0
    for b in range(student_logits.shape[0]):
        for t in range(student_logits.shape[1]):
            if not mask[b, t]:
                continue
            chosen = [int(i) for i in ids[b, t]]
            vocab = range(student_logits.shape[2])
            ps = _softmax([float(v) / temperature for v in student_logits[b, t]])
            pt = _softmax([float(v) for v in teacher_logits[b, t]])  # the cache stores T = 1
            qs = [ps[i] for i in chosen] + [sum(ps[j] for j in vocab if j not in chosen)]
            qt = [pt[i] for i in chosen] + [sum(pt[j] for j in vocab if j not in chosen)]
            qt = [q ** (1.0 / temperature) for q in qt]  # temper the buckets, then renormalise
            qt = [q / sum(qt) for q in qt]
            total += _kl(qs, qt) if direction == "reverse" else _kl(qt, qs)
            count += 1
    return total / count * temperature**2


def ref_dense_kl(student_logits, teacher_logits, mask, temperature, direction) -> float:
    """Full-vocabulary KL with both sides at temperature T."""
    total, count = 0.0, 0
    for b in range(student_logits.shape[0]):
        for t in range(student_logits.shape[1]):
            if mask[b, t]:
                ps = _softmax([float(v) / temperature for v in student_logits[b, t]])
                pt = _softmax([float(v) / temperature for v in teacher_logits[b, t]])
                total += _kl(ps, pt) if direction == "reverse" else _kl(pt, ps)
                count += 1
    return total / count * temperature**2


def ref_mmd(x, y, sigmas) -> float:
    """Biased squared MMD with a sum-of-Gaussians kernel, by double loops."""

    def kernel(a, b) -> float:
        d2 = sum((float(u) - float(v)) ** 2 for u, v in zip(a, b, strict=True))
        return sum(math.exp(-d2 / (2 * s * s)) for s in sigmas)

    def mean_k(p, q) -> float:
        return sum(kernel(a, b) for a in p for b in q) / (len(p) * len(q))

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


def ref_median_distance(x, y) -> float:
    """Lower median of the pairwise distances between distinct points of the pooled set."""
    pooled = list(x) + list(y)
    dists = sorted(
        math.dist([float(v) for v in a], [float(v) for v in b])
        for i, a in enumerate(pooled)
        for j, b in enumerate(pooled)
        if i != j
    )
    return dists[(len(dists) - 1) // 2]


# ----------------------------------------------------------------------------- fixtures
def make_batch(seed: int, k: int = K, dtype=torch.float64):
    """Student logits, teacher logits, teacher top-k cache, and a mask with some padding."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2).to(dtype)
    teacher = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    teacher_logp = F.log_softmax(teacher, dim=-1)
    topk_logprobs, topk_ids = teacher_logp.topk(k, dim=-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False
    mask[1, 0] = False
    return student, teacher, topk_ids, topk_logprobs.to(dtype), mask


# ----------------------------------------------------------------------------- KL
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_matches_reference(direction, temperature):
    student, teacher, ids, logprobs, mask = make_batch(0)
    got = KL_FUNCS[direction](student, ids, logprobs, mask, temperature=temperature)
    want = ref_topk_kl(student, teacher, ids, mask, temperature, direction)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_topk_kl_float32_cache_matches_reference(direction):
    student, teacher, ids, logprobs, mask = make_batch(1, dtype=torch.float32)
    got = KL_FUNCS[direction](student, ids, logprobs, mask, temperature=2.0)
    want = ref_topk_kl(student, teacher, ids, mask, 2.0, direction)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_k_equal_v_is_dense_kl(direction, temperature, dtype):
    student, teacher, ids, logprobs, mask = make_batch(2, k=V, dtype=dtype)
    student.requires_grad_(True)
    got = KL_FUNCS[direction](student, ids, logprobs, mask, temperature=temperature)
    want = ref_dense_kl(student.detach(), teacher, mask, temperature, direction)
    # At T = 2 rounding noise in the teacher's top-k mass (1e-16 in float64, 1e-7 in float32) is
    # tempered into a tail of noise**(1/2); the tolerance reflects that, not an error of the loss.
    tol = {(torch.float64, 1.0): 1e-9, (torch.float64, 2.0): 1e-6}.get((dtype, temperature), 1e-5)
    assert got.item() == pytest.approx(want, rel=tol, abs=tol)
    got.backward()
    assert torch.isfinite(student.grad).all()

    s_logq, t_logq = topk_with_tail(student, ids, logprobs, temperature)
    assert torch.isfinite(s_logq).all() and torch.isfinite(t_logq).all()
    assert (s_logq[..., -1].exp() <= 1.0001 * TAIL_FLOOR).all()  # empty, floored
    assert (t_logq[..., -1].exp() < 1e-3).all()  # the teacher's, up to (tempered) rounding


def test_buckets_are_normalised_distributions():
    student, _, ids, logprobs, _ = make_batch(3)
    for temperature in (1.0, 0.5, 3.0):
        s_logq, t_logq = topk_with_tail(student, ids, logprobs, temperature)
        assert s_logq.shape == t_logq.shape == (B, T, K + 1)
        torch.testing.assert_close(s_logq.exp().sum(-1), torch.ones(B, T, dtype=torch.float64))
        torch.testing.assert_close(t_logq.exp().sum(-1), torch.ones(B, T, dtype=torch.float64))


def test_identical_distributions_give_zero():
    _, teacher, ids, logprobs, mask = make_batch(4)
    for fn in KL_FUNCS.values():
        # K < V: exact at T = 1 only (tempering the teacher's tail bucket is an approximation).
        assert fn(teacher, ids, logprobs, mask).item() == pytest.approx(0.0, abs=1e-12)
    _, teacher, ids, logprobs, mask = make_batch(4, k=V)
    for fn in KL_FUNCS.values():  # K == V: any T, up to tempered rounding of the tail (see above)
        assert fn(teacher, ids, logprobs, mask, 2.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_kl_is_non_negative(seed, temperature):
    gen = torch.Generator().manual_seed(100 + seed)
    student = torch.randn(B, T, V, generator=gen) * 4
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(B * T)]).view(B, T, K)
    logprobs = F.log_softmax(torch.randn(B, T, V, generator=gen) * 4, -1).gather(-1, ids)
    mask = torch.ones(B, T)
    for fn in KL_FUNCS.values():
        assert fn(student, ids, logprobs, mask, temperature=temperature).item() >= -1e-6


def test_temperature_must_be_positive():
    student, _, ids, logprobs, mask = make_batch(5)
    with pytest.raises(ValueError):
        reverse_kl_topk(student, ids, logprobs, mask, temperature=0.0)


# ----------------------------------------------------------------------------- masking, edges
def test_masked_tokens_do_not_count():
    student, _, ids, logprobs, mask = make_batch(6)
    targets = ids[..., 0].clone()
    before = [fn(student, ids, logprobs, mask, 2.0) for fn in KL_FUNCS.values()]
    before.append(cross_entropy(student, targets, mask))

    student2, logprobs2, targets2 = student.clone(), logprobs.clone(), targets.clone()
    student2[~mask] = torch.randn_like(student2[~mask]) * 50
    logprobs2[~mask] = float("-inf")  # padding that would be NaN if it were used
    targets2[~mask] = -100
    student2.requires_grad_(True)
    after = [fn(student2, ids, logprobs2, mask, 2.0) for fn in KL_FUNCS.values()]
    after.append(cross_entropy(student2, targets2, mask))
    for b, a in zip(before, after, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-12)
    sum(after).backward()
    assert torch.isfinite(student2.grad).all()
    assert (student2.grad[~mask] == 0).all()


def test_all_masked_gives_zero_without_nan():
    student, _, ids, logprobs, _ = make_batch(7)
    student.requires_grad_(True)
    mask = torch.zeros(B, T, dtype=torch.float32)
    losses = [fn(student, ids, logprobs, mask, 2.0) for fn in KL_FUNCS.values()]
    losses.append(cross_entropy(student, ids[..., 0], mask))
    for loss in losses:
        assert loss.item() == 0.0
    sum(losses).backward()
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()


def test_very_negative_teacher_logprobs_stay_finite():
    student, _, ids, logprobs, mask = make_batch(8, dtype=torch.float32)
    logprobs[0, 0, -1] = -1e30
    logprobs[1, 1, -1] = float("-inf")
    student.requires_grad_(True)
    loss = reverse_kl_topk(student, ids, logprobs, mask) + forward_kl_topk(
        student, ids, logprobs, mask, 2.0
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_kl_gradients_reach_student(direction):
    student, _, ids, logprobs, mask = make_batch(9, dtype=torch.float32)
    student.requires_grad_(True)
    KL_FUNCS[direction](student, ids, logprobs, mask, temperature=2.0).backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[mask].abs().sum() > 0


def test_half_precision_logits_are_upcast():
    student, _, ids, logprobs, mask = make_batch(10, dtype=torch.float32)
    full = reverse_kl_topk(student, ids, logprobs, mask)
    half = reverse_kl_topk(student.bfloat16(), ids, logprobs, mask)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=5e-2)


# ----------------------------------------------------------------------------- cross-entropy
def test_cross_entropy_matches_torch_on_unmasked_tokens():
    student, _, _, _, mask = make_batch(11)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    want = F.cross_entropy(student[mask], targets[mask])
    assert cross_entropy(student, targets, mask).item() == pytest.approx(want.item(), rel=1e-12)


# ----------------------------------------------------------------------------- MMD
def _features(seed: int, n: int = 6, m: int = 5, d: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=gen, dtype=torch.float64),
        torch.randn(m, d, generator=gen, dtype=torch.float64) + 0.5,
    )


def test_mmd_matches_reference_fixed_bandwidths():
    x, y = _features(0)
    sigmas = (0.5, 1.0, 3.0)
    assert mmd(x, y, sigmas).item() == pytest.approx(ref_mmd(x, y, sigmas), rel=1e-9)


def test_mmd_matches_reference_median_heuristic():
    x, y = _features(1)
    median = ref_median_distance(x, y)
    sigmas = [median * s for s in (0.5, 1.0, 2.0, 4.0)]
    assert mmd(x, y).item() == pytest.approx(ref_mmd(x, y, sigmas), rel=1e-9)


@pytest.mark.parametrize("bandwidths", [None, (1.0, 2.0)])
def test_mmd_identical_sets_is_zero_and_non_negative(bandwidths):
    x, y = _features(2)
    assert mmd(x, x.clone(), bandwidths).item() == pytest.approx(0.0, abs=1e-12)
    assert mmd(x, y, bandwidths).item() > 0
    same = torch.ones(4, 3, dtype=torch.float64)  # zero median distance
    assert mmd(same, same.clone(), bandwidths).item() == pytest.approx(0.0, abs=1e-12)


def test_mmd_grows_when_sets_move_apart():
    x, _ = _features(3)
    y = x[:5].clone()
    fixed = [mmd(x, y + shift, (0.5, 1.0, 2.0)).item() for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in itertools.pairwise(fixed))
    median = [mmd(x, y + shift).item() for shift in (0.0, 1.0, 4.0)]
    assert all(a < b for a, b in itertools.pairwise(median))


def test_mmd_gradients_reach_both_inputs():
    x, y = _features(4)
    x = x.float().requires_grad_(True)
    y = y.float().requires_grad_(True)
    mmd(x, y).backward()
    for t in (x, y):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_mmd_empty_set_gives_zero():
    x, _ = _features(5)
    x.requires_grad_(True)
    out = mmd(x, x[:0])
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- DPO


def ref_sequence_logprobs(logits, targets, mask, rows, n_rows) -> list[float]:
    sums = [0.0] * n_rows
    for i in range(len(targets)):
        if mask[i]:
            probs = _softmax([float(v) for v in logits[i]])
            sums[int(rows[i])] += math.log(probs[int(targets[i])])
    return sums


def ref_dpo(pc, pr, rc, rr, beta) -> float:
    values = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        z = beta * ((float(a) - float(c)) - (float(b) - float(d)))
        values.append(-math.log(1.0 / (1.0 + math.exp(-z))))
    return sum(values) / len(values)


def _flat_batch(seed: int, n: int = 9, n_rows: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (n,), generator=g)
    rows = torch.tensor(sorted(torch.randint(0, n_rows, (n,), generator=g).tolist()))
    mask = torch.rand(n, generator=g) > 0.3
    return logits, targets, mask, rows


@pytest.mark.parametrize("seed", range(3))
def test_sequence_logprobs_matches_reference(seed):
    logits, targets, mask, rows = _flat_batch(seed)
    got = sequence_logprobs(logits, targets, mask, rows, 3)
    assert got.tolist() == pytest.approx(ref_sequence_logprobs(logits, targets, mask, rows, 3))


def test_sequence_logprobs_masked_tokens_do_not_count():
    logits, targets, mask, rows = _flat_batch(0)
    mask[:] = True
    mask[2] = False
    before = sequence_logprobs(logits, targets, mask, rows, 3)
    logits[2] = 1e6  # anything at a masked position
    targets[2] = -100
    assert torch.equal(sequence_logprobs(logits, targets, mask, rows, 3), before)
    none = sequence_logprobs(logits, targets, torch.zeros_like(mask), rows, 3)
    assert none.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_matches_reference(beta):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4))
    got = dpo_loss(pc, pr, rc, rr, beta)
    assert float(got) == pytest.approx(ref_dpo(pc, pr, rc, rr, beta), rel=1e-12)


def test_dpo_identical_policy_and_reference_is_log_2():
    pc, pr = torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -1.0])
    assert float(dpo_loss(pc, pr, pc.clone(), pr.clone(), 0.1)) == pytest.approx(math.log(2))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-5.0, -6.0], requires_grad=True)
    pr = torch.tensor([-5.0, -4.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-5.0, -6.0]), torch.tensor([-5.0, -4.0]), 0.1).backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected


def test_dpo_large_margins_stay_finite():
    pc, pr = torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0])
    zero = torch.zeros(2)
    loss = dpo_loss(pc, pr, zero, zero, 1.0)
    assert torch.isfinite(loss) and float(loss) == pytest.approx(1e4 / 2)
