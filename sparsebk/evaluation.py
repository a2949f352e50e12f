"""Evaluation: the loss and eval-mode sparsity of a model over a split of token blocks.

    val_loss, layer_sparsity = evaluate(model, blocks, batch_size=..., rank=r, world=w)

`evaluate` is the one evaluation loop: what every rank calls at a training run's evaluation
step, what `sparsebk eval` runs on one process, and what the benchmarks score with. Its sums
are all-reduced, so every rank gets the same numbers and the schedule actor sees one
validation loss. It imports nothing above the model and the Ray-free parallel helpers.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from sparsebk.parallel import all_reduce_sum, is_sharded, unwrap


def safe_ppl(loss: float) -> float:
    """exp(loss), inf where it would overflow (a diverged model's loss)."""
    return math.exp(loss) if loss < 700 else float("inf")


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, *, batch_size: int, device, rank: int = 0,
             world: int = 1, max_rows: int | None = None, autocast=nullcontext
             ) -> tuple[float, list[float] | None]:
    """Token-weighted mean cross-entropy over `blocks` (rows strided across ranks, sums
    all-reduced) and the measured per-layer sparsity (eval mode: no gate noise; None for a
    model that reports none, the dense Transformer baseline). Under FSDP a forward is
    collective, so every rank runs as many batches as the largest share (a rank with fewer
    rows repeats a row and does not count it). Gates forced for a benchmark
    (sparsebk.model.forcing) stay forced here: the forward is the model's own."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    rows = blocks if max_rows is None else blocks[:max_rows]
    mine = rows[rank::world]
    share = -(-len(rows) // world) if is_sharded(model) else len(mine)  # rows to run
    acc = torch.zeros(2 + net.config.n_layers, dtype=torch.float64, device=device)
    sparse = True  # the model reports its layers' sparsity
    for i in range(0, share, batch_size):  # acc: loss sum, tokens, sparsity sums
        b = mine[i:i + batch_size]
        count = len(b) > 0
        b = (b if count else rows[:1]).to(device, non_blocking=True)
        with autocast():
            out = net(b[:, :-1], targets=b[:, 1:])
        if not count:
            continue
        n_tok = b[:, 1:].numel()
        acc[0] += out["ce_loss"].double() * n_tok
        acc[1] += n_tok
        if "layer_sparsity" in out:
            acc[2:] += out["layer_sparsity"].double() * n_tok
        else:
            sparse = False
    all_reduce_sum(acc, world)
    if was_training:
        net.train()
    tokens = max(acc[1].item(), 1.0)
    return acc[0].item() / tokens, (acc[2:] / tokens).tolist() if sparse else None
