"""The Transformer baseline: causal, standard attention, matches a sparse BK LM's shape, learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rounding import float32_bound
from sparsebk.model.baselines import TransformerConfig, TransformerLM

CFG = dict(vocab_size=50, n_seq=16, d_model=32, n_layers=2, n_heads=4, dropout_p=0.1)


def _model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(**{**CFG, **overrides}))


@pytest.mark.parametrize("train_mode", [False, True])
def test_causal_under_perturbation(train_mode):
    model = _model().train(train_mode)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG["vocab_size"], (3, CFG["n_seq"]), generator=g)
    for j in (0, 5, CFG["n_seq"] - 1):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 7) % CFG["vocab_size"]
        torch.manual_seed(123)  # same dropout masks in both passes
        a = model(tokens)["logits"]
        torch.manual_seed(123)
        b = model(changed)["logits"]
        # positions before j see nothing of token j, bit for bit
        assert torch.equal(a[:, :j], b[:, :j])
        # and position j itself does see it (the perturbation test is not vacuous)
        assert not torch.allclose(a[:, j], b[:, j])


def _naive_block(block, x):
    """One pre-LN block in float64 with attention written out: softmax(QK^T/sqrt(d) + mask) V."""
    B, T, D = x.shape
    H = block.attn.n_heads
    h = F.layer_norm(x, (D,), block.ln1.weight.double(), block.ln1.bias.double())
    qkv = h @ block.attn.qkv.weight.double().T + block.attn.qkv.bias.double()
    out = torch.zeros_like(x)
    for b in range(B):
        heads = []
        for head in range(H):
            sl = slice(head * D // H, (head + 1) * D // H)
            q, k, v = qkv[b, :, :D][:, sl], qkv[b, :, D:2 * D][:, sl], qkv[b, :, 2 * D:][:, sl]
            rows = []
            for i in range(T):
                scores = torch.stack([q[i] @ k[j] for j in range(i + 1)]) / math.sqrt(D // H)
                w = torch.softmax(scores, dim=0)
                rows.append(sum(w[j] * v[j] for j in range(i + 1)))
            heads.append(torch.stack(rows))
        out[b] = torch.cat(heads, dim=-1)
    x = x + out @ block.attn.proj.weight.double().T + block.attn.proj.bias.double()
    h = F.layer_norm(x, (D,), block.ln2.weight.double(), block.ln2.bias.double())
    h = F.gelu(h @ block.mlp.fc.weight.double().T + block.mlp.fc.bias.double())
    return x + h @ block.mlp.out.weight.double().T + block.mlp.out.bias.double()


def test_block_matches_written_out_attention():
    model = _model(n_seq=6).double().eval()
    x = torch.randn(2, 6, CFG["d_model"], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    block = model.blocks[0]
    torch.testing.assert_close(block(x), _naive_block(block, x), rtol=1e-10, atol=1e-10)


def test_loss_is_mean_token_cross_entropy():
    model = _model().eval()
    tokens = torch.randint(0, CFG["vocab_size"], (2, 10))
    targets = torch.randint(0, CFG["vocab_size"], (2, 10))
    out = model(tokens, targets)
    logits = out["logits"].detach().double()
    logp = torch.log_softmax(logits, dim=-1)
    expected = -logp.gather(-1, targets[..., None]).mean()
    # float32 cross-entropy of these logits: within its rounding bound (tests/rounding.py)
    bound = float32_bound(lambda: F.cross_entropy(logits.reshape(20, -1), targets.reshape(20)))
    torch.testing.assert_close(out["loss"].double(), expected, rtol=0, atol=bound)
    assert out["ce_loss"] is out["loss"]
    # a shorter sequence than n_seq works; a longer one is refused with the limit named
    assert model(tokens[:, :3])["logits"].shape == (2, 3, CFG["vocab_size"])
    with pytest.raises(ValueError, match="n_seq=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_tied_head_and_gradients_reach_every_parameter():
    model = _model().train()
    assert model.head.weight is model.tok_emb.weight
    tokens = torch.randint(0, CFG["vocab_size"], (2, CFG["n_seq"]))
    model(tokens, tokens)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_matching_copies_width_depth_vocab_context():
    lm = {"vocab_size": 10000, "n_seq": 128, "d_model": 256, "n_layers": 4, "dropout_p": 0.2,
          "num_experts": 4, "target_sparsity": 0.5}
    cfg = TransformerConfig.matching(lm)
    assert (cfg.vocab_size, cfg.n_seq, cfg.d_model, cfg.n_layers, cfg.dropout_p) == (10000, 128, 256, 4, 0.2)
    assert cfg.n_heads == 4 and cfg.d_ff == 1024
    assert TransformerConfig.matching(lm, n_heads=8).n_heads == 8
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg


def test_matching_real_lm_config():
    lm_mod = pytest.importorskip("sparsebk.model.lm")
    lm_cfg = lm_mod.LMConfig.preset("small")
    cfg = TransformerConfig.matching(lm_cfg)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_seq) == (
        lm_cfg.vocab_size, lm_cfg.d_model, lm_cfg.n_layers, lm_cfg.n_seq)


@pytest.mark.parametrize("field,value,match", [
    ("d_model", 30, "divisible by n_heads=4"),
    ("n_layers", 0, "TransformerConfig.n_layers=0: must be >= 1"),
    ("dropout_p", 1.0, "TransformerConfig.dropout_p=1.0: must be < 1"),
    ("d_ff", -1, "TransformerConfig.d_ff=-1: must be >= 1"),
    ("tie_weights", "yes", "TransformerConfig.tie_weights='yes'"),
])
def test_bad_config_names_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{**CFG, field: value})
    with pytest.raises(ValueError, match="unknown field"):
        TransformerConfig.from_dict({**CFG, "n_head": 2})


@pytest.fixture()
def one_thread():
    """Tiny models on a loaded shared machine: one thread avoids OpenMP barrier stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_learns_a_deterministic_sequence(one_thread):
    """Next token = (token + 3) mod V: a perfect model has loss 0; chance is log V."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=17, n_seq=12, d_model=32, n_layers=1,
                                            n_heads=2, dropout_p=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        start = torch.randint(0, 17, (16, 1), generator=g)
        seq = (start + 3 * torch.arange(13)) % 17  # (16, 13)
        loss = model(seq[:, :-1], seq[:, 1:])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * math.log(17)
