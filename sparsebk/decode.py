"""Streaming decoding of a `SparseBKLM`: a constant-size state per layer, eval mode only.

    state = model.init_state(batch_size)
    logits, state = model.prefill(prompt)            # (B, T, V): the prompt, parallel scan
    logits, state = model.step(next_tokens, state)   # (B, V): one more position

What a layer must remember to continue its causal outputs (the layer equations are in
sparsebk.layers). Position i of head h needs alpha_i = s_i - k_{i-1} / alpha_{i-1}
(g_i = 1 / alpha_i, DESIGN.md §1) with s_i = v_i - 2 - z_h, and k_{i-1} = b_{i-1}^2 the
coupling of the previous position (1 without input couplings, 1 at a skipped position); a
skipped position outputs W_out f_j + b_out of j, the last computed position before it. So:

    LayerState.alpha   (B, H) complex  alpha of the last position, per head
    LayerState.k_prev  (B, H) real     k of the last position: its coupling to the next one
    LayerState.carry   (B, D)          W_out f_j + b_out of the last computed position j
                                       (W_out 0 + b_out before any: the forward's zero features);
                                       kept but unused with skip_output "own" / "zero" / "mix" /
                                       "light", whose skipped outputs need only alpha
    DecodeState.pos    int             positions consumed = the next token's position (the
                                       quasi gate's offset and the learned position row)

Nothing grows with the context. `carry` keeps the projected row, not the 2H features, so a
skipped token runs no expert FFN and no projection: its output is that row. A fresh state has
k_prev = 0 and alpha = 1, so the first position's alpha_0 = s_0 - 0 / 1 = s_0 exactly.

The gate decides per token as in eval mode ("quasi": logit + L_pos > 0 with the fixed offset
of the absolute position, "threshold": logit > 0), so decoding needs `model.eval()`: no gate
noise, no dropout. `prefill` runs a chunk of tokens at positions pos..pos+T-1 with the same
chunked parallel scan as the forward, the state folded into the chunk's first position
(s'_0 = s_0 - k_prev / alpha_prev); from a fresh state its inputs to every op are the
forward's, so its logits equal the forward's bit for bit on the same device. `step` is the
recurrence itself on (B, H) numbers. Both are functional: they return a new state and leave
the one they were given valid (a caller may branch from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sparsebk._scan import ratio_scan
from sparsebk.gate import _INV_PHI
from sparsebk.layers import SparseBKCore, SparseMoEResNetBKLayer

if TYPE_CHECKING:  # lm.py imports this module
    from sparsebk.lm import SparseBKLM

__all__ = ["LayerState", "DecodeState", "init_state", "prefill", "step", "layer_prefill",
           "layer_step"]


@dataclass
class LayerState:
    alpha: torch.Tensor  # (B, H) complex: the causal BK ratio of the last position, per head
    k_prev: torch.Tensor  # (B, H) real: k = b^2 linking the last position to the next
    carry: torch.Tensor  # (B, D): the output of a skipped position (see the module docstring)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.alpha, self.k_prev, self.carry))


@dataclass
class DecodeState:
    layers: list[LayerState]
    pos: int = 0  # positions consumed: the position of the next token

    @property
    def batch_size(self) -> int:
        return self.layers[0].carry.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the state: the same at every position."""
        return sum(s.nbytes() for s in self.layers)


# --- one layer -----------------------------------------------------------------------------
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The BK-core's real dtype for activations of `dtype` (as SparseBKCore.bk_features)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def init_layer_state(layer: SparseMoEResNetBKLayer, batch_size: int) -> LayerState:
    w = layer.output_proj.weight  # (D, 2H): device and dtype of the activations
    H, wd = layer.bk_heads, _work_dtype(w.dtype)
    cd = torch.complex128 if wd == torch.float64 else torch.complex64
    with torch.no_grad():
        zero_row = layer.output_proj(w.new_zeros(1, 2 * H))  # (1, D): the forward's table row 0
    return LayerState(alpha=torch.ones(batch_size, H, dtype=cd, device=w.device),
                      k_prev=torch.zeros(batch_size, H, dtype=wd, device=w.device),
                      carry=zero_row.expand(batch_size, -1).clone())


def quasi_offsets(start: int, n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n,) the quasi gate's offsets of positions start..start+n-1: entries start.. of
    `sparsebk.gate.quasi_logistic_offsets`, with the same element-wise float64 ops."""
    i = torch.arange(start + 1, start + n + 1, dtype=torch.float64, device=device)
    u = torch.frac(i * _INV_PHI)
    return (torch.log(u) - torch.log1p(-u)).to(dtype)


def _keep(core: SparseBKCore, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eval-mode mask (bool), gate logits), both of x's leading dims, of x (..., T, D) at
    positions start..start+T-1, or of x (B, D) at position `start`: the gate's comparison, on
    the same values."""
    logits = core.importance_predictor(x).squeeze(-1)  # (B, T) or (B,)
    gate = core.gate
    if gate.eval_mode == "quasi":
        n = logits.shape[-1] if x.dim() == 3 else 1
        pre = (logits + quasi_offsets(start, n, device=x.device, dtype=logits.dtype)) / gate.tau
    else:
        pre = logits / gate.tau
    return pre > 0, logits


def _shifts(core: SparseBKCore, wd: torch.dtype):
    """(z, scale): z the heads' shifts ((H,) complex tensor, or the fixed python complex), scale
    the learnt-z feature scale Im z_h ((H,) real) or None."""
    z = core.shifts()
    if not isinstance(z, torch.Tensor):
        return z, None
    cd = torch.complex128 if wd == torch.float64 else torch.complex64
    return z.to(cd), core.z_log_im.exp().to(wd)


def layer_step(layer: SparseMoEResNetBKLayer, x: torch.Tensor, st: LayerState, pos: int
               ) -> tuple[torch.Tensor, LayerState]:
    """x (B, D): the normalised input of position `pos` -> (y (B, D), the next state)."""
    B, D = x.shape
    H, core = layer.bk_heads, layer.sparse_bk_core
    wd = _work_dtype(x.dtype)
    keep, logits = _keep(core, x, pos)
    idx = keep.nonzero().squeeze(1)  # (M,) computed rows
    m = idx.numel()  # host sync: which rows run the experts
    v = layer.skipped_potentials(x)  # (B, H): a skipped row's (0 unless "mix")
    b = None
    if layer.light is not None:  # every row runs an FFN: the experts' or the light one
        h, _ = layer.light_rows(x, logits, keep, idx)  # (B, D)
        v = layer.v_proj(h)
        if layer.coupling_proj is not None:
            b = layer.couplings(h)
    elif m:
        h, _ = layer.experts(x.index_select(0, idx), logits.index_select(0, idx))  # (M, D)
        v = v.index_copy(0, idx, layer.v_proj(h))
        if layer.coupling_proj is not None:
            b = x.new_ones(B, H).index_copy(0, idx, layer.couplings(h))
    z, scale = _shifts(core, wd)
    alpha = (v.to(wd) - 2.0) - z - st.k_prev / st.alpha  # (B, H) complex
    g = alpha.reciprocal()
    if scale is not None:
        g = g * scale
    feats = torch.view_as_real(g).reshape(B, 2 * H).to(x.dtype)  # [Re g_1, Im g_1, ...]
    k = torch.ones_like(st.k_prev) if b is None else b.to(wd).square()
    carry = st.carry
    if layer.skip_output != "carry":  # "own": every row projects its features; "zero": 0
        if layer.light is not None:
            y = h + layer.output_proj(feats)
        elif layer.skip_output in ("own", "mix"):
            y = layer.output_proj(feats)  # (B, D)
            if m:
                y = y.index_copy(0, idx, h + y.index_select(0, idx))
        else:
            y = carry.new_zeros(B, D)
            if m:
                spec = layer.output_proj(feats.index_select(0, idx))
                y = y.index_copy(0, idx, (h + spec).to(y.dtype))
        return y, LayerState(alpha=alpha, k_prev=k, carry=carry)
    if m:
        spec = layer.output_proj(feats.index_select(0, idx))  # (M, D)
        y = carry.index_copy(0, idx, (h + spec).to(carry.dtype))
        carry = carry.index_copy(0, idx, spec.to(carry.dtype))
    else:
        y = carry  # every row skipped: no expert, no projection
    return y, LayerState(alpha=alpha, k_prev=k, carry=carry)


def layer_prefill(layer: SparseMoEResNetBKLayer, x: torch.Tensor, st: LayerState, start: int
                  ) -> tuple[torch.Tensor, LayerState]:
    """x (B, T, D): the normalised inputs of positions start..start+T-1 -> (y (B, T, D), the
    state after the last). The sparse layer's forward (`_sparse_forward`), continuing `st`."""
    B, T, D = x.shape
    H, core = layer.bk_heads, layer.sparse_bk_core
    wd = _work_dtype(x.dtype)
    keep, logits = _keep(core, x, start)  # (B, T) each
    flat = keep.reshape(-1)
    idx = flat.nonzero().squeeze(1)  # (M,) flat indices of computed positions; host sync
    if layer.light is not None:  # every row runs an FFN: the experts' or the light one
        h, _ = layer.light_rows(x.reshape(B * T, D), logits.reshape(-1), flat, idx)  # (B T, D)
        v = layer.v_proj(h).view(B, T, H)
        b = layer.couplings(h).view(B, T, H) if layer.coupling_proj is not None else None
    else:
        h, _ = layer.experts(x.reshape(B * T, D).index_select(0, idx),
                             logits.reshape(-1).index_select(0, idx))  # (M, D)
        v = layer.skipped_potentials(x.reshape(B * T, D)).index_copy(0, idx, layer.v_proj(h))
        v = v.view(B, T, H)
        b = None
        if layer.coupling_proj is not None:
            b = x.new_ones(B * T, H).index_copy(0, idx, layer.couplings(h)).view(B, T, H)
    k = torch.ones(B, T, H, dtype=wd, device=x.device) if b is None else b.to(wd).square()

    # BK over rows b H + h, as SparseBKCore.bk_features, the state folded into position 0
    z, scale = _shifts(core, wd)
    if isinstance(z, torch.Tensor):
        z = z.repeat(B).unsqueeze(-1)  # (B H, 1)
    rows = lambda t: t.permute(0, 2, 1).reshape(B * H, T)  # noqa: E731  (B, T, H) -> (B H, T)
    s = (rows(v).to(wd) - 2.0) - z  # (B H, T) complex
    s0 = s[:, :1] - (st.k_prev / st.alpha).reshape(B * H, 1)
    s = torch.cat([s0, s[:, 1:]], 1)
    kf = F.pad(rows(k)[:, :-1].to(s.dtype), (1, 0))  # k_{i-1} at i
    alpha = ratio_scan(s, kf)  # (B H, T)
    g = alpha.reciprocal()
    if scale is not None:
        g = g * scale.repeat(B).unsqueeze(-1)
    feats = torch.view_as_real(g).view(B, H, T, 2).permute(0, 2, 1, 3).reshape(B, T, 2 * H)
    feats = feats.to(x.dtype).reshape(B * T, 2 * H)
    new_ak = dict(alpha=alpha[:, -1].view(B, H), k_prev=k[:, -1])
    if layer.light is not None:
        y = h + layer.output_proj(feats)
        return y.view(B, T, D), LayerState(**new_ak, carry=st.carry)
    if layer.skip_output in ("own", "mix"):  # as the forward: every position projects its own
        spec = layer.output_proj(feats)  # (B T, D)
        y = spec.index_copy(0, idx, h + spec.index_select(0, idx))
        return y.view(B, T, D), LayerState(**new_ak, carry=st.carry)
    spec = layer.output_proj(feats.index_select(0, idx))  # (M, D)
    out = h + spec
    if layer.skip_output == "zero":
        y = out.new_zeros(B * T, D).index_copy(0, idx, out)
        return y.view(B, T, D), LayerState(**new_ak, carry=st.carry)

    # the row of [carry_in (B rows); spec (M rows)] each position copies when skipped
    src = SparseBKCore.carry_index(keep)  # (B, T) last computed j <= i, -1 if none
    rank = flat.cumsum(0)  # (B T,) 1-based rank of a computed position
    base = torch.arange(B, device=x.device).unsqueeze(1)  # (B, 1)
    row = torch.where(src >= 0, B - 1 + rank[(base * T + src.clamp_min(0)).reshape(-1)].view(B, T),
                      base)  # (B, T)
    table = torch.cat([st.carry, spec.to(st.carry.dtype)], 0)  # (B + M, D)
    y = table.index_select(0, row.reshape(-1)).index_copy(0, idx, out.to(table.dtype))
    new = LayerState(**new_ak, carry=table.index_select(0, row[:, -1]))
    return y.view(B, T, D), new


# --- the model -----------------------------------------------------------------------------
def _check_eval(model: SparseBKLM) -> None:
    if model.training:
        raise ValueError("decoding runs the eval-mode model (no gate noise, no dropout); "
                         "call model.eval() first")


def _check_positions(model: SparseBKLM, pos: int, n: int) -> None:
    c = model.config
    if model.pos_emb is not None and pos + n > c.n_seq:
        raise ValueError(
            f"positions {pos}..{pos + n - 1} are past n_seq={c.n_seq}: this model has learned "
            f"absolute positions (pos_emb='learned'), whose table ends at n_seq; a model "
            f"trained with pos_emb='none' decodes past its training length")


def _check_state(state: DecodeState, batch: int) -> None:
    if not isinstance(state, DecodeState):
        raise ValueError(f"state must be a DecodeState (from init_state or prefill), got "
                         f"{type(state).__name__}")
    if batch != state.batch_size:
        raise ValueError(f"{batch} sequences given to a state of batch size {state.batch_size}")


def init_state(model: SparseBKLM, batch_size: int) -> DecodeState:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return DecodeState([init_layer_state(layer, batch_size) for layer in model.layers], 0)


def _embed(model: SparseBKLM, tokens: torch.Tensor, pos: int) -> torch.Tensor:
    """tokens (B, T) at positions pos.. -> (B, T, D), as the forward's first line."""
    h = model.tok_emb(tokens)
    if model.pos_emb is not None:
        h = h + model.pos_emb[pos:pos + tokens.shape[1]]
    return model.drop(h)


@torch.no_grad()
def prefill(model: SparseBKLM, tokens: torch.Tensor, state: DecodeState | None = None
            ) -> tuple[torch.Tensor, DecodeState]:
    """tokens (B, T) int at the state's next positions (a fresh state when None) ->
    (logits (B, T, V), the state after them)."""
    _check_eval(model)
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32) or tokens.shape[1] < 1:
        raise ValueError(f"prefill takes int64 tokens (B, T) with T >= 1, got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    state = init_state(model, tokens.shape[0]) if state is None else state
    _check_state(state, tokens.shape[0])
    pos = state.pos
    _check_positions(model, pos, tokens.shape[1])
    h = _embed(model, tokens, pos)  # (B, T, D)
    layers = []
    for block, st in zip(model.blocks, state.layers):
        y, st = layer_prefill(block.layer, block.norm(h), st, pos)
        h = h + y
        layers.append(st)
    logits = model.norm_f(h) @ model.tok_emb.weight.t()  # (B, T, V)
    return logits, DecodeState(layers, pos + tokens.shape[1])


@torch.no_grad()
def step(model: SparseBKLM, tokens: torch.Tensor, state: DecodeState
         ) -> tuple[torch.Tensor, DecodeState]:
    """tokens (B,) int, one per sequence, at position state.pos -> (logits (B, V), next state)."""
    _check_eval(model)
    if tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"step takes one int64 token per sequence, shape (B,), got "
                         f"{tokens.dtype} {tuple(tokens.shape)}")
    _check_state(state, tokens.shape[0])
    pos = state.pos
    _check_positions(model, pos, 1)
    h = _embed(model, tokens[:, None], pos)[:, 0]  # (B, D)
    layers = []
    for block, st in zip(model.blocks, state.layers):
        y, st = layer_step(block.layer, block.norm(h), st, pos)
        h = h + y
        layers.append(st)
    logits = model.norm_f(h) @ model.tok_emb.weight.t()  # (B, V)
    return logits, DecodeState(layers, pos + 1)


def state_nbytes_per_sequence(model: SparseBKLM) -> int:
    """Bytes of decoding state per sequence (any position): sum over layers of 8H (alpha,
    complex64), 4H (k_prev) and 4D (carry) at float32."""
    return init_state(model, 1).nbytes()

