"""Model options from the quality work: what a skipped position outputs (`skip_output`: "carry",
"own", "zero"; sparsebk.model.layers), what the gate is trained on (`gate_grad`, `gate_weight`) and how
the sparsity budget is shared (`sparsity_budget`).

References: the layer's equations position by position with dense matrix inverses for the BK
features (tests/test_layers.py's helpers), and the full forward for the streaming decoder.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rounding import LAMBDA
from sparsebk.model.layers import SKIP_OUTPUTS, SparseMoEResNetBKLayer
from sparsebk.model.lm import LMConfig, SparseBKLM
from test_decode import decode_noise
from test_layers import D64, away_from_init, layer_reference as reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTS = [{}, {"bk_heads": 3, "bk_learn_z": True, "bk_input_couplings": True}]


def _assert_paths_match(layer, x, force, cot, params, reference_fn):
    """Both the sparse and the dense path give reference_fn()'s output and the gradients of
    sum(cot * y) with respect to params; returns the reference's gradients."""

    def value_and_grads(fn):
        y = fn()
        return y.detach(), torch.autograd.grad((y * cot).sum(), params, allow_unused=True)

    ref, ref_grads = value_and_grads(reference_fn)
    for sparse in (True, False):
        layer.use_sparse_computation = sparse
        y, grads = value_and_grads(lambda: layer(x, force_mask=force))
        torch.testing.assert_close(y, ref, atol=1e-10, rtol=0)
        for g, g_ref in zip(grads, ref_grads):
            g_ref = torch.zeros_like(g) if g_ref is None else g_ref
            torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=0)
    return ref_grads


@pytest.mark.parametrize("opts", OPTS, ids=["h1", "h3-z-b"])
@pytest.mark.parametrize("skip", SKIP_OUTPUTS)
def test_both_paths_match_the_reference_with_gradients(skip, opts):
    torch.manual_seed(4)
    layer = SparseMoEResNetBKLayer(8, 9, num_experts=3, top_k=2, dropout_p=0.0,
                                   skip_output=skip, **opts).double().eval()
    away_from_init(layer)
    with torch.no_grad():  # the mask is a constant for the reference (see test_layers)
        layer.sparse_bk_core.importance_predictor.weight.zero_()
    x = torch.randn(2, 9, 8, dtype=D64, requires_grad=True)
    force = (torch.rand(2, 9) < 0.5).double()
    force[0, :3] = 0  # leading skipped positions
    assert 0 < force.sum() < force.numel()
    cot = torch.randn(2, 9, 8, dtype=D64)
    params = [x, *(p for n, p in layer.named_parameters() if "importance_predictor" not in n)]
    _assert_paths_match(layer, x, force, cot, params, lambda: reference(layer, x, force))


def test_the_choices_differ_where_they_should():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 8, dtype=D64)
    force = (torch.rand(2, 9) < 0.5).double()
    outs = {}
    for skip in SKIP_OUTPUTS:
        torch.manual_seed(2)  # the same weights for every choice
        layer = SparseMoEResNetBKLayer(8, 9, num_experts=3, dropout_p=0.0,
                                       skip_output=skip).double().eval()
        outs[skip] = layer(x, force_mask=force).detach()
    computed = force > 0.5
    for skip in ("own", "zero"):  # computed positions unchanged ("mix" changes the chain)
        assert torch.equal(outs[skip][computed], outs["carry"][computed])
        assert not torch.allclose(outs[skip][~computed], outs["carry"][~computed])
    assert torch.equal(outs["zero"][~computed], torch.zeros_like(outs["zero"][~computed]))
    # "mix" and "light": skipped positions write into the chain, so later computed positions
    # change too
    assert not torch.allclose(outs["mix"][computed], outs["own"][computed])
    assert not torch.allclose(outs["light"][computed], outs["own"][computed])
    assert not torch.allclose(outs["light"][~computed], outs["own"][~computed])


@pytest.mark.parametrize("skip", ["own", "zero", "mix", "light"])
@pytest.mark.parametrize("eval_mode", ["quasi", "threshold"])
def test_decode_equals_the_full_forward(skip, eval_mode):
    """Prefill of a prefix, then step-wise decoding: the logits of every position equal the
    full eval-mode forward's, with skipped positions in every layer."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=61, n_seq=24, d_model=32, n_layers=3, bk_heads=2,
                   bk_input_couplings=True, skip_output=skip, gate_eval_mode=eval_mode)
    model = SparseBKLM(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.sparse_bk_core.importance_predictor.weight.normal_(std=3.0 / 32 ** 0.5)
            layer.coupling_proj.weight.normal_(std=1.0 / 32 ** 0.5)
    tokens = torch.randint(0, 61, (3, 24), generator=torch.Generator().manual_seed(1))
    # float32 decode and forward each within LAMBDA sigma of exact (tests/test_decode.py)
    bound = 2 * LAMBDA * decode_noise(copy.deepcopy(model).double(), tokens)["logits"]
    with torch.no_grad():
        want = model(tokens)["logits"]
        skipped = torch.stack([layer.last_mask < 0.5 for layer in model.layers]).float().mean()
        assert 0.2 < skipped < 0.8, skipped
        for prompt in (0, 5, 24):
            got, state = [], model.init_state(3)
            if prompt:
                logits, state = model.prefill(tokens[:, :prompt])
                got.append(logits)
            for t in range(prompt, 24):
                logits, state = model.step(tokens[:, t], state)
                got.append(logits[:, None])
            torch.testing.assert_close(torch.cat(got, 1), want, rtol=0, atol=bound)


def test_bad_choice_is_named():
    with pytest.raises(ValueError, match="skip_output"):
        LMConfig(vocab_size=10, n_seq=8, d_model=8, n_layers=1, skip_output="copy")


def _masks(*sparsities, n=40):
    """(2, n) float masks with the given exact sparsities (fraction of zeros)."""
    out = []
    for s in sparsities:
        m = torch.ones(2 * n)
        m[: round(s * 2 * n)] = 0.0
        out.append(m.view(2, n).requires_grad_())
    return out


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_model_budget_lets_layers_differ_and_equals_the_layer_budget_when_they_agree(loss_type):
    cfg = dict(vocab_size=11, n_seq=40, d_model=8, n_layers=2, sparsity_loss_type=loss_type)
    per_layer = SparseBKLM(LMConfig(**cfg))
    whole = SparseBKLM(LMConfig(**cfg, sparsity_budget="model"))
    for m in (per_layer, whole):
        m.set_sparsity_schedule(0.5, 2.0)
    # layers at 0.25 and 0.75: the model as a whole is on target
    apart = _masks(0.25, 0.75)
    assert whole._sparsity_loss(apart).item() == 0.0
    assert per_layer._sparsity_loss(apart).item() > 0.0
    # both layers at 0.3: the same loss and the same gradient either way
    a, b = _masks(0.3, 0.3), _masks(0.3, 0.3)
    la, lb = per_layer._sparsity_loss(a), whole._sparsity_loss(b)
    torch.testing.assert_close(la, lb)
    la.backward(), lb.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
        assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sparsity_budget"):
        LMConfig(**cfg, sparsity_budget="global")


# --- gate_grad: what the task gradient tells the gate ------------------------------------------

def _mask_grad(layer, x, force, cot):
    """(y, dL/dmask) for L = sum(cot * y): the gradient reaching the layer's live mask."""
    seen = []

    def keep(_module, _inputs, out):  # returns None: the output stays as it is
        out.retain_grad()
        seen.append(out)

    hook = layer.sparse_bk_core.gate.register_forward_hook(keep)
    try:
        y = layer(x, force_mask=force)
        (y * cot).sum().backward()
    finally:
        hook.remove()
    return y.detach(), seen[0].grad


@pytest.mark.parametrize("skip", ["carry", "zero"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_contrast_gradient_is_computing_minus_skipping(skip, sparse):
    """At a computed position i, dL/dm_i is <g_i, y_i> under "scale" and <g_i, y_i - y_i'>
    under "contrast", where y_i' is the layer's output at i in a second forward that skips i
    (for carry and zero that output does not depend on i's own work: an exact counterfactual)."""
    torch.manual_seed(5)
    x = torch.randn(2, 9, 8, dtype=D64)
    force = (torch.rand(2, 9) < 0.6).double()
    force[:, 0] = 1
    cot = torch.randn(2, 9, 8, dtype=D64)
    grads = {}
    for mode in ("scale", "contrast"):
        torch.manual_seed(6)
        layer = SparseMoEResNetBKLayer(8, 9, num_experts=3, dropout_p=0.0, skip_output=skip,
                                       gate_grad=mode, use_sparse_computation=sparse).double().eval()
        away_from_init(layer)
        y, grads[mode] = _mask_grad(layer, x, force, cot)
        if mode == "scale":
            y_scale = y
        else:
            assert torch.equal(y, y_scale)  # the forward values do not change
    checked = 0
    for b, i in force.nonzero().tolist():
        skipped = force.clone()
        skipped[b, i] = 0
        with torch.no_grad():
            y_alt = layer(x, force_mask=skipped)[b, i]
        torch.testing.assert_close(grads["scale"][b, i], (cot[b, i] * y_scale[b, i]).sum(), atol=1e-10, rtol=0)
        torch.testing.assert_close(grads["contrast"][b, i], (cot[b, i] * (y_scale[b, i] - y_alt)).sum(),
                                   atol=1e-10, rtol=0)
        checked += 1
    assert checked >= 6


# "light" has no "contrast" (refused: test_light_is_checked); it trains with "scale" here
@pytest.mark.parametrize("skip,gate_grad", [(s, "contrast") for s in SKIP_OUTPUTS if s != "light"]
                         + [("light", "scale")])
def test_contrast_sparse_and_dense_paths_agree_in_training(skip, gate_grad):
    """Gate noise and dropout on: the two paths give the same outputs and every gradient, the
    importance predictor's included."""
    torch.manual_seed(7)
    layer = away_from_init(SparseMoEResNetBKLayer(8, 10, num_experts=3, dropout_p=0.1, skip_output=skip,
                                                  gate_grad=gate_grad).double().train())
    x = torch.randn(3, 10, 8, dtype=D64, requires_grad=True)
    runs = []
    for sparse in (True, False):
        layer.use_sparse_computation = sparse
        torch.manual_seed(8)
        y = layer(x)
        (y.square().mean() + layer.get_sparsity_loss()).backward()
        runs.append((y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}))
        layer.zero_grad(set_to_none=True)
    (y_s, g_s), (y_d, g_d) = runs
    assert 0 < layer.last_mask.sum() < layer.last_mask.numel()
    torch.testing.assert_close(y_s, y_d, atol=1e-12, rtol=0)
    assert g_s.keys() == g_d.keys() and "sparse_bk_core.importance_predictor.weight" in g_s
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], atol=1e-11, rtol=0, msg=name)


def test_gate_grad_is_checked_and_reaches_every_layer():
    with pytest.raises(ValueError, match="gate_grad"):
        LMConfig.preset("debug", gate_grad="both")
    model = SparseBKLM(LMConfig.preset("debug", gate_grad="contrast"))
    assert {layer.gate_grad for layer in model.layers} == {"contrast"}


# --- gate_weight: the gate's probability weighs the expert output ----------------------------

@pytest.mark.parametrize("opts", OPTS, ids=["h1", "h3-z-b"])
@pytest.mark.parametrize("skip", SKIP_OUTPUTS)
def test_gate_weight_matches_the_reference_with_gate_gradients(skip, opts):
    """Both paths equal the layer's equations with h_i = sigmoid(l_i) MoE(x_i), gradients of
    every parameter included: the importance predictor now gets the task's gradient through
    the weight (the reference differentiates sigmoid(predictor(x_i)) itself)."""
    torch.manual_seed(11)
    layer = SparseMoEResNetBKLayer(8, 9, num_experts=3, top_k=2, dropout_p=0.0, skip_output=skip,
                                   gate_weight=True, **opts).double().eval()
    away_from_init(layer)
    x = torch.randn(2, 9, 8, dtype=D64, requires_grad=True)
    force = (torch.rand(2, 9) < 0.5).double()
    force[0, :2] = 0
    assert 0 < force.sum() < force.numel()
    cot = torch.randn(2, 9, 8, dtype=D64)
    pred = layer.sparse_bk_core.importance_predictor
    params = [x, *layer.parameters()]
    # the reference's mask is a constant: so is the layer's here (no straight-through part)
    layer.sparse_bk_core.gate_parts = lambda x_, force_mask=None: (force, pred(x_).squeeze(-1))
    ref_grads = _assert_paths_match(layer, x, force, cot, params, lambda: reference(layer, x, force))
    i_w = next(k for k, p in enumerate(params) if p is pred.weight)
    assert ref_grads[i_w].abs().max() > 1e-3  # the weight reaches the predictor


def test_gate_weight_gradient_is_the_experts_usefulness():
    """With the mask held fixed (straight-through part removed), dL/dl_i at a computed position
    is sigmoid'(l_i) <dL/dh_i, MoE(x_i)>; at a skipped position it is 0 through the weight."""
    torch.manual_seed(12)
    layer = away_from_init(SparseMoEResNetBKLayer(8, 9, num_experts=3, dropout_p=0.0,
                                                  gate_weight=True).double().eval())
    x = torch.randn(2, 9, 8, dtype=D64)
    force = (torch.rand(2, 9) < 0.6).double()
    cot = torch.randn(2, 9, 8, dtype=D64)
    core = layer.sparse_bk_core
    logits = core.importance_predictor(x).squeeze(-1).detach().requires_grad_(True)
    # the layer's sparse forward with these logits; mask forced and constant
    y, _ = layer._sparse_forward(x, force, logits)
    (g_logits,) = torch.autograd.grad((y * cot).sum(), logits)
    # reference: dL/dl_i = dL/dw_i * w_i (1 - w_i), with dL/dw_i by a finite difference of
    # the weight at position i alone
    eps = 1e-6
    for b, i in [(b, i) for b in range(2) for i in range(9)]:
        bump = torch.zeros_like(logits)
        bump[b, i] = eps
        with torch.no_grad():
            up = (layer._sparse_forward(x, force, logits + bump)[0] * cot).sum()
            dn = (layer._sparse_forward(x, force, logits - bump)[0] * cot).sum()
        fd = (up - dn) / (2 * eps)
        torch.testing.assert_close(g_logits[b, i], fd, atol=1e-7, rtol=1e-6)
        if force[b, i] == 0:
            assert g_logits[b, i] == 0
    assert (g_logits[force > 0].abs() > 1e-6).all()


def test_gate_weight_is_checked_and_changes_only_computed_expert_outputs():
    with pytest.raises(ValueError, match="gate_weight"):
        LMConfig.preset("debug", gate_weight="yes")
    model = SparseBKLM(LMConfig.preset("debug", gate_weight=True))
    assert {layer.gate_weight for layer in model.layers} == {True}
    torch.manual_seed(13)
    x = torch.randn(2, 9, 8, dtype=D64)
    force = torch.zeros(2, 9, dtype=D64)  # every position skipped: no expert, no weight
    outs = []
    for weight in (False, True):
        torch.manual_seed(14)
        layer = SparseMoEResNetBKLayer(8, 9, num_experts=3, dropout_p=0.0,
                                       gate_weight=weight).double().eval()
        outs.append((layer(x, force_mask=force).detach(), layer(x, force_mask=torch.ones_like(force)).detach()))
    assert torch.equal(outs[0][0], outs[1][0])
    assert not torch.allclose(outs[0][1], outs[1][1])


# --- skip_output "light": a light FFN stands in for the experts at skipped positions ----------

def test_light_is_checked():
    with pytest.raises(ValueError, match="gate_grad"):
        LMConfig.preset("debug", skip_output="light", gate_grad="contrast")
    with pytest.raises(ValueError, match="gate_grad"):
        SparseMoEResNetBKLayer(8, 9, skip_output="light", gate_grad="contrast")
    with pytest.raises(ValueError, match="light_d_ff"):
        LMConfig.preset("debug", skip_output="light", light_d_ff=0)
    assert SparseMoEResNetBKLayer(32, 9, skip_output="light").light.fc1.out_features == 8
    model = SparseBKLM(LMConfig.preset("debug", skip_output="light", light_d_ff=5))
    assert {layer.light.fc1.out_features for layer in model.layers} == {5}
    assert all(layer.light is None for layer in SparseBKLM(LMConfig.preset("debug")).layers)
    # the small preset's light FFN is 128 wide (its d_model), not the default D / 4 = 32
    small = SparseBKLM(LMConfig.preset("small", n_layers=1))
    assert small.layers[0].light.fc1.out_features == 128
    assert SparseBKLM(LMConfig.preset("small", n_layers=1, light_d_ff=None)
                      ).layers[0].light.fc1.out_features == 32


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_light_leaves_computed_positions_of_a_dense_mask_alone(sparse):
    """Every gate open: the light FFN never runs and the layer equals today's ("carry") layer
    with the same weights; its parameters get a zero gradient (in the graph, for DDP)."""
    torch.manual_seed(15)
    x = torch.randn(2, 9, 8, dtype=D64)
    ys = {}
    for skip in ("carry", "light"):
        torch.manual_seed(16)
        layer = SparseMoEResNetBKLayer(8, 9, num_experts=3, dropout_p=0.0, skip_output=skip,
                                       gate_weight=True, use_sparse_computation=sparse).double()
        away_from_init(layer)
        ys[skip] = layer(x, force_mask=torch.ones(2, 9, dtype=D64))
    torch.testing.assert_close(ys["light"], ys["carry"], atol=1e-12, rtol=0)
    ys["light"].square().sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in layer.light.parameters())
