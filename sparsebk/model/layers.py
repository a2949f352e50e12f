"""Sparse BK layer: a learned per-position mask decides where the expensive work happens.

    mask  = GumbelSigmoid(predictor(x))                       (B, N)  1 = compute, 0 = skip
    h_c   = MoE(x_c)                                          (M, D)  computed positions only
    v     = scatter(v_proj(h_c)), 0 at skipped positions      (B, N, H)  one potential per head
    b     = scatter(2 sigmoid(c_proj(h_c))), 1 at skipped     (B, N, H)  input couplings (option)
    g_h   = BK-core on H0 + diag(v_h) at shift z_h            (B, N)  complex, per head h
    f     = [Re g_1, Im g_1, ..., Re g_H, Im g_H]             (B, N, 2H) features
    y_i   = mask_i * (h_i + W_out f_i + b_out)                at a computed position i
    y_i   = W_out f_j + b_out                                 at a skipped position i

where f_j are the BK features of j, the last computed position at or before i (zero features
when there is none): a causal carry-forward, left neighbours only. A skipped position therefore
costs no expert FFN and no projection: its output is a row copy of an already projected row.
The BK-core runs over the whole sequence because it is a cheap O(N) scalar chain; skipping
inside it would save nothing.

What a skipped position outputs is the option `skip_output`:

    "carry" (above)  y_i = W_out f_j + b_out      a stale row: the features of an earlier position
    "own"            y_i = W_out f_i + b_out      its own BK features (v_i = 0, coupling 1): what
                                                  the chain carries to i from every computed
                                                  position before it, for one 2H -> D projection
    "zero"           y_i = 0                      Mixture-of-Depths: the residual stream only
    "mix"            y_i = W_out f_i + b_out      "own", and the skipped position still writes
                     v_i = W_s x_i                into the chain: its potentials come from a
                                                  linear map of its input (no expert)
    "light"          h_i = FFN_light(x_i)         a small FFN (D -> light_d_ff -> D) stands in
                     y_i = h_i + W_out f_i + b_out for the experts, and h_i feeds the potential
                                                  and coupling as an expert output does

"own" costs a (2H x D) projection per skipped position (against the expert FFN's 2 x D x 4D
and the v projection it still skips); the BK features of every position exist anyway. "mix"
adds a (D x H) projection: a skipped position is then a linear BK mixing layer, and only the
expert FFN is what the gate decides on. "light" is the two-branch layout of CoLT5 (Ainslie et
al. 2023), with the gate choosing the branch: a skipped position runs a light FFN whose width
defaults to D / 4 (a sixteenth of a 4D expert's multiply-adds) instead of the expert FFN, and
is otherwise a computed position. With `gate_weight` the gate is then a top-1 router over two
experts: h_i = (1 - sigmoid(l_i)) FFN_light(x_i) at a skipped position, so the logit gets a
task gradient there too. A dense model (every gate open) never runs the light FFN.

The gate and the BK mixing, multi-channel options included (`bk_heads`, `bk_learn_z`,
`bk_input_couplings`: H heads, learnt shifts, off-diagonals from the layer's `coupling_proj`),
are the layer's `SparseBKCore` (sparsebk.model.sparse_bk_core, whose docstring has their equations).

The mask is straight-through (exactly 0/1 forward): multiplying the computed outputs by it
hands the task gradient to the importance predictor, and the sparsity loss is built from the
same live mask. (At a skipped position the computed output does not exist, so its logit gets
the sparsity-loss gradient only, as with tokens that bypass a block in Mixture-of-Depths.)

What the task gradient tells the gate at a computed position is the option `gate_grad`:

    "scale"     y_i = m_i (h_i + W_out f_i + b_out)              dL/dm_i = <g_i, y_i>
    "contrast"  y_i = m_i (h_i + W_out f_i + b_out) + (1 - m_i) s_i
                                                                 dL/dm_i = <g_i, y_i - s_i>

where s_i is what position i outputs when skipped (the carried row of the last computed j < i
for "carry", its own projected features for "own"/"mix", 0 for "zero"). The forward values
are the same (m_i is exactly 1 there). "scale" only asks whether a larger output would help;
"contrast" asks whether computing beats skipping, the straight-through estimate of the
choice the gate makes. (Measured, `sparsebk bench gates`: with "scale" the trained gates
skip no better than random masks of the same rate.) For "carry" s_i is the exact
counterfactual (the carried row does not depend on i); for "own"/"mix" it uses the features
of i as computed (skipping i would also change its potential).

`gate_weight=True` scales the expert output of a computed position by the gate's
probability of computing it, as a Mixture-of-Experts router weighs its experts and a
Mixture-of-Depths router its block:

    h_i = sigmoid(l_i) MoE(x_i)                     l_i the gate logit of position i

This changes the forward values (h then feeds the potentials, couplings and output), and it
gives the gate a task gradient at every computed position, sigmoid'(l_i) <dL/dh_i, MoE(x_i)>:
how much the expert's work helps there. A token whose expert output the model turns down
costs little to skip, so what training sees and what skipping removes agree. In eval and
decoding the weight is the same function of the same logit.

`use_sparse_computation=False` computes every position densely and selects with the mask:
the same outputs (to rounding) at full cost; it is the reference the sparse path is tested
against. Host syncs: the sparse path reads the number of computed positions (one sync per
layer) and the MoE reads its per-expert counts (one more): dynamic sparsity needs both.

Two entry points compute the same thing. `forward_parts(x)` returns (y, mask, aux_loss) and
stores nothing; it trusts x's shape (the LM checks its tokens once per step). `layer(x)` is the
seed API: it checks x, returns y alone and remembers the mask and aux loss of that call, which
is all the seed's getters (`get_sparsity_loss()`, `get_balanced_loss()`, `get_sparsity_stats()`)
have to read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from sparsebk.model.config import (GATE_GRADS, SKIP_OUTPUTS, LMConfig, check_gate_grad,
                                   light_width)
from sparsebk.model.moe import ExpertFFN, MoEFFN
from sparsebk.model.sparse_bk_core import Z_IM_RANGE, SparseBKCore
from sparsebk.model.sparsity import LOSS_TYPES, balanced_sparsity_loss, sparsity_loss
from sparsebk.validation import check_bool, check_choice, check_float, check_int


__all__ = ["LayerOutput", "SparseBKCore", "SparseMoEResNetBKLayer", "get_sparsity_loss",
           "get_balanced_loss", "get_sparsity_stats"]


def _put_rows(base: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """base (R, ...) with rows (M, ...) written at the indices idx (M,), in the dtype both
    promote to: what the dense path's `torch.where(keep, rows, base)` gives. Under CUDA
    autocast a projection's rows are bfloat16 while a base of zeros or ones is float32, and
    CUDA's index_copy, unlike the CPU's under autocast, refuses mixed dtypes."""
    dtype = torch.promote_types(base.dtype, rows.dtype)
    return base.to(dtype).index_copy(0, idx, rows.to(dtype))


@dataclass
class LayerState:
    """What a layer remembers to continue its causal outputs (eval mode): constant in the
    context. A fresh state has k_prev = 0 and alpha = 1, so the first position's
    alpha_0 = s_0 - 0 / 1 = s_0 exactly."""

    alpha: torch.Tensor  # (B, H) complex: the causal BK ratio of the last position, per head
    k_prev: torch.Tensor  # (B, H) real: k = b^2 linking the last position to the next
    # (B, D): W_out f_j + b_out of the last computed position j (what a skipped position
    # outputs under skip_output "carry"; W_out 0 + b_out before any). (B, 0) under the other
    # skip outputs, which never read it (at `small`, 2,048 of the 2,432 bytes per sequence)
    carry: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.alpha, self.k_prev, self.carry))


class LayerOutput(NamedTuple):
    y: torch.Tensor  # (B, N, D)
    mask: torch.Tensor  # (B, N) live straight-through mask: 1 = computed, 0 = skipped
    aux_loss: torch.Tensor  # () MoE balance loss of the computed positions


class SparseMoEResNetBKLayer(nn.Module):
    """forward(x (B, N, D), force_mask=None) -> (B, N, D); see the module docstring.

    `forward_parts` returns (y, mask, aux_loss) and stores nothing. `forward` (the seed API)
    keeps `last_mask` (live, (B, N)) and `last_aux_loss` of its call for the seed's getters;
    that memory exists for them alone, and nothing inside the package reads it.
    """

    def __init__(self, d_model: int, n_seq: int, num_experts: int = 4, top_k: int = 1,
                 dropout_p: float = 0.1, target_sparsity: float = 0.5,
                 sparsity_loss_weight: float = 0.01, sparsity_loss_type: str = "adaptive",
                 use_sparse_computation: bool = True, *, tau: float = 1.0,
                 d_ff: int | None = None, causal: bool = True, gate_eval_mode: str = "quasi",
                 bk_heads: int = 1, bk_learn_z: bool = False, bk_input_couplings: bool = False,
                 skip_output: str = "carry", gate_grad: str = "scale", gate_weight: bool = False,
                 gate_train_noise: str = "random", light_d_ff: int | None = None,
                 bk_z_im_range: tuple[float, float] = Z_IM_RANGE):
        super().__init__()
        self.skip_output = check_choice("skip_output", skip_output, SKIP_OUTPUTS)
        self.gate_grad = check_choice("gate_grad", gate_grad, GATE_GRADS)
        check_gate_grad("", self.skip_output, self.gate_grad)
        self.gate_weight = check_bool("gate_weight", gate_weight)
        self.d_model = check_int("d_model", d_model, min=2)
        self.n_seq = check_int("n_seq", n_seq, min=1)
        dropout_p = check_float("dropout_p", dropout_p, min=0.0, max=1.0, max_open=True)
        self.bk_heads = check_int("bk_heads", bk_heads, min=1)
        self.bk_input_couplings = check_bool("bk_input_couplings", bk_input_couplings)
        self.sparse_bk_core = SparseBKCore(d_model, n_seq, target_sparsity, tau, causal=causal,
                                           gate_eval_mode=gate_eval_mode, heads=bk_heads,
                                           gate_train_noise=gate_train_noise,
                                           learn_z=bk_learn_z, z_im_range=bk_z_im_range)
        self.moe = MoEFFN(d_model, num_experts, top_k, d_ff)
        self.v_proj = nn.Linear(d_model, self.bk_heads)
        self.output_proj = nn.Linear(2 * self.bk_heads, d_model)
        self.dropout = nn.Dropout(dropout_p)
        # "mix": the potentials of skipped positions, from their input (sparsebk.model.layers doc)
        self.skip_v_proj = nn.Linear(d_model, self.bk_heads) if self.skip_output == "mix" else None
        # "light": the skipped positions' stand-in for the experts (sparsebk.model.layers doc)
        self.light = None
        if self.skip_output == "light":
            self.light = ExpertFFN(d_model, check_int("light_d_ff", light_width(d_model, light_d_ff),
                                                      min=1))
        self.coupling_proj = None
        if self.bk_input_couplings:
            # zero init: every coupling starts at 2 sigmoid(0) = 1, the Laplacian's
            self.coupling_proj = nn.Linear(d_model, self.bk_heads)
            nn.init.zeros_(self.coupling_proj.weight)
            nn.init.zeros_(self.coupling_proj.bias)
        self.sparsity_loss_weight = sparsity_loss_weight
        self.sparsity_loss_type = check_choice("sparsity_loss_type", sparsity_loss_type, LOSS_TYPES)
        self.use_sparse_computation = bool(use_sparse_computation)
        self.last_mask: torch.Tensor | None = None  # seed API only: see `remember`
        self.last_aux_loss: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: LMConfig) -> "SparseMoEResNetBKLayer":
        """The layer an `LMConfig` describes (causal)."""
        return cls(cfg.d_model, cfg.n_seq, num_experts=cfg.num_experts, top_k=cfg.top_k,
                   d_ff=cfg.d_ff, dropout_p=cfg.dropout_p, target_sparsity=cfg.target_sparsity,
                   sparsity_loss_weight=cfg.sparsity_loss_weight,
                   sparsity_loss_type=cfg.sparsity_loss_type,
                   use_sparse_computation=cfg.use_sparse_computation, tau=cfg.tau,
                   gate_eval_mode=cfg.gate_eval_mode, bk_heads=cfg.bk_heads,
                   bk_learn_z=cfg.bk_learn_z, bk_input_couplings=cfg.bk_input_couplings,
                   skip_output=cfg.skip_output, gate_grad=cfg.gate_grad,
                   gate_weight=cfg.gate_weight, gate_train_noise=cfg.gate_train_noise,
                   light_d_ff=cfg.light_d_ff, bk_z_im_range=(cfg.bk_z_im_min, cfg.bk_z_im_max))

    @property
    def sparsity_loss_weight(self) -> float:
        return self._sparsity_loss_weight

    @sparsity_loss_weight.setter
    def sparsity_loss_weight(self, value: float) -> None:
        self._sparsity_loss_weight = check_float("sparsity_loss_weight", value, min=0.0)

    def forward(self, x: torch.Tensor, force_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The seed API: checks x, returns y and remembers the call's mask for the getters."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, N, {self.d_model}), got {tuple(x.shape)}")
        if x.shape[1] > self.n_seq:
            raise ValueError(f"sequence length {x.shape[1]} exceeds n_seq={self.n_seq}")
        out = self.forward_parts(x, force_mask)
        self.remember(out.mask, out.aux_loss)
        return out.y

    def forward_parts(self, x: torch.Tensor, force_mask: torch.Tensor | None = None) -> LayerOutput:
        """(y (B, N, D), mask (B, N), aux_loss ()) for x (B, N, D) with N <= n_seq, which the
        caller guarantees (unchecked here). Stores nothing."""
        mask, logits = self.sparse_bk_core.gate_parts(x, force_mask)  # (B, N) each
        if self.use_sparse_computation:
            y, aux = self._sparse_forward(x, mask, logits)
        else:
            y, aux = self._dense_forward(x, mask, logits)
        # dropout over the full (B, N, D) output: the RNG draws do not depend on the mask
        return LayerOutput(self.dropout(y), mask, aux)

    def remember(self, mask: torch.Tensor, aux_loss: torch.Tensor) -> None:
        """Keep a forward's mask and aux loss for the seed getters (`get_sparsity_loss()`, the
        module-level `get_sparsity_loss(model)`, ...). Only those read them; a model that wants
        its losses builds them from what `forward_parts` returned."""
        self.last_mask, self.last_aux_loss = mask, aux_loss

    def experts(self, x: torch.Tensor, logits: torch.Tensor, token_mask: torch.Tensor | None = None):
        """(h (M, D), aux loss) for the computed rows x (M, D) with gate logits (M,): the MoE's
        output, scaled by sigmoid(logits) when `gate_weight` (module docstring)."""
        h, aux = self.moe.mix(x, token_mask=token_mask)
        if self.gate_weight:
            h = h * torch.sigmoid(logits).unsqueeze(-1).to(h.dtype)
        return h, aux

    def light_experts(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """h (M, D) of skipped rows x (M, D) with gate logits (M,) under "light": the light FFN,
        scaled by 1 - sigmoid(logits) when `gate_weight` (module docstring)."""
        h = self.light(x)
        if self.gate_weight:
            h = h * torch.sigmoid(-logits).unsqueeze(-1).to(h.dtype)
        return h

    def skipped_potentials(self, x: torch.Tensor) -> torch.Tensor:
        """Potentials (..., H) of skipped positions of inputs x (..., D): W_s x for "mix", else
        0 (a skipped position contributes the bare H0)."""
        if self.skip_v_proj is not None:
            return self.skip_v_proj(x)
        return x.new_zeros(*x.shape[:-1], self.bk_heads)

    def couplings(self, h: torch.Tensor) -> torch.Tensor:
        """Input-dependent off-diagonals (..., H) in (0, 2) from expert outputs h (..., D)."""
        return 2.0 * torch.sigmoid(self.coupling_proj(h))

    def _sparse_forward(self, x: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor):
        B, N, D = x.shape
        H = self.bk_heads
        keep = mask.reshape(-1) > 0.5  # (B N,)
        idx = keep.nonzero().squeeze(1)  # (M,) flat indices of computed positions; host sync
        if self.light is not None:
            return self._light_forward(x, mask, logits, keep, idx)
        h, aux = self.experts(x.reshape(B * N, D).index_select(0, idx),
                              logits.reshape(-1).index_select(0, idx))  # (M, D)
        v_c = self.v_proj(h)  # (M, H)
        v = _put_rows(self.skipped_potentials(x.reshape(B * N, D)), idx, v_c).view(B, N, H)
        b = None
        if self.coupling_proj is not None:  # coupling 1 (the Laplacian's) where skipped
            b_c = self.couplings(h)  # (M, H)
            b = b_c.new_ones(B * N, H).index_copy(0, idx, b_c).view(B, N, H)
        feats = self.sparse_bk_core.bk_features(v, b).reshape(B * N, 2 * H)
        m = mask.reshape(-1).index_select(0, idx).unsqueeze(-1)  # (M, 1) live: the gate's gradient
        contrast = self.gate_grad == "contrast"
        if self.skip_output in ("own", "mix"):  # every position projects its own features
            spec = self.output_proj(feats)  # (B N, D)
            own = spec.index_select(0, idx)
            out = m * (h + own) + ((1 - m) * own if contrast else 0)
            return spec.to(out.dtype).index_copy(0, idx, out).view(B, N, D), aux
        spec = self.output_proj(feats.index_select(0, idx))  # (M, D)
        out = m * (h + spec)  # (M, D)
        if self.skip_output == "zero":  # skipping outputs 0: "contrast" is "scale"
            return out.new_zeros(B * N, D).index_copy(0, idx, out).view(B, N, D), aux

        # row of the output table each position copies: 0 = projected zero features,
        # r >= 1 = the r-th computed position (flat order), i.e. the last computed j <= i
        src = self.sparse_bk_core.carry_index(mask)  # (B, N)
        rank = keep.cumsum(0)  # (B N,) rank of a computed position, 1-based
        base = torch.arange(B, device=x.device).unsqueeze(1) * N
        row_of = lambda j: torch.where(j >= 0, rank[(base + j.clamp_min(0)).reshape(-1)].view(B, N), 0)
        # under autocast the projections may be half precision while h is float32: one dtype
        table = torch.cat([self.output_proj(spec.new_zeros(1, 2 * H)), spec], dim=0).to(out.dtype)
        if contrast:  # a computed i, had it been skipped, copies the last computed j < i
            prev = torch.cat([src.new_full((B, 1), -1), src[:, :-1]], dim=1)  # (B, N)
            out = out + (1 - m) * table.index_select(0, row_of(prev).reshape(-1).index_select(0, idx))
        y = table.index_select(0, row_of(src).reshape(-1)).index_copy(0, idx, out)  # (B N, D)
        return y.view(B, N, D), aux

    def light_rows(self, x: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor,
                   idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h (R, D), aux) under "light" for rows x (R, D) with gate logits (R,), keep (R,) bool
        and idx the kept rows' indices (M,): the experts' output where kept, the light FFN's
        where skipped. The skipped rows come from a stable sort of `keep`, their count from
        idx's length: no second host sync."""
        R, M = keep.shape[0], idx.shape[0]
        sidx = torch.argsort(keep.to(torch.uint8), stable=True)[: R - M]  # skipped, in order
        h, aux = self.experts(x.index_select(0, idx), logits.index_select(0, idx))
        h_s = self.light_experts(x.index_select(0, sidx), logits.index_select(0, sidx))
        return h.new_zeros(R, x.shape[1]).index_copy(0, idx, h).index_copy(0, sidx, h_s.to(h.dtype)), aux

    def _light_forward(self, x, mask, logits, keep, idx):
        """The sparse path under "light": skipped rows run the light FFN, then every row is a
        computed one (potential, coupling, own features); only the computed rows' outputs
        carry the mask's straight-through factor."""
        B, N, D = x.shape
        h_all, aux = self.light_rows(x.reshape(B * N, D), logits.reshape(-1), keep, idx)
        b = self.couplings(h_all).view(B, N, -1) if self.coupling_proj is not None else None
        feats = self.sparse_bk_core.bk_features(self.v_proj(h_all).view(B, N, -1), b)
        y = h_all + self.output_proj(feats.reshape(B * N, -1)).to(h_all.dtype)
        m = mask.reshape(-1).index_select(0, idx).unsqueeze(-1)  # (M, 1) live
        return _put_rows(y, idx, m * y.index_select(0, idx)).view(B, N, D), aux

    def _dense_forward(self, x: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor):
        """Every position computed, the mask applied by selection: the sparse path's reference."""
        B, N, D = x.shape
        keep = mask > 0.5  # (B, N)
        h, aux = self.experts(x.reshape(B * N, D), logits.reshape(-1), token_mask=keep.reshape(-1))
        h = h.view(B, N, D)
        if self.light is not None:  # every row is computed, by the experts or the light FFN
            h = torch.where(keep.unsqueeze(-1), h, self.light_experts(x, logits))
            b = self.couplings(h) if self.coupling_proj is not None else None
            y = h + self.output_proj(self.sparse_bk_core.bk_features(self.v_proj(h), b))
            return torch.where(keep.unsqueeze(-1), mask.unsqueeze(-1) * y, y), aux
        v = torch.where(keep.unsqueeze(-1), self.v_proj(h), self.skipped_potentials(x))
        b = None
        if self.coupling_proj is not None:
            b = torch.where(keep.unsqueeze(-1), self.couplings(h), 1.0)  # (B, N, H)
        feats = self.sparse_bk_core.bk_features(v, b)  # (B, N, 2H)
        m = mask.unsqueeze(-1)
        out = m * (h + self.output_proj(feats))
        if self.skip_output in ("own", "mix"):
            skipped = self.output_proj(feats)
        elif self.skip_output == "zero":
            skipped = torch.zeros_like(out)
        else:
            carried = SparseBKCore.interpolate(feats, mask)  # (B, N, 2H): last computed <= i
            skipped = self.output_proj(carried)
        if self.gate_grad == "contrast" and self.skip_output != "zero":
            alt = skipped  # own / mix: the position's own projected features
            if self.skip_output == "carry":  # row i: the carried row of the last computed j < i
                alt = self.output_proj(torch.cat([torch.zeros_like(carried[:, :1]), carried[:, :-1]], dim=1))
            out = out + (1 - m) * alt
        return torch.where(keep.unsqueeze(-1), out, skipped), aux

    # --- streaming: the same outputs, one chunk or one position at a time (eval mode) ------
    def init_state(self, batch_size: int) -> LayerState:
        """A fresh state for `batch_size` sequences (device and dtype of the layer's weights)."""
        w = self.output_proj.weight  # (D, 2H)
        wd = torch.float64 if w.dtype == torch.float64 else torch.float32  # BK's real dtype
        cd = torch.complex128 if wd == torch.float64 else torch.complex64
        if self.skip_output == "carry":
            with torch.no_grad():
                zero_row = self.output_proj(w.new_zeros(1, 2 * self.bk_heads))  # the forward's row 0
            carry = zero_row.expand(batch_size, -1).clone()
        else:  # no other skip output reads it: an empty row keeps the batch size
            carry = w.new_zeros(batch_size, 0)
        return LayerState(alpha=torch.ones(batch_size, self.bk_heads, dtype=cd, device=w.device),
                          k_prev=torch.zeros(batch_size, self.bk_heads, dtype=wd, device=w.device),
                          carry=carry)

    def prefill(self, x: torch.Tensor, state: LayerState, start: int
                ) -> tuple[torch.Tensor, LayerState]:
        """x (B, T, D): the normalised inputs of positions start..start+T-1 -> (y (B, T, D),
        the state after the last). The sparse forward's ops, continuing `state`: from a fresh
        state the outputs equal the forward's (eval mode) bit for bit on the same device."""
        B, T, D = x.shape
        core = self.sparse_bk_core
        keep, logits = core.decide(x, start)  # (B, T) each
        flat = keep.reshape(-1)
        idx = flat.nonzero().squeeze(1)  # (M,) flat indices of computed positions; host sync
        h, v, b = self._continue_rows(x.reshape(B * T, D), logits.reshape(-1), flat, idx)
        wd = state.k_prev.dtype
        k = torch.ones(B * T, self.bk_heads, dtype=wd, device=x.device) if b is None else b.to(wd).square()
        feats, alpha = core.continue_features(v.view(B, T, -1), k.view(B, T, -1), state.alpha,
                                              state.k_prev)
        y, carry = self._continue_outputs(h, feats.reshape(B * T, -1), keep, idx, state.carry)
        return y.view(B, T, D), LayerState(alpha=alpha, k_prev=k.view(B, T, -1)[:, -1], carry=carry)

    def step(self, x: torch.Tensor, state: LayerState, pos: int) -> tuple[torch.Tensor, LayerState]:
        """x (B, D): the normalised input of position `pos` -> (y (B, D), the next state): the
        recurrence on (B, H) numbers; a skipped token runs no expert FFN."""
        y, state = self.prefill(x.unsqueeze(1), state, pos)
        return y[:, 0], state

    def _continue_rows(self, x: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor,
                       idx: torch.Tensor):
        """(h, v (R, H), b (R, H) or None) of rows x (R, D): h the FFN outputs of every row
        under "light" (R, D), else of the computed rows idx only (M, D)."""
        if self.light is not None:  # every row runs an FFN: the experts' or the light one
            h, _ = self.light_rows(x, logits, keep, idx)
            return h, self.v_proj(h), (self.couplings(h) if self.coupling_proj is not None else None)
        v = self.skipped_potentials(x)
        b = x.new_ones(x.shape[0], self.bk_heads) if self.coupling_proj is not None else None
        if idx.numel() == 0:  # every row skipped: no expert call
            return x.new_zeros(0, x.shape[1]), v, b
        h, _ = self.experts(x.index_select(0, idx), logits.index_select(0, idx))  # (M, D)
        v = _put_rows(v, idx, self.v_proj(h))
        if b is not None:
            b = _put_rows(b, idx, self.couplings(h))
        return h, v, b

    def _continue_outputs(self, h: torch.Tensor, feats: torch.Tensor, keep: torch.Tensor,
                          idx: torch.Tensor, carry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (B T, D), the next carry (B, D)) from the FFN outputs h, the features (B T, 2H)
        and the eval mask keep (B, T): the sparse forward's output rules."""
        if self.light is not None:
            return h + self.output_proj(feats), carry
        if self.skip_output in ("own", "mix"):  # every position projects its own features
            spec = self.output_proj(feats)  # (B T, D)
            return _put_rows(spec, idx, h + spec.index_select(0, idx)), carry
        if idx.numel() == 0 and self.skip_output == "carry":  # no expert, no projection
            B, T = keep.shape
            return carry.repeat_interleave(T, 0), carry
        spec = self.output_proj(feats.index_select(0, idx))  # (M, D)
        out = h + spec
        if self.skip_output == "zero":
            return out.new_zeros(feats.shape[0], out.shape[1]).index_copy(0, idx, out), carry
        # the row of [carry (B rows); spec (M rows)] each position copies when skipped
        B, T = keep.shape
        src = SparseBKCore.carry_index(keep)  # (B, T) last computed j <= i, -1 if none
        rank = keep.reshape(-1).cumsum(0)  # (B T,) 1-based rank of a computed position
        base = torch.arange(B, device=keep.device).unsqueeze(1)  # (B, 1)
        row = torch.where(src >= 0,
                          B - 1 + rank[(base * T + src.clamp_min(0)).reshape(-1)].view(B, T), base)
        table = torch.cat([carry, spec.to(carry.dtype)], 0)  # (B + M, D)
        y = table.index_select(0, row.reshape(-1)).index_copy(0, idx, out.to(table.dtype))
        return y, table.index_select(0, row[:, -1])

    def _mask(self) -> torch.Tensor:
        if self.last_mask is None:
            raise RuntimeError("no mask yet: call the layer's forward before asking for its losses or stats")
        return self.last_mask

    def weighted_sparsity_loss(self, mask: torch.Tensor, loss_type: str | None = None) -> torch.Tensor:
        """sparsity_loss_weight * sparsity loss of `mask` (B, N) against this layer's target,
        differentiable through a live mask; loss_type defaults to the layer's own."""
        loss_type = self.sparsity_loss_type if loss_type is None else loss_type
        return self._sparsity_loss_weight * sparsity_loss(
            mask, self.sparse_bk_core.target_sparsity, loss_type)

    def get_sparsity_loss(self, loss_type: str | None = None) -> torch.Tensor:
        """`weighted_sparsity_loss` of the last forward's live mask (seed API)."""
        return self.weighted_sparsity_loss(self._mask(), loss_type)

    def get_balanced_loss(self, accuracy_loss: torch.Tensor, sparsity_weight: float | None = None,
                          accuracy_weight: float = 1.0):
        """(accuracy_weight * accuracy_loss + sparsity_weight * sparsity_loss, info dict);
        sparsity_weight defaults to this layer's sparsity_loss_weight."""
        sw = self._sparsity_loss_weight if sparsity_weight is None else sparsity_weight
        return balanced_sparsity_loss(self._mask(), accuracy_loss, self.sparse_bk_core.target_sparsity,
                                      sparsity_weight=sw, accuracy_weight=accuracy_weight,
                                      loss_type=self.sparsity_loss_type)

    @torch.no_grad()
    def get_sparsity_stats(self) -> dict:
        """Plain floats (a host sync: call it for monitoring, not every step)."""
        mask = self._mask()
        return {"sparsity_ratio": float(1.0 - mask.float().mean()),
                "num_computed": float(mask.float().sum(-1).mean()),  # per sequence
                "target_sparsity": self.sparse_bk_core.target_sparsity}


def _sparse_layers(module: nn.Module) -> list[SparseMoEResNetBKLayer]:
    layers = [m for m in module.modules() if isinstance(m, SparseMoEResNetBKLayer)]
    if not layers:
        raise ValueError(f"{type(module).__name__} contains no SparseMoEResNetBKLayer")
    return layers


def get_sparsity_loss(module: nn.Module, loss_type: str | None = None) -> torch.Tensor:
    """Sum over the module's sparse layers of their weighted sparsity losses."""
    return sum(layer.get_sparsity_loss(loss_type) for layer in _sparse_layers(module))


def get_balanced_loss(module: nn.Module, accuracy_loss: torch.Tensor,
                      sparsity_weight: float | None = None, accuracy_weight: float = 1.0):
    """accuracy_weight * accuracy_loss + sum_l w_l * sparsity_loss_l, with w_l = sparsity_weight
    or, when None, each layer's own sparsity_loss_weight. Returns (total, info)."""
    parts = []
    for layer in _sparse_layers(module):
        w = layer.sparsity_loss_weight if sparsity_weight is None else sparsity_weight
        parts.append(w * sparsity_loss(layer._mask(), layer.sparse_bk_core.target_sparsity,
                                       layer.sparsity_loss_type))
    sp = sum(parts)
    total = accuracy_weight * accuracy_loss + sp
    info = {"total_loss": total.detach(), "accuracy_loss": accuracy_loss.detach(),
            "sparsity_loss": sp.detach(), "layer_sparsity_loss": [p.detach() for p in parts],
            "accuracy_weight": float(accuracy_weight)}
    return total, info


def get_sparsity_stats(module: nn.Module) -> dict:
    """Means over the module's sparse layers, plus the per-layer stats under "layers"."""
    per = [layer.get_sparsity_stats() for layer in _sparse_layers(module)]
    out = {k: sum(p[k] for p in per) / len(per) for k in ("sparsity_ratio", "num_computed", "target_sparsity")}
    out["layers"] = per
    return out
