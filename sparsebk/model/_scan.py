"""Chunked scans for the BK-core recurrences: no Python loop of length N.

Both scans split the sequence axis into C chunks of length L (N <= C * L, padded at the end)
and work in three phases:

1. inside every chunk at once (a loop of length L over (B, C) tensors): the chunk's own
   composite map, as a prefix sequence;
2. across chunks (a Hillis-Steele doubling scan over the C chunk maps, log2(C) steps of
   (B, C) ops): the value entering each chunk;
3. everywhere at once (a few full-size ops): apply each prefix map to its chunk's input.

A call costs O(L + log C) kernel launches and O(N) memory. Work is laid out as (L, B, C)
so that the loop's slices and the stacked results are contiguous. Chunk lengths were chosen
by measurement (see `chunk_len`). Complex division is avoided on full-size tensors: on CPU it is
~20x slower than a multiply by a reciprocal.

`ratio_scan` solves the continued-fraction recurrence alpha_i = s_i - kk_i / alpha_{i-1}
(a Möbius map per step); `linear_scan` solves x_i = u_i + w_i * x_{i-1}. Every quantity they
form is bounded when Im s_i <= -eta < 0 and kk_i >= 0 (see docs/math.md §1), so neither uses a
clamp, an epsilon or a division trick.
"""

from __future__ import annotations

import torch


def chunk_len(n: int) -> int:
    """Chunk length L for a sequence of n positions, about sqrt(n) / 3.

    Measured (B = 16, float32, one CPU thread, fwd+bwd): the best L was 4-8 at N = 128, 4-16
    at 512, 16-32 at 2048 and 32 at 8192; shorter chunks make the log-depth carry scan
    over C = N / L chunks the larger cost, longer ones the per-step loop.
    """
    return max(1, min(n, max(4, round(n ** 0.5 / 3))))


def _to_lbc(x: torch.Tensor, C: int, L: int, value: float) -> torch.Tensor:
    """(B, N) -> (L, B, C), padding the end of the sequence with `value` to N = C * L."""
    B, N = x.shape
    if C * L > N:
        fill = torch.full((B, C * L - N), value, dtype=x.dtype, device=x.device)
        x = torch.cat([x, fill], dim=-1)
    return x.reshape(B, C, L).permute(2, 0, 1).contiguous()


def _from_lbc(x: torch.Tensor, n: int) -> torch.Tensor:
    """(L, B, C) -> (B, n), dropping the padding."""
    L, B, C = x.shape
    return x.permute(1, 2, 0).reshape(B, C * L)[:, :n]


def mobius_prefix(Q: torch.Tensor, R: torch.Tensor, T: torch.Tensor):
    """Inclusive prefix compositions over the last axis of the maps a -> (a + Q) / (R a + T).

    Map c is the normalised matrix [[1, Q_c], [R_c, T_c]]; the prefix at c is map c after map
    c-1 after ... map 0, again divided by its (0, 0) entry. That entry is a ratio of
    determinants of (H - z) on blocks of positions, never zero for non-real z, and the
    normalised entries are ratios of resolvent entries, so they stay bounded.
    """
    M = torch.stack([Q, R, T])  # (3, ..., C): one cat per level instead of three
    C = M.shape[-1]
    d = 1
    while d < C:
        q2, r2, t2 = M[..., d:].unbind(0)  # later maps
        Q1, R1, T1 = M[..., :-d].unbind(0)  # earlier prefixes
        inv = (q2 * R1).add_(1).reciprocal_()
        new = torch.stack([torch.addcmul(Q1, q2, T1), torch.addcmul(r2, t2, R1),
                           torch.addcmul(r2 * Q1, t2, T1)]).mul_(inv)
        M = torch.cat([M[..., :d], new], -1)
        d *= 2
    return M.unbind(0)


def linear_prefix(X: torch.Tensor, W: torch.Tensor):
    """Inclusive prefix compositions over the last axis of the maps x -> X + W x."""
    C = X.shape[-1]
    d = 1
    while d < C:
        nX = torch.addcmul(X[..., d:], W[..., d:], X[..., :-d])
        nW = W[..., d:] * W[..., :-d]
        X = torch.cat([X[..., :d], nX], -1)
        W = torch.cat([W[..., :d], nW], -1)
        d *= 2
    return X, W


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
    L = chunk or chunk_len(N)
    C = -(-N // L)
    sl = _to_lbc(s, C, L, 1.0)  # (L, B, C)
    kl = _to_lbc(kk, C, L, 0.0)

    # phase 1: normalised prefix products inside every chunk, in parallel over (B, C)
    Q = torch.zeros_like(sl[0])
    R = torch.zeros_like(Q)
    T = torch.ones_like(Q)
    Qs, Rs, Ts = [], [], []
    for sj, kj in zip(sl.unbind(0), kl.unbind(0)):
        Rn = torch.addcmul(sj, kj, R, value=-1).reciprocal_()  # p_{j-1} / p_j, |1 / Rn| >= eta
        Qn = torch.addcmul(sj * Q, kj, T, value=-1).mul_(Rn)
        T = Q * Rn
        Q, R = Qn, Rn
        Qs.append(Q)
        Rs.append(R)
        Ts.append(T)
    Qs, Rs, Ts = torch.stack(Qs), torch.stack(Rs), torch.stack(Ts)  # (L, B, C)

    # phase 2: kk_0 = 0 makes chunk 0's map constant (Q = T = 0 exactly), so every prefix
    # from chunk 0 is the constant 1 / R: the alpha leaving chunk c.
    _, Rp, _ = mobius_prefix(Qs[-1], Rs[-1], Ts[-1])  # (B, C)
    a_in = torch.cat([torch.ones_like(Rp[:, :1]), Rp[:, :-1].reciprocal()], 1)  # chunk 0: any

    # phase 3: every position from its chunk's input
    alpha = (a_in + Qs).mul_(torch.addcmul(Ts, Rs, a_in).reciprocal_())  # (L, B, C)
    return _from_lbc(alpha, N)


def linear_scan(u: torch.Tensor, w: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x (B, N) with x_0 = u_0 and x_i = u_i + w_i * x_{i-1} (w_0 is ignored).

    u, w: (B, N), same dtype. Inside a chunk x_j = X_j + W_j * x_in, where X solves the chunk
    from a zero input and W_j is the product of w over the chunk up to j. In the BK adjoints
    every product of consecutive w's is a ratio of resolvent entries (bounded), so the
    cumulative product cannot overflow; it may underflow to 0, which is the exact limit.
    """
    B, N = u.shape
    L = chunk or chunk_len(N)
    C = -(-N // L)
    ul = _to_lbc(u, C, L, 0.0)  # (L, B, C)
    wl = _to_lbc(w, C, L, 0.0)

    X = torch.zeros_like(ul[0])
    W = torch.ones_like(X)
    Xs, Ws = [], []
    for uj, wj in zip(ul.unbind(0), wl.unbind(0)):
        X = torch.addcmul(uj, wj, X)
        W = W * wj  # products within one chunk only (a loop of muls beats cumprod here)
        Xs.append(X)
        Ws.append(W)
    Xs, W = torch.stack(Xs), torch.stack(Ws)  # (L, B, C)

    Xp, _ = linear_prefix(Xs[-1], W[-1])  # (B, C): x leaving chunk c (chunk 0 starts from 0)
    x_in = torch.cat([torch.zeros_like(Xp[:, :1]), Xp[:, :-1]], 1)
    return _from_lbc(torch.addcmul(Xs, W, x_in), N)
