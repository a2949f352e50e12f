"""sparsebk.model.forcing: each mode forces what its docstring says, through the layer's own
force path, against the layer's equations (tests/test_layers.py's position-by-position
reference), and everything comes back on exit."""

from __future__ import annotations

import pytest
import torch

from sparsebk.model.forcing import forced_gates
from sparsebk.model.layers import SparseMoEResNetBKLayer
from sparsebk.model.lm import LMConfig, SparseBKLM
from test_layers import D64, away_from_init, layer_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OPTS = [{}, {"bk_heads": 3, "bk_learn_z": True, "bk_input_couplings": True}]


def layer64(**kw) -> SparseMoEResNetBKLayer:
    torch.manual_seed(3)
    return away_from_init(SparseMoEResNetBKLayer(8, 9, num_experts=3, top_k=2, dropout_p=0.0,
                                                 **kw).double().eval())


def expert_rows(layer: SparseMoEResNetBKLayer) -> list[int]:
    """A list that counts the rows every expert of `layer` computes from now on."""
    rows = [0]
    for e in layer.moe.experts:
        e.register_forward_hook(lambda m, i, o: rows.__setitem__(0, rows[0] + i[0].shape[0]))
    return rows


@pytest.mark.parametrize("opts", OPTS, ids=["h1", "h3-z-b"])
@pytest.mark.parametrize("mode,value", [("open", 1.0), ("closed", 0.0)])
def test_open_and_closed_follow_the_layer_equations(mode, value, opts):
    layer = layer64(**opts)
    rows = expert_rows(layer)
    x = torch.randn(2, 9, 8, dtype=D64)
    with forced_gates(layer, mode):
        y, mask, _ = layer.forward_parts(x)
    assert rows[0] == (2 * 9 * 2 if mode == "open" else 0)  # top-2: two experts a position
    assert torch.equal(mask, torch.full((2, 9), value, dtype=D64))
    torch.testing.assert_close(y, layer_reference(layer, x, mask), atol=1e-10, rtol=0)


def test_open_is_the_dense_model_and_pinned_gates_weigh_one():
    """Without gate_weight, "open" computes the dense model ("pinned_open": logits pinned at
    +30). With it (the presets' gates), a pinned gate leaves the experts' (and the light FFN's)
    outputs unscaled: "pinned_open" / "pinned_closed" equal the same weights without
    gate_weight forced open / closed, to the bit in float32; "open" keeps the learned
    sigmoid(l) factors."""
    torch.manual_seed(0)
    model = SparseBKLM(LMConfig.preset("debug", vocab_size=50)).eval()
    tokens = torch.randint(0, 50, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with forced_gates(model, "open"):
            opened = model(tokens)
        with forced_gates(model, "pinned_open"):
            dense = model(tokens)
    assert torch.equal(opened["logits"], dense["logits"])
    assert opened["layer_sparsity"].tolist() == dense["layer_sparsity"].tolist() == [0.0, 0.0]

    torch.manual_seed(1)
    weighted = SparseMoEResNetBKLayer(8, 9, num_experts=3, dropout_p=0.0, gate_weight=True,
                                      skip_output="light").eval()
    plain = SparseMoEResNetBKLayer(8, 9, num_experts=3, dropout_p=0.0, skip_output="light").eval()
    plain.load_state_dict(weighted.state_dict())
    x = torch.randn(2, 9, 8)

    def y(layer, mode):
        with torch.no_grad(), forced_gates(layer, mode):
            return layer.forward_parts(x)

    for pinned, forced, mask in (("pinned_open", "open", 1.0), ("pinned_closed", "closed", 0.0)):
        got = y(weighted, pinned)
        assert torch.equal(got.mask, torch.full((2, 9), mask))
        assert torch.equal(got.y, y(plain, forced).y), pinned
        assert not torch.allclose(y(weighted, forced).y, got.y), forced


def test_a_given_mask_is_the_mask_the_layer_reports_and_trains_as_force_mask():
    """"mask" is the layer's force_mask, gradients included: in training (gate noise on, the
    same seed) the predictor gets the same straight-through gradient through the forced mask."""
    layer = layer64().train()
    x = torch.randn(2, 9, 8, dtype=D64)
    m = (torch.rand(2, 9, generator=torch.Generator().manual_seed(2)) < 0.5).double()
    assert 0 < m.sum() < m.numel()
    cot = torch.randn(2, 9, 8, dtype=D64)

    def run(**kw):
        torch.manual_seed(7)
        y, mask, aux = layer.forward_parts(x, **kw)
        (y * cot).sum().add(layer.weighted_sparsity_loss(mask)).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        layer.zero_grad(set_to_none=True)
        return y.detach(), mask.detach(), grads

    want = run(force_mask=m)
    with forced_gates(layer, "mask", masks=[m]):
        got = run()
    assert torch.equal(got[1], m)
    assert torch.equal(got[0], want[0])
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert torch.equal(got[2][name], want[2][name]), name
    assert want[2]["sparse_bk_core.importance_predictor.weight"].abs().max() > 0


def test_rate_draws_each_layers_mask_from_the_generator():
    torch.manual_seed(0)
    model = SparseBKLM(LMConfig.preset("debug", vocab_size=50)).eval()
    tokens = torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), forced_gates(model, "rate", rate=[0.25, 0.75],
                                       generator=torch.Generator().manual_seed(5)):
        sp = model(tokens)["layer_sparsity"]
        masks = [layer.last_mask for layer in model.layers]
    g = torch.Generator().manual_seed(5)
    for k, rate in enumerate([0.25, 0.75]):  # drawn layer by layer, in order
        want = (torch.rand(4, 32, generator=g) >= rate).float()
        assert torch.equal(masks[k], want)
        assert sp[k].item() == pytest.approx(1 - want.mean().item())
    with pytest.raises(ValueError, match="rate"):
        with forced_gates(model, "rate", rate=[0.5]):
            pass


def test_decoding_follows_the_forced_gates():
    """prefill and step decide through the layer's `decide`: forced closed, no expert runs
    and the logits are the forced forward's; forced open, every token computes."""
    torch.manual_seed(0)
    model = SparseBKLM(LMConfig.preset("debug", vocab_size=50, pos_emb="none")).eval()
    rows = [expert_rows(layer) for layer in model.layers]
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    for mode, computed in (("closed", 0), ("open", 2 * 12)):
        with forced_gates(model, mode):
            want = model(tokens)["logits"]
            for r in rows:
                r[0] = 0
            logits, state = model.prefill(tokens[:, :8])
            for t in range(8, 12):
                step, state = model.step(tokens[:, t], state)
                logits = torch.cat([logits, step[:, None]], 1)
        assert [r[0] for r in rows] == [computed] * 2, mode
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_calibrated_gates_skip_the_rate_of_the_calibration_tokens():
    torch.manual_seed(0)
    model = SparseBKLM(LMConfig.preset("debug", vocab_size=50, gate_eval_mode="threshold")).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.sparse_bk_core.importance_predictor.weight.normal_(std=0.2)
    tokens = torch.randint(0, 50, (16, 32), generator=torch.Generator().manual_seed(1))
    n = tokens.numel()
    for rate in (0.3, 0.7):
        with torch.no_grad(), forced_gates(model, "calibrated", rate=rate, tokens=tokens):
            sp = model(tokens)["layer_sparsity"]
        # the bias is minus a quantile of n values: all but about rate n of them lie above it
        assert (sp - rate).abs().max().item() <= 2 / n, (rate, sp)


@pytest.mark.parametrize("mode,kw", [("open", {}), ("rate", {"rate": 0.5}), ("pinned_open", {}),
                                     ("pinned_closed", {}), ("calibrated", {"rate": 0.5})])
def test_everything_comes_back_on_exit_even_after_an_error(mode, kw):
    torch.manual_seed(0)
    model = SparseBKLM(LMConfig.preset("debug", vocab_size=50)).eval()
    tokens = torch.randint(0, 50, (2, 32), generator=torch.Generator().manual_seed(1))
    if mode == "calibrated":
        kw = {**kw, "tokens": tokens}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(tokens)["logits"]
    with pytest.raises(RuntimeError, match="inside"):
        with forced_gates(model, mode, **kw):
            with torch.no_grad():
                model(tokens)
            raise RuntimeError("inside")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())
    for layer in model.layers:
        assert "gate_parts" not in layer.sparse_bk_core.__dict__
        assert "decide" not in layer.sparse_bk_core.__dict__
    with torch.no_grad():
        assert torch.equal(model(tokens)["logits"], want)


def test_bad_requests_are_named():
    model = SparseBKLM(LMConfig.preset("debug", vocab_size=50))
    with pytest.raises(ValueError, match="mode='half'"):
        with forced_gates(model, "half"):
            pass
    with pytest.raises(ValueError, match="masks"):
        with forced_gates(model, "mask", masks=[torch.ones(1, 32)]):
            pass
    with pytest.raises(ValueError, match="tokens"):
        with forced_gates(model, "calibrated", rate=0.5):
            pass
    with pytest.raises(ValueError, match="SparseBKLM"):
        with forced_gates(torch.nn.Linear(2, 2), "open"):
            pass
