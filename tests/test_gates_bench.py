"""`sparsebk bench gates`: its interventions (forced masks) follow the model's own code path,
and its statistics give the known values of gates set by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsebk.bench.gates import decisions, gradient_share
from sparsebk.model.forcing import forced_gates
from sparsebk.model.lm import LMConfig, SparseBKLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")
V = 50


@torch.no_grad()
def set_gates(model: SparseBKLM, logits: list[float]) -> None:
    """Every gate of layer k decides by the constant logit logits[k] (weight 0, bias)."""
    for layer, logit in zip(model.layers, logits):
        pred = layer.sparse_bk_core.importance_predictor
        pred.weight.zero_()
        pred.bias.fill_(logit)


def pair() -> tuple[SparseBKLM, SparseBKLM]:
    """Two debug models with the same weights; the first with every gate open by hand."""
    torch.manual_seed(0)
    cfg = LMConfig.preset("debug", vocab_size=V)
    a, b = SparseBKLM(cfg), SparseBKLM(cfg)
    b.load_state_dict(a.state_dict())
    set_gates(a, [30.0, 30.0])
    return a.eval(), b.eval()


def blocks(rows: int, seed: int = 0) -> torch.Tensor:
    n = LMConfig.preset("debug").n_seq
    return torch.randint(0, V, (rows, n + 1), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_forced_open_masks_equal_open_gates_and_the_gates_come_back():
    pinned, free = pair()
    tokens = blocks(3)[:, :-1]
    with forced_gates(free, "open"):
        got = free(tokens)
    want = pinned(tokens)
    assert torch.equal(got["logits"], want["logits"])
    assert got["layer_sparsity"].tolist() == [0.0, 0.0]
    # outside the block the learned gates decide again: at init they skip some positions
    assert free(tokens)["layer_sparsity"].max() > 0.1


@torch.no_grad()
def test_random_forced_masks_skip_at_the_asked_rate():
    _, free = pair()
    with forced_gates(free, "rate", rate=0.3, generator=torch.Generator().manual_seed(1)):
        sp = free(blocks(16)[:, :-1])["layer_sparsity"]
    assert sp.sub(0.3).abs().max() < 0.06  # 512 positions per layer: 0.02 standard deviation


def test_decisions_of_gates_set_by_hand():
    pinned, _ = pair()
    set_gates(pinned, [-30.0, 30.0])  # layer 0 skips every position; layer 1 computes every one
    valid, train = blocks(6, seed=2), blocks(20, seed=3)
    d = decisions(pinned, valid, train, batch_size=4)
    l0, l1 = d["layers"]
    assert (l0["sparsity"], l1["sparsity"]) == (1.0, 0.0)
    assert l0["decisiveness"] == pytest.approx(1.0, abs=1e-9)
    assert l1["decisiveness"] == pytest.approx(1.0, abs=1e-9)
    assert (l0["logit_mean"], l1["logit_mean"]) == (pytest.approx(-30.0), pytest.approx(30.0))
    assert set(v for v in l0["skip_by_position"].values() if v is not None) == {1.0}
    assert set(v for v in l1["skip_by_frequency_rank"].values() if v is not None) == {0.0}
    loss = d["valid_loss"]
    # random masks at rates 1 and 0 are these same masks; all-open differs (layer 0 computes)
    assert loss["random_same_rate"] == loss["learned"]
    assert loss["all_open"] != loss["learned"]
    assert d["random_sparsity"] == [1.0, 0.0]
    set_gates(pinned, [30.0, 30.0])
    assert decisions(pinned, valid, train, batch_size=4)["valid_loss"]["learned"] == pytest.approx(
        loss["all_open"], rel=1e-6)


def test_gradient_share_separates_the_lm_and_the_sparsity_loss():
    _, free = pair()
    train = blocks(16, seed=4)
    free.set_sparsity_schedule(0.5, 0.0)
    off = gradient_share(free, train, batch_size=4, batches=2)
    assert all(r["grad_norm_sparsity"] == 0.0 and r["grad_norm_ce"] > 0 for r in off)
    free.set_sparsity_schedule(0.5, 1.0)
    on = gradient_share(free, train, batch_size=4, batches=2)
    assert all(r["grad_norm_sparsity"] > 0 for r in on)
    # the same batches and noise stream: the LM gradient does not depend on the loss weight
    assert [r["grad_norm_ce"] for r in on] == pytest.approx([r["grad_norm_ce"] for r in off], rel=1e-5)


def test_quick_cli_run_writes_its_record(tmp_path):
    from sparsebk.bench import gates
    from sparsebk.data.prepare import prepare_dataset

    words = "the a red big cat dog runs sits .".split()
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "t.txt"
    text.write_text("\n".join(" ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=g))
                              for _ in range(400)))
    ds = prepare_dataset(tmp_path / "ds", corpus="text", text=str(text), tokenizer="word",
                         block_len=LMConfig.preset("debug").n_seq, valid_fraction=0.1, test_fraction=0.1)
    out = tmp_path / "out"
    assert gates.main(["--quick", "--preset", "debug", "--dataset", str(ds), "--out", str(out)]) == 0
    rec = json.loads((out / "gates.json").read_text())
    assert rec["train"]["steps"] == 5
    assert len(rec["decisions"]["layers"]) == len(rec["gradient_share"]) == 2
    assert all(math.isfinite(v) for v in rec["decisions"]["valid_loss"].values())
