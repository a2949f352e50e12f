"""MoE FFN, SparseBKCore and SparseMoEResNetBKLayer against references written out position by
position (dense matrix inverse for the BK-core, per-token expert loops for the MoE)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import requires_cuda
from sparsebk import (AdaptiveSparsityScheduler, MoEFFN, SparseBKCore, SparseMoEResNetBKLayer,
                      get_balanced_loss, get_sparsity_loss, get_sparsity_stats)

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- references
def causal_resolvent_dense(v: torch.Tensor, z: complex = 1j) -> torch.Tensor:
    """g[b, i] = [(H[0..i, 0..i] - z)^-1]_ii with H = H0 + diag(v[b]), by dense inverses."""
    B, N = v.shape
    out = torch.zeros(B, N, dtype=torch.complex128)
    for b in range(B):
        for i in range(N):
            n = i + 1
            H = (torch.diag(-2.0 + v[b, :n].double()) + torch.diag(torch.ones(n - 1, dtype=D64), 1)
                 + torch.diag(torch.ones(n - 1, dtype=D64), -1))
            out[b, i] = torch.linalg.inv(H.to(torch.complex128) - z * torch.eye(n))[i, i]
    return out


def full_resolvent_dense(v: torch.Tensor, z: complex = 1j) -> torch.Tensor:
    B, N = v.shape
    out = torch.zeros(B, N, dtype=torch.complex128)
    for b in range(B):
        H = (torch.diag(-2.0 + v[b].double()) + torch.diag(torch.ones(N - 1, dtype=D64), 1)
             + torch.diag(torch.ones(N - 1, dtype=D64), -1))
        out[b] = torch.linalg.inv(H.to(torch.complex128) - z * torch.eye(N)).diagonal()
    return out


def moe_reference(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Per token: the top-k experts by router probability, each weighted by its probability."""
    rows = []
    for t in range(x.shape[0]):
        probs = torch.softmax(moe.router(x[t]), dim=-1)
        chosen = sorted(range(moe.num_experts), key=lambda e: -probs[e].item())[:moe.top_k]
        rows.append(sum(probs[e] * moe.experts[e](x[t:t + 1])[0] for e in chosen))
    return torch.stack(rows)


def layer_reference(layer: SparseMoEResNetBKLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The layer's equations, position by position (eval mode, no dropout)."""
    B, N, D = x.shape
    h = torch.zeros(B, N, D, dtype=x.dtype)
    v = torch.zeros(B, N, dtype=x.dtype)
    for b in range(B):
        for i in range(N):
            if mask[b, i] == 1:
                h[b, i] = moe_reference(layer.moe, x[b, i:i + 1])[0]
                v[b, i] = layer.v_proj(h[b, i])[0]
    g = causal_resolvent_dense(v)
    feats = torch.stack([g.real, g.imag], dim=-1).to(x.dtype)
    y = torch.zeros_like(x)
    for b in range(B):
        last = None
        for i in range(N):
            if mask[b, i] == 1:
                last = i
                y[b, i] = h[b, i] + layer.output_proj(feats[b, i])
            else:
                f = feats[b, last] if last is not None else torch.zeros(2, dtype=x.dtype)
                y[b, i] = layer.output_proj(f)
    return y


def make_layer(**kw) -> SparseMoEResNetBKLayer:
    kw = {"d_model": 8, "n_seq": 10, "dropout_p": 0.0, **kw}
    return SparseMoEResNetBKLayer(**kw).double()


# ----------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_dispatch_matches_per_token_reference(top_k):
    torch.manual_seed(0)
    moe = MoEFFN(6, num_experts=4, top_k=top_k).double()
    x = torch.randn(13, 6, dtype=D64)
    y, aux = moe(x)
    assert torch.allclose(y, moe_reference(moe, x), atol=1e-12)
    # Switch balance loss written out: E * sum_e (share of assignments to e) * (mean prob of e)
    probs = torch.softmax(moe.router(x), -1)
    top = probs.topk(top_k, -1).indices
    share = [(top == e).sum().item() / (13 * top_k) for e in range(4)]
    hand = 4 * sum(share[e] * probs[:, e].mean() for e in range(4))
    assert aux.item() == pytest.approx(hand.item(), rel=1e-12)


def test_moe_router_and_idle_experts_get_gradients():
    torch.manual_seed(1)
    moe = MoEFFN(6, num_experts=3, top_k=1)
    with torch.no_grad():  # every token prefers expert 0: experts 1 and 2 get no tokens
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 5.0
    x = torch.randn(7, 6).abs() + 0.5
    y, aux = moe(x)
    y.pow(2).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0  # from the task loss, at top-1
    for e in (1, 2):
        for p in moe.experts[e].parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    moe.zero_grad(set_to_none=True)
    y, aux = moe(torch.randn(0, 6))  # no tokens at all
    (y.sum() + aux).backward()
    assert all(p.grad is not None for p in moe.parameters())


def test_moe_bad_arguments():
    with pytest.raises(ValueError, match="top_k=3 must not exceed num_experts=2"):
        MoEFFN(4, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_experts"):
        MoEFFN(4, num_experts=0)


# ----------------------------------------------------------------------------- core
def test_core_features_match_dense_inverse_and_carry_forward():
    torch.manual_seed(2)
    core = SparseBKCore(4, 8).double().eval()
    x = torch.randn(2, 7, 4, dtype=D64)
    v = torch.randn(2, 7, dtype=D64)
    force = torch.tensor([[0, 1, 0, 0, 1, 1, 0], [1, 0, 1, 0, 0, 0, 1]], dtype=D64)
    feats, mask, ratio = core(x, v, force_mask=force)
    assert feats.shape == (2, 7, 2) and feats.dtype == D64
    assert torch.equal(mask.detach(), force)
    assert ratio.item() == pytest.approx(1 - 6 / 14)  # 6 computed of 14
    g = causal_resolvent_dense(torch.where(force > 0, v, 0.0))
    ref = torch.stack([g.real, g.imag], -1)
    # last computed position to the left (hand-read from the mask); -1 = none
    src = [[-1, 1, 1, 1, 4, 5, 5], [0, 0, 2, 2, 2, 2, 6]]
    for b in range(2):
        for i in range(7):
            want = ref[b, src[b][i]] if src[b][i] >= 0 else torch.zeros(2, dtype=D64)
            assert torch.allclose(feats[b, i], want, atol=1e-12), (b, i)
    # dense option: BK features of the given v everywhere
    dense, _, _ = core(x, v, use_sparse_computation=False, force_mask=force)
    g = causal_resolvent_dense(v)
    assert torch.allclose(dense, torch.stack([g.real, g.imag], -1), atol=1e-12)


def test_core_bidirectional_option_matches_full_inverse():
    core = SparseBKCore(4, 6, causal=False).double().eval()
    v = torch.randn(2, 6, dtype=D64)
    feats, _, _ = core(torch.randn(2, 6, 4, dtype=D64), v, use_sparse_computation=False)
    g = full_resolvent_dense(v)
    assert torch.allclose(feats, torch.stack([g.real, g.imag], -1), atol=1e-12)


def test_core_masks_are_binary_and_ratio_is_measured():
    torch.manual_seed(3)
    core = SparseBKCore(16, 32).train()
    feats, mask, ratio = core(torch.randn(4, 32, 16), torch.randn(4, 32))
    assert feats.dtype == torch.float32 and mask.shape == (4, 32)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert ratio.item() == pytest.approx(1.0 - mask.detach().mean().item())
    assert ratio.requires_grad  # live, not detached


def test_core_losses_use_its_target():
    core = SparseBKCore(4, 4, target_sparsity=0.25)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # sparsity 0.5, d = 0.25
    assert core.sparsity_loss(mask).item() == pytest.approx(0.0625)
    assert core.sparsity_loss(mask, "l1").item() == pytest.approx(0.25)
    acc = torch.tensor(2.0)
    total, info = core.balanced_sparsity_loss(mask, acc, sparsity_weight=0.5, accuracy_weight=3.0)
    assert total.item() == pytest.approx(3.0 * 2.0 + 0.5 * 0.0625)
    core.target_sparsity, core.tau = 0.5, 0.3
    assert core.sparsity_loss(mask).item() == 0.0 and core.gate.tau == 0.3


# ----------------------------------------------------------------------------- layer
def test_layer_sparse_path_matches_position_by_position_reference():
    torch.manual_seed(4)
    layer = make_layer(num_experts=3, top_k=2).eval()
    x = torch.randn(2, 9, 8, dtype=D64)
    force = (torch.rand(2, 9) < 0.5).double()
    force[0, :3] = 0  # leading skipped positions take the projected zero features
    ref = layer_reference(layer, x, force)
    y = layer(x, force_mask=force)
    assert torch.allclose(y, ref, atol=1e-10)
    layer.use_sparse_computation = False
    assert torch.allclose(layer(x, force_mask=force), ref, atol=1e-10)
    # all-ones mask: the sparse path equals the dense one
    ones = torch.ones(2, 9, dtype=D64)
    dense = layer(x, force_mask=ones)
    layer.use_sparse_computation = True
    assert torch.allclose(layer(x, force_mask=ones), dense, atol=1e-12)


def test_skipped_positions_do_no_expert_or_projection_work():
    torch.manual_seed(5)
    layer = make_layer(num_experts=4).eval()
    rows = {"experts": 0, "v_proj": 0, "output_proj": 0}

    def counter(name):
        def hook(module, inputs, output):
            rows[name] += inputs[0].shape[0]
        return hook

    for e in layer.moe.experts:
        e.register_forward_hook(counter("experts"))
    layer.v_proj.register_forward_hook(counter("v_proj"))
    layer.output_proj.register_forward_hook(counter("output_proj"))
    force = torch.zeros(3, 10, dtype=D64)
    force[:, ::4] = 1  # 9 computed positions of 30
    layer(torch.randn(3, 10, 8, dtype=D64), force_mask=force)
    assert rows["experts"] == 9 and rows["v_proj"] == 9
    assert rows["output_proj"] == 9 + 1  # plus the single projected zero-feature row


def test_layer_stats_and_the_four_loss_types():
    torch.manual_seed(6)
    layer = make_layer(target_sparsity=0.6, sparsity_loss_weight=0.5)
    force = torch.zeros(2, 10, dtype=D64)
    force[:, :3] = 1  # sparsity 0.7, d = 0.1
    layer(torch.randn(2, 10, 8, dtype=D64), force_mask=force)
    stats = layer.get_sparsity_stats()
    assert set(stats) == {"sparsity_ratio", "num_computed", "target_sparsity"}
    assert stats["sparsity_ratio"] == pytest.approx(0.7)
    assert stats["num_computed"] == pytest.approx(3.0)
    assert stats["target_sparsity"] == pytest.approx(0.6)
    d, t, s = 0.1, 0.6, 0.7
    hand = {"l2": d * d, "l1": d,
            "kl": t * math.log(t / s) + (1 - t) * math.log((1 - t) / (1 - s)),
            "adaptive": delta_huber(d, 0.1)}
    for loss_type, value in hand.items():
        got = layer.get_sparsity_loss(loss_type)
        assert got.item() == pytest.approx(0.5 * value, rel=1e-9), loss_type
        assert got.requires_grad
    assert layer.get_sparsity_loss().item() == pytest.approx(0.5 * hand["adaptive"], rel=1e-9)
    acc = torch.tensor(1.7, dtype=D64)
    total, info = layer.get_balanced_loss(acc, sparsity_weight=0.3, accuracy_weight=2.0)
    assert total.item() == pytest.approx(2.0 * 1.7 + 0.3 * hand["adaptive"], rel=1e-9)
    # module-level helpers: sums over the layers of a module
    model = torch.nn.Sequential(layer)
    assert get_sparsity_loss(model).item() == pytest.approx(0.5 * hand["adaptive"], rel=1e-9)
    total, _ = get_balanced_loss(model, acc)
    assert total.item() == pytest.approx(1.7 + 0.5 * hand["adaptive"], rel=1e-9)
    assert get_sparsity_stats(model)["sparsity_ratio"] == pytest.approx(0.7)


def delta_huber(d: float, delta: float) -> float:
    return 0.5 * d * d if abs(d) < delta else delta * (abs(d) - 0.5 * delta)


def test_predictor_gets_gradient_from_task_loss_and_from_sparsity_loss():
    torch.manual_seed(7)
    layer = make_layer().train()
    x = torch.randn(2, 10, 8, dtype=D64)
    layer(x).pow(2).mean().backward()  # task loss alone
    g_task = layer.sparse_bk_core.importance_predictor.weight.grad.clone()
    assert g_task.abs().sum() > 0
    assert layer.moe.router.weight.grad.abs().sum() > 0
    layer.zero_grad(set_to_none=True)
    layer(x)
    layer.get_sparsity_loss("l1").backward()  # sparsity loss alone
    assert layer.sparse_bk_core.importance_predictor.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_every_parameter_gets_a_gradient(density):
    """A normal step (task loss + sparsity loss) reaches every parameter, even when the mask
    skips everything or some experts get no token: DDP needs no find_unused_parameters."""
    torch.manual_seed(8)
    layer = make_layer(num_experts=4).train()
    force = (torch.rand(2, 10) < density).double()
    y = layer(torch.randn(2, 10, 8, dtype=D64), force_mask=force)
    (y.pow(2).mean() + layer.get_sparsity_loss() + layer.last_aux_loss).backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None]
    assert not missing


def test_layer_is_causal_in_position():
    torch.manual_seed(9)
    layer = make_layer().eval()
    x = torch.randn(2, 10, 8, dtype=D64)
    x2 = x.clone()
    x2[:, 6] += 3.0
    y, y2 = layer(x), layer(x2)
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-12)
    assert not torch.allclose(y[:, 6], y2[:, 6])  # the change is seen where it happens


def test_large_inputs_stay_finite():
    torch.manual_seed(10)
    layer = SparseMoEResNetBKLayer(16, 32).train()
    x = (torch.randn(2, 32, 16) * 100).requires_grad_()
    y = layer(x)
    (y.square().mean() + layer.get_sparsity_loss()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="d_model=1"):
        SparseMoEResNetBKLayer(1, 8)
    with pytest.raises(ValueError, match="n_seq=0"):
        SparseMoEResNetBKLayer(8, 0)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="target_sparsity"):
            SparseMoEResNetBKLayer(8, 8, target_sparsity=bad)
    layer = SparseMoEResNetBKLayer(8, 8)
    with pytest.raises(ValueError, match="target_sparsity=1.0"):
        layer.sparse_bk_core.target_sparsity = 1.0
    with pytest.raises(ValueError, match="sparsity_loss_type='huber'"):
        SparseMoEResNetBKLayer(8, 8, sparsity_loss_type="huber")
    with pytest.raises(ValueError, match="top_k=5 must not exceed num_experts=4"):
        SparseMoEResNetBKLayer(8, 8, top_k=5)
    with pytest.raises(ValueError, match="sequence length 9 exceeds n_seq=8"):
        layer(torch.randn(1, 9, 8))
    with pytest.raises(ValueError, match="sparsity_loss_weight"):
        layer.sparsity_loss_weight = -1.0
    layer(torch.randn(1, 8, 8))
    with pytest.raises(ValueError, match="loss_type"):
        layer.get_sparsity_loss("l3")
    with pytest.raises(RuntimeError, match="call the layer's forward"):
        SparseMoEResNetBKLayer(8, 8).get_sparsity_loss()


def test_seed_usage_example_runs_as_written():
    """The seed spec's "With Adaptive Scheduling" example, verbatim inside the loop, with the
    names it leaves to the reader (layer, x, optimizer, num_steps, val_loss, accuracy_loss)."""
    torch.manual_seed(11)
    layer = SparseMoEResNetBKLayer(d_model=64, n_seq=128, target_sparsity=0.5,
                                   sparsity_loss_weight=0.01, sparsity_loss_type='adaptive')
    x = torch.randn(1, 64, 64)  # any length <= n_seq
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    num_steps, val_loss = 3, 2.5
    accuracy_loss = torch.tensor(2.0, requires_grad=True)  # a task loss computed elsewhere
    before = layer.sparse_bk_core.importance_predictor.weight.detach().clone()

    # Create scheduler
    scheduler = AdaptiveSparsityScheduler(
        initial_sparsity=0.2,
        final_sparsity=0.5,
        initial_weight=0.001,
        final_weight=0.01,
        warmup_steps=1000,
        schedule_type='cosine'
    )

    # Training loop
    for step in range(num_steps):
        # Update scheduler
        state = scheduler.step(current_accuracy=val_loss)

        # Update layer's sparsity target
        layer.sparse_bk_core.target_sparsity = state['sparsity_target']
        layer.sparsity_loss_weight = state['loss_weight']

        # Forward pass
        output = layer(x)

        # Compute loss
        total_loss, loss_dict = layer.get_balanced_loss(accuracy_loss)

        # Backward pass
        total_loss.backward()
        optimizer.step()

    assert layer.sparse_bk_core.target_sparsity == pytest.approx(state['sparsity_target'])
    assert layer.sparsity_loss_weight == pytest.approx(state['loss_weight'])
    assert 0.2 <= state['sparsity_target'] < 0.21  # three steps into a 1000-step cosine ramp
    assert output.shape == (1, 64, 64)
    assert not torch.equal(before, layer.sparse_bk_core.importance_predictor.weight)

    # Monitoring Sparsity (the seed's snippet)
    stats = layer.get_sparsity_stats()
    text = (f"Sparsity ratio: {stats['sparsity_ratio']:.3f} "
            f"Positions computed: {stats['num_computed']:.1f} / 128 "
            f"Target sparsity: {stats['target_sparsity']:.3f}")
    assert 0.0 <= stats['sparsity_ratio'] <= 1.0 and 0.0 <= stats['num_computed'] <= 64
    assert stats['num_computed'] == pytest.approx(64 * (1 - stats['sparsity_ratio']))
    assert "Target sparsity: 0.20" in text


@requires_cuda
def test_cuda_layer_matches_cpu():
    torch.manual_seed(12)
    layer = make_layer(num_experts=3).eval()
    x = torch.randn(2, 10, 8, dtype=D64)
    force = (torch.rand(2, 10) < 0.5).double()
    ref = layer(x, force_mask=force)
    got = layer.cuda()(x.cuda(), force_mask=force.cuda())
    assert torch.allclose(got.cpu(), ref, atol=1e-10)


def test_benchmark_forced_masks_skip_exactly_the_asked_fraction():
    from sparsebk.bench.layer import forced_mask

    gen = torch.Generator().manual_seed(0)
    for s in (0.0, 0.3, 0.5, 0.7):
        mask = forced_mask(4, 512, s, gen)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask.sum(1).tolist() == [512 - round(s * 512)] * 4
