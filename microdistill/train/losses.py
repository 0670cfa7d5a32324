"""Distillation losses over the kept output vocabulary, and the curricula that mix them.

    python -m pytest tests/test_losses.py -q

Every divergence is a pure function of student logits s [N, K] and teacher logits t [N, K]
(float16 from a shard is cast to float32 here) returning one value per position [N], already
multiplied by T² so that its gradient keeps the same scale whatever the temperature (Hinton et
al. 2015, "Distilling the Knowledge in a Neural Network", §2). With p = softmax(t / T) the
teacher and q = softmax(s / T) the student:

    forward_kl   KL(p ‖ q)                                   mass-covering
    reverse_kl   KL(q ‖ p)                                   mode-seeking
    jsd          β·KL(p ‖ m) + (1-β)·KL(q ‖ m),  m = β·p + (1-β)·q     (TRL's GKD convention)
    skew_kl      KL(p ‖ α·p + (1-α)·q)                        (DistiLLM's skew forward KL)
    taid         KL(p_λ ‖ q),  p_λ = softmax((1-λ)·sg(s/T) + λ·t/T)     (TAID)

`output_sums` and `hidden_state_sums` return sums and counts; `total_loss` weighs them into
the training loss, and is the one division of the whole loss computation.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from microdistill.train.config import CURRICULA


# Log-probabilities are floored here: e^-10000 is 0 in every float type, so no value changes,
# but masked (-inf) logits can no longer form -inf - -inf = NaN, whose gradient stays NaN even
# where a product with p = 0 hides the value. A student with no mass where the teacher has some
# gets a large finite divergence instead of inf.
LOG_FLOOR = -1.0e4


def _log_probs(logits: Tensor, T: float) -> Tensor:
    """log softmax(logits / T) over the last axis, in at least float32: [N, K] -> [N, K]."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.log_softmax(x / T, dim=-1).clamp(min=LOG_FLOOR)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_k p_k (log p_k - log q_k) over the last axis: [N, K] x2 -> [N]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(s: Tensor, t: Tensor, T: float = 1.0) -> Tensor:
    """T²·KL(p_t^T ‖ p_s^T) per position: s, t [N, K] -> [N]."""
    return T * T * _kl(_log_probs(t, T), _log_probs(s, T))


def reverse_kl(s: Tensor, t: Tensor, T: float = 1.0) -> Tensor:
    """T²·KL(p_s^T ‖ p_t^T) per position: s, t [N, K] -> [N]."""
    return T * T * _kl(_log_probs(s, T), _log_probs(t, T))


def generalized_jsd(s: Tensor, t: Tensor, beta: float = 0.5, T: float = 1.0) -> Tensor:
    """T²·JSD_β per position: s, t [N, K] -> [N] (Agarwal et al. 2024, "On-Policy Distillation
    of Language Models", Eq. 1, with the conventions of TRL's `GKDTrainer.generalized_jsd_loss`).

        m = β·p_t + (1-β)·p_s,   JSD_β = β·KL(p_t ‖ m) + (1-β)·KL(p_s ‖ m)

    As β -> 0, JSD_β / β -> KL(p_t ‖ p_s), and as β -> 1, JSD_β / (1-β) -> KL(p_s ‖ p_t); like TRL,
    the end points themselves return those limits: β = 0 is forward KL and β = 1 reverse KL.
    TRL does not multiply by T²; we do, as for every divergence here.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(s, t, T)
    if beta == 1.0:
        return reverse_kl(s, t, T)
    log_p, log_q = _log_probs(t, T), _log_probs(s, T)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return T * T * (beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m))


def skew_kl(s: Tensor, t: Tensor, alpha: float = 0.1, T: float = 1.0) -> Tensor:
    """T²·KL(p_t ‖ α·p_t + (1-α)·p_s) per position: s, t [N, K] -> [N] (Ko et al. 2024,
    "DistiLLM", §3.1, skew forward KL). Mixing a little teacher into the student keeps the
    divergence finite where the student puts no mass; α = 0 is forward KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_kl alpha must be in [0, 1), got {alpha}")
    log_p, log_q = _log_probs(t, T), _log_probs(s, T)
    log_m = log_q if alpha == 0.0 else torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
    return T * T * _kl(log_p, log_m)


def taid(s: Tensor, t: Tensor, lam: float, T: float = 1.0) -> Tensor:
    """T²·KL(p_λ ‖ p_s^T) per position: s, t [N, K] -> [N] (Shing et al. 2025, "TAID:
    Temporally Adaptive Interpolated Distillation", §3, and its official code).

        p_λ = softmax((1-λ)·stopgrad(s/T) + λ·t/T)

    The paper interpolates logits; interpolating log-probabilities gives the same p_λ because
    log_softmax only shifts each row by a constant that softmax removes. λ = 1 is forward KL;
    λ grows over training (`taid_lambda`) so the target moves from near the student to the teacher.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"taid lam must be in [0, 1], got {lam}")
    log_q = _log_probs(s, T)
    log_p_lam = _log_probs((1.0 - lam) * log_q.detach() + lam * _log_probs(t, T), 1.0)
    return T * T * _kl(log_p_lam, log_q)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "taid": taid,
}


def with_tail(t_kept_logits: Tensor, t_lse_full: Tensor) -> Tensor:
    """Teacher log-probs over K+1 classes, class K being the mass outside the kept set.

    t_kept_logits [N, K] (raw logits of the kept tokens), t_lse_full [N] (log-sum-exp over the
    full vocabulary) -> [N, K+1]. With a = logsumexp_k(t_k) - lse = log(kept mass) <= 0, the tail
    is log(1 - e^a), computed as log(-expm1(a)) near a = 0 and log1p(-e^a) below -ln 2
    (Mächler 2012, "Accurately computing log(1 - exp(-|a|))"). Rounding in the float16 logits can
    push a above 0; it is clamped, and a final log_softmax renormalises the K+1 classes.
    Use the result as the teacher logits of any divergence, with a student of K+1 outputs.
    """
    t = t_kept_logits.float()
    log_p = t - t_lse_full.float()[:, None]
    a = torch.logsumexp(log_p, dim=-1).clamp(max=0.0)
    near_zero = a > -math.log(2.0)
    tail = torch.where(near_zero, torch.log(-torch.expm1(a.clamp(min=-math.log(2.0)))),
                       torch.log1p(-torch.exp(a.clamp(max=-math.log(2.0)))))
    return F.log_softmax(torch.cat([log_p, tail[:, None]], dim=-1), dim=-1)


def cross_entropy(s: Tensor, target: Tensor) -> Tensor:
    """-log p_s(target) per position: s [N, K], target [N] (int) -> [N]."""
    return F.cross_entropy(s.to(torch.promote_types(s.dtype, torch.float32)), target, reduction="none")


def curriculum_weight(kind: str, progress: float, start: float = 0.9, end: float = 0.1, steps: int = 4) -> float:
    """Weight w_div of the divergence at training progress in [0, 1] (CE gets 1 - w_div).

    cosine:   end + (start - end)·(1 + cos(π·progress))/2   (the seed's 0.9 -> 0.1)
    linear:   start + (end - start)·progress
    constant: start
    step:     `steps` equal stages, stage i in 0..steps-1 at start + (end - start)·i/(steps - 1)
    """
    p = min(max(float(progress), 0.0), 1.0)
    if kind == "cosine":
        return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0
    if kind == "linear":
        return start + (end - start) * p
    if kind == "constant":
        return start
    if kind == "step":
        if steps < 1:
            raise ValueError(f"step curriculum needs steps >= 1, got {steps}")
        if steps == 1:
            return start
        stage = min(int(p * steps), steps - 1)
        return start + (end - start) * stage / (steps - 1)
    raise ValueError(f"unknown curriculum {kind!r}; choose one of {', '.join(CURRICULA)}")


def taid_lambda(progress: float, start: float = 0.1, end: float = 1.0) -> float:
    """TAID's interpolation λ rising linearly from `start` to `end` over training: the schedule
    of TAID without its adaptive term, and the floor the adaptive update never goes below."""
    p = min(max(float(progress), 0.0), 1.0)
    return start + (end - start) * p


def output_sums(s: Tensor, t: Tensor | None, target: Tensor, mask: Tensor, *, divergence: str = "forward_kl",
                T: float = 1.0, beta: float = 0.5, alpha: float = 0.1, lam: float | None = None) -> dict[str, Tensor | int]:
    """The per-token terms summed over the output positions selected by mask.

    s [..., K] student logits, t [..., K] teacher logits or None (text-only shards: CE only),
    target [...] kept-vocabulary indices, mask [...] bool; any matching leading shape.
    Returns {"divergence_sum": Σ T²·D(p_t^T ‖ p_s^T) (0 without teacher logits), "ce_sum": Σ -log
    p_s(teacher's token), "n": the number of positions, "teacher": whether t was given}. The divergence is taken at temperature
    T, the cross-entropy at T = 1.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    K = s.shape[-1]
    keep = mask.reshape(-1).bool()
    # Select before computing: padded rows (possibly all -inf) then never reach the maths.
    s_k, y_k = s.reshape(-1, K)[keep], target.reshape(-1)[keep]
    n = int(keep.sum())
    ce_sum = cross_entropy(s_k, y_k).sum()
    if t is None:
        return {"divergence_sum": ce_sum.new_zeros(()), "ce_sum": ce_sum, "n": n, "teacher": False}
    t_k = t.reshape(-1, t.shape[-1])[keep]
    if t_k.shape[-1] != K:
        raise ValueError(f"teacher has {t_k.shape[-1]} classes but the student {K}; with a tail class both need K+1")
    extra = {"jsd": {"beta": beta}, "skew_kl": {"alpha": alpha}, "taid": {"lam": lam}}.get(divergence, {})
    if divergence == "taid" and lam is None:
        raise ValueError("divergence 'taid' needs lam (see taid_lambda)")
    return {"divergence_sum": DIVERGENCES[divergence](s_k, t_k, T=T, **extra).sum(), "ce_sum": ce_sum, "n": n,
            "teacher": True}


def hidden_state_sums(pred: Tensor, target: Tensor) -> dict[str, Tensor | int]:
    """Squared error of a probe's prediction of the teacher's hidden state, summed: pred,
    target [B, H] -> {"hidden_sum": Σ (pred - target)², "hidden_n": B·H}."""
    return {"hidden_sum": F.mse_loss(pred, target, reduction="sum"), "hidden_n": target.numel()}


def total_loss(parts: dict[str, Tensor | int], w_div: float, hidden_weight: float = 0.0) -> Tensor:
    """The training loss from the sums of `output_sums` (and `hidden_state_sums`), and the one
    place where sums become means:

        (w_div·divergence_sum + (1 - w_div)·ce_sum) / n  +  hidden_weight·hidden_sum / hidden_n

    per output token, plus the hidden-state term per hidden dimension. n = 0 gives 0. Without
    teacher logits (text-only shards) the output term is CE alone, whatever w_div is.
    """
    w_div = w_div if parts.get("teacher", True) else 0.0
    loss = (w_div * parts["divergence_sum"] + (1.0 - w_div) * parts["ce_sum"]) / max(parts["n"], 1)
    if "hidden_sum" in parts:
        loss = loss + hidden_weight * (parts["hidden_sum"] / parts["hidden_n"])
    return loss
