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

from sparsebk.evaluation import evaluate, evaluate_strided, strided_windows, token_stream
from sparsebk.model.lm import LMConfig, SparseBKLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blocks(stream: torch.Tensor, L: int) -> torch.Tensor:
    """Rows of L + 1 ids every L ids, the tail dropped: how a split is prepared."""
    n = (len(stream) - 1) // L
    return stream[: n * L + 1].unfold(0, L + 1, L).clone()


def test_token_stream_inverts_the_blocks_and_refuses_others():
    stream = torch.randint(0, 50, (61,))
    blocks = _blocks(stream, 6)  # 10 rows
    assert torch.equal(token_stream(blocks), stream)
    assert torch.equal(token_stream(blocks[:1]), stream[:7])
    with pytest.raises(ValueError, match="not consecutive windows"):
        token_stream(blocks[[0, 2, 1]])
    with pytest.raises(ValueError, match=r"\(R, L \+ 1\)"):
        token_stream(stream)


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
    stream = torch.randint(0, 40, (43,))  # 42 targets: 5 full windows of 8 and a tail
    loss, scored = evaluate_strided(model, stream, window=8, stride=stride, batch_size=3,
                                    device=torch.device("cpu"))
    assert model.training and scored == 42
    model.eval()
    nll = []
    with torch.no_grad():
        for s, first in strided_windows(42, 8, stride):
            logp = torch.log_softmax(model(stream[None, s:s + 8])["logits"][0], dim=-1)
            nll += [-logp[j, stream[s + j + 1]].item() for j in range(first, 8)]
    assert len(nll) == 42
    # the full head's cross-entropy is taken in float32 by design (lm.py: `.float()`), ~1e-7
    # relative per term; the adaptive head's stays in the model's float64
    assert loss == pytest.approx(sum(nll) / 42, rel=1e-6 if head_cutoff == 0 else 1e-12)


def test_stride_equal_to_the_window_is_the_independent_windows_of_evaluate():
    model = _model(0)
    stream = torch.randint(0, 40, (41,))
    blocks = _blocks(stream, 8)
    loss, scored = evaluate_strided(model, token_stream(blocks), window=8, stride=8, batch_size=2,
                                    device=torch.device("cpu"))
    ref, _ = evaluate(model, blocks, batch_size=2, device=torch.device("cpu"))
    assert scored == 40 and loss == pytest.approx(ref, rel=1e-12)  # the same forwards
    # and a shorter stride gives each late target more context: a different (here lower) loss
    # for a model whose predictions depend on it is not asserted; only that it is not the same
    other, _ = evaluate_strided(model, token_stream(blocks), window=8, stride=2, batch_size=2,
                                device=torch.device("cpu"))
    assert other != pytest.approx(ref, rel=1e-9)


def test_random_offsets_cut_each_epoch_at_its_own_offset():
    from sparsebk.bench.quality import QualitySettings, _Order

    L = 6
    stream = torch.arange(200)  # an id tells its position in the stream
    blocks = _blocks(stream, L)  # 33 rows
    plain = _Order(blocks, 4, seed=5)
    gen = torch.Generator().manual_seed(5)  # the plain order: the blocks in one permutation per epoch
    perm = torch.randperm(len(blocks), generator=gen)
    assert torch.equal(plain.next(), blocks[perm[:4]]) and plain.offsets == []

    order = _Order(blocks, 4, seed=5, random_offsets=True)
    seen = []  # (epoch, start of each row in the stream)
    for _ in range(8 * 4):  # 8 batches per epoch of 32-33 rows: about 4 epochs
        batch = order.next()
        epoch = len(order.offsets) - 1  # an exhausted epoch draws the next offset in next()
        for row in batch:
            starts = [i for i in range(len(stream) - L) if torch.equal(stream[i:i + L + 1], row)]
            assert len(starts) == 1, "every row is a window of the training stream"
            seen.append((epoch, starts[0]))
    assert len(order.offsets) >= 4 and len(set(order.offsets)) > 1
    assert all(0 <= r < L for r in order.offsets)
    for epoch, start in seen:  # each epoch's windows start at its own offset, every L ids
        assert start % L == order.offsets[epoch]
    first_epoch = [s for e, s in seen if e == 0]
    assert len(first_epoch) == len(set(first_epoch))  # no window twice within an epoch
    with pytest.raises(ValueError, match="random_offsets=.* must be true or false"):
        QualitySettings(random_offsets="yes")
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=r"eval_stride=.* must be a positive integer or None"):
            QualitySettings(eval_stride=bad)
