"""Sliding-window evaluation (`sparsebk.evaluation.evaluate_strided`) and the quality bench's
random training offsets (`bench quality --eval-stride`, `--random-offsets`).

References: a brute-force search for the window that gives each target the most context, and
each target's log-probability read off the full logits of that window's own forward (float64,
so the two routes agree to rounding, not to a fitted tolerance: ~1e-15, or float32's ~1e-7
where the model's full head takes its cross-entropy in float32).
"""

from __future__ import annotations

import pytest
import torch

from sparsebk.evaluation import (context_table, evaluate, evaluate_strided, loss_by_context,
                                 loss_by_position, position_table, strided_windows, token_streams)
from sparsebk.model.lm import LMConfig, SparseBKLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blocks(stream: torch.Tensor, L: int) -> torch.Tensor:
    """Rows of L + 1 ids every L ids, the tail dropped: how a split is prepared."""
    n = (len(stream) - 1) // L
    return stream[: n * L + 1].unfold(0, L + 1, L).clone()


def test_token_streams_invert_the_blocks_part_by_part():
    one, two = torch.arange(0, 61), torch.arange(100, 140)  # two parts: 10 and 6 rows of 7
    blocks = torch.cat([_blocks(one, 6), _blocks(two, 6)])
    got = token_streams(blocks)
    assert len(got) == 2 and torch.equal(got[0], one) and torch.equal(got[1], two[:37])
    assert [len(s) for s in token_streams(blocks[:1])] == [7]
    assert token_streams(blocks[:0]) == []
    with pytest.raises(ValueError, match=r"\(R, L \+ 1\)"):
        token_streams(one)


@pytest.mark.parametrize("n,window,stride", [(40, 8, 8), (40, 8, 3), (41, 8, 1), (37, 8, 5),
                                             (5, 8, 2), (8, 8, 8), (9, 8, 4)])
def test_each_target_is_scored_once_in_the_window_with_the_most_context(n, window, stride):
    spans = strided_windows(n, window, stride)
    w = min(window, n)
    starts = [s for s, _ in spans]
    assert all(0 <= s <= n - w for s in starts) and starts == sorted(set(starts))
    # the windows a target could be in: every start k * stride, plus the one ending at n
    candidates = sorted({min(k * stride, n - w) for k in range(n)})
    owner = {}
    for s, first in spans:
        for t in range(s + first, s + w):
            assert t not in owner, f"target {t} scored twice"
            owner[t] = s
    assert sorted(owner) == list(range(n))
    for t, s in owner.items():  # brute force: the earliest window holding t
        assert s == min(c for c in candidates if c <= t < c + w)
        if s > 0:
            assert t - s >= w - stride  # context of at least window - stride ids
    if stride == window and n % window == 0:
        assert spans == [(k * window, 0) for k in range(n // window)]  # the blocks' windows


def test_bad_stride_is_named():
    for bad in (0, 9, 2.5):
        with pytest.raises(ValueError, match=r"stride=.* must be an integer in \[1, window=8\]"):
            strided_windows(40, 8, bad)


def _model(head_cutoff: int) -> SparseBKLM:
    torch.manual_seed(3)
    cfg = LMConfig.preset("debug", vocab_size=40, n_seq=8, head_cutoff=head_cutoff, dropout_p=0.1)
    model = SparseBKLM(cfg).double()
    with torch.no_grad():  # away from the initialisation, so the positions differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("head_cutoff", [0, 20], ids=["full-head", "adaptive-head"])
@pytest.mark.parametrize("stride", [8, 3, 1])
def test_strided_loss_is_the_mean_of_each_targets_log_prob_in_its_window(head_cutoff, stride):
    model = _model(head_cutoff)
    model.train()  # evaluation switches to eval mode and back
    # two parts of a split (5 and 3 rows of 8 targets): windows never cross between them
    streams = [torch.randint(0, 40, (41,)), torch.randint(0, 40, (25,))]
    streams[1][0] = (streams[0][-1] + 1) % 40  # the parts' boundary ids differ
    blocks = torch.cat([_blocks(st, 8) for st in streams])
    loss, scored = evaluate_strided(model, blocks, stride=stride, batch_size=3,
                                    device=torch.device("cpu"))
    assert model.training and scored == 64
    model.eval()
    nll = []  # the reference: each target's log-prob in its window, from the full logits
    with torch.no_grad():
        for st in streams:
            for s, first in strided_windows(len(st) - 1, 8, stride):
                logp = torch.log_softmax(model(st[None, s:s + 8])["logits"][0], dim=-1)
                nll += [-logp[j, st[s + j + 1]].item() for j in range(first, 8)]
    assert len(nll) == 64
    # the full head's cross-entropy is taken in float32 by design (lm.py: `.float()`), ~1e-7
    # relative per term; the adaptive head's stays in the model's float64
    assert loss == pytest.approx(sum(nll) / 64, rel=1e-6 if head_cutoff == 0 else 1e-12)


def test_stride_equal_to_the_window_is_the_independent_windows_of_evaluate():
    model = _model(0)
    stream = torch.randint(0, 40, (41,))
    blocks = _blocks(stream, 8)
    loss, scored = evaluate_strided(model, blocks, stride=8, batch_size=2, device=torch.device("cpu"))
    ref, _ = evaluate(model, blocks, batch_size=2, device=torch.device("cpu"))
    assert scored == 40 and loss == pytest.approx(ref, rel=1e-12)  # the same forwards
    # a shorter stride scores late targets with more context: another loss (which way it
    # moves depends on the model; only that it moves is asserted)
    other, _ = evaluate_strided(model, blocks, stride=2, batch_size=2, device=torch.device("cpu"))
    assert other != pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("head_cutoff", [0, 20], ids=["full-head", "adaptive-head"])
def test_loss_by_position_is_each_targets_log_prob_given_only_its_prefix(head_cutoff):
    model = _model(head_cutoff)
    model.train()  # evaluation switches to eval mode and back
    blocks = _blocks(torch.randint(0, 40, (41,)), 8)  # 5 rows of 8 targets
    got = loss_by_position(model, blocks, batch_size=2)
    assert model.training and got.dtype == torch.float64 and got.shape == (8,)
    model.eval()
    ref = torch.zeros(8, dtype=torch.float64)  # a forward over ids 0..t alone predicts id t + 1
    with torch.no_grad():
        for row in blocks:
            for t in range(8):
                logp = torch.log_softmax(model(row[None, :t + 1])["logits"][0, -1], dim=-1)
                ref[t] -= logp[row[t + 1]] / len(blocks)
    # float64 throughout; a prefix's forward and the window's differ only in the order of
    # rounding (a few ulps of values ~4: far below 1e-12)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert not torch.allclose(got, got[0].expand(8))  # the positions differ: context is used
    # the mean over the positions is evaluate's loss over the same (full) windows
    mean, _ = evaluate(model, blocks, batch_size=2, device=torch.device("cpu"))
    assert got.mean().item() == pytest.approx(mean, rel=1e-6 if head_cutoff == 0 else 1e-12)
    with pytest.raises(ValueError, match=r"\(R, L \+ 1\)"):
        loss_by_position(model, blocks[:0], batch_size=2)


@pytest.mark.parametrize("head_cutoff", [0, 20], ids=["full-head", "adaptive-head"])
def test_loss_by_context_scores_the_same_targets_from_exactly_c_ids(head_cutoff):
    model = _model(head_cutoff)
    model.train()
    # two parts of a split: a target's context never reaches into the other part
    streams = [torch.randint(0, 40, (41,)), torch.randint(0, 40, (25,))]
    streams[1][0] = (streams[0][-1] + 1) % 40
    blocks = torch.cat([_blocks(st, 8) for st in streams])
    contexts = [1, 2, 4, 8]
    got = loss_by_context(model, blocks, contexts=contexts, batch_size=3, every=3)
    assert model.training and got.dtype == torch.float64
    # targets: ids 8, 11, 14, ... of each part (8 ids before each), the same for every c
    ends = [(st, j) for st in streams for j in range(8, len(st), 3)]
    assert got.shape == (4, len(ends)) == (4, 11 + 6)
    model.eval()
    ref = torch.zeros(4, len(ends), dtype=torch.float64)
    with torch.no_grad():  # one forward per target and context, over its c ids alone
        for k, c in enumerate(contexts):
            for i, (st, j) in enumerate(ends):
                logp = torch.log_softmax(model(st[None, j - c:j])["logits"][0, -1], dim=-1)
                ref[k, i] = -logp[st[j]]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)  # float64: the same forwards
    assert not torch.equal(got[0], got[-1])  # the context changes the predictions
    table = context_table(contexts, got)
    assert [r["context"] for r in table] == contexts and table[0]["gain"] is None
    for k in range(1, 4):  # the gain and its paired standard error, from the definition
        d = got[k - 1] - got[k]
        assert table[k]["gain"] == pytest.approx(d.mean().item(), rel=1e-12)
        assert table[k]["gain_se"] == pytest.approx(
            (((d - d.mean()) ** 2).sum() / (len(d) - 1)).sqrt().item() / len(d) ** 0.5, rel=1e-9)
        assert table[k]["loss"] == pytest.approx(got[k].mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"contexts=\[0, 9\].*block_len=8"):
        loss_by_context(model, blocks, contexts=[0, 9], batch_size=2)
    with pytest.raises(ValueError, match=r"contexts=\[2.5\].*integers"):  # not rounded to 2
        loss_by_context(model, blocks, contexts=[2.5], batch_size=2)
    with pytest.raises(ValueError, match="every=0"):
        loss_by_context(model, blocks, contexts=[1], batch_size=2, every=0)
    with pytest.raises(ValueError, match="no rows"):
        loss_by_context(model, blocks[:0], contexts=[8], batch_size=2)


def test_position_table_doubles_the_context_per_row():
    assert position_table([1.0, 2.0, 4.0, 3.0, 5.0, 6.0, 7.0, 8.0]) == [
        (1, 1, 1.0), (2, 3, 3.0), (4, 7, 5.25), (8, 8, 8.0)]
    rows = position_table([0.0] * 128)
    assert [(lo, hi) for lo, hi, _ in rows] == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 31),
                                                (32, 63), (64, 127), (128, 128)]
    assert position_table([2.5, 0.5, 1.0]) == [(1, 1, 2.5), (2, 3, 0.75)]


def test_random_offsets_cut_each_epoch_at_its_own_offset():
    from sparsebk.bench.quality import QualitySettings, _Order

    L = 6
    parts = [torch.arange(200), torch.arange(300, 350)]  # an id tells its part and position
    blocks = torch.cat([_blocks(p, L) for p in parts])  # 33 + 8 rows
    plain = _Order(blocks, 4, seed=5)
    gen = torch.Generator().manual_seed(5)  # the plain order: the blocks in one permutation per epoch
    perm = torch.randperm(len(blocks), generator=gen)
    assert torch.equal(plain.next(), blocks[perm[:4]]) and plain.offsets == []

    order = _Order(blocks, 4, seed=5, random_offsets=True)
    seen = []  # (epoch, start of each row in the stream)
    for _ in range(10 * 4):  # 10 batches per epoch of 40-41 rows: about 4 epochs
        batch = order.next()
        epoch = len(order.offsets) - 1  # an exhausted epoch draws the next offset in next()
        for row in batch:
            starts = [(k, i) for k, p in enumerate(parts) for i in range(len(p) - L)
                      if torch.equal(p[i:i + L + 1], row)]
            assert len(starts) == 1, "every row is a window of one part's stream"
            seen.append((epoch, starts[0]))
    assert len(order.offsets) >= 4 and len(set(order.offsets)) > 1
    assert all(0 <= r < L for r in order.offsets)
    for epoch, (_, start) in seen:  # each epoch's windows start at its own offset, every L ids
        assert start % L == order.offsets[epoch]
    assert {k for _, (k, _) in seen} == {0, 1}
    first_epoch = [s for e, s in seen if e == 0]
    assert len(first_epoch) == len(set(first_epoch))  # no window twice within an epoch
    with pytest.raises(ValueError, match="random_offsets=.* must be true or false"):
        QualitySettings(random_offsets="yes")
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=r"eval_stride=.* must be a positive integer or None"):
            QualitySettings(eval_stride=bad)
