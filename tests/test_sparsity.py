"""Sparsity objectives against hand-computed values, torch's own Huber / Bernoulli-KL, and
finite differences (gradcheck)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, kl_divergence

from conftest import requires_cuda
from sparsebk import balanced_sparsity_loss, sparsity_loss
from sparsebk.model.sparsity import LOSS_TYPES, measured_sparsity


def mask_with_sparsity(n_skip: int, n: int, dtype=torch.float64, requires_grad=False) -> torch.Tensor:
    """(2, n/2) mask with exactly n_skip zeros."""
    m = torch.ones(n, dtype=dtype)
    m[:n_skip] = 0.0
    m = m.reshape(2, n // 2)
    return m.requires_grad_(requires_grad)


def straight_through_mask(logits: torch.Tensor) -> torch.Tensor:
    """Hard 0/1 forward, sigmoid backward: the gate the model uses."""
    soft = torch.sigmoid(logits)
    hard = (logits > 0).to(logits.dtype)
    return hard + soft - soft.detach()


def test_loss_types_constant():
    assert LOSS_TYPES == ("l2", "l1", "kl", "adaptive")


def test_measured_sparsity_is_one_minus_mean():
    m = mask_with_sparsity(3, 8)
    assert measured_sparsity(m).item() == pytest.approx(3 / 8, abs=0)
    # bool masks measure the same (and carry no gradient)
    assert measured_sparsity(m.bool()).item() == pytest.approx(3 / 8, abs=0)


@pytest.mark.parametrize("n_skip,target", [(3, 0.5), (6, 0.25), (0, 1.0), (8, 0.0), (4, 0.5)])
def test_l2_l1_hand_values(n_skip, target):
    m = mask_with_sparsity(n_skip, 8)
    d = n_skip / 8 - target
    assert sparsity_loss(m, target, "l2").item() == pytest.approx(d * d, abs=1e-15)
    assert sparsity_loss(m, target, "l1").item() == pytest.approx(abs(d), abs=1e-15)
    # default loss_type is l2
    assert sparsity_loss(m, target).item() == pytest.approx(d * d, abs=1e-15)


def test_huber_matches_hand_formula_and_torch():
    for n_skip in range(0, 17):
        for target in (0.0, 0.3, 0.5, 0.95, 1.0):
            for delta in (0.05, 0.1, 0.4):
                m = mask_with_sparsity(n_skip, 16)
                d = n_skip / 16 - target
                hand = 0.5 * d * d if abs(d) < delta else delta * (abs(d) - 0.5 * delta)
                got = sparsity_loss(m, target, "adaptive", delta=delta)
                assert got.item() == pytest.approx(hand, abs=1e-15)
                ref = F.huber_loss(torch.tensor(n_skip / 16, dtype=torch.float64),
                                   torch.tensor(target, dtype=torch.float64), delta=delta)
                assert got.item() == pytest.approx(ref.item(), abs=1e-15)


def test_huber_continuous_at_delta_value_and_gradient():
    delta = 0.1
    m = mask_with_sparsity(8, 16, requires_grad=True)  # sparsity 0.5
    vals, grads = [], []
    for side in (-1e-9, 1e-9):
        # target below current so that d = +(delta + side)
        target = torch.tensor(0.5 - (delta + side), dtype=torch.float64)
        m.grad = None
        loss = sparsity_loss(m, target, "adaptive", delta=delta)
        loss.backward()
        vals.append(loss.item())
        grads.append(m.grad.clone())
    # value: both branches give 0.5 delta^2 at |d| = delta
    assert vals[0] == pytest.approx(0.5 * delta ** 2, abs=1e-9)
    assert vals[1] == pytest.approx(0.5 * delta ** 2, abs=1e-9)
    # gradient: dL/dd = d inside, delta * sign(d) outside; dd/dm_i = -1/n
    expect = torch.full_like(m, -delta / 16)
    torch.testing.assert_close(grads[0], expect, rtol=0, atol=1e-9)
    torch.testing.assert_close(grads[1], expect, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n_skip", [0, 2, 5, 8, 11, 16])
def test_kl_at_target_zero_one_half(n_skip):
    m = mask_with_sparsity(n_skip, 16)
    c = n_skip / 16
    eps = torch.finfo(torch.float64).eps
    cs, ds = max(c, eps), max(1 - c, eps)
    # target 0: KL(Bern(0) || Bern(c)) = -log(1 - c); target 1: -log(c); target 0.5 by hand
    assert sparsity_loss(m, 0.0, "kl").item() == pytest.approx(-math.log(ds), rel=1e-12, abs=1e-15)
    assert sparsity_loss(m, 1.0, "kl").item() == pytest.approx(-math.log(cs), rel=1e-12, abs=1e-15)
    half = 0.5 * math.log(0.5 / cs) + 0.5 * math.log(0.5 / ds)
    assert sparsity_loss(m, 0.5, "kl").item() == pytest.approx(half, rel=1e-12, abs=1e-15)


def test_kl_matches_torch_bernoulli_kl_in_interior():
    for n_skip in range(1, 16):
        for target in (0.0, 0.1, 0.5, 0.77, 1.0):
            m = mask_with_sparsity(n_skip, 16)
            ref = kl_divergence(Bernoulli(probs=torch.tensor(target, dtype=torch.float64)),
                                Bernoulli(probs=torch.tensor(n_skip / 16, dtype=torch.float64)))
            got = sparsity_loss(m, target, "kl")
            assert got.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-14)
            # a tensor target gives the same
            got_t = sparsity_loss(m, torch.tensor(target), "kl")
            assert got_t.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)


def test_kl_at_boundary_is_finite_and_still_pushes():
    # all positions computed (sparsity 0), target 0.5: KL is infinite in exact math; we evaluate it
    # at sparsity = eps and keep that point's gradient, so the mask is still pushed towards skipping
    m = torch.ones(2, 8, dtype=torch.float32, requires_grad=True)
    loss = sparsity_loss(m, 0.5, "kl")
    loss.backward()
    eps = torch.finfo(torch.float32).eps
    assert loss.item() == pytest.approx(0.5 * math.log(0.5 / eps) + 0.5 * math.log(0.5), rel=1e-5)
    assert torch.isfinite(m.grad).all()
    # dKL/ds = -t/s + (1-t)/(1-s) at s = eps, ds/dm_i = -1/n: strongly positive (descent lowers m)
    expect = (-(0.5 / eps) + 0.5 / (1 - eps)) * (-1 / 16)
    torch.testing.assert_close(m.grad, torch.full_like(m, expect), rtol=1e-5, atol=0)
    # target 0 with all computed: exactly zero loss and no 0 * log 0 NaN; the gradient is the
    # one-sided derivative of -log(1 - s) at s = 0, i.e. 1, times ds/dm_i = -1/n
    m.grad = None
    loss0 = sparsity_loss(m, 0.0, "kl")
    loss0.backward()
    assert loss0.item() == 0.0
    torch.testing.assert_close(m.grad, torch.full_like(m, -1 / 16), rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_against_finite_differences(loss_type):
    torch.manual_seed(0)
    # a soft mask whose sparsity (~0.35) is away from the target and from the Huber / L1 kinks
    m = (0.55 + 0.2 * torch.rand(3, 7, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sparsity_loss(x, 0.6, loss_type, delta=0.1), (m,))
    assert torch.autograd.gradcheck(lambda x: sparsity_loss(x, 0.3, loss_type, delta=0.5), (m,))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_reaches_logits_through_straight_through_mask(loss_type):
    n = 16
    # 12 of 16 positions skipped: sparsity 0.75 > target 0.5 (sparser than the target)
    logits = torch.tensor([-2.0] * 12 + [1.5] * 4, dtype=torch.float64).reshape(2, 8).requires_grad_(True)
    mask = straight_through_mask(logits)
    assert measured_sparsity(mask).item() == 0.75
    sparsity_loss(mask, 0.5, loss_type).backward()
    # sparser than the target: every logit is pushed up (negative gradient, descent raises it)
    assert (logits.grad < 0).all()
    # magnitude: dL/dlogit_i = L'(c) * (-1/n) * sigmoid'(logit_i)
    c, t, delta = 0.75, 0.5, 0.1
    dLdc = {"l2": 2 * (c - t), "l1": 1.0, "kl": -t / c + (1 - t) / (1 - c),
            "adaptive": delta}[loss_type]
    sig = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, dLdc * (-1 / n) * sig * (1 - sig), rtol=1e-12, atol=0)

    # denser than the target: every logit is pushed down
    logits2 = logits.detach().neg().requires_grad_(True)  # sparsity 0.25
    sparsity_loss(straight_through_mask(logits2), 0.5, loss_type).backward()
    assert (logits2.grad > 0).all()


def test_half_precision_mask_is_measured_in_float32():
    m = mask_with_sparsity(3, 8, dtype=torch.bfloat16, requires_grad=True)
    loss = sparsity_loss(m, 0.5, "l2")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((3 / 8 - 0.5) ** 2, abs=1e-7)
    loss.backward()
    assert m.grad.dtype == torch.bfloat16


def test_balanced_loss_combines_and_reports():
    m = mask_with_sparsity(6, 16, requires_grad=True)  # sparsity 0.375
    acc = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    total, info = balanced_sparsity_loss(m, acc, 0.5, sparsity_weight=0.2, accuracy_weight=0.7)
    d = 0.375 - 0.5
    s = 0.1 * (abs(d) - 0.05)  # default adaptive, |d| = 0.125 > delta 0.1
    assert total.item() == pytest.approx(0.7 * 2.5 + 0.2 * s, abs=1e-15)
    assert set(info) == {"total_loss", "accuracy_loss", "sparsity_loss", "sparsity_weight",
                         "accuracy_weight", "current_sparsity", "target_sparsity"}
    assert info["total_loss"].item() == pytest.approx(total.item(), abs=0)
    assert info["accuracy_loss"].item() == 2.5
    assert info["sparsity_loss"].item() == pytest.approx(s, abs=1e-15)
    assert info["current_sparsity"].item() == 0.375
    assert (info["sparsity_weight"], info["accuracy_weight"], info["target_sparsity"]) == (0.2, 0.7, 0.5)
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for v in info.values())
    total.backward()
    assert acc.grad.item() == pytest.approx(0.7, abs=0)
    # mask denser than the target (0.375 < 0.5): dL/dd = -delta, dd/dm_i = -1/n, so m is pushed down
    torch.testing.assert_close(m.grad, torch.full_like(m, 0.2 * (-0.1) * (-1 / 16)), rtol=1e-12, atol=0)


def test_balanced_loss_type_is_forwarded():
    m = mask_with_sparsity(6, 16)
    total, info = balanced_sparsity_loss(m, torch.tensor(0.0), 0.5, loss_type="l2")
    assert info["sparsity_loss"].item() == pytest.approx(0.125 ** 2, abs=1e-15)


@pytest.mark.parametrize("call,match", [
    (lambda m: sparsity_loss(m, 0.5, "huber"), r"loss_type='huber'"),
    (lambda m: sparsity_loss(m, -0.1), r"target=-0\.1"),
    (lambda m: sparsity_loss(m, 1.5), r"target=1\.5"),
    (lambda m: sparsity_loss(m, float("nan")), r"target=nan"),
    (lambda m: sparsity_loss(m, torch.tensor(1.2)), r"target=1\.2"),
    (lambda m: sparsity_loss(m, torch.tensor([0.5, 0.5])), r"target must be .* 0-dim .* \(2,\)"),
    (lambda m: sparsity_loss(m, "0.5"), r"target='0\.5'"),
    (lambda m: sparsity_loss(m, 0.5, "adaptive", delta=0.0), r"delta=0\.0"),
    (lambda m: sparsity_loss(m, 0.5, "adaptive", delta=-1), r"delta=-1"),
    (lambda m: sparsity_loss(torch.ones(2, 0), 0.5), r"mask .* shape \(2, 0\)"),
    (lambda m: sparsity_loss(torch.ones(()), 0.5), r"mask .* shape \(\)"),
    (lambda m: sparsity_loss([1, 0], 0.5), r"mask must be a torch.Tensor"),
    (lambda m: balanced_sparsity_loss(m, torch.tensor(1.0), 0.5, sparsity_weight=-0.1), r"sparsity_weight=-0\.1"),
    (lambda m: balanced_sparsity_loss(m, torch.tensor(1.0), 0.5, accuracy_weight=-2.0), r"accuracy_weight=-2\.0"),
    (lambda m: balanced_sparsity_loss(m, torch.tensor(1.0), 0.5, sparsity_weight=float("inf")), r"sparsity_weight=inf"),
    (lambda m: balanced_sparsity_loss(m, torch.ones(3), 0.5), r"accuracy_loss .* \(3,\)"),
    (lambda m: balanced_sparsity_loss(m, torch.tensor(1.0), 0.5, loss_type="l3"), r"loss_type='l3'"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.ones(2, 4))


@requires_cuda
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_host_sync_on_cuda(loss_type):
    logits = torch.randn(8, 128, device="cuda", requires_grad=True)
    target_t = torch.tensor(0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for target in (0.5, target_t):
            mask = straight_through_mask(logits)
            total, _ = balanced_sparsity_loss(mask, mask.sum() * 0.0, target, loss_type=loss_type)
            total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # same value as the CPU computation
    cpu = sparsity_loss(straight_through_mask(logits.detach().cpu()), 0.5, loss_type)
    torch.testing.assert_close(sparsity_loss(straight_through_mask(logits.detach()), 0.5, loss_type).cpu(),
                               cpu, rtol=1e-5, atol=1e-6)
