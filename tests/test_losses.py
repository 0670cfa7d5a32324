"""Losses against float64 NumPy references written from the definitions, their limits, and curricula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from microdistill.train.losses import (
    CURRICULA, DIVERGENCES, cross_entropy, curriculum_weight, forward_kl, generalized_jsd, hidden_state_sums,
    output_sums, reverse_kl, skew_kl, taid, taid_lambda, total_loss, with_tail,
)

N, K = 6, 11


def logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * scale


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


def ref(name: str, s: torch.Tensor, t: torch.Tensor, T: float, **kw) -> np.ndarray:
    """The definitions, in float64 NumPy, with p the teacher and q the student at temperature T."""
    s64, t64 = s.double().numpy() / T, t.double().numpy() / T
    p, q = np_softmax(t64), np_softmax(s64)
    if name == "forward_kl":
        d = np_kl(p, q)
    elif name == "reverse_kl":
        d = np_kl(q, p)
    elif name == "jsd":
        m = kw["beta"] * p + (1 - kw["beta"]) * q
        d = kw["beta"] * np_kl(p, m) + (1 - kw["beta"]) * np_kl(q, m)
    elif name == "skew_kl":
        d = np_kl(p, kw["alpha"] * p + (1 - kw["alpha"]) * q)
    elif name == "taid":  # the paper's form: interpolate the logits themselves
        d = np_kl(np_softmax((1 - kw["lam"]) * s64 + kw["lam"] * t64), q)
    return T * T * d


CASES = [
    ("forward_kl", {}), ("reverse_kl", {}),
    ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.9}),
    ("skew_kl", {"alpha": 0.1}), ("skew_kl", {"alpha": 0.5}),
    ("taid", {"lam": 0.2}), ("taid", {"lam": 0.7}),
]


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name, kw", CASES)
def test_divergence_matches_numpy_definition(name, kw, T):
    s, t = logits(1), logits(2).half()  # teacher logits arrive as float16 from a shard
    got = DIVERGENCES[name](s, t, T=T, **kw)
    assert got.shape == (N,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), ref(name, s, t.float(), T, **kw), rtol=1e-4, atol=1e-6)
    assert (got > 0).all()


@pytest.mark.parametrize("name, kw", CASES)
def test_identical_distributions_give_zero(name, kw):
    s = logits(3)
    # A shifted copy is the same distribution: only log-probabilities may matter.
    torch.testing.assert_close(DIVERGENCES[name](s, s + 4.0, T=1.5, **kw), torch.zeros(N), atol=1e-5, rtol=0)


def test_temperature_factor():
    s, t = logits(4), logits(5)
    # T² scaling: at T=2 the value is 4 × the plain KL of the tempered distributions.
    plain = forward_kl(s / 2, t / 2, T=1.0)
    torch.testing.assert_close(forward_kl(s, t, T=2.0), 4.0 * plain)
    assert not torch.allclose(forward_kl(s, t, T=2.0), forward_kl(s, t, T=1.0))


def test_jsd_limits():
    s, t = logits(6), logits(7)
    fkl, rkl = forward_kl(s, t, T=2.0), reverse_kl(s, t, T=2.0)
    # TRL's end points: beta=0 is KL(teacher ‖ student), beta=1 is KL(student ‖ teacher).
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0, T=2.0), fkl)
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0, T=2.0), rkl)
    # ... which are the limits of JSD_β / β and JSD_β / (1-β) of the mixture form.
    eps = 1e-3
    s64, t64 = s.double(), t.double()
    torch.testing.assert_close(generalized_jsd(s64, t64, beta=eps, T=2.0) / eps, fkl.double(), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(generalized_jsd(s64, t64, beta=1 - eps, T=2.0) / eps, rkl.double(), rtol=2e-2, atol=1e-4)
    # Symmetric at beta = 0.5.
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.5), generalized_jsd(t, s, beta=0.5))


def test_jsd_matches_trl():
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    s, t = logits(8), logits(9)
    for beta in (0.0, 0.3, 0.5, 1.0):
        for T in (1.0, 2.0):
            theirs = GKDTrainer.generalized_jsd_loss(s[None], t[None], beta=beta, temperature=T, reduction="sum")
            torch.testing.assert_close(generalized_jsd(s, t, beta=beta, T=T).sum() / T**2, theirs, rtol=1e-5, atol=1e-6)


def test_skew_kl_alpha_zero_is_forward_kl():
    s, t = logits(10), logits(11)
    torch.testing.assert_close(skew_kl(s, t, alpha=0.0, T=1.3), forward_kl(s, t, T=1.3))
    # Skewing toward the teacher can only shrink the divergence (KL is convex in its second argument).
    assert (skew_kl(s, t, alpha=0.3) < forward_kl(s, t)).all()


def test_taid_target_is_stopped_and_lam_one_is_forward_kl():
    s, t = logits(12).requires_grad_(), logits(13)
    torch.testing.assert_close(taid(s, t, lam=1.0, T=1.5), forward_kl(s, t, T=1.5))
    # Gradient only through the student side: d/ds KL(p_λ ‖ softmax(s)) = softmax(s) - p_λ.
    taid(s, t, lam=0.4).sum().backward()
    p_lam = torch.softmax(0.6 * s.detach() + 0.4 * t, -1)
    torch.testing.assert_close(s.grad, torch.softmax(s.detach(), -1) - p_lam, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name, kw", CASES)
def test_gradients_finite_with_masked_logits(name, kw):
    s, t = logits(14), logits(15)
    blocked = torch.zeros(N, K, dtype=torch.bool)
    blocked[:, :3] = True  # e.g. tokens the grammar forbids, -inf for both models
    s = s.masked_fill(blocked, -math.inf).requires_grad_()
    t = t.masked_fill(blocked, -math.inf).requires_grad_()
    value = DIVERGENCES[name](s, t, T=2.0, **kw)
    assert torch.isfinite(value).all()
    np.testing.assert_allclose(value.detach().double().numpy(),
                               ref(name, s.detach()[:, 3:], t.detach()[:, 3:], 2.0, **kw), rtol=1e-4, atol=1e-6)
    value.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert (s.grad[blocked] == 0).all()


def test_forward_kl_finite_where_only_teacher_is_masked():
    s = logits(16).requires_grad_()
    t = logits(17).masked_fill(torch.arange(K) < 4, -math.inf)
    forward_kl(s, t).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_cross_entropy_matches_torch():
    s, y = logits(18), torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cross_entropy(s, y), F.cross_entropy(s, y, reduction="none"))
    torch.testing.assert_close(cross_entropy(s, y), -torch.log_softmax(s, -1)[torch.arange(N), y])


def test_with_tail_adds_outside_mass():
    full = torch.randn(N, 50, generator=torch.Generator().manual_seed(1)) * 2
    kept = full[:, :K]
    lse = torch.logsumexp(full, -1)
    got = with_tail(kept.half(), lse)
    assert got.shape == (N, K + 1)
    p_full = torch.softmax(full.double(), -1)
    expected = torch.cat([p_full[:, :K], p_full[:, K:].sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(got.exp().double(), expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(N))


def test_with_tail_is_stable_at_both_extremes():
    # Kept set holds nearly all mass (tail ~ 1e-30) and nearly none (tail ~ 1).
    kept = torch.tensor([[0.0, -2.0, -4.0], [-80.0, -81.0, -82.0]])
    lse = torch.stack([torch.logsumexp(kept[0], 0), torch.tensor(0.0)])
    got = with_tail(kept, lse)
    assert torch.isfinite(got[1]).all()
    assert got[1, 3].item() == pytest.approx(0.0, abs=1e-6)
    assert got[0, 3].item() < -30  # no mass outside, and no NaN
    assert not torch.isnan(got).any()
    # Rounding that makes the kept mass exceed the full lse is clamped, not NaN.
    assert torch.isfinite(with_tail(kept[:1], lse[:1] - 1e-3)[0, :3]).all()


@pytest.mark.parametrize("kind, expected", [
    ("cosine", (0.9, 0.5, 0.1)),
    ("linear", (0.9, 0.5, 0.1)),
    ("constant", (0.9, 0.9, 0.9)),
    ("step", (0.9, 0.9 - 0.8 * 2 / 3, 0.1)),  # 4 stages: 0.9, 0.633, 0.367, 0.1; progress 0.5 is stage 2
])
def test_curriculum_weights(kind, expected):
    got = tuple(curriculum_weight(kind, p) for p in (0.0, 0.5, 1.0))
    assert got == pytest.approx(expected)


def test_curriculum_shapes():
    assert curriculum_weight("cosine", 0.25) == pytest.approx(0.1 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert curriculum_weight("step", 0.24) == pytest.approx(0.9)
    assert curriculum_weight("step", 0.26) == pytest.approx(0.9 - 0.8 / 3)
    assert curriculum_weight("cosine", 1.7) == pytest.approx(0.1)  # progress clamped
    assert set(CURRICULA) == {"cosine", "linear", "constant", "step"}
    with pytest.raises(ValueError, match="cosine, linear, constant, step"):
        curriculum_weight("exp", 0.5)


def test_taid_schedules():
    assert taid_lambda(0.0) == pytest.approx(0.1) and taid_lambda(0.5) == pytest.approx(0.55) and taid_lambda(1.0) == 1.0
    assert taid_lambda(-1.0) == pytest.approx(0.1) and taid_lambda(2.0) == 1.0  # progress is clamped


def distill_loss(s, t, target, mask, w_div, **kw):
    """output_sums weighed by total_loss: the training loss without a hidden-state term."""
    parts = output_sums(s, t, target, mask, **kw)
    return {**parts, "loss": total_loss(parts, w_div)}


def test_distill_loss_hand_computed():
    # Two rows of three positions over K=2; the last position of row 1 is padding.
    s = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [0.0, 0.0], [9.0, -9.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0], [-math.inf, -math.inf]]])
    target = torch.tensor([[0, 1, 1], [1, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  p(first of two) = sigmoid(difference)
    kl = lambda a, b: a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))  # noqa: E731
    kl_sum = 0 + kl(0.5, sig(1)) + 0 + 0 + kl(sig(1), 0.5)
    ce_sum = -math.log(0.5) - math.log(1 - sig(1)) - math.log(1 - sig(-2)) - math.log(1 - sig(-1)) - math.log(0.5)
    out = distill_loss(s, t, target, mask, 0.9)
    assert out["n"] == 5
    assert out["divergence_sum"].item() == pytest.approx(kl_sum, rel=1e-5)
    assert out["ce_sum"].item() == pytest.approx(ce_sum, rel=1e-5)
    assert out["loss"].item() == pytest.approx((0.9 * kl_sum + 0.1 * ce_sum) / 5, rel=1e-5)
    # Text-only shards: CE alone, whatever w_kl is.
    ce_only = distill_loss(s, None, target, mask, 0.9)
    assert ce_only["divergence_sum"].item() == 0.0 and ce_only["loss"].item() == pytest.approx(ce_sum / 5, rel=1e-5)


def test_distill_loss_gradient_ignores_padding_and_dispatches():
    s = logits(19).requires_grad_()
    t, y = logits(20), torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([True, True, False, True, False, True])
    t_padded = t.clone()
    t_padded[~mask] = -math.inf  # whatever sits at padding must not reach the loss or its gradient
    out = distill_loss(s, t_padded, y, mask, 0.5, divergence="jsd", beta=0.3, T=2.0)
    out["loss"].backward()
    assert torch.isfinite(s.grad).all() and (s.grad[~mask] == 0).all()
    kl_sum = generalized_jsd(s[mask], t[mask], beta=0.3, T=2.0).sum()
    expected = (0.5 * kl_sum + 0.5 * cross_entropy(s[mask], y[mask]).sum()) / 4
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(distill_loss(s, t, y, mask, 1.0, divergence="taid", lam=0.3)["divergence_sum"],
                               taid(s[mask], t[mask], lam=0.3).sum())
    with pytest.raises(ValueError, match="needs lam"):
        distill_loss(s, t, y, mask, 0.5, divergence="taid")
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd, skew_kl, taid"):
        distill_loss(s, t, y, mask, 0.5, divergence="kl")
    with pytest.raises(ValueError, match="K\\+1"):
        distill_loss(s, with_tail(t, torch.logsumexp(t, -1) + 1), y, mask, 0.5)
    assert distill_loss(s, t, y, torch.zeros(N, dtype=torch.bool), 0.5)["loss"].item() == 0.0


def test_hidden_state_term_is_a_mean_squared_error_added_by_total_loss():
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    target = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 0.5]])
    sums = hidden_state_sums(pred, target)
    assert sums["hidden_n"] == 6
    assert sums["hidden_sum"].item() == pytest.approx(0 + 4 + 1 + 1 + 4 + 0)
    parts = {"divergence_sum": torch.tensor(3.0), "ce_sum": torch.tensor(1.0), "n": 2, **sums}
    # (0.25·3 + 0.75·1) / 2 per token, plus 2·10/6 per hidden dimension
    assert total_loss(parts, 0.25, hidden_weight=2.0).item() == pytest.approx(0.75 + 2 * 10 / 6)
    assert total_loss(parts, 0.25, hidden_weight=0.0).item() == pytest.approx(0.75)
    without = {k: v for k, v in parts.items() if not k.startswith("hidden")}
    assert total_loss(without, 0.25, hidden_weight=2.0).item() == pytest.approx(0.75)
