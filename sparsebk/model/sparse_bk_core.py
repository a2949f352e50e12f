"""The BK mixing of a sparse layer: gate, potentials to BK features, causal carry-forward.

    features, mask, sparsity = SparseBKCore(d_model, n_seq, heads=H)(x, v, couplings=b)

The importance predictor scores position i from x_i alone, so the mask is causal; the
Gumbel-sigmoid gate (sparsebk.model.gate) turns the scores into a straight-through 0/1 mask. The
BK-core (sparsebk.model.bk_core) turns the potentials v into the resolvent diagonal g of
H0 + diag(v) at the shift z, and its [Re, Im] parts are the features. On the sparse path a
skipped position contributes the bare H0 (v = 0, coupling 1) and takes the features of the last
computed position to its left (`interpolate`). The layer around it (sparsebk.model.layers) owns the
experts and the projections in and out.

Multi-channel mixing (`bk_heads`, `bk_learn_z`, `bk_input_couplings`; the defaults 1, False,
False are the single-channel layer, bit for bit). The H heads run as one BK-core call over
(B H, N) rows. Head h has the shift z_h: 1j for every head when fixed; when learnt,
z_h = x_h + i exp(u_h) (Im z_h > 0 by construction), x_h = 0 and exp(u_h) log-spaced over
`z_im_range` = [0.1, 10] at init (bin centres: several memory lengths; H = 1 starts at
z = 1j; a range [a, a] starts every head at z = i a), and
the head's features are y_h g_h = [((H_h - x_h) / y_h - i)^-1] (causal block diagonal), the
resolvent of the rescaled operator at z = i, so |y_h g_h| <= 1 for every head whatever its
scale. With input couplings the off-diagonal b_i of head h (linking positions i and i + 1) is
2 sigmoid(c_proj(h_i))_h in (0, 2): 1 (the Laplacian's) at a zero logit, where c_proj starts
(zero init), near 0 it cuts the chain. It reads position i alone, and the causal g_i involves
b_0..b_{i-1} only, so causality holds. A skipped position runs no projection: its heads take
v = 0 and coupling 1, i.e. it contributes the bare H0, as the fixed-coupling layer does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsebk.model._scan import ratio_scan
from sparsebk.model.bk_core import resolvent_diagonal, resolvent_features
from sparsebk.model.gate import GumbelSigmoidGate
from sparsebk.model.sparsity import balanced_sparsity_loss, sparsity_loss
from sparsebk.validation import check_bool, check_float, check_int, check_sparsity

__all__ = ["SparseBKCore", "Z_IM_RANGE", "check_z_im_range"]

# the learnt shifts' init: Im z_h log-spaced over this range (module docstring)
Z_IM_RANGE = (0.1, 10.0)


def check_z_im_range(name: str, value) -> tuple[float, float]:
    """(low, high) with 0 < low <= high, both finite: the range of Im z at init."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name}={value!r} must be a pair (low, high)")
    low = check_float(f"{name}[0]", value[0], min=0.0, min_open=True)
    high = check_float(f"{name}[1]", value[1], min=low)
    return low, high


class SparseBKCore(nn.Module):
    """Importance predictor + Gumbel-sigmoid gate + BK-core + causal feature interpolation.

    forward(x (B, N, D), v (B, N)) -> (features (B, N, 2), mask (B, N), sparsity_ratio 0-dim);
    with `heads` H > 1, v is (B, N, H) and the features (B, N, 2H) (a (B, N, 1) v is taken for
    H = 1 too); `couplings` (B, N, H) are the input-dependent off-diagonals, None for ones.
    The predictor scores position i from x_i alone, so the mask is causal. `target_sparsity`
    and `tau` may be set at any step (the scheduler does). `gate_eval_mode` ("quasi" or
    "threshold") picks the deterministic eval mask, `gate_train_noise` ("random" or "none") the
    training draw (see sparsebk.model.gate). `z` is every head's
    fixed shift; `learn_z=True` gives each head a learnt shift instead, its imaginary part
    initialised log-spaced over `z_im_range` (module docstring).
    """

    def __init__(self, d_model: int, n_seq: int, target_sparsity: float = 0.5, tau: float = 1.0,
                 *, causal: bool = True, z: complex = 1j, gate_eval_mode: str = "quasi",
                 heads: int = 1, learn_z: bool = False, gate_train_noise: str = "random",
                 z_im_range: tuple[float, float] = Z_IM_RANGE):
        super().__init__()
        self.d_model = check_int("d_model", d_model, min=2)
        self.n_seq = check_int("n_seq", n_seq, min=1)
        self.heads = check_int("heads", heads, min=1)
        self.learn_z = check_bool("learn_z", learn_z)
        self.causal, self.z = bool(causal), complex(z)
        if not self.z.imag > 0:
            raise ValueError(f"z={z!r} must have Im z > 0")
        if self.learn_z and self.z != 1j:
            raise ValueError(f"z={z!r} is a fixed shift: with learn_z=True the shifts are "
                             f"learnt from their own init; leave z at its default 1j")
        self.importance_predictor = nn.Linear(d_model, 1)
        self.gate = GumbelSigmoidGate(tau, eval_mode=gate_eval_mode, train_noise=gate_train_noise)
        self.target_sparsity = target_sparsity
        low, high = check_z_im_range("z_im_range", z_im_range)
        if not self.learn_z and (low, high) != Z_IM_RANGE:
            raise ValueError(f"z_im_range={z_im_range!r} initialises learnt shifts; it needs "
                             f"learn_z=True (a fixed shift is z)")
        if self.learn_z:
            # z_h = z_re_h + i exp(z_log_im_h); Im z_h log-spaced over [low, high] (bin centres)
            centres = (torch.arange(self.heads, dtype=torch.float64) + 0.5) / self.heads
            self.z_re = nn.Parameter(torch.zeros(self.heads))
            self.z_log_im = nn.Parameter(
                (math.log(low) + centres * math.log(high / low)).float())

    @property
    def target_sparsity(self) -> float:
        return self._target_sparsity

    @target_sparsity.setter
    def target_sparsity(self, value: float) -> None:
        self._target_sparsity = check_sparsity("target_sparsity", value)

    @property
    def tau(self) -> float:
        return self.gate.tau

    @tau.setter
    def tau(self, value: float) -> None:
        self.gate.tau = value

    def gate_parts(self, x: torch.Tensor, force_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(straight-through mask (B, N), gate logits (B, N)) from x (B, N, D); `force_mask`
        fixes the mask's forward value."""
        logits = self.importance_predictor(x).squeeze(-1)  # (B, N)
        return self.gate(logits, force=force_mask), logits

    def compute_mask(self, x: torch.Tensor, force_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Straight-through mask (B, N) from x (B, N, D); `force_mask` fixes its forward value."""
        return self.gate_parts(x, force_mask)[0]

    def shifts(self) -> torch.Tensor | complex:
        """The heads' shifts: a complex (H,) tensor when learnt, else the fixed python z."""
        if not self.learn_z:
            return self.z
        return torch.complex(self.z_re, self.z_log_im.exp())

    def bk_features(self, v: torch.Tensor, couplings: torch.Tensor | None = None) -> torch.Tensor:
        """BK features of the potentials v (B, N, H) -> (B, N, 2H) ([Re, Im] per head, head-major),
        or of v (B, N) -> (B, N, 2) for one head. couplings: (B, N, H) off-diagonals (b_i links
        i and i + 1; the last position's is unused) or None for the Laplacian's ones."""
        if v.dim() == 2:
            v = v.unsqueeze(-1)
        B, N, H = v.shape
        assert H == self.heads, (H, self.heads)
        rows = v.permute(0, 2, 1).reshape(B * H, N)  # row b H + h: head h of sequence b
        diag = (rows if rows.dtype == torch.float64 else rows.float()) - 2.0  # H0 diagonal is -2
        offdiag = None
        if couplings is not None:
            offdiag = couplings.permute(0, 2, 1).reshape(B * H, N)[:, :-1].to(diag.dtype)
        z = self.shifts()
        if isinstance(z, torch.Tensor):
            z = z.repeat(B)  # (B H,): row b H + h gets z_h
        # validate=False: the finiteness checks are host syncs; v, b and z are finite and
        # Im z > 0 by construction
        g = resolvent_diagonal(diag, z, offdiag=offdiag, causal=self.causal, validate=False)
        if self.learn_z:  # y_h g_h: the resolvent of the rescaled operator, |y_h g_h| <= 1
            g = g * self.z_log_im.exp().to(diag.dtype).repeat(B).unsqueeze(-1)
        feats = resolvent_features(g).view(B, H, N, 2).permute(0, 2, 1, 3)  # (B, N, H, 2)
        return feats.reshape(B, N, 2 * H).to(v.dtype)

    # --- continuing a sequence (eval mode): what the layer's prefill and step use ----------
    def decide(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eval-mode mask (bool), gate logits) of x (B, T, D) at positions start..start+T-1:
        the gate's comparison, on the same values as the forward's."""
        logits = self.importance_predictor(x).squeeze(-1)  # (B, T)
        return self.gate.eval_keep(logits, start), logits

    def continue_features(self, v: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor,
                          k_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BK features (B, T, 2H) of the potentials v (B, T, H) with couplings k = b^2
        (B, T, H, real work dtype), continuing a sequence whose last position had the causal
        ratio `alpha` (B, H) and coupling k_prev (B, H) to the next: alpha_i = s_i -
        k_{i-1} / alpha_{i-1}, the state folded into the first position. Returns the features
        (v's dtype) and the last position's alpha. A fresh state (alpha 1, k_prev 0) gives
        `bk_features` exactly: the same ops on the same values."""
        B, T, H = v.shape
        wd = k.dtype
        z, scale = self.shifts(), None
        if isinstance(z, torch.Tensor):
            z = z.to(torch.complex128 if wd == torch.float64 else torch.complex64)
            scale = self.z_log_im.exp().to(wd)  # (H,)
        if T == 1:  # the recurrence itself, on (B, H) numbers
            a = (v[:, 0].to(wd) - 2.0) - z - k_prev / alpha  # (B, H) complex
            g = a.reciprocal() if scale is None else a.reciprocal() * scale
            return torch.view_as_real(g).reshape(B, 1, 2 * H).to(v.dtype), a
        if isinstance(z, torch.Tensor):
            z = z.repeat(B).unsqueeze(-1)  # (B H, 1)
        rows = lambda t: t.permute(0, 2, 1).reshape(B * H, T)  # noqa: E731  (B, T, H) -> (B H, T)
        s = (rows(v).to(wd) - 2.0) - z  # (B H, T) complex
        s = torch.cat([s[:, :1] - (k_prev / alpha).reshape(B * H, 1), s[:, 1:]], 1)
        kf = F.pad(rows(k)[:, :-1].to(s.dtype), (1, 0))  # k_{i-1} at i
        a = ratio_scan(s, kf)  # (B H, T)
        g = a.reciprocal()
        if scale is not None:
            g = g * scale.repeat(B).unsqueeze(-1)
        feats = torch.view_as_real(g).view(B, H, T, 2).permute(0, 2, 1, 3).reshape(B, T, 2 * H)
        return feats.to(v.dtype), a[:, -1].view(B, H)

    @staticmethod
    def carry_index(mask: torch.Tensor) -> torch.Tensor:
        """(B, N) index of the last computed position j <= i, or -1 where there is none."""
        pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
        return torch.where(mask > 0.5, pos, -1).cummax(dim=-1).values

    @classmethod
    def interpolate(cls, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the features (B, N, C) of skipped positions by those of the last computed
        position to their left (zeros before the first computed one). Causal."""
        src = cls.carry_index(mask)  # (B, N)
        carried = features.gather(1, src.clamp_min(0).unsqueeze(-1).expand_as(features))
        return torch.where((src >= 0).unsqueeze(-1), carried, 0.0)

    def forward(self, x: torch.Tensor, v: torch.Tensor, use_sparse_computation: bool = True,
                force_mask: torch.Tensor | None = None, couplings: torch.Tensor | None = None):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, N, {self.d_model}), got {tuple(x.shape)}")
        heads_shape = (*x.shape[:2], self.heads)
        if v.shape != heads_shape and not (self.heads == 1 and v.shape == x.shape[:2]):
            raise ValueError(f"v must have shape {heads_shape}" + (
                f" or {tuple(x.shape[:2])}" if self.heads == 1 else "") + f", got {tuple(v.shape)}")
        if couplings is not None and couplings.shape != heads_shape:
            raise ValueError(f"couplings must have shape {heads_shape}, got {tuple(couplings.shape)}")
        if x.shape[1] > self.n_seq:
            raise ValueError(f"sequence length {x.shape[1]} exceeds n_seq={self.n_seq}")
        mask = self.compute_mask(x, force_mask)
        if use_sparse_computation:
            # skipped positions contribute the bare H0 (v = 0, coupling 1) and take
            # interpolated features
            keep = mask > 0.5
            v = torch.where(keep if v.dim() == 2 else keep.unsqueeze(-1), v, 0.0)
            if couplings is not None:
                couplings = torch.where(keep.unsqueeze(-1), couplings, 1.0)
            features = self.interpolate(self.bk_features(v, couplings), mask)
        else:
            features = self.bk_features(v, couplings)
        return features, mask, 1.0 - mask.mean()

    def sparsity_loss(self, mask: torch.Tensor, loss_type: str = "l2") -> torch.Tensor:
        return sparsity_loss(mask, self._target_sparsity, loss_type)

    def balanced_sparsity_loss(self, mask: torch.Tensor, accuracy_loss: torch.Tensor,
                               sparsity_weight: float = 1.0, accuracy_weight: float = 1.0,
                               loss_type: str = "l2"):
        return balanced_sparsity_loss(mask, accuracy_loss, self._target_sparsity,
                                      sparsity_weight=sparsity_weight,
                                      accuracy_weight=accuracy_weight, loss_type=loss_type)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_seq={self.n_seq}, target_sparsity={self._target_sparsity}, "
                f"causal={self.causal}, heads={self.heads}, learn_z={self.learn_z}")
