"""Evaluation: the loss and eval-mode sparsity of a model over a split of token blocks.

    val_loss, layer_sparsity = evaluate(model, blocks, batch_size=..., rank=r, world=w)

`evaluate` is the one evaluation loop: what every rank calls at a training run's evaluation
step, what `sparsebk eval` runs on one process, and what the benchmarks score with. Its sums
are all-reduced, so every rank gets the same numbers and the schedule actor sees one
validation loss. It imports nothing above the model and the Ray-free parallel helpers.

    loss, scored = evaluate_strided(model, blocks, stride=16, batch_size=...)

scores the same tokens in sliding windows (`sparsebk eval --stride`, `bench quality
--eval-stride`): each token once, with at least block_len - stride tokens of context.

    by_pos = loss_by_position(model, blocks, batch_size=...)   # (block_len,) float64

the mean loss at each position of the window (`sparsebk eval --by-position`, `bench quality
--by-position`): how much a prediction gains from each further token of context, so where
the model's usable memory ends.

    losses = loss_by_context(model, blocks, contexts=[1, 2, 4, 8], every=16, batch_size=...)

the same targets scored from exactly c ids of context for each c (a paired comparison: the
gain of c ids over c' on the same tokens, with its standard error).
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


def token_streams(blocks: torch.Tensor) -> list[torch.Tensor]:
    """The id streams a split's blocks (R, L + 1) were cut from. Consecutive rows of one stream
    overlap by one id (sparsebk.data.prepare); a row whose first id is not the previous row's
    last starts a new stream (a new part of the corpus, whose short tail was dropped). Two
    parts whose boundary ids happen to agree read as one stream: a few tokens then see
    context from the other part, and every token is still scored once."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (R, L + 1) with L >= 1, got {tuple(blocks.shape)}")
    if len(blocks) == 0:
        return []
    breaks = (torch.nonzero(blocks[:-1, -1] != blocks[1:, 0]).flatten() + 1).tolist()
    return [torch.cat([b[0], b[1:, 1:].reshape(-1)])
            for b in torch.tensor_split(blocks, breaks) if len(b)]


def strided_windows(n_targets: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored) per window for a stream of `n_targets` targets (target t is id
    t + 1 given ids 0..t): windows of `window` inputs start every `stride` ids, plus one ending
    at the stream's end, and each target is scored once, in the window that holds it with the
    most context before it (the earliest). `first scored` is relative to the window's start:
    0 for the first window, window - stride for a full step."""
    if not (isinstance(window, int) and isinstance(stride, int) and 1 <= stride <= window):
        raise ValueError(f"stride={stride!r} must be an integer in [1, window={window!r}]")
    if n_targets < 1:
        return []
    window = min(window, n_targets)
    out, covered, start = [], 0, 0  # covered: targets [0, covered) already scored
    while covered < n_targets:
        start = min(start, n_targets - window)
        out.append((start, covered - start))
        covered = start + window
        start += stride
    return out


@torch.no_grad()
def evaluate_strided(model, blocks: torch.Tensor, *, stride: int, batch_size: int, device
                     ) -> tuple[float, int]:
    """(mean cross-entropy, targets scored) over every token `blocks` (R, L + 1) predict, in
    windows of L ids that start every `stride` ids along the stream(s) the blocks were cut
    from (`token_streams`, `strided_windows`): a token past a stream's first window is
    predicted from at least L - stride ids before it. stride = L is `evaluate`'s independent
    windows; a smaller one is the sliding-window protocol, nearer to a recurrent model that
    carries its state through the whole split. One process, eval mode; costs about L / stride
    times `evaluate`."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    window = blocks.shape[1] - 1 if blocks.dim() == 2 else 0
    rows, firsts = [], []  # every window of every stream, and its first scored position
    for stream in token_streams(blocks):
        for s, first in strided_windows(len(stream) - 1, window, stride):
            rows.append(stream[s:s + window + 1])
            firsts.append(first)
    total, scored = torch.zeros((), dtype=torch.float64), 0
    for i in range(0, len(rows), batch_size):
        batch = torch.stack(rows[i:i + batch_size])
        targets = batch[:, 1:].clone()
        for j, first in enumerate(firsts[i:i + batch_size]):
            targets[j, :first] = -100  # scored in an earlier window, with more context
        n = int((targets != -100).sum())
        out = net(batch[:, :-1].to(device), targets=targets.to(device))
        total += out["ce_loss"].double().cpu() * n
        scored += n
    if was_training:
        net.train()
    return total.item() / max(scored, 1), scored


@torch.no_grad()
def loss_by_position(model, blocks: torch.Tensor, *, batch_size: int, device="cpu"
                     ) -> torch.Tensor:
    """(L,) float64: the mean cross-entropy at each position of the independent windows
    `blocks` (R, L + 1): entry t is the loss of predicting id t + 1 from the t + 1 ids 0..t,
    averaged over the rows. Its mean is `evaluate`'s loss over the same rows (every window is
    full). One process, eval mode; forms each batch's full log-probabilities (B, L, V)."""
    if blocks.dim() != 2 or blocks.shape[1] < 2 or len(blocks) == 0:
        raise ValueError(f"blocks must be (R, L + 1) with R >= 1, L >= 1, got {tuple(blocks.shape)}")
    net = unwrap(model)
    was_training = net.training
    net.eval()
    total = torch.zeros(blocks.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(blocks), batch_size):
        b = blocks[i:i + batch_size].to(device)
        logits = net(b[:, :-1])["logits"]  # (B, L, V); the adaptive head's are log-probs
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll = -logp.gather(-1, b[:, 1:, None].long()).squeeze(-1)  # (B, L)
        total += nll.sum(0).cpu()
    if was_training:
        net.train()
    return total / len(blocks)


@torch.no_grad()
def loss_by_context(model, blocks: torch.Tensor, *, contexts, batch_size: int, every: int = 1,
                    device="cpu") -> torch.Tensor:
    """(len(contexts), T) float64: the cross-entropy of the same T targets predicted from
    exactly c ids before each, for each c in `contexts` (each at most the window, block_len).
    The targets are every `every`-th id of the stream(s) the blocks were cut from
    (`token_streams`) that has max(contexts) ids before it in its stream; the window for
    context c is those c ids alone (a fresh state), so row c - row c' is what c ids gain over
    c' on the same tokens, a paired comparison free of `loss_by_position`'s mix of tokens
    (each of whose positions scores different ones). One process, eval mode; costs about
    sum(contexts) / every forwards per target id, e.g. 255 / 16 ~ 16 evaluations for contexts
    1, 2, 4, ..., 128 and every 16."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (R, L + 1) with L >= 1, got {tuple(blocks.shape)}")
    if len(blocks) == 0:
        raise ValueError("blocks has no rows: nothing to score")
    window = blocks.shape[1] - 1
    contexts = list(contexts)
    if (not contexts or any(isinstance(c, bool) or not isinstance(c, int) for c in contexts)
            or any(not 1 <= c <= window for c in contexts)):
        raise ValueError(f"contexts={contexts!r} must be a non-empty list of integers in "
                         f"[1, block_len={window}]")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} must be an integer >= 1")
    net = unwrap(model)
    was_training = net.training
    net.eval()
    longest = max(contexts)
    ends = [(stream, j) for stream in token_streams(blocks)
            for j in range(longest, len(stream), every)]  # target id j of `stream`
    out = torch.empty(len(contexts), len(ends), dtype=torch.float64)
    for k, c in enumerate(contexts):
        for i in range(0, len(ends), batch_size):
            batch = torch.stack([stream[j - c:j + 1] for stream, j in ends[i:i + batch_size]])
            logits = net(batch[:, :-1].to(device))["logits"][:, -1]  # (B, V): the last position
            logp = torch.log_softmax(logits.double(), dim=-1)  # the adaptive head's: log-probs
            out[k, i:i + len(batch)] = -logp.gather(-1, batch[:, -1:].to(device).long()
                                                    ).squeeze(-1).cpu()
    if was_training:
        net.train()
    return out


def context_table(contexts, losses) -> list[dict]:
    """`loss_by_context`'s (len(contexts), T) losses as rows, in the order of `contexts`:
    the context c, the mean loss over the T targets, and the gain over the row before
    (its mean loss minus this one's, in nats, > 0 when the extra ids help) with the paired
    standard error of that gain (the sample sd of the per-target differences / sqrt(T))."""
    losses = torch.as_tensor(losses, dtype=torch.float64)
    rows = []
    for k, c in enumerate(contexts):
        row = {"context": int(c), "loss": losses[k].mean().item(), "gain": None, "gain_se": None}
        if k:
            d = losses[k - 1] - losses[k]
            row["gain"] = d.mean().item()
            row["gain_se"] = (d.std().item() / math.sqrt(len(d))) if len(d) > 1 else None
        rows.append(row)
    return rows


def context_scores(model, blocks: torch.Tensor, *, every: int, batch_size: int, device="cpu"
                   ) -> dict:
    """`loss_by_context` at c = 1, 2, 4, ..., block_len (every `every`-th target), summed up
    by `context_table`: {"every", "targets", "contexts", "loss" (mean per c), "gain" (each
    c's over the c before, None first), "gain_se"} (what `sparsebk eval --by-context` and
    `bench quality --by-context` record)."""
    window = blocks.shape[1] - 1 if blocks.dim() == 2 else 0
    contexts = [1 << k for k in range(window.bit_length()) if 1 << k < window] + [window]
    losses = loss_by_context(model, blocks, contexts=contexts, batch_size=batch_size,
                             every=every, device=device)
    table = context_table(contexts, losses)
    return {"every": every, "targets": losses.shape[1], "contexts": contexts,
            "loss": [r["loss"] for r in table], "gain": [r["gain"] for r in table],
            "gain_se": [r["gain_se"] for r in table]}


def position_table(by_pos) -> list[tuple[int, int, float]]:
    """(first, last, mean loss) over contexts of 1, 2-3, 4-7, ... ids (position t sees t + 1
    ids), the last bucket ending at the window's length: `loss_by_position` in a few rows."""
    by_pos = [float(x) for x in by_pos]
    rows, lo = [], 1
    while lo <= len(by_pos):
        hi = min(2 * lo - 1, len(by_pos))
        part = by_pos[lo - 1:hi]
        rows.append((lo, hi, sum(part) / len(part)))
        lo = hi + 1
    return rows
