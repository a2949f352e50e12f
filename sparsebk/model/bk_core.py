"""BK-core: the diagonal of the resolvent of a batched tridiagonal operator, exactly.

Per sequence, H has diagonal `diag` (B, N) and symmetric off-diagonals b_i (all ones by
default; only k_i = b_i^2 enters). With s_i = diag_i - z (Im z = eta > 0) and the ratios

    alpha_0 = s_0,          alpha_i = s_i - k_{i-1} / alpha_{i-1}     (forward)
    beta_{N-1} = s_{N-1},   beta_i  = s_i - k_i / beta_{i+1}          (backward)

the outputs are
    causal=True:  g_i  = [(H[0..i, 0..i] - z)^-1]_ii = 1 / alpha_i   (depends on diag[:, :i+1])
    causal=False: G_ii = [(H - z)^-1]_ii = 1 / (alpha_i + beta_i - s_i).
z is one shift for the whole batch, or one per row (shape (B,)): a multi-head layer runs its
H heads as B * H rows, each head with its own z_h. With z = x + i y, y > 0,
(H - z)^-1 = y^-1 ((H - x) / y - i)^-1: a shift is a rescaled operator at z = i.

|alpha_i|, |beta_i| >= eta, so |G_ii| <= 1 / eta: no clamp or epsilon is needed anywhere.
`resolvent_diagonal` is the fast path (chunked scans, exact O(N) adjoint gradient);
`resolvent_diagonal_reference` is the same math as a plain float64 loop.
"""

from __future__ import annotations

import numbers

import torch

from sparsebk.model._scan import linear_scan, ratio_scan

__all__ = ["resolvent_diagonal", "resolvent_diagonal_reference", "resolvent_features"]

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _validate(diag, z, offdiag, *, validate: bool = True):
    """Check the inputs; return (diag, z, k = offdiag^2 as (1|B, N-1) in diag's dtype).

    z comes back as a python complex, or as a tensor in diag's complex dtype: 0-dim (one shift)
    or (B, 1) (one shift per row, broadcasting against (B, N)). `validate=False` skips the
    checks of tensor values (finiteness, Im z > 0 of a tensor z: host syncs), not the others.
    """
    _check_diag_form(diag)
    zt = _shift(z, diag, validate)
    # a NaN or inf makes the sum non-finite (one reduction pass); a finite sum can only be a
    # false alarm from overflow, which the exact element-wise check then clears
    if validate and not bool(diag.detach().sum().isfinite()) \
            and not bool(torch.isfinite(diag).all()):
        b, i = (~torch.isfinite(diag)).nonzero()[0].tolist()
        raise ValueError(f"diag must be finite; diag[{b}, {i}] = {diag[b, i].item()}")
    return diag, zt, _couplings_squared(offdiag, diag, validate)


def _check_diag_form(diag) -> None:
    """diag is a real float32/float64 tensor (B, N) with N >= 1."""
    if not isinstance(diag, torch.Tensor):
        raise ValueError(f"diag must be a torch.Tensor of shape (B, N), got {type(diag).__name__}")
    if diag.dim() != 2:
        raise ValueError(f"diag must have shape (B, N) (2 dims), got shape {tuple(diag.shape)}")
    if diag.dtype not in _COMPLEX_OF:
        raise ValueError(f"diag must be float32 or float64 (real), got {diag.dtype}; "
                         f"cast it first (e.g. diag.float() under autocast)")
    if diag.shape[1] == 0:
        raise ValueError("diag has N = 0 positions; the sequence length must be >= 1")


def _shift(z, diag: torch.Tensor, validate: bool):
    """The shift z checked against diag (B, N): a python complex, or a tensor in diag's
    complex dtype, 0-dim or (B, 1)."""
    B, N = diag.shape
    if isinstance(z, torch.Tensor):
        if z.shape not in ((), (B,), (B, 1)):
            raise ValueError(f"z must be a complex scalar, a 0-dim tensor, or one shift per row "
                             f"of shape (B,) = ({B},) or (B, 1) = ({B}, 1) for diag of shape "
                             f"({B}, {N}), got shape {tuple(z.shape)}")
        if z.device != diag.device:
            raise ValueError(f"z is on {z.device} but diag is on {diag.device}")
        if not z.is_complex():
            raise ValueError(f"z must be complex with Im z > 0, got a real tensor ({z.dtype})")
        if validate:
            _check_shift_values(z)
        cdtype = _COMPLEX_OF[diag.dtype]
        return z.to(cdtype) if z.dim() == 0 else z.to(cdtype).reshape(B, 1)
    if isinstance(z, numbers.Complex) and not isinstance(z, bool):
        zc = complex(z)
        if not zc.imag > 0 or zc != zc or abs(zc) == float("inf"):
            raise ValueError(f"z must be finite with Im z > 0, got z = {zc}")
        return zc  # a python scalar: no host-to-device copy, and `diag - zc` is already complex
    raise ValueError(f"z must be a complex number or a complex tensor (0-dim, or (B,) for "
                     f"one shift per row), got {type(z).__name__}")


def _check_shift_values(z: torch.Tensor) -> None:
    """Every shift finite with Im z > 0 (one host sync, as for a scalar)."""
    bad = (z.imag <= 0) | ~torch.isfinite(z)  # NaN imag fails `> 0` too
    if bool(bad.any()):
        if z.dim() == 0:
            raise ValueError(f"z must be finite with Im z > 0, got z = {complex(z.detach().cpu())}")
        b = bad.reshape(-1).nonzero()[0].item()
        raise ValueError(f"z must be finite with Im z > 0 in every row; "
                         f"z[{b}] = {complex(z.detach().reshape(-1)[b].cpu())}")


def _couplings_squared(offdiag, diag: torch.Tensor, validate: bool) -> torch.Tensor:
    """k = offdiag^2 as (1|B, N-1) in diag's dtype (ones for offdiag None: the Laplacian)."""
    B, N = diag.shape
    if offdiag is None:
        return torch.ones(1, N - 1, dtype=diag.dtype, device=diag.device)
    if not isinstance(offdiag, torch.Tensor):
        raise ValueError(f"offdiag must be None or a torch.Tensor, got {type(offdiag).__name__}")
    if offdiag.is_complex() or not offdiag.is_floating_point():
        raise ValueError(f"offdiag must be a real floating tensor, got {offdiag.dtype}")
    if offdiag.device != diag.device:
        raise ValueError(f"offdiag is on {offdiag.device} but diag is on {diag.device}")
    if offdiag.dim() == 1:
        offdiag = offdiag.unsqueeze(0)
    if offdiag.dim() != 2 or offdiag.shape[-1] != N - 1 or offdiag.shape[0] not in (1, B):
        raise ValueError(
            f"offdiag must have shape (N-1,) = ({N - 1},) or (B, N-1) = ({B}, {N - 1}) "
            f"for diag of shape ({B}, {N}), got shape {tuple(offdiag.shape)}")
    if validate and not bool(torch.isfinite(offdiag).all()):
        raise ValueError("offdiag must be finite")
    return offdiag.to(diag.dtype).square()


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    """(B, M) -> (B, M + 1) with a zero in front: aligns k_{i-1} with position i."""
    return torch.nn.functional.pad(x, (1, 0))


class _ResolventDiagonal(torch.autograd.Function):
    """Forward by chunked scans; backward by the adjoint recurrences (docs/math.md §1), O(N).

    Reverse mode through the ratio recurrences. With gbar = dL/dRe G - i dL/dIm G, every
    adjoint below is holomorphic and dL = Re(sum_j A_j ds_j + sum_j K_j dk_j):
      causal:  abar_j = -gbar_j g_j^2 + (k_j / alpha_j^2) abar_{j+1}      (reverse scan)
               A_j = abar_j,  K_j = -abar_{j+1} / alpha_j
      bidir:   c_j = -gbar_j G_j^2 (adjoint of gamma_j = alpha_j + beta_j - s_j)
               abar_j = c_j + (k_j / alpha_j^2) abar_{j+1}                (reverse scan)
               bbar_j = c_j + (k_{j-1} / beta_j^2) bbar_{j-1}             (forward scan)
               A_j = abar_j + bbar_j - c_j,  K_j = -abar_{j+1} / alpha_j - bbar_j / beta_{j+1}
    The causal abar is -Q of docs/math.md; the bidirectional A equals its -G^2 (Lambda + P - gbar).
    With s_j = diag_j - z: dL/ddiag_j = Re A_j, and dL = Re(-(sum_j A_j) dz) gives PyTorch's
    complex gradient dL/dRe z + i dL/dIm z = -conj(sum_j A_j), summed over the row's positions
    for a per-row z (B, 1) and over the whole batch for a scalar z. k = offdiag^2 gets Re K
    (autograd then applies dk/db = 2b).
    Every product of consecutive weights k / alpha^2 (or k / beta^2) is a ratio of resolvent
    entries, so the scans cannot overflow.
    """

    @staticmethod
    def forward(ctx, diag, z, k, causal):
        B, N = diag.shape
        s = diag - z  # (B, N) complex
        kc = k.to(s.dtype).expand(B, N - 1)
        kf = _shift_right(kc)  # (B, N): k_{i-1} at i, 0 at i = 0
        if causal:
            alpha = ratio_scan(s, kf)
            out = alpha.reciprocal()
            ctx.save_for_backward(out, kc)
        else:
            # the backward ratios are the forward ones of the reversed sequence; one scan does both
            both = ratio_scan(torch.cat([s, s.flip(-1)]),
                              torch.cat([kf, _shift_right(kc.flip(-1))]))  # (2B, N)
            alpha, beta = both[:B], both[B:].flip(-1)
            out = (alpha + beta - s).reciprocal()
            ctx.save_for_backward(out, kc, alpha.reciprocal(), beta.reciprocal())
        ctx.causal = causal
        ctx.k_batch = k.shape[0]
        ctx.z_per_row = isinstance(z, torch.Tensor) and z.dim() == 2
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        gbar = grad_out.conj()
        pad_end = lambda x: torch.nn.functional.pad(x, (0, 1))  # noqa: E731
        if ctx.causal:
            g, kc = ctx.saved_tensors
            g2 = g * g
            w = pad_end(kc * g2[:, :-1]).flip(-1)  # k_j / alpha_j^2, reversed
            abar = linear_scan((-gbar * g2).flip(-1), w).flip(-1)
            A = abar
            K = -abar[:, 1:] * g[:, :-1] if ctx.needs_input_grad[2] else None
        else:
            G, kc, ia, ib = ctx.saved_tensors
            B = G.shape[0]
            c = -gbar * (G * G)
            w_a = pad_end(kc * (ia * ia)[:, :-1]).flip(-1)  # k_j / alpha_j^2, reversed
            w_b = _shift_right(kc * (ib * ib)[:, 1:])  # k_{j-1} / beta_j^2
            ab = linear_scan(torch.cat([c.flip(-1), c]), torch.cat([w_a, w_b]))  # (2B, N)
            abar, bbar = ab[:B].flip(-1), ab[B:]
            A = abar + bbar - c
            K = None
            if ctx.needs_input_grad[2]:
                K = -(abar[:, 1:] * ia[:, :-1] + bbar[:, :-1] * ib[:, 1:])
        grad_diag = A.real if ctx.needs_input_grad[0] else None
        # s = diag - z, so dL = Re(sum_j A_j ds_j) gives dL/dz (PyTorch convention) = -conj(sum A)
        grad_z = None
        if ctx.needs_input_grad[1]:
            grad_z = -(A.sum(1, keepdim=True) if ctx.z_per_row else A.sum()).conj()
        grad_k = None
        if K is not None:  # k is (1, N-1) when shared over the batch
            grad_k = K.real.sum(0, keepdim=True) if ctx.k_batch == 1 else K.real
        return grad_diag, grad_z, grad_k, None


def resolvent_diagonal(diag: torch.Tensor, z: complex | torch.Tensor = 1j, *,
                       offdiag: torch.Tensor | None = None, causal: bool = False,
                       validate: bool = True) -> torch.Tensor:
    """Diagonal of (H - z)^-1 (or of the leading-block resolvents when causal), shape (B, N).

    diag: (B, N) float32/float64, the full diagonal of H (the model passes -2 + v).
    z: complex, Im z > 0: a python scalar, a 0-dim tensor, or one shift per row as a tensor of
        shape (B,) or (B, 1); exact gradient when it requires grad (a tensor z must be on
        diag's device; it is cast to diag's complex dtype).
    offdiag: None (all ones), (N-1,) or (B, N-1) real; exact gradient when it requires grad.
    causal: g_i = [(H[0..i, 0..i] - z)^-1]_ii, which depends on diag[:, :i+1] only.
    validate: check values (finite diag/offdiag, finite z with Im z > 0 for a tensor z); each
        check is a host sync on CUDA, so a caller that guarantees them may pass False. Shapes
        and devices are always checked.
    Returns complex64 for float32 input, complex128 for float64.
    """
    diag, zt, k = _validate(diag, z, offdiag, validate=validate)
    if diag.shape[0] == 0:
        return torch.empty(diag.shape, dtype=_COMPLEX_OF[diag.dtype], device=diag.device)
    return _ResolventDiagonal.apply(diag, zt, k, bool(causal))


def resolvent_diagonal_reference(diag: torch.Tensor, z: complex | torch.Tensor = 1j, *,
                                 offdiag: torch.Tensor | None = None, causal: bool = False,
                                 validate: bool = True) -> torch.Tensor:
    """Same contract as `resolvent_diagonal`, as a plain loop in float64/complex128.

    Differentiable by autograd through the loop (wrt diag, z and offdiag). The result is cast
    to the complex dtype matching diag.
    """
    diag, zt, k = _validate(diag, z, offdiag, validate=validate)
    B, N = diag.shape
    # lists of (B,) columns: unbind once, so that autograd's backward stays O(N) (indexing
    # s[:, i] in the loop would make every step's backward write a full (B, N) zero tensor)
    z64 = zt.to(torch.complex128) if isinstance(zt, torch.Tensor) else zt
    s = (diag.to(torch.float64) - z64).unbind(1)  # N x (B,)
    k = k.to(torch.float64).expand(B, N - 1).unbind(1)  # (N - 1) x (B,)

    alpha = [s[0]]
    for i in range(1, N):
        alpha.append(s[i] - k[i - 1] / alpha[i - 1])
    if causal:
        out = [1 / a for a in alpha]
    else:
        beta = [None] * N
        beta[N - 1] = s[N - 1]
        for i in range(N - 2, -1, -1):
            beta[i] = s[i] - k[i] / beta[i + 1]
        out = [1 / (alpha[i] + beta[i] - s[i]) for i in range(N)]
    return torch.stack(out, dim=1).to(_COMPLEX_OF[diag.dtype])


def resolvent_features(g: torch.Tensor) -> torch.Tensor:
    """Complex (B, N) -> real (B, N, 2) = (Re, Im) in the matching real dtype (differentiable)."""
    if not isinstance(g, torch.Tensor) or not g.is_complex():
        raise ValueError(f"resolvent_features expects a complex tensor, got "
                         f"{getattr(g, 'dtype', type(g).__name__)}")
    return torch.view_as_real(g)
