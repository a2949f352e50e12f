"""Gumbel-sigmoid gate: Bernoulli(sigmoid(l)) hard samples, straight-through gradient, eval determinism."""

from __future__ import annotations

import math

import pytest
import torch

from sparsebk import GumbelSigmoidGate, gumbel_sigmoid
from sparsebk.model.gate import quasi_logistic_offsets


def test_hard_sample_is_exactly_binary_and_bernoulli_sigmoid():
    torch.manual_seed(0)
    levels = torch.tensor([-2.0, 0.0, 1.5])
    logits = levels.repeat_interleave(100_000)
    mask = gumbel_sigmoid(logits, tau=0.7)  # tau does not change P(mask = 1)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    freq = mask.view(3, -1).mean(dim=1)
    expected = torch.sigmoid(levels)  # logistic noise: P(l + L > 0) = sigmoid(l)
    # binomial std at n = 1e5 is <= 0.0016; 0.006 is ~4 std
    assert torch.allclose(freq, expected, atol=6e-3), (freq, expected)
    # a single Gumbel sample would give 1 - exp(-1) = 0.632 at logit 0
    assert abs(freq[1].item() - 0.5) < 6e-3


def test_straight_through_gradient_is_the_sigmoid_derivative():
    logits = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    tau = 0.5
    mask = gumbel_sigmoid(logits, tau, noise=False)
    assert mask.tolist() == [0.0, 1.0, 1.0]
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    (mask * weights).sum().backward()
    s = [1 / (1 + math.exp(-l / tau)) for l in (-1.0, 0.3, 2.0)]
    hand = [w * si * (1 - si) / tau for w, si in zip((1.0, 2.0, 3.0), s)]
    assert logits.grad.tolist() == pytest.approx(hand, rel=1e-12)


def test_soft_sample_is_the_relaxed_value():
    logits = torch.tensor([-1.0, 0.0, 3.0])
    soft = gumbel_sigmoid(logits, 2.0, hard=False, noise=False)
    assert torch.allclose(soft, torch.sigmoid(logits / 2.0))


@pytest.mark.parametrize("eval_mode", ["quasi", "threshold"])
def test_eval_mode_is_deterministic_and_uses_no_randomness(eval_mode):
    gate = GumbelSigmoidGate(tau=1.0, eval_mode=eval_mode).eval()
    logits = torch.randn(4, 9)
    state = torch.get_rng_state()
    a, b = gate(logits), gate(logits)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    if eval_mode == "threshold":
        assert torch.equal(a, (logits > 0).float())


def test_quasi_offsets_by_hand():
    inv_phi = (math.sqrt(5) - 1) / 2
    hand = []
    for i in range(1, 6):
        u = i * inv_phi - math.floor(i * inv_phi)
        hand.append(math.log(u / (1 - u)))
    got = quasi_logistic_offsets(5, dtype=torch.float64)
    assert got.tolist() == pytest.approx(hand, rel=1e-12)


@pytest.mark.parametrize("level", [-2.0, -0.4, 0.0, 0.3, 1.5])
def test_quasi_eval_mask_computes_a_sigmoid_fraction(level):
    """Logits near one constant (what the sparsity loss produces): the threshold rule computes
    all or nothing, the quasi mask the fraction sigmoid(l) a training-mode sample has."""
    gate = GumbelSigmoidGate(eval_mode="quasi").eval()
    logits = torch.full((3, 1000), level)
    mask = gate(logits)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # low discrepancy: the fraction is within a few / N of sigmoid(l) in every row
    assert torch.allclose(mask.mean(-1), torch.sigmoid(torch.tensor(level)).expand(3), atol=5e-3)


def test_quasi_eval_mask_is_decisive_where_logits_are():
    gate = GumbelSigmoidGate(eval_mode="quasi").eval()
    n = 64  # the largest |offset| over 64 positions is below 5
    assert quasi_logistic_offsets(n).abs().max() < 5
    logits = torch.where(torch.rand(2, n) > 0.5, 6.0, -6.0)
    assert torch.equal(gate(logits), (logits > 0).float())


def test_quasi_eval_mask_is_causal():
    """Position i's mask depends on (l_i, i) only: later logits and a longer sequence change nothing."""
    gate = GumbelSigmoidGate(eval_mode="quasi").eval()
    torch.manual_seed(5)
    logits = torch.randn(3, 20)
    full = gate(logits)
    changed = logits.clone()
    changed[:, 12:] = torch.randn(3, 8)
    assert torch.equal(gate(changed)[:, :12], full[:, :12])
    assert torch.equal(gate(logits[:, :7]), full[:, :7])
    # and it does depend on the position: shifting the logits by one changes the mask
    assert not torch.equal(gate(torch.zeros(1, 20))[:, 1:], gate(torch.zeros(1, 20))[:, :-1])


def test_straight_through_gradient_in_quasi_mode():
    logits = torch.tensor([[0.2, -0.7, 1.1]], dtype=torch.float64, requires_grad=True)
    mask = gumbel_sigmoid(logits, 0.5, noise="quasi")
    pre = (logits.detach() + quasi_logistic_offsets(3, dtype=torch.float64)) / 0.5
    assert torch.equal(mask.detach(), (pre > 0).double())
    mask.sum().backward()
    s = torch.sigmoid(pre)
    assert torch.allclose(logits.grad, s * (1 - s) / 0.5, rtol=1e-12)


def test_seed_fixes_the_training_noise():
    gate = GumbelSigmoidGate().train()
    logits = torch.zeros(8, 16)
    torch.manual_seed(3)
    a = gate(logits)
    torch.manual_seed(3)
    b = gate(logits)
    torch.manual_seed(4)
    c = gate(logits)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_forced_mask_keeps_the_soft_gradient():
    logits = torch.tensor([[0.5, -0.5, 1.0]], requires_grad=True)
    force = torch.tensor([[0.0, 1.0, 1.0]])
    mask = gumbel_sigmoid(logits, 1.0, noise=False, force=force)
    assert torch.equal(mask.detach(), force)
    mask.sum().backward()
    s = torch.sigmoid(logits.detach())
    assert torch.allclose(logits.grad, s * (1 - s))


def test_tau_is_settable_and_validated():
    gate = GumbelSigmoidGate(tau=2.0)
    gate.tau = 0.25
    assert gate.tau == 0.25
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="tau"):
            gate.tau = bad
        with pytest.raises(ValueError, match="tau"):
            gumbel_sigmoid(torch.zeros(3), bad)
    with pytest.raises(ValueError, match="eval_mode='noisy'"):
        GumbelSigmoidGate(eval_mode="noisy")
    with pytest.raises(ValueError, match="noise='gauss'"):
        gumbel_sigmoid(torch.zeros(3), noise="gauss")
    with pytest.raises(ValueError, match="force has shape"):
        gumbel_sigmoid(torch.zeros(2, 3), force=torch.zeros(3))


def test_train_noise_none_trains_on_the_threshold_mask():
    """train_noise="none": in training the mask is exactly logits > 0 (the "threshold" eval
    rule), no random number is drawn, and the gradient is d sigmoid(l / tau)."""
    gate = GumbelSigmoidGate(tau=0.5, eval_mode="threshold", train_noise="none").train()
    logits = torch.randn(4, 50, dtype=torch.float64, requires_grad=True)
    before = torch.get_rng_state()
    mask = gate(logits)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(mask.detach(), (logits > 0).double())
    assert torch.equal(mask.detach(), gate.eval()(logits).detach())  # eval decides the same
    (mask * torch.arange(50.0, dtype=torch.float64)).sum().backward()
    s = torch.sigmoid(logits.detach() / 0.5)
    torch.testing.assert_close(logits.grad, torch.arange(50.0, dtype=torch.float64) * s * (1 - s) / 0.5)
    with pytest.raises(ValueError, match="train_noise"):
        GumbelSigmoidGate(train_noise="quasi")


def test_lm_config_wires_train_noise_and_refuses_a_mismatched_eval_rule():
    from sparsebk.model.lm import LMConfig, SparseBKLM

    with pytest.raises(ValueError, match="gate_eval_mode='threshold'"):
        LMConfig.preset("debug", gate_train_noise="none")
    model = SparseBKLM(LMConfig.preset("debug", gate_train_noise="none", gate_eval_mode="threshold"))
    assert {layer.sparse_bk_core.gate.train_noise for layer in model.layers} == {"none"}
