"""Validation during training: the loss and sparsity over a split, and the metrics record.

    val_loss, layer_sparsity = evaluate(model, blocks, batch_size=..., rank=r, world=w)
    metrics = validation_metrics(state, val_loss, layer_sparsity, schedule, last_log, lr)

`evaluate` is what every rank calls at an evaluation step (and what `sparsebk eval` runs on
one process): its sums are all-reduced, so every rank gets the same numbers and the schedule
actor sees one validation loss. `validation_metrics` is the record that goes to the log, the
trackers and Ray Train's report; it is a pure function of what the Trainer holds.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from sparsebk.train.metrics import safe_ppl
from sparsebk.train.parallel import all_reduce_sum, is_sharded, unwrap
from sparsebk.train.run_state import RunState


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, *, batch_size: int, device, rank: int = 0,
             world: int = 1, max_rows: int | None = None, autocast=nullcontext
             ) -> tuple[float, list[float]]:
    """Token-weighted mean cross-entropy over `blocks` (rows strided across ranks, sums
    all-reduced) and the measured per-layer sparsity (eval mode: no gate noise). Under FSDP
    a forward is collective, so every rank runs as many batches as the largest share (a rank
    with fewer rows repeats a row and does not count it)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    rows = blocks if max_rows is None else blocks[:max_rows]
    mine = rows[rank::world]
    share = -(-len(rows) // world) if is_sharded(model) else len(mine)  # rows to run
    acc = torch.zeros(2 + net.config.n_layers, dtype=torch.float64, device=device)
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
        acc[2:] += out["layer_sparsity"].double() * n_tok
    all_reduce_sum(acc, world)
    if was_training:
        net.train()
    tokens = max(acc[1].item(), 1.0)
    return acc[0].item() / tokens, (acc[2:] / tokens).tolist()


def validation_metrics(state: RunState, val_loss: float, spars: list[float], sched,
                       last_log: dict, lr: float) -> dict:
    """The record of an evaluation step: validation loss and eval-mode sparsity (per layer and
    their mean), the training-mode sparsity and loss of the last log interval (`last_log`,
    all-reduced there), the step's Schedule (per-layer targets, loss weight) and the LR."""
    # training-mode (sampled-mask) sparsity: the mean over the last log interval; the
    # eval-mode values come from the deterministic gate
    train_spars = last_log.get("sparsity_layers") or [float("nan")] * len(spars)
    return {
        "step": state.step, "epoch": state.epoch, "val_loss": val_loss,
        "val_ppl": safe_ppl(val_loss),
        "sparsity": sum(spars) / len(spars),
        **{f"sparsity_layer_{i}": x for i, x in enumerate(spars)},
        "train_sparsity": sum(train_spars) / len(train_spars),
        **{f"train_sparsity_layer_{i}": x for i, x in enumerate(train_spars)},
        **{f"target_layer_{i}": t for i, t in enumerate(sched.targets)},
        "target_sparsity": sum(sched.targets) / len(sched.targets),
        "loss_weight": sched.weight,
        "train_loss": last_log.get("train_loss", float("nan")),
        "tokens_per_s": last_log.get("tokens_per_s", float("nan")),
        "lr": lr, "bad_steps": state.bad_steps,
    }
