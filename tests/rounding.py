"""Rounding-error bounds derived from the computation, not from one machine's rounding.

A float32 result differs from the exact one by the rounding of every operation on the way,
amplified by what comes after it. Which way each rounding goes depends on the CPU, the BLAS
build, the thread count and the kernels' blocking; how far the result can move does not: it
is a property of the computation. We measure it in float64 by Monte Carlo arithmetic
(Parker 1997; the method of Verificarlo): run the float64 computation with the result r of
every rounding operation replaced by

    r + u m xi      xi uniform in [-1, 1] (real and imaginary parts apart for complex r)

with u = 2^-24, float32's unit roundoff, and m the magnitude the operation rounds at:

- |r| for an elementwise op: fl(a op b) = (a op b)(1 + delta), |delta| <= u;
- sum |terms| for an inner product (mm, addmm, bmm: |A| |B|; a fused multiply-add's product
  too): every addition rounds by up to u times its partial sum, and what cancels in the
  result still rounded on the way (for terms of mixed sign, as with weights, the partial
  sums' rms is about sum |terms|);
- sqrt(log2 n + 1) sum |terms| for sums and means of n terms (and the negative log-likelihood
  loss), whose terms may all have one sign: torch's CPU reductions sum pairwise (cascade
  summation, whatever the vector width), ceil(log2 n) roundings deep, which in rms grow
  like their square root;
- for the fused ops (layer norm, attention, log-softmax, GELU), the terms they cancel (see
  the methods below); exact ops (copies, indexing, comparisons, max, sign) do not round.

Rounding errors that small act linearly, so over the samples the deviation of output
element j from the unperturbed float64 result has a root mean square sigma_j proportional
to u. A float32 run on any machine is one more draw of the same kind of rounding (Higham &
Mary 2019, "A new approach to probabilistic rounding error analysis"). The bounds are
LAMBDA = 8 times the largest sigma_j (the max norm the tests compare in): a Gaussian draw
beyond 8 sigma has probability ~1e-15 (Chebyshev: < 1/64 whatever the distribution); the
largest sigma estimated from 16 samples falls below half its value with probability ~3e-4;
and a complex multiply or divide, drawn once here, rounds by up to a few u. Rescaled by
u64 / u32 = 2^-29, the same sigma bounds two float64 evaluation orders of the same math.

Cost: a Python call per aten op and a random draw per element, fine at test sizes. Where rows
are independent, replicate the batch `samples` times in one run instead of `samples` runs.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

U32 = 2.0 ** -24  # unit roundoff of float32
U64 = 2.0 ** -53  # of float64
LAMBDA = 8.0
SAMPLES = 16

# Ops whose results are exact (data movement, selection, comparison, sign and max): no rounding.
_EXACT = {
    "_to_copy", "_unsafe_view", "abs", "alias", "amax", "amin", "arange", "argmax", "argmin",
    "cat", "clamp", "clamp_min", "clamp_max", "clone", "complex", "constant_pad_nd", "copy_",
    "cummax", "cummin", "detach", "embedding", "empty", "empty_like", "eq", "expand", "fill_",
    "flip", "full", "full_like", "gather", "ge", "gt", "index", "index_copy", "index_copy_",
    "index_put", "index_put_", "index_select", "le", "lift_fresh", "lift_fresh_copy", "lt",
    "masked_fill", "masked_fill_", "max", "maximum", "min", "minimum", "ne", "neg",
    "new_empty", "new_full", "new_ones", "new_zeros", "nonzero", "ones", "ones_like",
    "relu", "repeat", "resolve_conj", "resolve_neg", "scatter", "scatter_", "select_scatter",
    "sign", "slice_scatter", "sort", "split_with_sizes", "stack", "threshold_backward",
    "topk", "unbind", "view_as_complex", "view_as_real", "where", "zero_", "zeros",
    "zeros_like", "_conj", "conj_physical", "real", "imag", "_local_scalar_dense", "equal",
    "floor", "ceil", "frac", "tril", "triu", "scalar_tensor", "round", "trunc", "argsort",
    "masked_select", "narrow", "unfold",
}
# Sums of terms: they round at the sum of |terms| (see the module docstring).
_MATMUL = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2)}  # (A, B) args
_SUMS = {"sum", "mean", "cumsum", "nansum"}
_FMA = {"addcmul": lambda a, b, c, value=1: value * b * c,  # a + value b c: the product rounds
        "addcdiv": lambda a, b, c, value=1: value * b / c}
_FUSED = {  # op -> the Float32Rounding method that perturbs its outputs
    "native_layer_norm": "_layer_norm",
    "_scaled_dot_product_flash_attention_for_cpu": "_attention",
    "_log_softmax": "_log_softmax",
    "nll_loss_forward": "_nll_loss",
    "gelu": "_gelu",
    "native_layer_norm_backward": "_layer_norm_backward",
    "_softmax_backward_data": "_softmax_backward",
    "_log_softmax_backward_data": "_log_softmax_backward",
    "embedding_dense_backward": "_scatter_sum",
    "index_add": "_scatter_sum",
    "index_put": "_scatter_sum",
}


_NAMES: dict = {}  # op -> its name without the namespace


def _pairwise(n: int) -> float:
    """rms growth of a pairwise sum of n same-sign terms, in units of u sum |terms|."""
    return math.sqrt(math.log2(max(n, 1)) + 1)


class Float32Rounding(TorchDispatchMode):
    """Monte Carlo arithmetic at float32's unit roundoff on a float64 computation."""

    def __init__(self, seed: int = 0, u: float = U32):
        super().__init__()
        self.u = u
        self.gen = torch.Generator().manual_seed(seed)

    def _perturb(self, out: torch.Tensor, mag: torch.Tensor, inplace: bool) -> torch.Tensor:
        """out + u mag xi, xi uniform in [-1, 1] per element (per part when complex)."""
        real = out.real if out.is_complex() else out
        xi = torch.empty(real.shape, dtype=real.dtype, device=out.device).uniform_(
            -self.u, self.u, generator=self.gen)
        if out.is_complex():
            xi = torch.complex(xi, torch.empty_like(xi).uniform_(-self.u, self.u,
                                                                 generator=self.gen))
        mag = mag.to(real.dtype)
        return out.addcmul_(mag, xi) if inplace else torch.addcmul(out, mag, xi)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _NAMES.get(func)
        if name is None:
            name = _NAMES[func] = func._schema.name.split("::")[-1]
        if name in _EXACT:
            return out
        if name in _FUSED:
            return getattr(self, _FUSED[name])(args, kwargs, out)
        if name.startswith("_foreach_") and name.endswith("_"):  # in place on a list: args[0]
            for t in args[0]:
                if self._rounds(t):
                    self._perturb(t, t.abs(), True)
            return out
        if isinstance(out, (tuple, list)):  # other multi-output ops: each output at |r|
            return type(out)(self._perturb(o, o.abs(), False) if self._rounds(o) else o
                             for o in out)
        if not self._rounds(out):
            return out
        ret = func._schema.returns[0].alias_info
        inplace = ret is not None and ret.is_write
        if ret is not None and not inplace:
            return out  # a view: its base was perturbed when it was made
        if name in _MATMUL:
            a, b = (args[i] for i in _MATMUL[name])
            mag = torch.matmul(a.abs(), b.abs())
            if name in ("addmm", "baddbmm"):
                mag = mag + args[0].abs()
        elif name in _SUMS:
            x = args[0]
            mag = func(x.abs(), *args[1:], **kwargs)
            mag = mag * _pairwise(x.numel() // max(1, out.numel()))
        elif name.rstrip("_") in _FMA:
            mag = out.abs() + _FMA[name.rstrip("_")](*args, **kwargs).abs()
        else:
            mag = out.abs()
        return self._perturb(out, mag, inplace)

    def _layer_norm(self, args, kwargs, out):
        """(y, mean, rstd) over the last dim: x - mean cancels, so y rounds like
        (|x - mean| + mean |x|) rstd |w|, not like y."""
        x, _, w = args[:3]
        y, mu, rstd = out
        mag = (x - mu).abs().add(x.abs().mean(-1, keepdim=True)).mul(rstd)
        if w is not None:
            mag = mag * w.abs()
        return (self._perturb(y, mag + y.abs(), False), mu, rstd)

    def _attention(self, args, kwargs, out):
        """(out, logsumexp) of softmax(q k^T scale + mask) v. The scores round like
        |q| |k|^T scale, which moves each weight P_j by P_j delta_j, so out by
        sum_j P_j delta_j (v_j - out); the weighted sum rounds like P |v|."""
        q, k, v = args[:3]
        is_causal = kwargs.get("is_causal", args[4] if len(args) > 4 else False)
        mask = kwargs.get("attn_mask", args[6] if len(args) > 6 else None)
        scale = kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        scores = q @ k.transpose(-2, -1) * scale  # (..., Tq, Tk)
        if is_causal:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
                else scores + mask
        p = scores.softmax(-1)
        pa = p * (q.abs() @ k.abs().transpose(-2, -1) * scale)
        y = out[0]
        mag = p @ v.abs() + pa @ v.abs() + pa.sum(-1, keepdim=True) * y.abs()
        return (self._perturb(y, mag, False), *out[1:])

    def _log_softmax(self, args, kwargs, out):
        """x - logsumexp(x): rounds like |x - out| + |out|, the two terms that cancel."""
        return self._perturb(out, out.abs() + (args[0] - out).abs(), False)

    def _nll_loss(self, args, kwargs, out):
        """(loss, total weight): a sum of same-sign terms, as _SUMS."""
        loss, total = out
        return (self._perturb(loss, loss.abs() * _pairwise(args[1].numel()), False), total)

    def _gelu(self, args, kwargs, out):
        """x (1 + erf(x / sqrt 2)) / 2: for x < 0, 1 + erf cancels, leaving u |x|."""
        return self._perturb(out, out.abs() + args[0].abs(), False)

    def _layer_norm_backward(self, args, kwargs, out):
        """(grad x, grad w, grad b): grad w and grad b sum over the rows; grad x is
        rstd (w g - mean(w g) - xhat mean(w g xhat)), which cancels."""
        g, x, _, mu, rstd, w = args[:6]
        gx, gw, gb = out
        xhat = (x - mu) * rstd
        wg = g if w is None else g * w
        rows = _pairwise(max(1, g.numel() // g.shape[-1]))
        dims = tuple(range(g.dim() - 1))
        if gx is not None:
            mag = rstd * (wg.abs() + wg.abs().mean(-1, keepdim=True)
                          + xhat.abs() * (wg * xhat).abs().mean(-1, keepdim=True))
            gx = self._perturb(gx, mag + gx.abs(), False)
        if gw is not None:
            gw = self._perturb(gw, (g * xhat).abs().sum(dims) * rows, False)
        if gb is not None:
            gb = self._perturb(gb, g.abs().sum(dims) * rows, False)
        return (gx, gw, gb)

    def _softmax_backward(self, args, kwargs, out):
        """y (g - sum_j y_j g_j): the difference cancels."""
        g, y, dim = args[:3]
        return self._perturb(out, y.abs() * (g.abs() + (y * g).abs().sum(dim, keepdim=True)),
                             False)

    def _log_softmax_backward(self, args, kwargs, out):
        """g - exp(out) sum_j g_j: the difference cancels."""
        g, lp, dim = args[:3]
        return self._perturb(out, g.abs() + lp.exp() * g.abs().sum(dim, keepdim=True), False)

    def _scatter_sum(self, args, kwargs, out):
        """Sums of rows into rows (an embedding's gradient, index_add, index_put with
        accumulate): the same op on |terms|, as _SUMS; index_put without accumulate is exact."""
        if len(args) == 5 and isinstance(args[2], int):  # embedding_dense_backward
            g, idx, n, pad, scale = args
            mag = torch.ops.aten.embedding_dense_backward(g.abs(), idx, n, pad, scale)
            count = idx.numel()
        elif len(args) >= 4 and isinstance(args[1], int):  # index_add(self, dim, index, source)
            x, dim, idx, src = args[:4]
            mag = torch.ops.aten.index_add(x.abs(), dim, idx, src.abs(), **kwargs)
            count = idx.numel()
        else:  # index_put(self, indices, values, accumulate=False)
            x, indices, values = args[:3]
            if not (args[3] if len(args) > 3 else kwargs.get("accumulate", False)):
                return out
            mag = torch.ops.aten.index_put(x.abs(), indices, values.abs(), True)
            count = values.numel()
        return self._perturb(out, mag * _pairwise(count), False)

    @staticmethod
    def _rounds(t) -> bool:
        return (isinstance(t, torch.Tensor) and t.numel() > 0
                and (t.is_floating_point() or t.is_complex()))


def rms_deviation(runs: torch.Tensor, exact: torch.Tensor) -> float:
    """max_j sqrt(mean_s |runs[s, j] - exact[j]|^2): the largest per-element rounding noise."""
    return float((runs - exact.unsqueeze(0)).abs().square().mean(0).sqrt().max())


def float32_noise(fn, samples: int = SAMPLES, replicas: bool = False):
    """sigma: the largest per-element rms deviation of fn()'s float64 output over `samples`
    Monte Carlo runs at float32's unit roundoff; a list of them when fn returns several tensors.

    replicas=True: fn(r) computes r copies of its batch at once, (r B, ...), the rows
    independent of each other: one run of `samples` copies instead of `samples` runs."""
    if replicas:
        exact = fn(1)
        with Float32Rounding(seed=0):
            runs = fn(samples)
        return rms_deviation(runs.reshape(samples, *exact.shape), exact)
    exact = fn()
    runs = []
    for s in range(samples):
        with Float32Rounding(seed=s):
            runs.append(fn())
    if isinstance(exact, torch.Tensor):
        return rms_deviation(torch.stack(runs), exact)
    return [rms_deviation(torch.stack([r[i] for r in runs]), e) for i, e in enumerate(exact)]


def float32_bound(fn, samples: int = SAMPLES, replicas: bool = False):
    """LAMBDA sigma: a bound on max |float32 evaluation - exact| of what fn computes in float64
    (a list of them when fn returns several tensors)."""
    sigma = float32_noise(fn, samples, replicas)
    return [LAMBDA * x for x in sigma] if isinstance(sigma, list) else LAMBDA * sigma


def float64_bound(sigma32: float) -> float:
    """The same bound at float64's unit roundoff, from a float32 sigma of the same computation."""
    return LAMBDA * sigma32 * (U64 / U32)
