"""Streaming decoding of SparseBKLM (its prefill/step and its layers'): prefill-then-step equals the full forward.

Bounds come from the computation (tests/rounding.py), every position of every sequence, max
norm, for each model and token batch:

- sigma: the float32 rounding noise of the logits, measured on the float64 model by Monte
  Carlo arithmetic at float32's unit roundoff, over both evaluation orders (the forward's
  chunked scan and (B T, D) matmuls; the step's recurrence and (B, D) matmuls): the largest
  sqrt(sigma_forward^2 + sigma_step^2) over the logits. It grows with the recurrence's
  condition (like 1 / Im z^2: learnt shifts start at Im z down to 0.1) and with the norms
  the layers amplify; it is not fitted to one CPU's rounding.
- float32, against the float64 forward of the same weights: the full forward and the decode
  (any prompt length) each within LAMBDA sigma; so decoded and full within 2 LAMBDA sigma.
- float64: decoded and full within 2 LAMBDA sigma u64 / u32 (~1e-12): the same math, not
  merely close values. This is the test of the recurrence's exactness: a wrong state or a
  missed position shows orders of magnitude above it.
- A prefill of the whole sequence from a fresh state feeds every op the sparse forward's
  inputs: equal bit for bit. (A shorter prompt is not: the scan's chunk length and the
  matmuls' blocking depend on the number of rows; nor is the dense reference path's forward.)
- Decoding states reached step-wise and by prefill agree within 2 LAMBDA times their own
  measured noise (alpha, k_prev, carry).

`test_worst_case_error` prints the largest |decoded - float64| / bound seen. The forward's
chunked scan and the step's plain recurrence round differently, and the step's (B, D) matmuls
reduce in another order than the forward's (B T, D) ones.

The models get trained-looking weights (the init's scales make all logits nearly equal) and
importance predictors with logits spread around 0, so masks mix computed and skipped
positions; each test that needs it asserts the coverage it relies on (skipped positions,
a prompt ending on a skipped token, steps where every row is skipped).
"""

from __future__ import annotations

import functools

import pytest
import torch

from rounding import LAMBDA, SAMPLES, U32, U64, Float32Rounding
from sparsebk.model.lm import DecodeState
from sparsebk.model.gate import quasi_logistic_offsets
from sparsebk.model.lm import LMConfig, SparseBKLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = dict(vocab_size=61, n_seq=24, d_model=32, n_layers=3, num_experts=4, top_k=1,
            dropout_p=0.1)
B = 3

# name -> LMConfig overrides; "gate_bias" (not a config field) sets the predictors' bias
VARIANTS = {
    "dense": dict(gate_bias=1e3),  # every position computed
    "sparse-quasi": dict(gate_eval_mode="quasi"),
    "sparse-threshold": dict(gate_eval_mode="threshold", tau=0.5),
    "dense-reference-path": dict(use_sparse_computation=False),
    "heads-learnz-couplings": dict(bk_heads=4, bk_learn_z=True, bk_input_couplings=True, top_k=2),
    "heads-couplings-threshold": dict(bk_heads=2, bk_input_couplings=True,
                                      gate_eval_mode="threshold"),
    "no-positions": dict(pos_emb="none", bk_heads=2, bk_learn_z=True),
    "gate-weight": dict(gate_weight=True, bk_heads=2, bk_input_couplings=True),
    "light": dict(skip_output="light", gate_weight=True, bk_heads=2, bk_input_couplings=True,
                  gate_eval_mode="threshold"),
    # the two-level adaptive head: ids below 20 in the first level
    "adaptive-head": dict(head_cutoff=20, bk_heads=2),
}


def _model(variant: str = "sparse-quasi", dtype=torch.float32, seed: int = 0) -> SparseBKLM:
    over = dict(VARIANTS[variant])
    bias = over.pop("gate_bias", 0.0)
    torch.manual_seed(seed)
    model = SparseBKLM(LMConfig(**{**BASE, **over})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.mul_(10.0)
            elif "z_re" in name:  # spread the learnt shifts' real parts too
                p.normal_()
        for layer in model.layers:
            lin = layer.sparse_bk_core.importance_predictor
            lin.weight.normal_(std=3.0 / BASE["d_model"] ** 0.5)  # logits ~ N(0, 9) after the norm
            lin.bias.fill_(bias)
            if layer.coupling_proj is not None:  # zero init would make every coupling 1
                layer.coupling_proj.weight.normal_(std=1.0 / BASE["d_model"] ** 0.5)
    return model.to(dtype)  # the same weights in every dtype


def _sparse_forward(variant: str) -> bool:
    """Whether the forward runs the sparse path, as prefill does (the dense reference path
    computes every row and selects: other matmul shapes, equal bit for bit only by chance)."""
    return VARIANTS[variant].get("use_sparse_computation", True)


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, BASE["vocab_size"], (batch, length), generator=g)


def _full(model, tokens):
    """(logits (B, T, V), per-layer eval masks (B, T) bool) of the full forward."""
    with torch.no_grad():
        logits = model(tokens)["logits"]
    return logits, [layer.last_mask > 0.5 for layer in model.layers]


def _decode(model, tokens, prompt_len: int):
    """Prefill the first prompt_len tokens (none: all step-wise), step the rest."""
    got, state = [], model.init_state(tokens.shape[0])
    if prompt_len:
        logits, state = model.prefill(tokens[:, :prompt_len])
        got.append(logits)
    for t in range(prompt_len, tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        got.append(logits[:, None])
    return torch.cat(got, dim=1), state


STATE_FIELDS = ("alpha", "k_prev", "carry")


def _states(state: DecodeState, field: str) -> torch.Tensor:
    """(L, B, ...) one field of every layer's state."""
    return torch.stack([getattr(layer, field) for layer in state.layers])


def _assert_states_close(a: DecodeState, b: DecodeState, atol: dict | float):
    """atol: one bound for every field, or a bound per field name."""
    assert a.pos == b.pos
    for name in STATE_FIELDS:
        tol = atol[name] if isinstance(atol, dict) else atol
        torch.testing.assert_close(_states(a, name), _states(b, name), rtol=0, atol=tol,
                                   msg=lambda m: f"{name}: {m}")


def _sigma(runs: torch.Tensor, exact: torch.Tensor, samples: int) -> torch.Tensor:
    """runs (samples B, ...) of Monte Carlo replicas of the rows of exact (B, ...) -> (B, ...)
    the per-element mean square deviation."""
    runs = runs.reshape(samples, *exact.shape)
    return (runs - exact).abs().square().mean(0)  # float64 runs: |.| of complex128 or float64


def decode_noise(model: SparseBKLM, tokens: torch.Tensor) -> dict:
    """The float32 rounding noise (tests/rounding.py) of decoding `tokens` (B, T) with the
    float64 `model`: "logits", the largest sqrt(sigma_f^2 + sigma_s^2) over the logits of the
    forward f and the step-wise decode s, and the same of each state field after a prefill
    and after stepping. The rows are independent, so the SAMPLES replicas run as one batch."""
    rep = tokens.repeat(SAMPLES, 1)  # (SAMPLES B, T)
    logits, _ = _full(model, tokens)
    _, prefilled = model.prefill(tokens)
    with Float32Rounding(seed=0):
        f, _ = _full(model, rep)
        _, p_rep = model.prefill(rep)
    with Float32Rounding(seed=1):
        s, s_rep = _decode(model, rep, 0)
    var = _sigma(f, logits, SAMPLES) + _sigma(s, logits, SAMPLES)
    out = {"logits": float(var.sqrt().max())}
    for name in STATE_FIELDS:
        exact = _states(prefilled, name).transpose(0, 1)  # (B, L, ...): rows first
        var = (_sigma(_states(p_rep, name).transpose(0, 1), exact, SAMPLES)
               + _sigma(_states(s_rep, name).transpose(0, 1), exact, SAMPLES))
        out[name] = float(var.sqrt().max()) if var.numel() else 0.0  # carry is empty but under "carry"
    return out


@functools.lru_cache(maxsize=None)
def _noise(variant: str, batch: int, length: int, seed: int) -> dict:
    """decode_noise of the variant's model on _tokens(batch, length, seed)."""
    return decode_noise(_model(variant, dtype=torch.float64), _tokens(batch, length, seed))


WORST: dict[str, list[float]] = {"float32": [], "float64": []}  # for test_worst_case_error


def _assert_within(got: torch.Tensor, want: torch.Tensor, bound: float, key: str):
    """max |got - want| <= bound, recorded (as a share of the bound) for test_worst_case_error."""
    err = float((got.double() - want.double()).abs().max())
    WORST[key].append(err / bound)
    assert err <= bound, f"{key}: max |got - want| = {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prompt_len", [0, 1, 7, BASE["n_seq"] - 1, BASE["n_seq"]])
def test_prefill_then_step_equals_full_forward(variant, prompt_len):
    model = _model(variant)
    tokens = _tokens(B, BASE["n_seq"])
    full, masks = _full(model, tokens)
    assert full.std() > 1.0  # positions differ: the comparison is not vacuous
    skipped = torch.stack([~m for m in masks]).float().mean()
    if variant == "dense":
        assert skipped == 0
    else:
        assert 0.2 < skipped < 0.8, skipped  # both kinds of position are exercised
    got, state = _decode(model, tokens, prompt_len)
    assert state.pos == BASE["n_seq"]
    sigma = _noise(variant, B, BASE["n_seq"], 1)["logits"]
    model64 = _model(variant, dtype=torch.float64)
    truth, _ = _full(model64, tokens)
    _assert_within(full, truth, LAMBDA * sigma, "float32")  # the forward as exact as float32 allows
    _assert_within(got, truth, LAMBDA * sigma, "float32")  # and the decode
    got64, _ = _decode(model64, tokens, prompt_len)
    _assert_within(got64, truth, 2 * LAMBDA * sigma * U64 / U32, "float64")  # the same math
    if prompt_len == BASE["n_seq"] and _sparse_forward(variant):
        assert torch.equal(got, full)  # from a fresh state prefill is the forward, op for op


@pytest.mark.parametrize("variant", ["sparse-quasi", "heads-learnz-couplings",
                                     "heads-couplings-threshold"])
def test_prompt_ending_on_skipped_tokens(variant):
    """Prompts whose last token is skipped in some layer (by some or every row) continue
    exactly; the decode hits steps where every row of a layer skips (no expert call) and steps
    where only some rows compute."""
    model = _model(variant)
    tokens = _tokens(B, BASE["n_seq"], seed=2)
    full, masks = _full(model, tokens)
    bound = 2 * LAMBDA * _noise(variant, B, BASE["n_seq"], 2)["logits"]
    ends_skipped = [t for t in range(1, BASE["n_seq"]) if any((~m[:, t - 1]).any() for m in masks)]
    all_rows_skip = [t for t in range(BASE["n_seq"]) if any((~m[:, t]).all() for m in masks)]
    some_rows = [t for t in range(BASE["n_seq"])
                 if any(0 < int(m[:, t].sum()) < B for m in masks)]
    assert len(ends_skipped) >= 5 and all_rows_skip and some_rows
    for prompt_len in ends_skipped[:5]:
        got, _ = _decode(model, tokens, prompt_len)
        _assert_within(got, full, bound, "float32")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_reaches_the_step_wise_state(variant):
    model = _model(variant)
    tokens = _tokens(B, 17)
    noise = _noise(variant, B, 17, 1)
    bound = {name: 2 * LAMBDA * noise[name] for name in STATE_FIELDS}
    _, stepped = _decode(model, tokens, 0)
    _, prefilled = model.prefill(tokens)
    _assert_states_close(stepped, prefilled, bound)
    # chunked prefill: a prompt fed in two chunks reaches the same state and logits
    a, s1 = model.prefill(tokens[:, :6])
    b, s2 = model.prefill(tokens[:, 6:], s1)
    _assert_states_close(s2, prefilled, bound)
    _assert_within(torch.cat([a, b], 1), model.prefill(tokens)[0], 2 * LAMBDA * noise["logits"],
                   "float32")


@pytest.mark.parametrize("variant", ["sparse-quasi", "heads-learnz-couplings", "no-positions"])
def test_float64_agrees_to_rounding(variant):
    """In float64 the rounding differences shrink by u64 / u32 = 2^-29: what is left is the
    math (test_prefill_then_step_equals_full_forward checks every variant so; here a prompt
    length it does not use)."""
    model = _model(variant, dtype=torch.float64)
    tokens = _tokens(B, BASE["n_seq"])
    full, _ = _full(model, tokens)
    bound = 2 * LAMBDA * _noise(variant, B, BASE["n_seq"], 1)["logits"] * U64 / U32
    for prompt_len in (0, 9):
        got, _ = _decode(model, tokens, prompt_len)
        _assert_within(got, full, bound, "float64")


def test_rows_decode_independently():
    """Each sequence of a batch decodes as it would alone."""
    model = _model("heads-learnz-couplings")
    tokens = _tokens(4, 12)
    batch, _ = _decode(model, tokens, 5)
    bound = 2 * LAMBDA * _noise("heads-learnz-couplings", 4, 12, 1)["logits"]
    for r in range(4):
        alone, _ = _decode(model, tokens[r:r + 1], 5)
        _assert_within(alone[0], batch[r], bound, "float32")


def test_skipped_tokens_run_no_expert_and_no_projection():
    """Rows through the experts and the v/coupling/output projections while decoding equal the
    number of computed (layer, position, sequence) triples of the forward's masks."""
    model = _model("heads-learnz-couplings")
    tokens = _tokens(B, BASE["n_seq"], seed=3)
    _, masks = _full(model, tokens)
    state = model.init_state(B)  # (its one output_proj(0) row per layer is not counted)
    rows = {"expert": 0, "v_proj": 0, "output_proj": 0, "coupling_proj": 0}

    def counter(key):
        def hook(mod, inp, out):
            rows[key] += inp[0].shape[0]
        return hook

    handles = []
    for layer in model.layers:
        handles += [e.fc1.register_forward_hook(counter("expert")) for e in layer.moe.experts]
        for key in ("v_proj", "output_proj", "coupling_proj"):
            handles.append(getattr(layer, key).register_forward_hook(counter(key)))
    try:
        for t in range(BASE["n_seq"]):
            _, state = model.step(tokens[:, t], state)
    finally:
        for h in handles:
            h.remove()
    computed = int(sum(m.sum() for m in masks))
    assert computed < 0.8 * B * BASE["n_seq"] * BASE["n_layers"]
    assert rows == {"expert": 2 * computed, "v_proj": computed, "output_proj": computed,
                    "coupling_proj": computed}  # top_k = 2: two experts per computed token


def test_state_is_constant_size_and_functional():
    model = _model("heads-learnz-couplings")
    tokens = _tokens(B, 20)
    state = model.init_state(B)
    size = state.nbytes()
    c = model.config
    assert c.skip_output == "carry"  # a skipped token copies the last computed output row
    assert size == c.n_layers * B * (8 * c.bk_heads + 4 * c.bk_heads + 4 * c.d_model)
    light = _model("light")  # skipped tokens run the light FFN: no output row to carry
    assert light.init_state(B).nbytes() == light.config.n_layers * B * 12 * light.config.bk_heads
    assert light.state_nbytes_per_sequence() * B == light.init_state(B).nbytes()
    assert light.init_state(B).batch_size == B
    _, state = model.prefill(tokens[:, :15])
    assert state.nbytes() == size
    # stepping does not touch the state it was given: branching from it gives equal results
    a, sa = model.step(tokens[:, 15], state)
    b, sb = model.step(tokens[:, 15], state)
    assert torch.equal(a, b) and sa.pos == sb.pos == 16 and state.pos == 15
    _assert_states_close(sa, sb, 0.0)


def test_no_positions_decodes_past_n_seq():
    """pos_emb='none': no position table; the forward and the decoder run past n_seq, equal."""
    model = _model("no-positions")
    assert model.pos_emb is None and "pos_emb" not in model.state_dict()
    n = 3 * BASE["n_seq"] + 5
    tokens = _tokens(B, n)
    full, _ = _full(model, tokens)
    got, state = _decode(model, tokens, BASE["n_seq"] - 3)
    _assert_within(got, full, 2 * LAMBDA * _noise("no-positions", B, n, 1)["logits"], "float32")
    assert state.pos == n


def test_learned_positions_stop_at_n_seq_with_a_clear_error():
    model = _model("sparse-quasi")
    tokens = _tokens(B, BASE["n_seq"])
    _, state = model.prefill(tokens)
    with pytest.raises(ValueError, match=r"past n_seq=24.*pos_emb='none'"):
        model.step(tokens[:, 0], state)
    with pytest.raises(ValueError, match="past n_seq=24"):
        model.prefill(_tokens(B, BASE["n_seq"] + 1))
    with pytest.raises(ValueError, match="n_seq=24"):
        model(_tokens(B, BASE["n_seq"] + 1))


def test_bad_calls_get_clear_errors():
    model = _model("sparse-quasi")
    state = model.init_state(B)
    with pytest.raises(ValueError, match="batch size 3"):
        model.step(torch.zeros(2, dtype=torch.long), state)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        model.step(torch.zeros(B, 1, dtype=torch.long), state)
    with pytest.raises(ValueError, match="T >= 1"):
        model.prefill(torch.zeros(B, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        model.init_state(0)
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        model.train().step(torch.zeros(B, dtype=torch.long), state)
    with pytest.raises(ValueError, match="pos_emb"):
        LMConfig(**BASE, pos_emb="rope")


def test_quasi_offsets_are_the_gates():
    """The offsets of positions start.. are entries start.. of the gate's table, and the
    decoder's eval decision at any start equals the eval-mode gate's on the whole sequence."""
    table = quasi_logistic_offsets(5000)
    assert torch.equal(quasi_logistic_offsets(7, start=4321), table[4321:4328])
    from sparsebk.model.gate import GumbelSigmoidGate

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for mode in ("quasi", "threshold"):
        gate = GumbelSigmoidGate(tau=0.7, eval_mode=mode).eval()
        full = gate(logits) > 0.5
        assert torch.equal(gate.eval_keep(logits[:, 20:], start=20), full[:, 20:])
        assert torch.equal(gate.eval_keep(logits), full)


def test_worst_case_error():
    """Runs after the exactness tests (file order): the largest error seen above, as a share
    of its bound (the bounds are LAMBDA sigma: the measured noise sigma is ~1 / LAMBDA)."""
    if not WORST["float32"]:
        pytest.skip("run with the exactness tests")
    for key, errs in WORST.items():
        print(f"\nworst |decoded - reference| / bound, {key}, over {len(errs)} comparisons: "
              f"{max(errs):.2f}")
    assert max(WORST["float32"]) <= 1 and max(WORST["float64"]) <= 1


def test_decode_benchmark_smoke(tmp_path, capsys):
    """`sparsebk bench decode` at toy sizes: it runs, calibrates the sparsity it was asked for,
    and its state memory is flat for BK and grows with the context for the KV cache."""
    import json

    from sparsebk.bench.decode import main as bench

    assert bench(["--out", str(tmp_path), "--preset", "debug", "--vocab", "64", "--contexts",
                  "32,64", "--batches", "1,2", "--steps", "2", "--sparsities", "0.5",
                  "--max-prefill-tokens", "64", "--prefill-chunk", "16"]) == 0
    assert "| model" in capsys.readouterr().out
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"bk-s0", "bk-s0.5", "bk-all-skipped", "transformer"}
    mem = {(r["model"], r["batch"], r["context"]): r["state_MB"] for r in rows}
    assert mem["bk-s0.5", 2, 32] == mem["bk-s0.5", 2, 64] == 2 * mem["bk-s0.5", 1, 64]
    assert mem["transformer", 1, 64] == 2 * mem["transformer", 1, 32]
    half = next(r for r in rows if r["model"] == "bk-s0.5")
    assert abs(half["measured_sparsity"] - 0.5) < 0.1
    assert all(r["step_ms"] > 0 for r in rows)
    assert [r["prefill_tokens_per_s"] is None for r in rows if r["model"] == "bk-s0"] == \
        [False, False, False, True]  # B C = 128 > 64: not measured
    assert (tmp_path / "decode.png").stat().st_size > 0
