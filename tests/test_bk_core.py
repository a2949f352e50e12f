"""BK-core against trusted references: dense inverses, gradcheck, the float64 loop, plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from sparsebk.model._scan import linear_scan, ratio_scan
from sparsebk.model.bk_core import resolvent_diagonal, resolvent_diagonal_reference, resolvent_features
from conftest import requires_cuda
from rounding import float32_bound

pytestmark = pytest.mark.usefixtures("one_torch_thread")


Z_VALUES = [1j, 0.3 + 0.5j, -1 + 2j]
N_VALUES = [1, 2, 3, 17, 128, 512]
B = 2


def _inputs(n, dtype=torch.float64, seed=0, batch=B, per_batch_offdiag=False):
    g = torch.Generator().manual_seed(seed)
    diag = -4 * torch.rand(batch, n, generator=g, dtype=torch.float64)  # [-4, 0]
    shape = (batch, n - 1) if per_batch_offdiag else (n - 1,)
    off = 0.5 + torch.rand(*shape, generator=g, dtype=torch.float64)  # [0.5, 1.5]
    return diag.to(dtype), off.to(dtype)


def _dense_h(diag_row, off_row):
    """Dense complex128 H for one sequence."""
    h = torch.diag(diag_row.double()).to(torch.complex128)
    if diag_row.numel() > 1:
        o = off_row.double().to(torch.complex128)
        h = h + torch.diag(o, 1) + torch.diag(o, -1)
    return h


def _dense_diag(diag, off, z, positions=None):
    """Bidirectional G_ii (positions None) or causal g_i at `positions`, by torch.linalg.inv."""
    out = []
    for b in range(diag.shape[0]):
        o = off[b] if off.dim() == 2 else off
        h = _dense_h(diag[b], o)
        n = h.shape[0]
        eye = torch.eye(n, dtype=torch.complex128)
        if positions is None:
            out.append(torch.linalg.inv(h - z * eye).diagonal())
        else:
            shifted = h - z * eye
            out.append(torch.stack([torch.linalg.inv(shifted[: i + 1, : i + 1])[i, i] for i in positions]))
    return torch.stack(out)


def _causal_positions(n):
    if n <= 128:
        return list(range(n))
    return sorted({0, 1, 2, 63, 64, 65, n // 2, n - 2, n - 1})  # dense inverses of every block are slow


@pytest.mark.parametrize("n", N_VALUES)
@pytest.mark.parametrize("z", Z_VALUES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_dense_inverse(n, z, causal):
    diag, off = _inputs(n, per_batch_offdiag=(n % 2 == 1))
    pos = _causal_positions(n) if causal else None
    ref = _dense_diag(diag, off, z, pos)
    scale = ref.abs().max()

    got64 = resolvent_diagonal(diag, z, offdiag=off, causal=causal)
    assert got64.dtype == torch.complex128
    got64 = got64 if pos is None else got64[:, pos]
    assert (got64 - ref).abs().max() <= 1e-10 * scale

    got32 = resolvent_diagonal(diag.float(), z, offdiag=off.float(), causal=causal)
    assert got32.dtype == torch.complex64
    got32 = got32 if pos is None else got32[:, pos]
    bound = _float32_bound(diag, off, z, causal, pos)
    assert (got32.to(torch.complex128) - ref).abs().max() <= bound

    ref_loop = resolvent_diagonal_reference(diag, z, offdiag=off, causal=causal)
    ref_loop = ref_loop if pos is None else ref_loop[:, pos]
    assert (ref_loop - ref).abs().max() <= 1e-10 * scale


def _float32_bound(diag, off, z, causal, pos=None):
    """The float32 fast path's rounding bound (tests/rounding.py), from its float64 run: its
    rows are independent, so the samples are replicated rows."""
    def fn(r):
        o = off.repeat(r, 1) if off is not None and off.dim() == 2 else off
        zz = z.repeat(r) if isinstance(z, torch.Tensor) and z.dim() == 1 else \
            z.repeat(r, 1) if isinstance(z, torch.Tensor) and z.dim() == 2 else z
        g = resolvent_diagonal(diag.double().repeat(r, 1), zz, offdiag=o, causal=causal)
        return g if pos is None else g[:, pos]
    return float32_bound(fn, replicas=True)


def test_default_offdiag_is_the_laplacian():
    diag, _ = _inputs(33)
    ones = torch.ones(32, dtype=torch.float64)
    ref = _dense_diag(diag, ones, 1j)
    assert (resolvent_diagonal(diag) - ref).abs().max() <= 1e-12
    # z as a 0-dim tensor gives the same as the python scalar
    zt = torch.tensor(1j, dtype=torch.complex128)
    assert (resolvent_diagonal(diag, zt) - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_zero_offdiag_splits_the_chain(causal):
    # b_i = 0 decouples the operator into independent blocks: still the dense inverse
    diag, off = _inputs(40, seed=11)
    off[[0, 9, 10, 38]] = 0.0
    pos = list(range(40)) if causal else None
    ref = _dense_diag(diag, off, 0.3 + 0.5j, pos)
    got = resolvent_diagonal(diag, 0.3 + 0.5j, offdiag=off, causal=causal)
    assert (got - ref).abs().max() <= 1e-12


def test_non_contiguous_inputs():
    diag, off = _inputs(50, seed=12, batch=3, per_batch_offdiag=True)
    want = resolvent_diagonal(diag, offdiag=off)
    got = resolvent_diagonal(diag.t().contiguous().t(), offdiag=off.t().contiguous().t())
    assert torch.equal(got, want)
    row = diag[:1].expand(4, 50)  # stride 0 over the batch
    assert torch.equal(resolvent_diagonal(row), resolvent_diagonal(row.contiguous()))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_diag_and_z(causal):
    diag, off = _inputs(12, per_batch_offdiag=True)
    diag.requires_grad_()
    z = torch.tensor(0.3 + 0.5j, dtype=torch.complex128, requires_grad=True)
    fn = lambda d, zz: resolvent_diagonal(d, zz, offdiag=off, causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (diag, z), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_long_sequence_several_chunks(causal):
    # N = 70 spans 9 chunks (4 carry levels) in both scans; default off-diagonal
    diag, _ = _inputs(70, batch=1)
    diag.requires_grad_()
    z = torch.tensor(-1 + 2j, dtype=torch.complex128, requires_grad=True)
    fn = lambda d, zz: resolvent_diagonal(d, zz, causal=causal)  # noqa: E731
    # fast mode: checks u^T J v for random u, v instead of the full Jacobian (N^2 entries)
    assert torch.autograd.gradcheck(fn, (diag, z), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("n", [1, 2, 5, 17, 65, 257])
@pytest.mark.parametrize("offdiag_shape", ["none", "shared", "per_batch"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_reference_autograd(n, offdiag_shape, causal):
    # every gradient (diag, z, offdiag) against autograd through the float64 loop, eta = 0.05
    g = torch.Generator().manual_seed(n)
    diag = 20 * torch.rand(3, n, generator=g, dtype=torch.float64) - 12
    off = {"none": None,
           "shared": torch.rand(n - 1, generator=g, dtype=torch.float64) * 2 - 1,
           "per_batch": torch.rand(3, n - 1, generator=g, dtype=torch.float64) * 2}[offdiag_shape]
    cot = torch.randn(3, n, generator=g, dtype=torch.complex128)
    grads = []
    for fn in (resolvent_diagonal, resolvent_diagonal_reference):
        d = diag.clone().requires_grad_()
        z = torch.tensor(0.7 + 0.05j, dtype=torch.complex128, requires_grad=True)
        o = None if off is None else off.clone().requires_grad_()
        torch.autograd.backward(fn(d, z, offdiag=o, causal=causal), cot)
        grads.append((d.grad, z.grad, None if o is None else o.grad))
    (d_fast, z_fast, o_fast), (d_ref, z_ref, o_ref) = grads
    assert (d_fast - d_ref).abs().max() <= 1e-10 * d_ref.abs().max()
    assert abs(complex(z_fast) - complex(z_ref)) <= 1e-10 * abs(complex(z_ref))
    if off is not None and n > 1:
        assert o_fast.shape == off.shape
        assert (o_fast - o_ref).abs().max() <= 1e-10 * o_ref.abs().max()


@pytest.mark.parametrize("causal", [False, True])
def test_float32_gradient_matches_float64_reference(causal):
    diag, off = _inputs(300, seed=3)
    w = torch.randn(B, 300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    d64 = diag.clone().requires_grad_()
    z64 = torch.tensor(0.3 + 0.5j, dtype=torch.complex128, requires_grad=True)
    (resolvent_features(resolvent_diagonal_reference(d64, z64, offdiag=off, causal=causal)) * w).sum().backward()

    d32 = diag.float().requires_grad_()
    z32 = torch.tensor(0.3 + 0.5j, dtype=torch.complex64, requires_grad=True)
    (resolvent_features(resolvent_diagonal(d32, z32, offdiag=off.float(), causal=causal))
     * w.float()).sum().backward()

    assert d32.grad.dtype == torch.float32 and z32.grad.dtype == torch.complex64

    def fast64():  # the float32 path's computation, in float64: for its rounding bound
        d = diag.clone().requires_grad_()
        z = torch.tensor(0.3 + 0.5j, dtype=torch.complex128, requires_grad=True)
        (resolvent_features(resolvent_diagonal(d, z, offdiag=off, causal=causal)) * w).sum().backward()
        return d.grad, z.grad

    d_bound, z_bound = float32_bound(fast64)
    assert (d32.grad.double() - d64.grad).abs().max() <= d_bound
    assert abs(complex(z32.grad) - complex(z64.grad)) <= z_bound


def test_causal_mode_is_exactly_causal():
    n = 200
    diag, off = _inputs(n, seed=5)
    base = resolvent_diagonal(diag, offdiag=off, causal=True)
    for j in [0, 1, 57, 64, 128, 199]:
        bumped = diag.clone()
        bumped[:, j] += 1.7
        out = resolvent_diagonal(bumped, offdiag=off, causal=True)
        assert torch.equal(out[:, :j], base[:, :j])
        assert (out[:, j] != base[:, j]).all()

    # and the gradient of g_i has no component on later positions (exact zeros)
    d = diag.clone().requires_grad_()
    i = 100
    g = resolvent_diagonal(d, offdiag=off, causal=True)
    (g[:, i].real + g[:, i].imag).sum().backward()
    assert torch.count_nonzero(d.grad[:, i + 1:]) == 0
    assert (d.grad[:, i] != 0).all()


def test_bidirectional_mode_sees_the_future():
    diag, off = _inputs(20, seed=6)
    bumped = diag.clone()
    bumped[:, 15] += 1.0
    a = resolvent_diagonal(diag, offdiag=off)
    b = resolvent_diagonal(bumped, offdiag=off)
    assert ((a[:, 10] - b[:, 10]).abs() > 1e-8).all()


@pytest.mark.parametrize("causal", [False, True])
def test_fast_matches_reference_at_4096(causal):
    g = torch.Generator().manual_seed(7)
    diag = -2 + 20 * torch.rand(B, 4096, generator=g, dtype=torch.float64) - 10
    fast = resolvent_diagonal(diag, 0.3 + 0.5j, causal=causal)
    ref = resolvent_diagonal_reference(diag, 0.3 + 0.5j, causal=causal)
    assert (fast - ref).abs().max() <= 1e-10
    fast32 = resolvent_diagonal(diag.float(), 0.3 + 0.5j, causal=causal)
    bound = _float32_bound(diag, None, 0.3 + 0.5j, causal)
    assert (fast32.to(torch.complex128) - ref).abs().max() <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_finite_and_bounded_at_65536(dtype, causal):
    g = torch.Generator().manual_seed(8)
    diag = (-2 + 20 * torch.rand(2, 65536, generator=g, dtype=torch.float64) - 10).to(dtype)
    diag.requires_grad_()
    out = resolvent_diagonal(diag, 1j, causal=causal)
    assert torch.isfinite(torch.view_as_real(out)).all()
    assert out.abs().max() <= 1.0 + 1e-5  # |G_ii| <= 1 / Im z
    out.abs().sum().backward()
    assert torch.isfinite(diag.grad).all()
    if dtype == torch.float32 and causal:  # no error growth along the sequence (float64 loop)
        ref = resolvent_diagonal_reference(diag.detach()[:1], 1j, causal=causal)
        bound = _float32_bound(diag.detach()[:1], None, 1j, causal)  # of these float32 inputs
        assert (out.detach()[:1] - ref).abs().max() <= bound


def test_features_are_real_and_imaginary_parts():
    g = torch.complex(torch.randn(3, 5), torch.randn(3, 5)).requires_grad_()
    f = resolvent_features(g)
    assert f.shape == (3, 5, 2) and f.dtype == torch.float32
    assert torch.equal(f[..., 0], g.real) and torch.equal(f[..., 1], g.imag)
    f[..., 1].sum().backward()  # d/dIm: PyTorch's complex gradient is dL/dRe + i dL/dIm = i
    assert torch.equal(g.grad, torch.full((3, 5), 1j, dtype=torch.complex64))
    assert resolvent_features(g.detach().to(torch.complex128)).dtype == torch.float64
    with pytest.raises(ValueError, match="complex"):
        resolvent_features(torch.randn(3, 5))


def test_empty_batch():
    out = resolvent_diagonal(torch.zeros(0, 4))
    assert out.shape == (0, 4) and out.dtype == torch.complex64


# --- the scans against plain loops, for chunk lengths that do and do not divide N -------------

@pytest.mark.parametrize("n,chunk", [(1, 1), (7, 1), (7, 3), (16, 4), (16, 16), (29, 5), (30, 64)])
def test_scans_match_plain_loops(n, chunk):
    g = torch.Generator().manual_seed(n * 100 + chunk)
    s = torch.complex(torch.randn(3, n, generator=g, dtype=torch.float64) * 3,
                      -0.2 - torch.rand(3, n, generator=g, dtype=torch.float64))
    kk = (0.1 + torch.rand(3, n, generator=g, dtype=torch.float64)).to(s.dtype)
    kk[:, 0] = 0
    want = [s[:, 0]]
    for i in range(1, n):
        want.append(s[:, i] - kk[:, i] / want[-1])
    assert (ratio_scan(s, kk, chunk) - torch.stack(want, 1)).abs().max() <= 1e-12

    u = torch.randn(3, n, generator=g, dtype=torch.float64)
    w = 1.5 * torch.randn(3, n, generator=g, dtype=torch.float64)
    x = [u[:, 0]]
    for i in range(1, n):
        x.append(u[:, i] + w[:, i] * x[-1])
    x = torch.stack(x, 1)
    assert (linear_scan(u, w, chunk) - x).abs().max() <= 1e-12 * max(1.0, x.abs().max().item())


# --- bad input ---------------------------------------------------------------------------------

BAD_INPUTS = [
    (dict(diag=torch.zeros(5)), "shape \\(B, N\\)"),
    (dict(diag=torch.zeros(2, 3, 4)), "shape \\(B, N\\)"),
    (dict(diag=torch.zeros(2, 0)), "N = 0"),
    (dict(diag=torch.zeros(2, 4, dtype=torch.int64)), "float32 or float64"),
    (dict(diag=torch.zeros(2, 4, dtype=torch.complex64)), "float32 or float64"),
    (dict(diag=[[0.0, 1.0]]), "torch.Tensor"),
    (dict(diag=torch.zeros(2, 4), z=1.0), "Im z > 0"),
    (dict(diag=torch.zeros(2, 4), z=0.5 + 0j), "Im z > 0"),
    (dict(diag=torch.zeros(2, 4), z=1 - 1j), "Im z > 0"),
    (dict(diag=torch.zeros(2, 4), z=complex("nan+1j")), "finite"),
    (dict(diag=torch.zeros(2, 4), z=torch.tensor(2.0 - 0.1j)), "Im z > 0"),
    (dict(diag=torch.zeros(2, 4), z=torch.tensor(2.0)), "real tensor"),
    (dict(diag=torch.zeros(2, 4), z=torch.tensor([1j])), "0-dim"),
    (dict(diag=torch.zeros(2, 4), z="1j"), "complex number"),
    (dict(diag=torch.zeros(2, 4), z=torch.tensor([1j, 0.5 - 0.25j])), "every row; z\\[1\\] = \\(0.5-0.25j\\)"),
    (dict(diag=torch.zeros(2, 4), z=torch.tensor([[1j], [0j]])), "every row; z\\[1\\]"),
    (dict(diag=torch.zeros(2, 4), z=torch.tensor([complex("nan+1j"), 1j])), "finite with Im z > 0 in every row; z\\[0\\]"),
    (dict(diag=torch.zeros(2, 4), z=torch.tensor([1j, 1j, 1j])), "shape \\(B,\\) = \\(2,\\) .* got shape \\(3,\\)"),
    (dict(diag=torch.zeros(2, 4), z=torch.full((1, 2), 1j)), "got shape \\(1, 2\\)"),
    (dict(diag=torch.zeros(2, 4), z=torch.full((2, 4), 1j)), "got shape \\(2, 4\\)"),
    (dict(diag=torch.zeros(2, 4), z=torch.ones(2)), "real tensor"),
    (dict(diag=torch.zeros(2, 4), z=torch.full((2,), 1j, device="meta")), "z is on meta but diag is on cpu"),
    (dict(diag=torch.tensor([[0.0, float("nan"), 0.0]])), "finite; diag\\[0, 1\\] = nan"),
    (dict(diag=torch.tensor([[0.0, 0.0], [0.0, float("inf")]])), "finite; diag\\[1, 1\\] = inf"),
    (dict(diag=torch.zeros(2, 4), offdiag=torch.ones(4)), "shape \\(N-1,\\) = \\(3,\\)"),
    (dict(diag=torch.zeros(2, 4), offdiag=torch.ones(3, 3)), "got shape \\(3, 3\\)"),
    (dict(diag=torch.zeros(2, 4), offdiag=torch.ones(2, 3, 1)), "got shape"),
    (dict(diag=torch.zeros(2, 4), offdiag=torch.ones(3, dtype=torch.int64)), "real floating"),
    (dict(diag=torch.zeros(2, 4), offdiag=torch.tensor([1.0, float("inf"), 1.0])), "offdiag must be finite"),
    (dict(diag=torch.zeros(2, 4), offdiag=[1.0, 1.0, 1.0]), "offdiag must be None or a torch.Tensor"),
]


@pytest.mark.parametrize("fn", [resolvent_diagonal, resolvent_diagonal_reference])
@pytest.mark.parametrize("kwargs,message", BAD_INPUTS)
def test_bad_input_raises(fn, kwargs, message):
    kwargs = dict(kwargs)
    diag = kwargs.pop("diag")
    with pytest.raises(ValueError, match=message):
        fn(diag, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_offdiag_gradient_matches_dense_inverse(causal):
    # dG_jj/db_i = -2 G_ji G_j,i+1 for symmetric H (from d(H - z)^-1 = -(H - z)^-1 dH (H - z)^-1);
    # causal: the same on the leading block H[0..j, 0..j]
    diag, off = _inputs(9, seed=9, batch=1)
    off.requires_grad_()
    j = 6
    out = resolvent_diagonal(diag, 0.3 + 0.5j, offdiag=off, causal=causal)
    (out[0, j].real + 2 * out[0, j].imag).backward()
    m = j + 1 if causal else 9
    h = _dense_h(diag[0], off.detach())[:m, :m]
    ginv = torch.linalg.inv(h - (0.3 + 0.5j) * torch.eye(m, dtype=torch.complex128))
    dG = torch.zeros(8, dtype=torch.complex128)
    dG[: m - 1] = torch.stack([-2 * ginv[j, i] * ginv[j, i + 1] for i in range(m - 1)])
    want = dG.real + 2 * dG.imag
    assert (off.grad - want).abs().max() <= 1e-12
    if causal:
        assert torch.count_nonzero(off.grad[j:]) == 0


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_offdiag(causal):
    diag, off = _inputs(13, seed=4, per_batch_offdiag=True)
    off.requires_grad_()
    fn = lambda o: resolvent_diagonal(diag, 0.3 + 0.5j, offdiag=o, causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (off,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_huge_finite_diag_is_accepted():
    # the sum of these overflows to inf in float32, yet every entry is finite
    diag = torch.full((1, 8), 3e38)
    out = resolvent_diagonal(diag, causal=True)
    ref = resolvent_diagonal_reference(diag, causal=True)  # ~3.3e-39, a float32 subnormal
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_validate_false_skips_value_checks_only():
    with pytest.raises(ValueError, match="shape"):
        resolvent_diagonal(torch.zeros(5), validate=False)
    # a python z is always checked (no host sync needed)
    with pytest.raises(ValueError, match="Im z"):
        resolvent_diagonal(torch.zeros(1, 3), -1j, validate=False)


@pytest.mark.parametrize("z_shape", [(), (4,)])
@pytest.mark.parametrize("causal", [False, True])
def test_every_tensor_follows_the_input_device(causal, z_shape):
    # the meta device runs no kernels: any tensor made on a fixed device (CPU) would fail to
    # mix with it, so this checks device-agnosticism on a machine without a GPU
    d = torch.empty(4, 300, device="meta").requires_grad_()
    z = torch.full(z_shape, 0.3 + 1j, dtype=torch.complex64, device="meta").requires_grad_()
    off = torch.empty(4, 299, device="meta")
    out = resolvent_diagonal(d, z, offdiag=off, causal=causal, validate=False)
    assert out.device.type == "meta" and out.dtype == torch.complex64 and out.shape == (4, 300)
    out.abs().sum().backward()
    assert d.grad.device.type == "meta" and z.grad.device.type == "meta"
    assert z.grad.shape == z_shape


# --- one shift z per row (the B * H rows of a multi-head layer) --------------------------------

Z_ROWS = [1j, 0.3 + 0.5j, -1 + 2j]  # one z per row of a batch of 3


def _z_rows(form, dtype=torch.complex128):
    z = torch.tensor(Z_ROWS, dtype=dtype)
    return z if form == "(B,)" else z.unsqueeze(1)


def _dense_diag_differentiable(diag, off, z, causal):
    """Autograd-friendly dense reference: diag (B, N), off (B, N-1), z (B,) -> (B, N) complex128."""
    n = diag.shape[1]
    h = torch.diag_embed(diag).to(torch.complex128)
    if n > 1:
        o = off.to(torch.complex128)
        h = h + torch.diag_embed(o, 1) + torch.diag_embed(o, -1)
    shifted = h - z.reshape(-1, 1, 1) * torch.eye(n, dtype=torch.complex128)  # (B, N, N)
    if not causal:
        return torch.linalg.inv(shifted).diagonal(dim1=-2, dim2=-1)
    return torch.stack([torch.linalg.inv(shifted[:, : i + 1, : i + 1])[:, i, i] for i in range(n)], 1)


@pytest.mark.parametrize("n", [1, 2, 17, 128])
@pytest.mark.parametrize("z_form", ["(B,)", "(B, 1)"])
@pytest.mark.parametrize("causal", [False, True])
def test_per_row_z_matches_dense_inverse(n, z_form, causal):
    diag, off = _inputs(n, seed=20 + n, batch=3, per_batch_offdiag=True)
    pos = _causal_positions(n) if causal else None
    ref = torch.cat([_dense_diag(diag[b:b + 1], off[b:b + 1], Z_ROWS[b], pos) for b in range(3)])
    scale = ref.abs().max()

    got64 = resolvent_diagonal(diag, _z_rows(z_form), offdiag=off, causal=causal)
    assert got64.dtype == torch.complex128 and got64.shape == (3, n)
    got64 = got64 if pos is None else got64[:, pos]
    assert (got64 - ref).abs().max() <= 1e-10 * scale

    # a complex128 z follows float32 diag down to complex64
    got32 = resolvent_diagonal(diag.float(), _z_rows(z_form), offdiag=off.float(), causal=causal)
    assert got32.dtype == torch.complex64
    got32 = got32 if pos is None else got32[:, pos]
    bound = _float32_bound(diag, off, _z_rows(z_form), causal, pos)
    assert (got32.to(torch.complex128) - ref).abs().max() <= bound

    ref_loop = resolvent_diagonal_reference(diag, _z_rows(z_form), offdiag=off, causal=causal)
    ref_loop = ref_loop if pos is None else ref_loop[:, pos]
    assert (ref_loop - ref).abs().max() <= 1e-10 * scale


@pytest.mark.parametrize("causal", [False, True])
def test_per_row_z_equal_rows_agree_with_a_scalar_z(causal):
    # the same shift in every row: same values, and the per-row gradients sum to the scalar one
    diag, off = _inputs(40, seed=21, batch=3)
    cot = torch.randn(3, 40, dtype=torch.complex128, generator=torch.Generator().manual_seed(2))
    z0 = torch.tensor(0.3 + 0.5j, dtype=torch.complex128, requires_grad=True)
    zr = torch.full((3,), 0.3 + 0.5j, dtype=torch.complex128, requires_grad=True)
    out0 = resolvent_diagonal(diag, z0, offdiag=off, causal=causal)
    outr = resolvent_diagonal(diag, zr, offdiag=off, causal=causal)
    assert (outr - out0).abs().max() <= 1e-14
    torch.autograd.backward(out0, cot)
    torch.autograd.backward(outr, cot)
    assert zr.grad.shape == (3,)
    assert abs(complex(zr.grad.sum()) - complex(z0.grad)) <= 1e-12 * abs(complex(z0.grad))


@pytest.mark.parametrize("z_form", ["(B,)", "(B, 1)"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_per_row_z_diag_and_offdiag(z_form, causal):
    # every input requires grad at once: diag (B, N), z (B,) or (B, 1), offdiag (B, N-1)
    diag, off = _inputs(12, seed=22, batch=3, per_batch_offdiag=True)
    args = (diag.requires_grad_(), _z_rows(z_form).requires_grad_(), off.requires_grad_())
    fn = lambda d, zz, o: resolvent_diagonal(d, zz, offdiag=o, causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 33])
@pytest.mark.parametrize("causal", [False, True])
def test_per_row_gradients_match_dense_inverse_autograd(n, causal):
    # diag, per-row z and per-row offdiag gradients: fast path, float64 loop and autograd
    # through torch.linalg.inv of the dense tridiagonal matrix (leading blocks when causal)
    g = torch.Generator().manual_seed(30 + n)
    diag = 8 * torch.rand(3, n, generator=g, dtype=torch.float64) - 6
    off = torch.rand(3, n - 1, generator=g, dtype=torch.float64) * 2 - 1  # signs: only b^2 enters
    z = torch.tensor([0.7 + 0.05j, -2 + 0.3j, 1j], dtype=torch.complex128)
    cot = torch.randn(3, n, generator=g, dtype=torch.complex128)
    grads = []
    for fn in (resolvent_diagonal, resolvent_diagonal_reference,
               lambda d, zz, offdiag, causal: _dense_diag_differentiable(d, offdiag, zz, causal)):
        d, zz, o = diag.clone().requires_grad_(), z.clone().requires_grad_(), off.clone().requires_grad_()
        torch.autograd.backward(fn(d, zz, offdiag=o, causal=causal), cot)
        grads.append((d.grad, zz.grad, o.grad))
    dense = grads[2] if n > 1 else grads[2][:2]  # N = 1: no off-diagonal, no gradient to compare
    for got in grads[:2]:
        for a, want in zip(got, dense):
            assert a.shape == want.shape
            assert (a - want).abs().max() <= 1e-9 * max(1.0, want.abs().max().item())
    assert (dense[1] != 0).all()  # every row's z gets its own, nonzero gradient


def test_per_row_float32_gradient_matches_float64_reference():
    diag, off = _inputs(300, seed=23, batch=3, per_batch_offdiag=True)
    w = torch.randn(3, 300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for causal in (False, True):
        d64, z64 = diag.clone().requires_grad_(), _z_rows("(B,)").requires_grad_()
        o64 = off.clone().requires_grad_()
        (resolvent_features(resolvent_diagonal_reference(d64, z64, offdiag=o64, causal=causal))
         * w).sum().backward()
        d32, z32 = diag.float().requires_grad_(), _z_rows("(B,)", torch.complex64).requires_grad_()
        o32 = off.float().requires_grad_()
        (resolvent_features(resolvent_diagonal(d32, z32, offdiag=o32, causal=causal))
         * w.float()).sum().backward()
        assert z32.grad.dtype == torch.complex64 and z32.grad.shape == (3,)

        def fast64():  # the float32 path's computation, in float64: for its rounding bound
            d, z, o = (t.clone().requires_grad_() for t in (diag, _z_rows("(B,)"), off))
            (resolvent_features(resolvent_diagonal(d, z, offdiag=o, causal=causal))
             * w).sum().backward()
            return d.grad, z.grad, o.grad

        bounds = float32_bound(fast64)
        for a, want, bound in zip((d32.grad, z32.grad, o32.grad), (d64.grad, z64.grad, o64.grad),
                                  bounds, strict=True):
            assert (a.to(want.dtype) - want).abs().max() <= bound


@pytest.mark.parametrize("causal", [False, True])
def test_shift_is_a_rescaled_operator_at_z_equals_i(causal):
    # (H - z)^-1 = y^-1 ((H - x) / y - i)^-1 for z = x + i y (and so on every leading block):
    # a learnable z_h = x_h + i y_h shifts the spectrum by x_h and sets its resolution y_h
    diag, off = _inputs(50, seed=24, batch=3, per_batch_offdiag=True)
    x, y = torch.tensor([0.3, -1.5, 2.0], dtype=torch.float64), torch.tensor([0.5, 0.05, 3.0], dtype=torch.float64)
    lhs = resolvent_diagonal(diag, torch.complex(x, y), offdiag=off, causal=causal)
    rhs = resolvent_diagonal((diag - x[:, None]) / y[:, None], 1j, offdiag=off / y[:, None],
                             causal=causal) / y[:, None]
    assert (lhs - rhs).abs().max() <= 1e-10 * lhs.abs().max()


# --- CUDA ---------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("z_shape", [(), (B,)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(causal, dtype, z_shape):
    diag, off = _inputs(1000, dtype=dtype, seed=10, per_batch_offdiag=True)
    z_cpu = torch.full(z_shape, 0.3 + 0.5j, dtype=torch.complex128, requires_grad=True)
    z_gpu = torch.full(z_shape, 0.3 + 0.5j, dtype=torch.complex128, device="cuda", requires_grad=True)
    d_cpu = diag.clone().requires_grad_()
    d_gpu = diag.cuda().requires_grad_()
    out_cpu = resolvent_diagonal(d_cpu, z_cpu, offdiag=off, causal=causal)
    out_gpu = resolvent_diagonal(d_gpu, z_gpu, offdiag=off.cuda(), causal=causal)
    assert out_gpu.device.type == "cuda"
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (out_gpu.cpu() - out_cpu).abs().max() <= tol
    out_cpu.abs().sum().backward()
    out_gpu.abs().sum().backward()
    assert (d_gpu.grad.cpu() - d_cpu.grad).abs().max() <= tol * max(1.0, d_cpu.grad.abs().max().item())
    assert (z_gpu.grad.cpu() - z_cpu.grad).abs().max() <= tol * max(1.0, z_cpu.grad.abs().max().item())
