"""`sparsebk bench bk-core --out DIR`: BK-core forward+backward time against its baselines.

For each sequence length N and mode (causal, bidirectional), at batch B, it times forward +
backward (a fixed random cotangent) of
  - fast:      sparsebk.model.bk_core.resolvent_diagonal (chunked scans + adjoint backward),
  - reference: resolvent_diagonal_reference (plain float64 loop, autograd backward),
  - dense:     torch.linalg.inv of the dense (B, N, N) operator (bidirectional, N <= 512),
  - cumsum:    torch.cumsum forward+backward on a complex (B, N) tensor, a proxy for the
               memory-bound limit of any O(N) scan,
all in the same run, and reports the ratios. Prints a table; writes DIR/bk_core.json.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from sparsebk.bench.common import format_table, time_call, write_result
from sparsebk.model.bk_core import resolvent_diagonal, resolvent_diagonal_reference

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _dense_diagonal(diag: torch.Tensor, z: complex) -> torch.Tensor:
    """Bidirectional G_ii through a dense inverse of the Laplacian-plus-diag operator."""
    B, N = diag.shape
    ones = torch.ones(N - 1, dtype=diag.dtype, device=diag.device)
    h0 = torch.diag(ones, 1) + torch.diag(ones, -1)  # (N, N)
    eye = torch.eye(N, dtype=diag.dtype, device=diag.device)
    h = torch.diag_embed(diag) + h0  # (B, N, N)
    shifted = torch.complex(h - z.real * eye, -z.imag * eye.expand(B, N, N))
    return torch.linalg.inv(shifted).diagonal(dim1=-2, dim2=-1)


def _fwd_bwd(fn, x: torch.Tensor, cot: torch.Tensor):
    def run():
        x.grad = None
        out = fn(x)
        torch.autograd.backward(out, cot)
    return run


def bench_one(n: int, batch: int, dtype: torch.dtype, causal: bool, device: str,
              repeats: int, min_time: float, max_reference_n: int, max_dense_n: int,
              clock: str = "wall") -> dict:
    # clock "cpu": process CPU time (CPU device, one torch thread): on a shared machine whose
    # load average is many times its core count, wall time mostly measures the other processes
    timer = partial(time_call, clock=clock, device=device)
    g = torch.Generator().manual_seed(n)
    # the model's operator: diag = -2 + v, v in [-1, 1]
    diag = (-2 + 2 * torch.rand(batch, n, generator=g) - 1).to(device=device, dtype=dtype)
    diag.requires_grad_()
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    cot = torch.randn(batch, n, generator=g, dtype=cdtype).to(device)
    z = 1j
    row = {"N": n, "mode": "causal" if causal else "bidir"}

    fast = _fwd_bwd(lambda d: resolvent_diagonal(d, z, causal=causal), diag, cot)
    row["fast_ms"] = 1e3 * timer(fast, repeats=repeats, min_time=min_time)["median_s"]

    def fast_fwd():
        with torch.no_grad():
            resolvent_diagonal(diag, z, causal=causal)
    row["fast_fwd_ms"] = 1e3 * timer(fast_fwd, repeats=repeats, min_time=min_time)["median_s"]

    c = torch.randn(batch, n, generator=g, dtype=cdtype).to(device).requires_grad_()
    cumsum = _fwd_bwd(lambda x: torch.cumsum(x, dim=-1), c, cot)
    row["cumsum_ms"] = 1e3 * timer(cumsum, repeats=repeats, min_time=min_time)["median_s"]

    if n <= max_reference_n:
        ref = _fwd_bwd(lambda d: resolvent_diagonal_reference(d, z, causal=causal), diag, cot)
        long = n > 2048  # one call of the loop takes seconds there
        row["reference_ms"] = 1e3 * timer(ref, repeats=1 if long else max(1, repeats // 2),
                                              warmup=0 if long else 1)["median_s"]
        row["ref/fast"] = row["reference_ms"] / row["fast_ms"]
    if not causal and n <= max_dense_n:
        dense = _fwd_bwd(lambda d: _dense_diagonal(d, z), diag, cot)
        row["dense_ms"] = 1e3 * timer(dense, repeats=max(1, repeats // 2), warmup=1)["median_s"]
        row["dense/fast"] = row["dense_ms"] / row["fast_ms"]
    row["fast/cumsum"] = row["fast_ms"] / row["cumsum_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparsebk bench bk-core", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="directory for bk_core.json")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sizes", default="128,512,2048,8192", help="comma-separated N values")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--modes", default="causal,bidir", help="comma-separated: causal, bidir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: stable timings on a shared machine; 0: leave torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None,
                   help="wall: perf_counter; cpu: process CPU time, for a loaded shared "
                        "CPU box (needs --threads 1). Default: cpu on CPU with one thread, else wall")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per cell (fast path)")
    p.add_argument("--max-reference-n", type=int, default=8192)
    p.add_argument("--max-dense-n", type=int, default=512)
    args = p.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall")
    if clock == "cpu" and (args.device != "cpu" or torch.get_num_threads() != 1):
        p.error("--clock cpu needs --device cpu and --threads 1 (CPU time adds up over threads)")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("causal", "bidir"):
            p.error(f"--modes: unknown mode {m!r}; choose causal and/or bidir")
    rows = []
    for n in sizes:
        for m in modes:
            rows.append(bench_one(n, args.batch, _DTYPES[args.dtype], m == "causal", args.device,
                                  args.repeats, args.min_time, args.max_reference_n, args.max_dense_n,
                                  clock))
            print(f"  N={n} {m}: fast {rows[-1]['fast_ms']:.3f} ms", flush=True)
    columns = ["N", "mode", "fast_ms", "fast_fwd_ms", "reference_ms", "dense_ms", "cumsum_ms",
               "ref/fast", "dense/fast", "fast/cumsum"]
    print(f"BK-core forward+backward, B={args.batch}, {args.dtype}, device={args.device}, "
          f"torch threads={torch.get_num_threads()}, {clock} clock (medians)")
    print(format_table(rows, columns))
    path = write_result(args.out, "bk_core", {
        "batch": args.batch, "threads": torch.get_num_threads(), "clock": clock,
        "dtype": args.dtype, "device": args.device, "z": "1j",
        "diag": "-2 + U[-1, 1]", "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
