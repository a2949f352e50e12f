"""Gumbel-sigmoid (binary concrete) gate: a binary compute/skip mask with a usable gradient.

For a logit l and temperature tau, the relaxed sample is

    y_soft = sigmoid((l + L) / tau),    L = log u - log(1 - u),  u ~ U(0, 1)

where L is LOGISTIC noise (the difference of two Gumbel samples). Then P(y_soft > 1/2) =
P(L > -l) = sigmoid(l): the hard mask is a Bernoulli(sigmoid(l)) draw. (Adding one Gumbel
sample instead, as the studied code did, biases P(mask = 1) to 0.632 at l = 0.)

Straight-through: the forward value is the hard mask (exactly 0.0 or 1.0), the backward uses
the gradient of y_soft. The noise comes from torch's global RNG, so `torch.manual_seed` fixes it.

`train_noise="none"` drops the random draw in training too: the training mask is then
l > 0, the "threshold" eval mask, so training and eval decide the same way (a Mixture-of-Depths
router's choice), and the sparsity loss, which reads the hard forward value, sees the rate
that eval gets. The gradient is still that of sigmoid(l / tau).

Eval mode is deterministic (no random draw), in one of two ways:

- "quasi" (default): the random L is replaced by a fixed per-position offset
  L_i = log u_i - log(1 - u_i) with u_i = frac((i + 1) / phi), the golden-ratio low-discrepancy
  sequence along the last dim. The mask is a deterministic function of (l_i, i), so it stays
  causal, and over many positions the fraction computed is mean(sigmoid(l)): the rate the
  network was trained with. Where the logits are decisive (|l| >> 1) it equals l > 0.
- "threshold": the mask is l > 0.

Why not only the threshold: the sparsity loss pulls mean(sigmoid(l)) to the target, which a
layer satisfies with logits close to one constant. Measured on the debug LM (40 steps, target
0.4): logits of one layer at 1.1 +- 0.1 gave a training sparsity of 0.24 and an eval (l > 0)
sparsity of 0.00; another layer moved from 0.93 to 0.02 eval sparsity while its training
sparsity went from 0.62 to 0.36. The quasi offsets make eval sparsity follow training sparsity.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from sparsebk.validation import check_choice, check_float, field_error

__all__ = ["gumbel_sigmoid", "GumbelSigmoidGate", "quasi_logistic_offsets", "NOISE_MODES",
           "EVAL_MODES", "TRAIN_NOISES"]

NOISE_MODES = ("random", "quasi", "none")
EVAL_MODES = ("quasi", "threshold")
TRAIN_NOISES = ("random", "none")  # the training draw: logistic noise, or none (mask = l > 0)
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # 1 / golden ratio: the most uniform 1-D Kronecker step


def quasi_logistic_offsets(n: int, *, start: int = 0, device=None, dtype=torch.float32
                           ) -> torch.Tensor:
    """(n,) deterministic logistic "noise": logit(frac((i + 1) / phi)) for i = start..start+n-1
    (the offsets of absolute positions: a decoder continuing at `start` gets the forward's).

    The u_i fill (0, 1) evenly (any n consecutive ones leave gaps of at most three sizes), so
    for a logit l the fraction of positions with l + L_i > 0 is sigmoid(l) up to O(1/n).
    Computed in float64 (frac of large multiples), then cast; u_i is never 0 or 1 (phi is
    irrational), so every offset is finite.
    """
    i = torch.arange(start + 1, start + n + 1, dtype=torch.float64, device=device)
    u = torch.frac(i * _INV_PHI)
    return (torch.log(u) - torch.log1p(-u)).to(dtype)


def _noise_mode(noise) -> str:
    if noise is True:
        return "random"
    if noise is False:
        return "none"
    if noise not in NOISE_MODES:
        raise field_error("noise", noise, f"must be True/False or one of {NOISE_MODES}")
    return noise


def _check_tau(tau: float) -> float:
    return check_float("tau", tau, min=0.0, min_open=True)


def gumbel_sigmoid(logits: torch.Tensor, tau: float = 1.0, *, hard: bool = True,
                   noise: bool | str = True, force: torch.Tensor | None = None) -> torch.Tensor:
    """Binary-concrete sample of `logits` (any shape), same shape and dtype.

    hard: return the straight-through hard mask (forward exactly 0/1, backward d y_soft);
        otherwise the relaxed y_soft itself.
    noise: True or "random": add random logistic noise (training); "quasi": add the fixed
        per-position offsets `quasi_logistic_offsets` along the last dim (deterministic eval);
        False or "none": no noise, the sample is sigmoid(logits / tau) and the mask logits > 0.
    force: optional 0/1 tensor of the logits' shape that replaces the hard forward value while
        keeping the straight-through gradient (benchmarks, ablations): the mask then follows
        exactly the code path of a learned one.
    """
    tau = _check_tau(tau)
    mode = _noise_mode(noise)
    if mode == "random":
        u = torch.rand_like(logits)
        # u = 0 (probability 2^-24 per draw in float32) gives L = -inf: y_soft = 0 with a zero
        # gradient, which is the correct limit, so no clamp is needed.
        pre = (logits + (torch.log(u) - torch.log1p(-u))) / tau
    elif mode == "quasi":
        if logits.dim() == 0:
            raise ValueError("noise='quasi' needs logits with a position dim (..., N), got a 0-dim tensor")
        pre = (logits + quasi_logistic_offsets(logits.shape[-1], device=logits.device,
                                               dtype=logits.dtype)) / tau
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

    In training mode `train_noise` decides: "random" (logistic noise, the default) or "none"
    (logits > 0). In eval mode `eval_mode` decides: "quasi" (fixed per-position offsets, the
    default) or "threshold" (logits > 0); both are deterministic and causal. `tau` may be
    changed at any step (annealing).
    """

    def __init__(self, tau: float = 1.0, eval_mode: str = "quasi", train_noise: str = "random"):
        super().__init__()
        self.tau = tau
        self.eval_mode = eval_mode
        self.train_noise = check_choice("train_noise", train_noise, TRAIN_NOISES)

    @property
    def eval_mode(self) -> str:
        return self._eval_mode

    @eval_mode.setter
    def eval_mode(self, value: str) -> None:
        self._eval_mode = check_choice("eval_mode", value, EVAL_MODES)

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._tau = _check_tau(value)

    def forward(self, logits: torch.Tensor, force: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            noise = self.train_noise
        else:
            noise = "quasi" if self._eval_mode == "quasi" else "none"
        return gumbel_sigmoid(logits, self._tau, hard=True, noise=noise, force=force)

    def eval_keep(self, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The eval-mode decision (bool, 1 = compute) of logits (..., T) at absolute positions
        start..start+T-1: the forward's comparison on the same values, for a decoder that
        continues a sequence."""
        pre = logits
        if self._eval_mode == "quasi":
            pre = logits + quasi_logistic_offsets(logits.shape[-1], start=start,
                                                  device=logits.device, dtype=logits.dtype)
        return pre / self._tau > 0

    def extra_repr(self) -> str:
        return f"tau={self._tau}, eval_mode={self._eval_mode!r}, train_noise={self.train_noise!r}"
