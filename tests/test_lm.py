"""SparseBKLM and LMConfig: config validation, loss composition, causality, gradients, learning."""

from __future__ import annotations

import math

import pytest
import torch

from sparsebk import (AdaptiveSparsityScheduler, LMConfig, SparseBKLM, SparseMoEResNetBKLayer,
                      get_sparsity_loss, get_sparsity_stats)
from sparsebk.model.baselines import TransformerConfig, TransformerLM
from rounding import float32_bound


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def debug_model(dtype=torch.float32, **overrides) -> SparseBKLM:
    return SparseBKLM(LMConfig.preset("debug", **overrides)).to(dtype)


# multi-channel BK mixing, every option on (sparsebk.model.layers)
MULTI = {"bk_heads": 4, "bk_learn_z": True, "bk_input_couplings": True}


def perturb_new_parameters(model: SparseBKLM) -> SparseBKLM:
    """Move shifts and couplings off their init (x_h = 0, all couplings 1)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.layers:
            core = layer.sparse_bk_core
            if core.learn_z:
                core.z_re.copy_(torch.randn(core.z_re.shape, generator=g))
            if layer.coupling_proj is not None:
                w = layer.coupling_proj.weight
                w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
    return model


# ----------------------------------------------------------------------------- config
def test_presets_and_dict_round_trip():
    debug = LMConfig.preset("debug")
    assert (debug.vocab_size, debug.n_seq, debug.d_model, debug.n_layers) == (64, 32, 32, 2)
    small = LMConfig.preset("small", dropout_p=0.2)
    assert small.vocab_size == 10000 and small.dropout_p == 0.2
    large = LMConfig.preset("large")
    assert large.d_model > small.d_model and large.n_layers > small.n_layers
    for cfg in (debug, small, large):
        assert LMConfig.from_dict(cfg.to_dict()) == cfg
    assert debug.to_dict()["sparsity_loss_type"] == "adaptive"
    # multi-channel mixing is off by default: one head, z = 1j, Laplacian couplings
    assert (debug.bk_heads, debug.bk_learn_z, debug.bk_input_couplings) == (1, False, False)
    multi = LMConfig.preset("debug", **MULTI)
    assert LMConfig.from_dict(multi.to_dict()) == multi


@pytest.mark.parametrize("field, value, message", [
    ("d_model", 1, "LMConfig.d_model=1: must be >= 2"),
    ("d_model", 8.0, "LMConfig.d_model=8.0: must be an integer"),
    ("n_seq", 0, "LMConfig.n_seq=0: must be >= 1"),
    ("target_sparsity", 1.0, "LMConfig.target_sparsity=1.0: must be a sparsity in \\[0, 1\\)"),
    ("target_sparsity", -0.1, "target_sparsity=-0.1"),
    ("sparsity_loss_type", "huber", "sparsity_loss_type='huber': choose one of"),
    ("top_k", 5, "top_k=5 must not exceed num_experts=4"),
    ("tau", 0.0, "tau=0.0"),
    ("dropout_p", 1.0, "dropout_p=1.0"),
    ("moe_aux_weight", -1.0, "moe_aux_weight=-1.0"),
    ("accuracy_weight", -0.5, "accuracy_weight=-0.5"),
    ("use_sparse_computation", "yes", "use_sparse_computation='yes'"),
    ("bk_heads", 0, "LMConfig.bk_heads=0: must be >= 1"),
    ("bk_heads", 2.0, "LMConfig.bk_heads=2.0: must be an integer"),
    ("bk_learn_z", "yes", "LMConfig.bk_learn_z='yes': must be true or false"),
    ("bk_input_couplings", 1, "LMConfig.bk_input_couplings=1: must be true or false"),
    ("d_ff", 0, "LMConfig.d_ff=0: must be >= 1"),
    ("head_cutoff", -1, "LMConfig.head_cutoff=-1: must be >= 0"),
    ("head_cutoff", 64, "LMConfig.head_cutoff=64 must be below vocab_size=64"),
    ("head_cutoff", 2.0, "LMConfig.head_cutoff=2.0: must be an integer"),
])
def test_bad_config_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        LMConfig.preset("debug", **{field: value})


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="unknown LMConfig preset 'huge'"):
        LMConfig.preset("huge")
    with pytest.raises(ValueError, match="LMConfig.n_head=4: unknown field"):
        LMConfig.from_dict({**LMConfig.preset("debug").to_dict(), "n_head": 4})
    with pytest.raises(ValueError, match="missing required field.*'n_layers'"):
        LMConfig.from_dict({"vocab_size": 8, "n_seq": 8, "d_model": 8})


# ----------------------------------------------------------------------------- forward
def test_forward_outputs_and_loss_composition():
    torch.manual_seed(0)
    model = debug_model(sparsity_loss_type="l2", moe_aux_weight=0.3, accuracy_weight=0.7).train()
    model.set_sparsity_schedule([0.2, 0.7], loss_weight=0.5)
    tokens = torch.randint(0, 64, (3, 20))
    targets = torch.randint(0, 64, (3, 20))
    out = model(tokens, targets)
    assert out["logits"].shape == (3, 20, 64)
    s = out["layer_sparsity"]
    assert s.shape == (2,) and not s.requires_grad
    for layer, value in zip(model.layers, s.tolist()):
        assert value == pytest.approx(1.0 - layer.last_mask.detach().mean().item())
    # per-layer targets and weight, l2 loss, written out from the measured sparsities
    hand = 0.5 * (s[0].item() - 0.2) ** 2 + 0.5 * (s[1].item() - 0.7) ** 2
    assert out["sparsity_loss"].item() == pytest.approx(hand, rel=1e-5, abs=1e-9)
    assert out["sparsity_loss"].requires_grad
    aux = sum(layer.last_aux_loss for layer in model.layers)
    assert out["aux_loss"].item() == pytest.approx(aux.item())
    # the seed API's module-level getters see this forward's masks
    assert get_sparsity_loss(model).item() == pytest.approx(out["sparsity_loss"].item(), rel=1e-6)
    stats = get_sparsity_stats(model)
    assert [l["sparsity_ratio"] for l in stats["layers"]] == pytest.approx(s.tolist())
    logits = out["logits"].detach().double()
    logp = torch.log_softmax(logits, -1)
    ce = -logp.gather(-1, targets.unsqueeze(-1)).mean()
    # float32 cross-entropy of these logits: within its rounding bound (tests/rounding.py)
    bound = float32_bound(lambda: torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))
    assert abs(out["ce_loss"].item() - ce.item()) <= bound
    total = 0.7 * out["ce_loss"] + out["sparsity_loss"] + 0.3 * out["aux_loss"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)


def test_outputs_come_from_the_returned_masks_not_the_layers_memory(monkeypatch):
    """The model builds its outputs from what the blocks return: with the layers' seed-API
    memory switched off, every output is bit for bit the same."""
    torch.manual_seed(0)
    model = debug_model(sparsity_loss_type="l1").train()
    tokens, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    torch.manual_seed(1)
    ref = model(tokens, targets)
    for layer in model.layers:
        layer.last_mask = layer.last_aux_loss = None
        monkeypatch.setattr(layer, "remember", lambda mask, aux_loss: None)
    torch.manual_seed(1)
    out = model(tokens, targets)
    for key in ("logits", "layer_sparsity", "loss", "ce_loss", "sparsity_loss", "aux_loss"):
        assert torch.equal(out[key], ref[key]), key
    assert all(layer.last_mask is None for layer in model.layers)


def test_block_returns_the_layer_parts_and_stores_nothing():
    torch.manual_seed(0)
    model = debug_model().train()
    block, layer = model.blocks[0], model.layers[0]
    h = torch.randn(2, 16, 32)
    torch.manual_seed(1)
    y, mask, aux = block(h)
    assert y.shape == (2, 16, 32) and mask.shape == (2, 16) and aux.dim() == 0
    assert layer.last_mask is None and layer.last_aux_loss is None
    torch.manual_seed(1)  # the seed entry point: same draws, same values, and it remembers them
    assert torch.equal(h + layer(block.norm(h)), y)
    assert torch.equal(layer.last_mask, mask) and torch.equal(layer.last_aux_loss, aux)
    assert layer.weighted_sparsity_loss(mask, "l1").item() == pytest.approx(
        0.01 * abs((1 - mask.mean().item()) - 0.5), rel=1e-6)


def test_layer_from_config_takes_every_layer_field():
    cfg = LMConfig.preset("debug", num_experts=3, top_k=2, dropout_p=0.2, target_sparsity=0.3,
                          sparsity_loss_weight=0.7, sparsity_loss_type="kl", tau=0.5,
                          use_sparse_computation=False, gate_eval_mode="threshold", d_ff=24,
                          skip_output="light", light_d_ff=6, **MULTI)
    layer = SparseMoEResNetBKLayer.from_config(cfg)
    assert (layer.d_model, layer.n_seq) == (cfg.d_model, cfg.n_seq)
    assert {e.fc1.out_features for e in layer.moe.experts} == {24} and layer.moe.d_ff == 24
    assert layer.skip_output == "light" and layer.light.fc1.out_features == 6
    assert (layer.moe.num_experts, layer.moe.top_k, layer.dropout.p) == (3, 2, 0.2)
    assert (layer.sparse_bk_core.target_sparsity, layer.sparsity_loss_weight) == (0.3, 0.7)
    assert (layer.sparsity_loss_type, layer.sparse_bk_core.tau) == ("kl", 0.5)
    assert layer.use_sparse_computation is False
    assert layer.sparse_bk_core.gate.eval_mode == "threshold"
    assert (layer.bk_heads, layer.sparse_bk_core.heads, layer.sparse_bk_core.learn_z) == (4, 4, True)
    assert layer.bk_input_couplings and layer.coupling_proj.out_features == 4
    assert (layer.v_proj.out_features, layer.output_proj.in_features) == (4, 8)


@pytest.mark.parametrize("build", [
    lambda: debug_model(),
    lambda: TransformerLM(TransformerConfig.matching(LMConfig.preset("debug"))),
], ids=["sparse_bk_lm", "transformer"])
def test_configure_optimizers_decays_exactly_the_matrices(build):
    """nanoGPT's rule, owned by the model: every parameter in exactly one group, decay on
    ndim >= 2 (matrices, embeddings) only, none on biases, norms and other vectors."""
    model = build()
    opt = model.configure_optimizers(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert decay["params"] and no_decay["params"]


def test_any_length_up_to_n_seq_and_bad_inputs():
    model = debug_model().eval()
    for T in (1, 7, 32):
        assert model(torch.randint(0, 64, (2, T)))["logits"].shape == (2, T, 64)
    with pytest.raises(ValueError, match="T=33 must be in \\[1, n_seq=32\\]"):
        model(torch.randint(0, 64, (2, 33)))
    with pytest.raises(ValueError, match="int64"):
        model(torch.rand(2, 8))
    with pytest.raises(ValueError, match="3 sparsity targets for 2 layers"):
        model.set_sparsity_schedule([0.1, 0.2, 0.3], 0.01)
    with pytest.raises(ValueError, match="target_sparsity=1.2"):
        model.set_sparsity_schedule(1.2, 0.01)


def test_scheduler_dict_drives_per_layer_targets():
    model = debug_model()
    sched = AdaptiveSparsityScheduler(initial_sparsity=0.1, final_sparsity=0.5, warmup_steps=4,
                                      schedule_type="linear", layer_final_sparsity=[0.3, 0.6])
    for _ in range(4):
        state = sched.step()
    model.set_sparsity_schedule(state.get("layer_targets", state["sparsity_target"]), state["loss_weight"])
    got = [layer.sparse_bk_core.target_sparsity for layer in model.layers]
    assert got == pytest.approx(state["layer_targets"])
    assert all(layer.sparsity_loss_weight == pytest.approx(state["loss_weight"]) for layer in model.layers)


# ----------------------------------------------------------------------------- causality
@pytest.mark.parametrize("opts", [{}, {"bk_heads": 3, "bk_learn_z": True}, MULTI],
                         ids=["h1", "h3-z", "h4-z-b"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_changing_token_j_changes_no_logit_before_j(mode, opts):
    torch.manual_seed(1)
    model = perturb_new_parameters(debug_model(torch.float64, dropout_p=0.1, **opts))
    model.train(mode == "train")
    tokens = torch.randint(0, 64, (4, 32))
    for j in (0, 13, 31):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 17) % 64
        torch.manual_seed(2)  # same gate noise and dropout draws in both runs
        a = model(tokens)["logits"]
        torch.manual_seed(2)
        b = model(changed)["logits"]
        assert torch.allclose(a[:, :j], b[:, :j], atol=1e-10, rtol=0), j
        assert (a[:, j] - b[:, j]).abs().max() > 1e-3  # token j itself is seen at j


@pytest.mark.parametrize("opts", [{}, MULTI], ids=["h1", "h4-z-b"])
def test_the_causality_check_catches_a_bidirectional_core(opts):
    """Teeth: with the bidirectional resolvent (G_ii sees the whole sequence) the same check fails."""
    torch.manual_seed(1)
    model = perturb_new_parameters(debug_model(torch.float64, **opts)).eval()
    for layer in model.layers:
        layer.sparse_bk_core.causal = False
    tokens = torch.randint(0, 64, (4, 32))
    changed = tokens.clone()
    changed[:, 13] = (changed[:, 13] + 17) % 64
    leak = (model(tokens)["logits"][:, :13] - model(changed)["logits"][:, :13]).abs().max()
    assert leak > 1e-6


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("opts", [{}, MULTI], ids=["h1", "h4-z-b"])
def test_every_parameter_gets_a_gradient_in_a_training_step(opts):
    torch.manual_seed(3)
    model = debug_model(**opts).train()
    tokens = torch.randint(0, 64, (4, 32))
    model(tokens, tokens.roll(-1, 1))["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.layers[0].sparse_bk_core.importance_predictor.weight.grad.abs().sum() > 0
    assert model.layers[0].moe.router.weight.grad.abs().sum() > 0
    if opts:  # the new parameters learn from their init on (zero-init couplings included)
        for layer in model.layers:
            core = layer.sparse_bk_core
            for p in (core.z_re, core.z_log_im, layer.coupling_proj.weight):
                assert p.grad.abs().min() > 0


def progression_batch(batch: int, length: int, vocab: int, stride: int = 3):
    """Arithmetic progressions mod vocab from a random start: next = prev + stride."""
    start = torch.randint(0, vocab, (batch, 1))
    seq = (start + stride * torch.arange(length + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]


@pytest.fixture(scope="module")
def progression_run():
    """200 AdamW steps of the debug LM on progressions at a 0.75 sparsity target (weight 1.0),
    and the weights and global RNG state after its first 100 steps: two tests read one run,
    the second where the first 100 steps end (it trained exactly those 100 before)."""
    torch.manual_seed(4)
    target = 0.75  # far from the ~0.5 an untrained gate gives
    model = debug_model(dropout_p=0.0, target_sparsity=target, sparsity_loss_weight=1.0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ce_hist, sp_hist, at_100 = [], [], None
    for step in range(200):
        if step == 100:
            at_100 = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                      torch.get_rng_state())
        x, y = progression_batch(16, 32, 64)
        out = model(x, y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        ce_hist.append(out["ce_loss"].detach())
        sp_hist.append(out["layer_sparsity"])
    return {"target": target, "ce": ce_hist, "sparsity": sp_hist, "at_100": at_100}


def test_debug_lm_learns_and_reaches_its_sparsity_target(progression_run):
    ce_hist, sp_hist, target = (progression_run[k] for k in ("ce", "sparsity", "target"))
    first = ce_hist[0].item()
    last = torch.stack(ce_hist[-20:]).mean().item()
    assert first == pytest.approx(math.log(64), abs=0.1)  # untrained: near uniform
    assert last < 0.3 * first, (first, last)
    achieved = torch.stack(sp_hist[-20:]).mean(0)  # (L,) measured, per layer
    assert torch.all((achieved - target).abs() < 0.05), achieved


@pytest.mark.parametrize("opts", [{}, MULTI], ids=["h1", "h4-z-b"])
def test_bf16_autocast_step_tracks_float32(opts):
    """Mixed precision (as on GPUs) runs through the gathers and the BK-core, close to float32."""
    torch.manual_seed(5)
    model = perturb_new_parameters(debug_model(dropout_p=0.0, **opts)).eval()
    tokens = torch.randint(0, 64, (4, 32))
    ref = model(tokens, tokens.roll(-1, 1))["ce_loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, tokens.roll(-1, 1))
    out["loss"].backward()
    assert abs(out["ce_loss"].item() - ref.item()) < 0.05
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_eval_mode_sparsity_follows_training_sparsity_and_the_target(progression_run):
    """The sparsity loss pulls mean(sigmoid(l)) to the target with logits near one constant; the
    eval mask must keep that rate (the threshold l > 0 measured 0.95 here at a 0.75 target)."""
    target = progression_run["target"]
    weights, rng = progression_run["at_100"]  # 100 training steps (the shared run's first 100)
    model = debug_model(dropout_p=0.0, target_sparsity=target, sparsity_loss_weight=1.0)
    model.load_state_dict(weights)
    torch.set_rng_state(rng)
    trained = torch.stack(progression_run["sparsity"][80:100]).mean(0)  # (L,) training mode
    model.eval()
    x, y = progression_batch(256, 32, 64)
    with torch.no_grad():
        evaluated = model(x, y)["layer_sparsity"]  # (L,) eval mode (deterministic gate)
        again = model(x, y)["layer_sparsity"]
    assert torch.equal(evaluated, again)
    assert torch.all((trained - target).abs() < 0.1), trained
    assert torch.all((evaluated - trained).abs() < 0.1), (evaluated, trained)
    assert torch.all((evaluated - target).abs() < 0.1), evaluated
    # teeth: the noise-free threshold rule on the same weights misses the training rate
    for layer in model.layers:
        layer.sparse_bk_core.gate.eval_mode = "threshold"
    with torch.no_grad():
        thresholded = model(x, y)["layer_sparsity"]
    assert (thresholded - trained).abs().max() > 0.1, (thresholded, trained)


def test_gate_eval_mode_is_a_validated_config_field():
    assert LMConfig.preset("debug").gate_eval_mode == "quasi"
    model = debug_model(gate_eval_mode="threshold")
    assert all(layer.sparse_bk_core.gate.eval_mode == "threshold" for layer in model.layers)
    with pytest.raises(ValueError, match="gate_eval_mode='noisy'"):
        LMConfig.preset("debug", gate_eval_mode="noisy")


# ----------------------------------------------------------------------------- adaptive head
def _adaptive_probs_by_definition(model: SparseBKLM, tokens: torch.Tensor) -> torch.Tensor:
    """p (B, T, V) of the two-level head written out in probability space, from the model's
    final-norm outputs and its weights: p(i) = softmax(a)_i for i < c, softmax(a)_c *
    softmax(r)_(i - c) above (lm.py's docstring), without the model's head code."""
    seen = {}
    hook = model.norm_f.register_forward_hook(lambda mod, inp, out: seen.setdefault("u", out))
    model(tokens)
    hook.remove()
    u, E, c = seen["u"], model.tok_emb.weight, model.config.head_cutoff
    a = torch.cat([u @ E[:c].t(), u @ model.rest_logit.weight.t() + model.rest_logit.bias], -1)
    r = (u @ model.rest_proj.weight.t()) @ E[c:].t()
    pa, pr = torch.softmax(a, -1), torch.softmax(r, -1)
    return torch.cat([pa[..., :c], pa[..., c:] * pr], -1)


def _trained_looking_adaptive(cutoff: int = 10) -> SparseBKLM:
    torch.manual_seed(11)
    model = debug_model(torch.float64, dropout_p=0.0, head_cutoff=cutoff).eval()
    with torch.no_grad():  # off the init (P = identity, w = 0), logits spread out
        for p in (model.rest_proj.weight, model.rest_logit.weight, model.tok_emb.weight):
            p.normal_(std=0.5)
    return model


def test_adaptive_head_is_the_two_level_distribution_and_its_loss_the_full_cross_entropy():
    """float64: the model's log-probabilities are those of the definition and sum to 1; its
    loss, which reads the second level at the tail targets only, is the mean -log p(target)
    of the whole distribution, and so is its gradient, ignored targets (-100) left out."""
    model = _trained_looking_adaptive()
    tokens = torch.randint(0, 64, (3, 20))
    targets = torch.randint(0, 64, (3, 20))
    targets[0, :4] = -100
    assert (targets >= 10).any() and ((targets >= 0) & (targets < 10)).any()
    lp = model(tokens)["logits"]
    p_def = _adaptive_probs_by_definition(model, tokens)
    eps = torch.finfo(torch.float64).eps
    assert (lp.exp() - p_def).abs().max() < 64 * 1e3 * eps
    assert (lp.exp().sum(-1) - 1).abs().max() < 64 * 1e2 * eps

    out = model(tokens, targets)
    assert "logits" not in out  # not formed: the head's saving
    keep = targets != -100
    want = -torch.log(p_def[keep].gather(-1, targets[keep][:, None])).mean()
    assert abs(out["ce_loss"].item() - want.item()) < 1e3 * eps * abs(want.item())
    grads = torch.autograd.grad(out["ce_loss"], list(model.parameters()), allow_unused=True)
    wants = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    for (name, _), g, w in zip(model.named_parameters(), grads, wants):
        if w is None:  # the gates' own parameters: no path to the cross-entropy
            assert g is None or g.abs().max() == 0, name
            continue
        assert (g - w).abs().max() <= 1e6 * eps * (w.abs().max() + 1e-300), name


def test_adaptive_head_without_tail_targets_keeps_its_parameters_in_the_graph():
    """A batch whose targets are all frequent ids still gives the rest's projection a (zero)
    gradient, as an expert with no tokens: DDP needs every parameter in the graph."""
    model = _trained_looking_adaptive()
    tokens = torch.randint(0, 64, (2, 16))
    model(tokens, torch.randint(0, 10, (2, 16)))["loss"].backward()
    assert model.rest_proj.weight.grad is not None
    assert model.rest_proj.weight.grad.abs().max() == 0
    assert model.rest_logit.weight.grad.abs().max() > 0


def test_adaptive_head_starts_as_the_full_softmax_gives_the_rest_its_share():
    """At init (P = identity, w = 0, b = log(V - c)) the first level gives the rest the mass a
    full softmax of near-equal logits gives V - c ids: (V - c) / V, up to the logits' spread."""
    torch.manual_seed(2)
    model = debug_model(head_cutoff=16).eval()
    p_rest = model(torch.randint(0, 64, (4, 32)))["logits"][..., 16:].exp().sum(-1)
    assert (p_rest - 48 / 64).abs().max() < 0.02


def test_debug_lm_with_an_adaptive_head_learns():
    torch.manual_seed(4)
    model = debug_model(dropout_p=0.0, head_cutoff=16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ce = []
    for _ in range(150):
        x, y = progression_batch(16, 32, 64)
        out = model(x, y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        ce.append(out["ce_loss"].item())
    assert ce[0] == pytest.approx(math.log(64), abs=0.1)
    assert sum(ce[-20:]) / 20 < 0.3 * ce[0], (ce[0], ce[-20:])
