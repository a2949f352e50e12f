"""`sparsebk bench layer --out DIR`: what a skipped position buys in one sparse BK layer.

Times one SparseMoEResNetBKLayer forward + backward (task loss + weighted sparsity loss + MoE
balance loss, as in training) with forced masks at several sparsities. A forced mask replaces
only the gate's hard forward value, so it runs exactly the code path of a learned mask. Each
mask skips round(s * N) random positions of every sequence. Sparsities are timed round-robin
(one call each per round) so that load drifting on a shared machine hits all of them alike.

Two clocks per call: wall time, and this process's CPU time. On a shared CPU box other jobs
steal cores and inflate wall time unevenly; with --threads 1 the CPU time counts the work done.
Prints the measured speed-up against sparsity 0 beside the ideal 1 / (1 - s), the dense
reference path at sparsity 0, and the sparsity loss's share of the layer forward; writes
DIR/layer.json.

Multi-channel BK mixing (`--heads H`, 0 to skip; `--learn-z`, `--input-couplings`, both on by
default): the same forward + backward of a layer with H BK heads at the same width, timed
round-robin against the single-channel layer at sparsity 0 and 0.5; the ratio is its cost.

What a whole training step costs with each kind of skipped output (`--lm-skip-outputs
carry,light --lm-sparsities 0.5,0.7`): one LM of the first `--lm-presets` preset per skip
output (same seed), every layer's mask forced to random masks of each sparsity, timed
round-robin with the same model's dense step (every gate open): tokens/s against dense from
one run, free of the drift between separate training rows.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from sparsebk.bench.common import format_table, time_call, time_calls, write_result
from sparsebk.model.forcing import forced_gates
from sparsebk.model.layers import SKIP_OUTPUTS, SparseMoEResNetBKLayer


def forced_mask(batch: int, n: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """(B, N) 0/1 mask skipping exactly round(sparsity * n) random positions per row."""
    skip = round(sparsity * n)
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    mask = torch.ones(batch, n)
    mask.scatter_(1, order[:, :skip], 0.0)
    return mask


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsebk bench layer", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-results")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1, help="the layer's dropout_p (default 0.1)")
    p.add_argument("--sparsities", default="0,0.3,0.5,0.7")
    p.add_argument("--rounds", type=int, default=7, help="timed calls per sparsity (median taken)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--lm-presets", default="small",
                   help="comma-separated LMConfig presets whose full training step is timed "
                        "(tokens/s); empty to skip")
    p.add_argument("--lm-batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=8,
                   help="BK heads of the multi-channel layer timed against today's (0: skip)")
    p.add_argument("--learn-z", action=argparse.BooleanOptionalAction, default=True,
                   help="the multi-channel layer learns a shift per head (default on)")
    p.add_argument("--input-couplings", action=argparse.BooleanOptionalAction, default=True,
                   help="the multi-channel layer has input-dependent couplings (default on)")
    p.add_argument("--skip-output", choices=SKIP_OUTPUTS, default=None,
                   help="what a skipped position outputs in every layer timed (default: carry "
                        "for the single layers, as the seed's layer; each preset's own for "
                        "--lm-presets)")
    p.add_argument("--lm-skip-outputs", default="",
                   help="comma-separated skip outputs whose whole training step is timed at "
                        "--lm-sparsities against dense, round-robin (empty: skip)")
    p.add_argument("--lm-sparsities", default="0.5")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if 0.0 not in sparsities:
        sparsities.insert(0, 0.0)
    dev = torch.device(args.device)
    layer, x, masks = single_layer(args, sparsities, dev)
    rows, raw = sparsity_rows(args, layer, x, masks, sparsities, dev)
    s_mid = 0.5 if 0.5 in masks else sparsities[-1]
    share = sparsity_loss_share(args, layer, x, masks[s_mid], s_mid, dev)
    multi_rows = multi_channel_rows(args, layer, x, masks, sorted({0.0, s_mid}), dev)

    print(f"one layer fwd+bwd: d_model={args.d_model} N={args.n_seq} B={args.batch} "
          f"experts={args.experts} top-{args.top_k} dropout={args.dropout} device={dev} "
          f"threads={torch.get_num_threads()}")
    print(format_table(rows))
    for table in ([share], multi_rows):
        if table:
            print("\n" + format_table(table))
    presets = [n for n in args.lm_presets.split(",") if n]
    lm_rows = [lm_step_rate(name, args.lm_batch, dev, args.rounds, args.skip_output)
               for name in presets]
    if lm_rows:
        print("\n" + format_table(lm_rows))
    skip_rows = []
    if args.lm_skip_outputs and presets:
        skip_rows = lm_skip_output_rates(
            presets[0], args.lm_batch, dev, args.rounds, args.lm_skip_outputs.split(","),
            [float(s) for s in args.lm_sparsities.split(",")])
        print("\n" + format_table(skip_rows))
    path = write_result(args.out, "layer", {
        "config": _config(args), "rows": rows, "sparsity_loss_share": share, "lm_steps": lm_rows,
        "multi_channel": multi_rows, "lm_skip_outputs": skip_rows, **raw})
    print(f"wrote {path}")
    return 0


def _config(args) -> dict:
    config = {k: getattr(args, k) for k in ("d_model", "n_seq", "batch", "experts", "top_k", "dropout",
                                            "rounds", "device", "lm_batch")}
    config["threads"] = torch.get_num_threads()
    config.update(heads=args.heads, learn_z=args.learn_z, input_couplings=args.input_couplings,
                  skip_output=args.skip_output)
    return config


def single_layer(args, sparsities: list[float], dev: torch.device):
    """(the layer timed, its input x (B, N, D), {sparsity: forced mask (B, N)})."""
    torch.manual_seed(0)
    layer = SparseMoEResNetBKLayer(args.d_model, args.n_seq, num_experts=args.experts,
                                   top_k=args.top_k, dropout_p=args.dropout,
                                   skip_output=args.skip_output or "carry").to(dev).train()
    x = torch.randn(args.batch, args.n_seq, args.d_model, device=dev, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    masks = {s: forced_mask(args.batch, args.n_seq, s, gen).to(dev) for s in sparsities}
    return layer, x, masks


def sparsity_rows(args, layer: SparseMoEResNetBKLayer, x: torch.Tensor, masks: dict,
                  sparsities: list[float], dev: torch.device) -> tuple[list[dict], dict]:
    """Forward + backward at each forced sparsity on the sparse path, and at 0 on the dense
    reference path, round-robin: (one row per case with its speed-ups against the sparse
    path at 0 and the ideal 1 / (1 - s), the raw per-call times)."""
    def step(s: float, sparse: bool = True):
        layer.use_sparse_computation = sparse
        fwd_bwd(layer, x, masks[s])

    cases = [(s, True) for s in sparsities] + [(0.0, False)]
    # round-robin over the cases, one warm-up round (allocator, kernels, thread pools)
    timed = time_calls({case: partial(step, *case) for case in cases}, repeats=args.rounds,
                       warmup=1, device=dev)
    med_w = {c: t["wall_median_s"] for c, t in timed.items()}
    med_c = {c: t["cpu_median_s"] for c, t in timed.items()}
    base_w, base_c = med_w[(0.0, True)], med_c[(0.0, True)]
    rows = [{"path": "sparse" if sparse else "dense-ref", "sparsity": s,
             "wall_ms": 1e3 * med_w[(s, sparse)], "speedup_wall": base_w / med_w[(s, sparse)],
             "cpu_ms": 1e3 * med_c[(s, sparse)], "speedup_cpu": base_c / med_c[(s, sparse)],
             "ideal": 1.0 / (1.0 - s) if sparse else 1.0} for s, sparse in cases]
    raw = {f"raw_{clock}_s": {f"{'sparse' if sp else 'dense'}@{s}": t[f"{clock}_s"]
                              for (s, sp), t in timed.items()} for clock in ("wall", "cpu")}
    return rows, raw


def sparsity_loss_share(args, layer: SparseMoEResNetBKLayer, x: torch.Tensor, mask: torch.Tensor,
                        s: float, dev: torch.device) -> dict:
    """The sparsity loss's share of the layer forward (training mode, graph built) at s."""
    layer.use_sparse_computation = True
    fwd = time_call(lambda: layer(x, force_mask=mask), repeats=args.rounds, warmup=1, device=dev)
    loss = time_call(lambda: layer.get_sparsity_loss(), repeats=50, warmup=5, device=dev)
    return {"sparsity": s, "layer_forward_ms": 1e3 * fwd["median_s"],
            "sparsity_loss_ms": 1e3 * loss["median_s"],
            "share_percent": 100.0 * loss["median_s"] / fwd["median_s"]}


def fwd_bwd(layer: SparseMoEResNetBKLayer, x: torch.Tensor, mask: torch.Tensor) -> None:
    """One training-shaped call: task loss + weighted sparsity loss + MoE balance loss."""
    y = layer(x, force_mask=mask)
    loss = y.square().mean() + layer.get_sparsity_loss() + 0.01 * layer.last_aux_loss
    loss.backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None


def multi_channel_rows(args, single: SparseMoEResNetBKLayer, x: torch.Tensor, masks: dict,
                       sparsities: list[float], dev: torch.device) -> list[dict]:
    """Forward + backward of an `args.heads`-head layer against the single-channel one (same
    width, experts, inputs and masks), round-robin; one row per sparsity with the ratios."""
    if not args.heads:
        return []
    torch.manual_seed(0)
    multi = SparseMoEResNetBKLayer(
        args.d_model, args.n_seq, num_experts=args.experts, top_k=args.top_k,
        dropout_p=args.dropout, bk_heads=args.heads, bk_learn_z=args.learn_z,
        bk_input_couplings=args.input_couplings,
        skip_output=args.skip_output or "carry").to(dev).train()
    single.use_sparse_computation = True
    layers = {"single": single, "multi": multi}
    timed = time_calls({(name, s): partial(fwd_bwd, lay, x, masks[s])
                        for s in sparsities for name, lay in layers.items()},
                       repeats=args.rounds, warmup=1, device=dev)
    rows = []
    for s in sparsities:
        one, many = timed[("single", s)], timed[("multi", s)]
        rows.append({"sparsity": s, "heads": args.heads, "learn_z": args.learn_z,
                     "couplings": args.input_couplings,
                     "single_wall_ms": 1e3 * one["wall_median_s"],
                     "multi_wall_ms": 1e3 * many["wall_median_s"],
                     "ratio_wall": many["wall_median_s"] / one["wall_median_s"],
                     "single_cpu_ms": 1e3 * one["cpu_median_s"],
                     "multi_cpu_ms": 1e3 * many["cpu_median_s"],
                     "ratio_cpu": many["cpu_median_s"] / one["cpu_median_s"]})
    return rows


def lm_step_rate(name: str, batch: int, dev: torch.device, rounds: int,
                 skip_output: str | None = None) -> dict:
    """Tokens/s of one full training step (forward, backward, AdamW) of a preset LM at n_seq,
    with every gate open (dense) and every gate closed (all skipped), timed round-robin: their
    ratio is the share of a step that sparsity can remove, and 1 / (1 - s share) the most a
    sparsity s can buy in tokens/s (the embedding, the output head and the BK-core stay).
    `skip_output` None: the preset's own."""
    from sparsebk.model.lm import LMConfig, SparseBKLM

    torch.manual_seed(0)
    cfg = LMConfig.preset(name, **({} if skip_output is None else {"skip_output": skip_output}))
    model = SparseBKLM(cfg).to(dev).train()
    # the training optimizer's groups (decay on ndim >= 2); AdamW's default decay and betas
    opt = model.configure_optimizers(weight_decay=0.01, lr=1e-3, betas=(0.9, 0.999))
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.n_seq + 1), device=dev)

    def step(gates: str):
        with forced_gates(model, gates):  # a pinned logit outweighs any gate noise
            out = model(tokens[:, :-1], tokens[:, 1:])
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()

    t = time_calls({"dense": partial(step, "pinned_open"), "skipped": partial(step, "pinned_closed")},
                   repeats=rounds, warmup=1, device=dev)
    w, c = t["dense"]["wall_median_s"], t["dense"]["cpu_median_s"]
    n_tok = batch * cfg.n_seq
    share_w = 1.0 - t["skipped"]["wall_median_s"] / w
    share_c = 1.0 - t["skipped"]["cpu_median_s"] / c
    return {"preset": name, "skip_output": cfg.skip_output,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "batch": batch, "seq": cfg.n_seq, "step_wall_ms": 1e3 * w, "tokens_per_s_wall": n_tok / w,
            "step_cpu_ms": 1e3 * c, "tokens_per_s_cpu": n_tok / c,
            "all_skipped_wall_ms": 1e3 * t["skipped"]["wall_median_s"],
            "skippable_share_wall": share_w, "skippable_share_cpu": share_c,
            "max_speedup_at_0.5_cpu": 1.0 / (1.0 - 0.5 * share_c)}


def lm_skip_output_rates(name: str, batch: int, dev: torch.device, rounds: int,
                         skip_outputs: list[str], sparsities: list[float]) -> list[dict]:
    """Tokens/s of one full training step of the preset LM for each skip output at each forced
    sparsity (random masks, fixed per layer, through the gate's force path: `forced_gates`
    "mask"), timed round-robin with the dense step (every gate open) of the same model; rows
    carry the ratio to dense."""
    from sparsebk.model.lm import LMConfig, SparseBKLM

    for skip in skip_outputs:
        if skip not in SKIP_OUTPUTS:
            raise ValueError(f"--lm-skip-outputs: {skip!r} is not one of {SKIP_OUTPUTS}")
    gen = torch.Generator().manual_seed(0)
    cfg0 = LMConfig.preset(name)
    masks = {s: [forced_mask(batch, cfg0.n_seq, s, gen).to(dev) for _ in range(cfg0.n_layers)]
             for s in [0.0, *sparsities]}
    tokens = torch.randint(0, cfg0.vocab_size, (batch, cfg0.n_seq + 1), generator=gen).to(dev)
    steps, achieved = {}, {}
    for skip in skip_outputs:
        torch.manual_seed(0)
        model = SparseBKLM(LMConfig.preset(name, skip_output=skip)).to(dev).train()
        opt = model.configure_optimizers(weight_decay=0.01, lr=1e-3, betas=(0.9, 0.999))

        def step(s, model=model, opt=opt, skip=skip):
            with forced_gates(model, "mask", masks=masks[s]):
                out = model(tokens[:, :-1], tokens[:, 1:])
                achieved[(skip, s)] = float(out["layer_sparsity"].mean())
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                opt.step()

        for s in [0.0, *sparsities]:
            steps[(skip, s)] = partial(step, s)
    t = time_calls(steps, repeats=rounds, warmup=1, device=dev)
    n_tok = batch * cfg0.n_seq
    rows = []
    for (skip, s), r in t.items():
        dense = t[(skip, 0.0)]
        rows.append({"preset": name, "skip_output": skip, "sparsity": s,
                     "achieved_sparsity": achieved[(skip, s)],
                     "step_wall_ms": 1e3 * r["wall_median_s"],
                     "tokens_per_s_wall": n_tok / r["wall_median_s"],
                     "vs_dense_wall": dense["wall_median_s"] / r["wall_median_s"],
                     "vs_dense_cpu": dense["cpu_median_s"] / r["cpu_median_s"]})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
