"""Language model of sparse BK layers: config dataclass with presets, and the model.

    h_0 = E[tokens] + P[:T]                        (B, T, D)
    h_l = h_{l-1} + Layer_l(LayerNorm(h_{l-1}))    l = 1..L   (pre-norm residual blocks)
    logits = LayerNorm(h_L) @ E^T                  (B, T, V)  (output head tied to E)

Every piece is causal: embeddings and norms act per position, each layer's mask reads x_i and
the position i alone (the eval mask's fixed offsets depend on i), experts and projections read
x_i alone, the BK-core is the causal (leading-block) resolvent and skipped
positions copy features from the left only. Architecture only: no Ray, no distributed code.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsebk.gate import EVAL_MODES
from sparsebk.layers import SparseMoEResNetBKLayer
from sparsebk.sparsity import LOSS_TYPES

__all__ = ["LMConfig", "SparseBKLM", "PRESETS"]


# Named sizes. "small" is PTB-sized (10k word vocabulary) and trains at a useful rate on a few
# CPU cores; "large" is for multi-GPU nodes (GPT-2 BPE vocabulary, 1k context).
PRESETS: dict[str, dict] = {
    "debug": dict(vocab_size=64, n_seq=32, d_model=32, n_layers=2, num_experts=4, top_k=1),
    "small": dict(vocab_size=10000, n_seq=128, d_model=128, n_layers=4, num_experts=4, top_k=1),
    "large": dict(vocab_size=50257, n_seq=1024, d_model=1024, n_layers=16, num_experts=8, top_k=2),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class LMConfig:
    vocab_size: int
    n_seq: int
    d_model: int
    n_layers: int
    num_experts: int = 4
    top_k: int = 1
    dropout_p: float = 0.1
    target_sparsity: float = 0.5
    sparsity_loss_weight: float = 0.01
    sparsity_loss_type: str = "adaptive"
    tau: float = 1.0
    use_sparse_computation: bool = True
    moe_aux_weight: float = 0.01
    # the balanced loss's weight on cross-entropy (the seed's accuracy_weight); Tune sweeps it
    accuracy_weight: float = 1.0
    # eval-mode mask: "quasi" (fixed per-position logistic offsets: eval sparsity follows the
    # training rate) or "threshold" (logit > 0); see sparsebk.gate
    gate_eval_mode: str = "quasi"

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"LMConfig.{name}={getattr(self, name)!r} {why}")

        for name, low in (("vocab_size", 1), ("n_seq", 1), ("d_model", 2), ("n_layers", 1),
                          ("num_experts", 1), ("top_k", 1)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                bad(name, f"must be an int >= {low}")
        if self.top_k > self.num_experts:
            bad("top_k", f"must not exceed num_experts={self.num_experts}")
        if not _is_num(self.dropout_p) or not 0.0 <= self.dropout_p < 1.0:
            bad("dropout_p", "must be a float in [0, 1)")
        if not _is_num(self.target_sparsity) or not 0.0 <= self.target_sparsity < 1.0:
            bad("target_sparsity", "must be a float in [0, 1)")
        for name in ("sparsity_loss_weight", "moe_aux_weight", "accuracy_weight"):
            if not _is_num(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "must be a non-negative finite number")
        if self.sparsity_loss_type not in LOSS_TYPES:
            bad("sparsity_loss_type", f"must be one of {LOSS_TYPES}")
        if not _is_num(self.tau) or self.tau <= 0:
            bad("tau", "must be a positive finite number")
        if self.gate_eval_mode not in EVAL_MODES:
            bad("gate_eval_mode", f"must be one of {EVAL_MODES}")
        if not isinstance(self.use_sparse_computation, bool):
            bad("use_sparse_computation", "must be true or false")

    @classmethod
    def preset(cls, name: str, **overrides) -> "LMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown LMConfig preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        if not isinstance(d, dict):
            raise ValueError(f"LMConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LMConfig field(s) {unknown}; known fields: {sorted(known)}")
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise ValueError(f"LMConfig is missing required field(s) {missing}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm residual block: x + layer(LayerNorm(x))."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.layer = SparseMoEResNetBKLayer(
            cfg.d_model, cfg.n_seq, num_experts=cfg.num_experts, top_k=cfg.top_k,
            dropout_p=cfg.dropout_p, target_sparsity=cfg.target_sparsity,
            sparsity_loss_weight=cfg.sparsity_loss_weight, sparsity_loss_type=cfg.sparsity_loss_type,
            use_sparse_computation=cfg.use_sparse_computation, tau=cfg.tau,
            gate_eval_mode=cfg.gate_eval_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(self.norm(x))


class SparseBKLM(nn.Module):
    """model(tokens (B, T) int64, targets=None) -> dict; see `forward`."""

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise ValueError(f"SparseBKLM needs an LMConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Parameter(torch.zeros(config.n_seq, config.d_model))
        self.drop = nn.Dropout(config.dropout_p)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    @property
    def layers(self) -> list[SparseMoEResNetBKLayer]:
        return [b.layer for b in self.blocks]

    def set_sparsity_schedule(self, targets: float | Sequence[float], loss_weight: float) -> None:
        """Per-layer sparsity targets (one float for all, or one per layer) and the loss weight:
        what AdaptiveSparsityScheduler.step() returns ('layer_targets' or 'sparsity_target',
        and 'loss_weight')."""
        layers = self.layers
        if isinstance(targets, (int, float)) and not isinstance(targets, bool):
            targets = [float(targets)] * len(layers)
        targets = list(targets)
        if len(targets) != len(layers):
            raise ValueError(f"got {len(targets)} sparsity targets for {len(layers)} layers")
        for layer, t in zip(layers, targets):
            layer.sparse_bk_core.target_sparsity = t
            layer.sparsity_loss_weight = loss_weight

    def set_tau(self, tau: float) -> None:
        """Gate temperature of every layer (annealing)."""
        for layer in self.layers:
            layer.sparse_bk_core.tau = tau

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        """tokens (B, T) int64 with T <= n_seq; targets (B, T) (-100 = ignored) or None.

        Returns "logits" (B, T, V) and "layer_sparsity" (L,) (detached 1 - mean(mask) per layer,
        no host sync); with targets also "loss" = accuracy_weight * ce_loss + sparsity_loss +
        moe_aux_weight * aux_loss, "ce_loss", "sparsity_loss" (sum over layers, each weighted by its layer's
        sparsity_loss_weight, differentiable) and "aux_loss" (sum of the layers' MoE balance
        losses).
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an int64 tensor (B, T), got {tokens.dtype} {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if not 1 <= T <= self.config.n_seq:
            raise ValueError(f"sequence length T={T} must be in [1, n_seq={self.config.n_seq}]")
        h = self.drop(self.tok_emb(tokens) + self.pos_emb[:T])  # (B, T, D)
        for block in self.blocks:
            h = block(h)
        logits = self.norm_f(h) @ self.tok_emb.weight.t()  # (B, T, V)
        layers = self.layers
        out = {"logits": logits,
               "layer_sparsity": torch.stack([1.0 - l.last_mask.detach().float().mean() for l in layers])}
        if targets is not None:
            if targets.shape != tokens.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}")
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long())
            sp = sum(l.get_sparsity_loss() for l in layers)
            aux = sum(l.last_aux_loss for l in layers)
            out.update(loss=self.config.accuracy_weight * ce + sp + self.config.moe_aux_weight * aux, ce_loss=ce,
                       sparsity_loss=sp, aux_loss=aux)
        return out
