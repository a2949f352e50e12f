"""The Transformer baseline's KV cache: prefill-then-step gives the full forward's logits.

Bound: float32, every position of every sequence, max |cached - full| <= 2 LAMBDA sigma, sigma
the float32 rounding noise of the logits of both evaluation orders (the full forward; the
cached steps, which reduce over the keys in another order), measured on the float64 model
(tests/rounding.py). In float64 the two agree within the same bound times u64 / u32.
"""

from __future__ import annotations

import functools

import pytest
import torch

from rounding import LAMBDA, SAMPLES, U32, U64, Float32Rounding, rms_deviation
from sparsebk.model.baselines import TransformerConfig, TransformerLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = dict(vocab_size=61, n_seq=24, d_model=32, n_layers=3, n_heads=4, dropout_p=0.1)


def _model(dtype=torch.float32, **overrides) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**{**CFG, **overrides})).eval()
    # trained-looking weights: the init's 0.02 scale makes every logit nearly equal, which
    # would let a wrong attention pattern pass
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0 if p.ndim >= 2 else 1.0)
    return model.to(dtype)  # the same weights in every dtype


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG["vocab_size"], (batch, length), generator=g)


def _decode(model, tokens, prompt_len):
    """Prefill the first prompt_len tokens (none: all step-wise), step the rest -> (logits, cache)."""
    B, T = tokens.shape
    cache = model.init_cache(batch_size=B)
    got = []
    if prompt_len:
        logits, cache = model.prefill(tokens[:, :prompt_len], cache)
        assert logits.shape == (B, prompt_len, CFG["vocab_size"]) and cache.pos == prompt_len
        got.append(logits)
    for t in range(prompt_len, T):
        logits, cache = model.step(tokens[:, t], cache)
        assert logits.shape == (B, CFG["vocab_size"])
        got.append(logits[:, None])
    return torch.cat(got, dim=1), cache


@functools.lru_cache(maxsize=None)
def _bound(batch: int, length: int, seed: int) -> float:
    """2 LAMBDA sigma for cached vs full on _tokens(batch, length, seed): sigma the largest
    float32 rounding noise of the logits over the forward and the step-wise decode, the
    SAMPLES Monte Carlo replicas run as one batch (rows are independent)."""
    model = _model(torch.float64)
    tokens = _tokens(batch, length, seed)
    with torch.no_grad():
        exact = model(tokens)["logits"]
        rep = tokens.repeat(SAMPLES, 1)
        with Float32Rounding(seed=0):
            full = model(rep)["logits"].reshape(SAMPLES, *exact.shape)
        with Float32Rounding(seed=1):
            steps = _decode(model, rep, 0)[0].reshape(SAMPLES, *exact.shape)
    return 2 * LAMBDA * max(rms_deviation(full, exact), rms_deviation(steps, exact))


def _assert_within(got, want, bound):
    err = float((got.detach().double() - want.detach().double()).abs().max())
    assert err <= bound, f"max |got - want| = {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("prompt_len", [0, 1, 7, CFG["n_seq"] - 1, CFG["n_seq"]])
def test_prefill_then_step_equals_full_forward(prompt_len):
    model = _model()
    tokens = _tokens(3, CFG["n_seq"])
    full = model(tokens)["logits"]  # (B, T, V)
    assert full.std() > 1.0  # positions and sequences differ: the comparison is not vacuous
    got, cache = _decode(model, tokens, prompt_len)
    bound = _bound(3, CFG["n_seq"], 1)
    _assert_within(got, full, bound)
    assert cache.pos == CFG["n_seq"]
    model64 = _model(torch.float64)  # the same math: float64 agrees to float64's rounding
    _assert_within(_decode(model64, tokens, prompt_len)[0], model64(tokens)["logits"],
                   bound * U64 / U32)


def test_chunked_prefill_and_per_sequence_independence():
    """A prompt fed in two chunks is the same as one; each row decodes as if alone."""
    model = _model()
    tokens = _tokens(4, 20, seed=2)
    bound = _bound(4, 20, 2)
    full = model(tokens)["logits"]
    a, cache = model.prefill(tokens[:, :9])
    b, cache = model.prefill(tokens[:, 9:20], cache)
    _assert_within(torch.cat([a, b], dim=1), full, bound)

    alone, c1 = model.prefill(tokens[2:3, :12])
    step_alone, _ = model.step(tokens[2:3, 12], c1)
    both, c4 = model.prefill(tokens[:, :12])
    step_both, _ = model.step(tokens[:, 12], c4)
    _assert_within(alone[0], both[2], bound)
    _assert_within(step_alone[0], step_both[2], bound)


def test_cache_memory_grows_with_the_context():
    model = _model()
    cache = model.init_cache(batch_size=2)
    assert cache.nbytes() == 0
    model.prefill(_tokens(2, 5), cache)
    # keys and values, every layer, every filled position: 2 * L * B * pos * D float32
    assert cache.nbytes() == 2 * CFG["n_layers"] * 2 * 5 * CFG["d_model"] * 4
    model.step(_tokens(2, 1)[:, 0], cache)
    assert cache.nbytes() == 2 * CFG["n_layers"] * 2 * 6 * CFG["d_model"] * 4


def test_bad_input_is_refused_with_the_limit_named():
    model = _model()
    cache = model.init_cache(batch_size=2, max_len=4)
    model.prefill(_tokens(2, 3), cache)
    with pytest.raises(ValueError, match=r"positions 3..4 exceed the cache's max_len=4"):
        model.prefill(_tokens(2, 2), cache)
    with pytest.raises(ValueError, match="3 sequences given to a cache of batch size 2"):
        model.step(_tokens(3, 1)[:, 0], cache)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        model.step(_tokens(2, 1), cache)
    with pytest.raises(ValueError, match="max_len=25: must be <= 24"):
        model.init_cache(batch_size=1, max_len=25)
    with pytest.raises(ValueError, match="batch_size=0: must be >= 1"):
        model.init_cache(batch_size=0)
