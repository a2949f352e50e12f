"""Chunked scans for the BK-core recurrences: no Python loop of length N.

Both scans split the sequence axis into C chunks of length L (N <= C * L, padded at the end)
and work in three phases:

1. inside every chunk at once (a loop of length L over (B, C) tensors): the chunk's own
   composite map, as a prefix sequence;
2. across chunks (a loop of length C over (B,) tensors): the value entering each chunk;
3. everywhere at once (a few full (B, N) ops): apply each prefix map to its chunk's input.

With L ~ sqrt(N) a call costs O(sqrt(N)) small kernel launches and O(N) memory.

`ratio_scan` solves the continued-fraction recurrence alpha_i = s_i - kk_i / alpha_{i-1}
(a Möbius map per step); `linear_scan` solves x_i = u_i + w_i * x_{i-1}. Every quantity they
form is bounded when Im s_i <= -eta < 0 and kk_i >= 0 (see DESIGN.md §1), so neither uses a
clamp, an epsilon or a division trick.
"""

from __future__ import annotations

import math

import torch


def chunk_len(n: int, ops_ratio: float = 1.0) -> int:
    """Chunk length L balancing the in-chunk loop (L steps) against the carry loop (N/L steps).

    `ops_ratio` = (kernel launches per carry step) / (launches per in-chunk step).
    """
    return max(1, min(n, int(round(math.sqrt(n * ops_ratio)))))


def _pad_end(x: torch.Tensor, length: int, value: float) -> torch.Tensor:
    """Pad the last axis of x (B, N) to `length` with `value`."""
    extra = length - x.shape[-1]
    if extra == 0:
        return x
    fill = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, fill], dim=-1)


def ratio_scan(s: torch.Tensor, kk: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """alpha (B, N) with alpha_0 = s_0 and alpha_i = s_i - kk_i / alpha_{i-1}.

    s: (B, N) complex with Im s <= -eta < 0; kk: (B, N) same complex dtype, real values >= 0
    (kk_0 is ignored). Step i is the matrix M_i = [[s_i, -kk_i], [1, 0]] acting projectively
    on (alpha_{i-1}, 1). Inside a chunk the prefix product P_j = M_j ... M_first, divided by
    its (0, 0) entry p_j, is [[1, Q_j], [R_j, T_j]]:
        R_j = p_{j-1} / p_j,  Q_j = q_j / p_j,  T_j = q_{j-1} / p_j,
    where p_j is the determinant of (H - z) restricted to the chunk's positions so far (never
    zero for non-real z). These are ratios of resolvent entries, bounded by about kk / eta, so
    the normalisation is exact projectively and nothing grows. Given the chunk's input a,
    alpha_j = (a + Q_j) / (R_j a + T_j); the pole -T_j / R_j lies in the closed upper half-plane
    and a in the lower one, so the denominator does not cancel.
    """
    B, N = s.shape
    L = chunk or chunk_len(N, 0.5)  # 6 launches per in-chunk step, 3 per carry step
    C = -(-N // L)
    s3 = _pad_end(s, C * L, 1.0).view(B, C, L)
    k3 = _pad_end(kk, C * L, 0.0).view(B, C, L)

    # phase 1: normalised prefix products inside every chunk, in parallel over (B, C)
    Q = torch.zeros_like(s3[..., 0])
    R = torch.zeros_like(Q)
    T = torch.ones_like(Q)
    Qs, Rs, Ts = [], [], []
    for j in range(L):
        sj, kj = s3[..., j], k3[..., j]
        D = torch.addcmul(sj, kj, R, value=-1)  # p_j / p_{j-1}: the local ratio, |D| >= eta
        Rn = D.reciprocal()
        Qn = torch.addcmul(sj * Q, kj, T, value=-1).mul_(Rn)
        T = Q * Rn
        Q, R = Qn, Rn
        Qs.append(Q)
        Rs.append(R)
        Ts.append(T)
    Qs, Rs, Ts = torch.stack(Qs, -1), torch.stack(Rs, -1), torch.stack(Ts, -1)  # (B, C, L)

    # phase 2: the value entering each chunk. Chunk 0's input is irrelevant (kk_0 is ignored,
    # so its maps are constant); 1 is a harmless stand-in.
    a = torch.ones_like(s3[:, 0, 0])  # (B,)
    inputs = [a]
    for c in range(C - 1):
        a = (a + Qs[:, c, -1]) / torch.addcmul(Ts[:, c, -1], Rs[:, c, -1], a)
        inputs.append(a)
    a_in = torch.stack(inputs, -1).unsqueeze(-1)  # (B, C, 1)

    # phase 3: every position from its chunk's input
    alpha = (a_in + Qs) / torch.addcmul(Ts, Rs, a_in)
    return alpha.reshape(B, C * L)[:, :N]


def linear_scan(u: torch.Tensor, w: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x (B, N) with x_0 = u_0 and x_i = u_i + w_i * x_{i-1} (w_0 is ignored).

    u, w: (B, N), same dtype. Inside a chunk x_j = X_j + W_j * x_in, where X solves the chunk
    from a zero input and W_j is the product of w over the chunk up to j. In the BK adjoints
    every product of consecutive w's is a ratio of resolvent entries (bounded), so the
    cumulative product cannot overflow; it may underflow to 0, which is the exact limit.
    """
    B, N = u.shape
    L = chunk or chunk_len(N, 1.0)
    C = -(-N // L)
    u3 = _pad_end(u, C * L, 0.0).view(B, C, L)
    w3 = _pad_end(w, C * L, 0.0).view(B, C, L)

    X = torch.zeros_like(u3[..., 0])
    Xs = []
    for j in range(L):
        X = torch.addcmul(u3[..., j], w3[..., j], X)
        Xs.append(X)
    Xs = torch.stack(Xs, -1)  # (B, C, L)
    W = torch.cumprod(w3, dim=-1)  # (B, C, L), products within one chunk only

    x = torch.zeros_like(u3[:, 0, 0])  # chunk 0 starts from zero
    inputs = [x]
    for c in range(C - 1):
        x = torch.addcmul(Xs[:, c, -1], W[:, c, -1], x)
        inputs.append(x)
    x_in = torch.stack(inputs, -1).unsqueeze(-1)  # (B, C, 1)
    return torch.addcmul(Xs, W, x_in).reshape(B, C * L)[:, :N]
