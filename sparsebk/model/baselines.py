"""Baseline a user would reach for instead of a sparse BK LM: a standard causal Transformer.

Architecture only (no training, no Ray). Pre-LayerNorm GPT-style blocks with standard
softmax attention over a causal mask, learned absolute position embeddings and an output
head tied to the token embedding. `TransformerConfig.matching(lm_config)` builds one of the
same width (d_model), depth (n_layers), vocabulary and context (n_seq) as a sparse BK LM, so
the two compare on the same tokenizer and data.

The forward pass returns the same dict keys as `SparseBKLM` where they make sense
("logits", and with targets "loss" and "ce_loss", which are equal here), so one
benchmark loop can drive both models.

Incremental decoding keeps every layer's keys and values (a KV cache, preallocated to the
model's n_seq, as gpt-fast does):

    cache = model.init_cache(batch_size)
    logits, cache = model.prefill(prompt, cache)     # (B, T, V): the prompt in one pass
    logits, cache = model.step(next_tokens, cache)   # (B, V): one more position

A chunk of T tokens at positions pos..pos+T-1 attends to the cached keys 0..pos-1 and causally
within itself, so prefill-then-step gives the full forward's logits at every position (up to
float32 rounding: the reductions run in another order). The cache grows with the context:
2 * n_layers * B * pos * d_model values, where a BK layer's decoding state is constant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsebk.model.lm import adamw_with_decay_groups
from sparsebk.validation import check_bool, check_float, check_int, from_mapping


@dataclass
class TransformerConfig:
    vocab_size: int
    n_seq: int
    d_model: int
    n_layers: int
    n_heads: int = 4
    d_ff: int | None = None  # hidden width of the MLP; None -> 4 * d_model
    dropout_p: float = 0.1
    tie_weights: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "n_seq", "d_model", "n_layers", "n_heads"):
            setattr(self, name, check_int(f"TransformerConfig.{name}", getattr(self, name), min=1))
        if self.d_model % self.n_heads:  # a relation of two fields: both named
            raise ValueError(
                f"TransformerConfig.d_model={self.d_model} must be divisible by "
                f"n_heads={self.n_heads}; pick n_heads among the divisors of d_model")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        self.d_ff = check_int("TransformerConfig.d_ff", self.d_ff, min=1)
        self.dropout_p = check_float("TransformerConfig.dropout_p", self.dropout_p, min=0.0,
                                     max=1.0, max_open=True)
        check_bool("TransformerConfig.tie_weights", self.tie_weights)

    @classmethod
    def matching(cls, lm_config, **overrides) -> "TransformerConfig":
        """Same vocab, context, width, depth and dropout as an `LMConfig` (or its dict)."""
        src = lm_config if isinstance(lm_config, dict) else lm_config.to_dict()
        kwargs = {k: src[k] for k in ("vocab_size", "n_seq", "d_model", "n_layers", "dropout_p")}
        # 4 heads (64 wide at d_model=256, as in GPT-2); any width not divisible by 4 gets 1 head
        kwargs["n_heads"] = 4 if kwargs["d_model"] % 4 == 0 else 1
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        return from_mapping(cls, d, "TransformerConfig")

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout_p = cfg.dropout_p
        self.resid_drop = nn.Dropout(cfg.dropout_p)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: int = 0) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). With `kv` (this layer's cache, each (B, H, T_max, D/H)),
        x holds positions pos..pos+T-1: their keys and values are written into the cache and
        the queries attend to the cached positions 0..pos+T-1, causally."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # each (B, T, D)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
                   for t in (q, k, v))  # (B, H, T, D/H)
        p = self.dropout_p if self.training else 0.0
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            k_cache, v_cache = kv
            k_cache[:, :, pos:pos + T] = k
            v_cache[:, :, pos:pos + T] = v
            k, v = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]  # (B, H, pos + T, D/H)
            # query t (position pos + t) sees keys 0..pos + t; a single query sees them all
            mask = None if T == 1 else (torch.arange(pos + T, device=x.device)
                                        <= pos + torch.arange(T, device=x.device)[:, None])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), kv, pos)
        return x + self.mlp(self.ln2(x))


@dataclass
class KVCache:
    """Keys and values of every layer, each (B, H, max_len, D/H), and the number of positions
    filled (`pos`): what `TransformerLM.step` needs to decode the next token."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pos: int = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        """Bytes held by the filled positions (the preallocated tail not counted)."""
        per_pos = sum(t[:, :, :1].numel() * t.element_size() for t in self.keys + self.values)
        return per_pos * self.pos


class TransformerLM(nn.Module):
    """Causal Transformer LM: tokens (B, T) int64, T <= n_seq -> dict with "logits" (B, T, V)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.n_seq, config.d_model)
        self.drop = nn.Dropout(config.dropout_p)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual output projections by depth so the residual stream's
        # variance does not grow with n_layers at init
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def configure_optimizers(self, weight_decay: float, lr: float,
                             betas: tuple[float, float]) -> torch.optim.AdamW:
        """AdamW with the same weight-decay groups as SparseBKLM's (`adamw_with_decay_groups`:
        decay on ndim >= 2), so the two compare under one optimizer rule."""
        return adamw_with_decay_groups(self, weight_decay, lr, betas)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if T > self.config.n_seq:
            raise ValueError(f"sequence length {T} exceeds n_seq={self.config.n_seq}")
        pos = torch.arange(T, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, V)
        out = {"logits": logits}
        if targets is not None:
            if targets.shape != tokens.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal tokens shape "
                                 f"{tuple(tokens.shape)}")
            ce = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))
            out["ce_loss"] = ce
            out["loss"] = ce
        return out

    # --- incremental decoding ------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` (default and at
        most n_seq: the learned position table ends there) tokens, on the model's device and
        dtype."""
        max_len = self.config.n_seq if max_len is None else max_len
        check_int("batch_size", batch_size, min=1)
        check_int("max_len", max_len, min=1, max=self.config.n_seq)
        c = self.config
        w = self.tok_emb.weight
        shape = (batch_size, c.n_heads, max_len, c.d_model // c.n_heads)
        return KVCache(keys=[w.new_zeros(shape) for _ in range(c.n_layers)],
                       values=[w.new_zeros(shape) for _ in range(c.n_layers)])

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: KVCache | None = None
                ) -> tuple[torch.Tensor, KVCache]:
        """tokens (B, T) at the cache's next positions (a prompt, or its next chunk) ->
        (logits (B, T, V), the cache holding them). Without a cache, a new one (max_len n_seq)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        if cache is None:
            cache = self.init_cache(tokens.shape[0])
        return self._decode(tokens, cache), cache

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """tokens (B,): one token per sequence at position cache.pos -> (logits (B, V), cache)."""
        if tokens.dim() != 1:
            raise ValueError(f"step takes one token per sequence, shape (B,), got "
                             f"{tuple(tokens.shape)}")
        return self._decode(tokens[:, None], cache)[:, 0], cache

    def _decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T = tokens.shape
        if B != cache.batch_size:
            raise ValueError(f"{B} sequences given to a cache of batch size {cache.batch_size}")
        pos = cache.pos
        if pos + T > cache.max_len:
            raise ValueError(f"positions {pos}..{pos + T - 1} exceed the cache's max_len="
                             f"{cache.max_len} (n_seq={self.config.n_seq}: learned positions "
                             "end there)")
        positions = torch.arange(pos, pos + T, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))  # (B, T, D)
        for block, k, v in zip(self.blocks, cache.keys, cache.values):
            x = block(x, (k, v), pos)
        cache.pos = pos + T
        return self.head(self.ln_f(x))  # (B, T, V)
