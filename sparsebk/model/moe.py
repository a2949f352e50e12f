"""Mixture-of-experts feed-forward block with top-k routing and a Switch-style balance loss.

    p = softmax(router(x))                          (M, E)
    y_t = sum_{e in topk(p_t)} p_t,e * FFN_e(x_t)   (M, D)

The router probability multiplies the expert output, so the router gets a gradient from the
task loss even at top-1 (with the bare argmax it would get none). The probabilities are not
renormalised over the chosen k: at top-1 a renormalised weight is the constant 1.

Dispatch: token-expert pairs are sorted by expert; each expert runs once, on its own
contiguous slice. The slice sizes are read on the host (one sync per call, inherent to
dynamic routing). There is no capacity limit: dropping tokens over capacity would make a
token's output depend on other tokens of the batch, including later positions (not causal).

An expert that gets no tokens still runs, on an empty slice: its weights stay in the autograd
graph and receive a zero gradient, so DDP needs no `find_unused_parameters`.

Balance loss (Switch Transformer): aux = E * sum_e f_e * P_e, with f_e the fraction of
token-expert assignments sent to e (not differentiable) and P_e the mean router probability
of e. It equals 1 for a perfectly uniform router and grows as routing collapses.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsebk.validation import check_int

__all__ = ["MoEFFN"]


class ExpertFFN(nn.Module):
    """One expert: D -> F -> D with GELU."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MoEFFN(nn.Module):
    """forward(x (M, D)) -> (y (M, D), aux_loss 0-dim). Tokens are independent rows.

    `forward` checks x's shape; `mix` is the same computation without the check, for a caller
    that built x itself (the sparse layer, whose input was checked once per step upstream).
    """

    def __init__(self, d_model: int, num_experts: int = 4, top_k: int = 1, d_ff: int | None = None):
        super().__init__()
        self.d_model = check_int("d_model", d_model, min=1)
        self.num_experts = check_int("num_experts", num_experts, min=1)
        self.top_k = check_int("top_k", top_k, min=1)
        if top_k > num_experts:  # a relation of two fields: both named, with their values
            raise ValueError(f"top_k={top_k} must not exceed num_experts={num_experts}")
        self.d_ff = check_int("d_ff", 4 * d_model if d_ff is None else d_ff, min=1)
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(ExpertFFN(d_model, self.d_ff) for _ in range(num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (M, E) (float32 at least), chosen weights (M, k) and experts (M, k)."""
        logits = self.router(x)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # a softmax over experts in half precision rounds the weights
        probs = torch.softmax(logits, dim=-1)
        top_p, top_e = probs.topk(self.top_k, dim=-1)
        return probs, top_p, top_e

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """token_mask: optional bool (M,); only those tokens count in the balance loss (the
        dense reference of the sparse layer runs every token but balances the computed ones)."""
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoEFFN expects tokens of shape (M, {self.d_model}), got {tuple(x.shape)}")
        return self.mix(x, token_mask)

    def mix(self, x: torch.Tensor, token_mask: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` without the shape check: x (M, D) is trusted."""
        m, k, n_exp = x.shape[0], self.top_k, self.num_experts
        probs, top_p, top_e = self.route(x)  # (M, E), (M, k), (M, k)

        flat_e = top_e.reshape(-1)  # (M k,) assignment a belongs to token a // k
        order = torch.argsort(flat_e, stable=True)
        token_of = order // k  # (M k,) token of each sorted assignment
        counts_t = torch.bincount(flat_e, minlength=n_exp)  # (E,)
        counts = counts_t.tolist()  # the one host sync: slice sizes

        xs = x.index_select(0, token_of)  # (M k, D), grouped by expert
        outs = []
        start = 0
        for expert, c in zip(self.experts, counts):
            outs.append(expert(xs[start:start + c]))  # an empty slice keeps the expert in the graph
            start += c
        ys = torch.cat(outs, dim=0) * top_p.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
        y = x.new_zeros(m, self.d_model).index_add(0, token_of, ys)  # (M, D)

        if token_mask is None:
            denom = max(m, 1)  # an empty batch gives aux = 0, still attached to the router
            frac = counts_t.to(probs.dtype) / (denom * k)  # (E,)
            mean_p = probs.sum(dim=0) / denom  # (E,)
        else:
            w = token_mask.to(probs.dtype)  # (M,)
            denom = w.sum().clamp_min(1.0)
            frac = torch.bincount(flat_e, weights=w.repeat_interleave(k), minlength=n_exp) / (denom * k)
            mean_p = (probs * w.unsqueeze(-1)).sum(dim=0) / denom
        aux = n_exp * (frac * mean_p).sum()
        return y, aux

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, d_ff={self.d_ff}"
