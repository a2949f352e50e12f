"""Gumbel-sigmoid (binary concrete) gate: a binary compute/skip mask with a usable gradient.

For a logit l and temperature tau, the relaxed sample is

    y_soft = sigmoid((l + L) / tau),    L = log u - log(1 - u),  u ~ U(0, 1)

where L is LOGISTIC noise (the difference of two Gumbel samples). Then P(y_soft > 1/2) =
P(L > -l) = sigmoid(l): the hard mask is a Bernoulli(sigmoid(l)) draw. (Adding one Gumbel
sample instead, as the studied code did, biases P(mask = 1) to 0.632 at l = 0.)

Straight-through: the forward value is the hard mask (exactly 0.0 or 1.0), the backward uses
the gradient of y_soft. In eval mode there is no noise: the mask is l > 0, deterministic.
The noise comes from torch's global RNG, so `torch.manual_seed` fixes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["gumbel_sigmoid", "GumbelSigmoidGate"]


def _check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (
            math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau={tau!r} must be a positive finite number (the gate temperature)")
    return float(tau)


def gumbel_sigmoid(logits: torch.Tensor, tau: float = 1.0, *, hard: bool = True,
                   noise: bool = True, force: torch.Tensor | None = None) -> torch.Tensor:
    """Binary-concrete sample of `logits` (any shape), same shape and dtype.

    hard: return the straight-through hard mask (forward exactly 0/1, backward d y_soft);
        otherwise the relaxed y_soft itself.
    noise: add logistic noise (training); without it the sample is sigmoid(logits / tau).
    force: optional 0/1 tensor of the logits' shape that replaces the hard forward value while
        keeping the straight-through gradient (benchmarks, ablations): the mask then follows
        exactly the code path of a learned one.
    """
    tau = _check_tau(tau)
    if noise:
        u = torch.rand_like(logits)
        # u = 0 (probability 2^-24 per draw in float32) gives L = -inf: y_soft = 0 with a zero
        # gradient, which is the correct limit, so no clamp is needed.
        pre = (logits + (torch.log(u) - torch.log1p(-u))) / tau
    else:
        pre = logits / tau
    y_soft = torch.sigmoid(pre)
    if not hard:
        return y_soft
    if force is not None:
        if force.shape != logits.shape:
            raise ValueError(f"force has shape {tuple(force.shape)}, expected the logits' shape "
                             f"{tuple(logits.shape)}")
        y_hard = force.to(dtype=logits.dtype)
    else:
        # y_soft > 1/2  <=>  pre > 0; testing the pre-sigmoid value avoids rounding at 1/2
        y_hard = (pre > 0).to(logits.dtype)
    # y_hard + (y_soft - y_soft.detach()): forward is exactly y_hard (x - x == 0 in floating
    # point, unlike y_hard - y_soft.detach() + y_soft), backward is d y_soft.
    return y_hard + (y_soft - y_soft.detach())


class GumbelSigmoidGate(nn.Module):
    """Turns per-position logits (B, N) into a straight-through binary mask (B, N).

    Noise in training mode only. `tau` may be changed at any step (annealing).
    """

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.tau = tau

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._tau = _check_tau(value)

    def forward(self, logits: torch.Tensor, force: torch.Tensor | None = None) -> torch.Tensor:
        return gumbel_sigmoid(logits, self._tau, hard=True, noise=self.training, force=force)

    def extra_repr(self) -> str:
        return f"tau={self._tau}"
