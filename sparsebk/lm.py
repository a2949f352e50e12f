"""Language model of sparse BK layers: config dataclass with presets, and the model.

    h_0 = E[tokens] + P[:T]                         (B, T, D)  (no P with pos_emb="none")
    y_l, m_l, a_l = Layer_l(LayerNorm(h_{l-1}))     l = 1..L: output (B, T, D), mask (B, T), aux ()
    h_l = h_{l-1} + y_l                             (pre-norm residual blocks)
    logits = LayerNorm(h_L) @ E^T                   (B, T, V)  (output head tied to E)

Each block returns h_l together with its layer's live mask m_l and MoE balance loss a_l; the
model builds every output from those returned values:

    layer_sparsity_l = 1 - mean(m_l)                                   (detached)
    loss = accuracy_weight * CE + sum_l w_l * S(m_l, t_l) + moe_aux_weight * sum_l a_l

with S the sparsity loss of `sparsity_loss_type`, t_l and w_l layer l's target and weight (set
each step by `set_sparsity_schedule`). The tokens' shape is checked once, here; the layers
trust it. After a forward each layer also remembers its mask for the seed API's getters
(`get_sparsity_loss(model)`, `get_sparsity_stats(model)`, ...), which the model never reads.

Every piece is causal: embeddings and norms act per position, each layer's mask reads x_i and
the position i alone (the eval mask's fixed offsets depend on i), experts and projections read
x_i alone, the BK-core is the causal (leading-block) resolvent (an input coupling b_i,
read at position i, links i and i + 1 and so enters no g_j with j <= i) and skipped
positions copy features from the left only. Architecture only: no Ray, no distributed code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparsebk import decode
from sparsebk.decode import DecodeState
from sparsebk.gate import EVAL_MODES, TRAIN_NOISES
from sparsebk.layers import GATE_GRADS, SKIP_OUTPUTS, LayerOutput, SparseMoEResNetBKLayer
from sparsebk.sparse_bk_core import Z_IM_RANGE
from sparsebk.sparsity import LOSS_TYPES, sparsity_loss
from sparsebk.validation import (check_bool, check_choice, check_float, check_int,
                                 check_sparsity, from_mapping)

__all__ = ["LMConfig", "SparseBKLM", "PRESETS", "adamw_with_decay_groups"]

POS_EMB = ("learned", "none")
SPARSITY_BUDGETS = ("layer", "model")


# Named sizes. "small" is PTB-sized (10k word vocabulary) and trains at a useful rate on a few
# CPU cores; "large" is for multi-GPU nodes (GPT-2 BPE vocabulary, 1k context). Both mix with
# 8 BK heads, learnt shifts and input couplings: measured on PTB (BENCHMARKS.md, 600 s rows on
# an idle machine) at the small size: test ppl 200.2 against 215.7 for the single-channel layer,
# at 0.95x its tokens/s; the layer's forward + backward at d_model 256 costs 0.99x. (The large
# size's quality is not measured here: it inherits the small size's choice.) "debug" keeps the
# single-channel layer of the seed spec.
MULTI_CHANNEL = dict(bk_heads=8, bk_learn_z=True, bk_input_couplings=True)
# Both also gate the way the measurements chose (BENCHMARKS.md, "Gates that learn" and "A light
# FFN for skipped tokens"): the gate's probability weighs the expert output, the training mask
# is the deterministic logit > 0, and a skipped position runs a light FFN (width D / 4) in
# place of the experts. PTB, small, 600 s, LR 4e-3: test ppl 189.3 at 0.5 and 187.8 at 0.7,
# against 198.0 and 237.7 when a skipped position carries the last computed row (dense 177.7),
# and 243.0 at 0.5 for the seed's Bernoulli-drawn, unweighted gate (at LR 2e-3). A dense model
# (every gate open) never runs the light FFN.
LEARNED_GATES = dict(gate_weight=True, gate_train_noise="none", gate_eval_mode="threshold",
                     skip_output="light")
PRESETS: dict[str, dict] = {
    "debug": dict(vocab_size=64, n_seq=32, d_model=32, n_layers=2, num_experts=4, top_k=1),
    "small": dict(vocab_size=10000, n_seq=128, d_model=128, n_layers=4, num_experts=4, top_k=1,
                  **MULTI_CHANNEL, **LEARNED_GATES),
    "large": dict(vocab_size=50257, n_seq=1024, d_model=1024, n_layers=16, num_experts=8, top_k=2,
                  **MULTI_CHANNEL, **LEARNED_GATES),
}


def adamw_with_decay_groups(model: nn.Module, weight_decay: float, lr: float,
                            betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with nanoGPT's rule: weight decay on the parameters with ndim >= 2 (matrices and
    embeddings), none on the rest (biases, norm scales, other vectors). Groups in that order,
    each in `parameters()` order (a tied parameter appears once)."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr, betas=betas)


@dataclass
class LMConfig:
    # None: not decided yet (a training config takes the dataset's; TrainConfig.resolve_vocab).
    # A model needs it decided.
    vocab_size: int | None
    n_seq: int
    d_model: int
    n_layers: int
    num_experts: int = 4
    top_k: int = 1
    # each expert's hidden width (None: 4 d_model)
    d_ff: int | None = None
    dropout_p: float = 0.1
    # every layer's initial sparsity target and loss weight: what a model built from this config
    # uses until someone changes them. Under training the sparsity schedule sets both on every
    # step (SparseBKLM.set_sparsity_schedule), so there these are only the step-0 values.
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
    # multi-channel BK mixing (sparsebk.layers): BK heads per layer, a learnt spectral shift
    # per head, input-dependent couplings. The defaults (1, False, False) are the
    # single-channel layer with z = 1j and Laplacian couplings.
    bk_heads: int = 1
    bk_learn_z: bool = False
    bk_input_couplings: bool = False
    # bk_learn_z only: the heads' Im z at init, log-spaced over [min, max] (memory lengths from
    # about 1/max to 1/min positions); min = max starts every head at the same shift
    bk_z_im_min: float = Z_IM_RANGE[0]
    bk_z_im_max: float = Z_IM_RANGE[1]
    # recompute each block in backward instead of storing its activations (non-reentrant
    # torch.utils.checkpoint); the RNG state is replayed, so the recomputed gate noise, mask
    # and dropout are the ones of the forward
    activation_checkpointing: bool = False
    # "learned": an absolute position table P (n_seq, D), which caps a model at n_seq tokens;
    # "none": no absolute positions (the causal BK recurrence is order-aware), so a model
    # trained on n_seq-token blocks runs (and decodes) past n_seq
    pos_emb: str = "learned"
    # what a skipped position outputs: "carry" (the projected features of the last computed
    # position), "own" (its own BK features, projected), "zero" (the residual stream only);
    # see sparsebk.layers
    skip_output: str = "carry"
    # "light" only: the width of the light FFN a skipped position runs (None: d_model // 4)
    light_d_ff: int | None = None
    # what the task gradient tells the gate: "scale" (whether a larger output helps) or
    # "contrast" (whether computing beats skipping); forward values identical (layers.py)
    gate_grad: str = "scale"
    # scale a computed position's expert output by the gate's probability sigmoid(logit), as
    # a Mixture-of-Experts router weighs its experts: the gate then learns where the experts'
    # work helps (sparsebk.layers)
    gate_weight: bool = False
    # the gate's training draw: "random" (logistic noise: a Bernoulli(sigmoid(logit)) mask) or
    # "none" (mask = logit > 0, deterministic; needs gate_eval_mode "threshold", the same rule)
    gate_train_noise: str = "random"
    # how the sparsity loss shares the budget: "layer" pulls every layer's sparsity to its own
    # target; "model" pulls the sparsity of all layers' masks together to the mean target, so
    # the gates choose which layers skip more (as Mixture-of-Depths routes some blocks only)
    sparsity_budget: str = "layer"

    def __post_init__(self):
        if self.vocab_size is not None:
            self.vocab_size = check_int("LMConfig.vocab_size", self.vocab_size, min=1)
        for name, low in (("n_seq", 1), ("d_model", 2), ("n_layers", 1), ("num_experts", 1),
                          ("top_k", 1)):
            setattr(self, name, check_int(f"LMConfig.{name}", getattr(self, name), min=low))
        if self.top_k > self.num_experts:  # a relation of two fields: both named
            raise ValueError(f"LMConfig.top_k={self.top_k} must not exceed "
                             f"num_experts={self.num_experts}")
        self.dropout_p = check_float("LMConfig.dropout_p", self.dropout_p, min=0.0, max=1.0,
                                     max_open=True)
        self.target_sparsity = check_sparsity("LMConfig.target_sparsity", self.target_sparsity)
        for name in ("sparsity_loss_weight", "moe_aux_weight", "accuracy_weight"):
            setattr(self, name, check_float(f"LMConfig.{name}", getattr(self, name), min=0.0))
        check_choice("LMConfig.sparsity_loss_type", self.sparsity_loss_type, LOSS_TYPES)
        self.tau = check_float("LMConfig.tau", self.tau, min=0.0, min_open=True)
        check_choice("LMConfig.gate_eval_mode", self.gate_eval_mode, EVAL_MODES)
        check_choice("LMConfig.gate_train_noise", self.gate_train_noise, TRAIN_NOISES)
        if self.gate_train_noise == "none" and self.gate_eval_mode != "threshold":
            raise ValueError(
                f"LMConfig.gate_train_noise='none' trains on the mask logit > 0; set "
                f"gate_eval_mode='threshold' (got {self.gate_eval_mode!r}) so that evaluation "
                f"decides the same way")
        for name in ("use_sparse_computation", "bk_learn_z", "bk_input_couplings",
                     "activation_checkpointing", "gate_weight"):
            check_bool(f"LMConfig.{name}", getattr(self, name))
        self.bk_heads = check_int("LMConfig.bk_heads", self.bk_heads, min=1)
        self.bk_z_im_min = check_float("LMConfig.bk_z_im_min", self.bk_z_im_min, min=0.0,
                                       min_open=True)
        self.bk_z_im_max = check_float("LMConfig.bk_z_im_max", self.bk_z_im_max,
                                       min=self.bk_z_im_min)
        if not self.bk_learn_z and (self.bk_z_im_min, self.bk_z_im_max) != Z_IM_RANGE:
            raise ValueError(f"LMConfig.bk_z_im_min/bk_z_im_max ({self.bk_z_im_min}, "
                             f"{self.bk_z_im_max}) initialise learnt shifts; set "
                             f"bk_learn_z=true, or leave them at {Z_IM_RANGE}")
        check_choice("LMConfig.pos_emb", self.pos_emb, POS_EMB)
        check_choice("LMConfig.skip_output", self.skip_output, SKIP_OUTPUTS)
        check_choice("LMConfig.gate_grad", self.gate_grad, GATE_GRADS)
        if self.d_ff is not None:
            self.d_ff = check_int("LMConfig.d_ff", self.d_ff, min=1)
        if self.light_d_ff is not None:
            self.light_d_ff = check_int("LMConfig.light_d_ff", self.light_d_ff, min=1)
        if self.skip_output == "light" and self.gate_grad == "contrast":
            raise ValueError("LMConfig.gate_grad='contrast' is not defined for "
                             "skip_output='light'; use gate_grad='scale'")
        check_choice("LMConfig.sparsity_budget", self.sparsity_budget, SPARSITY_BUDGETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> "LMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown LMConfig preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        return from_mapping(cls, d, "LMConfig")

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm residual block: (x + layer(LayerNorm(x)), the layer's mask, its aux loss)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.layer = SparseMoEResNetBKLayer.from_config(cfg)

    def forward(self, x: torch.Tensor) -> LayerOutput:
        y, mask, aux = self.layer.forward_parts(self.norm(x))
        return LayerOutput(x + y, mask, aux)


class SparseBKLM(nn.Module):
    """model(tokens (B, T) int64, targets=None) -> dict; see `forward`."""

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise ValueError(f"SparseBKLM needs an LMConfig, got {type(config).__name__}")
        if config.vocab_size is None:
            raise ValueError("LMConfig.vocab_size=None: the vocabulary is not decided; give "
                             "vocab_size (a training config takes the dataset's)")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos_emb == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(config.n_seq, config.d_model))
        else:
            self.register_parameter("pos_emb", None)
        self.drop = nn.Dropout(config.dropout_p)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=0.02)

    @property
    def layers(self) -> list[SparseMoEResNetBKLayer]:
        return [b.layer for b in self.blocks]

    def set_sparsity_schedule(self, targets: float | Sequence[float], loss_weight: float) -> None:
        """Per-layer sparsity targets (one float for all, or one per layer) and the loss weight:
        what AdaptiveSparsityScheduler.step() returns ('layer_targets' or 'sparsity_target',
        and 'loss_weight'). The trainer calls this every step with values its config already
        validated, so nothing is re-validated here beyond the layer setters' one cheap check
        per value (a type and range compare on a Python float; no host sync)."""
        layers = self.layers
        if isinstance(targets, (int, float)):
            targets = [targets] * len(layers)  # a bool lands here too; the setter refuses it
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

    def configure_optimizers(self, weight_decay: float, lr: float,
                             betas: tuple[float, float]) -> torch.optim.AdamW:
        """AdamW over the model's weight-decay groups: see `adamw_with_decay_groups`."""
        return adamw_with_decay_groups(self, weight_decay, lr, betas)

    # --- streaming decoding (eval mode; the state and its equations: sparsebk.decode) -------
    def init_state(self, batch_size: int) -> DecodeState:
        """A fresh decoding state for `batch_size` sequences: O(1) in the context per layer."""
        return decode.init_state(self, batch_size)

    def prefill(self, tokens: torch.Tensor, state: DecodeState | None = None
                ) -> tuple[torch.Tensor, DecodeState]:
        """tokens (B, T) at the state's next positions (fresh when None) -> (logits (B, T, V),
        state): the parallel scan over the chunk, the state the step-wise path would reach."""
        return decode.prefill(self, tokens, state)

    def step(self, tokens: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        """tokens (B,) at position state.pos -> (logits (B, V), the next state)."""
        return decode.step(self, tokens, state)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        """tokens (B, T) int64 with T <= n_seq (any T with pos_emb="none"); targets (B, T)
        (-100 = ignored) or None.

        Returns "logits" (B, T, V) and "layer_sparsity" (L,) (detached 1 - mean(mask) per layer,
        no host sync); with targets also "loss" = accuracy_weight * ce_loss + sparsity_loss +
        moe_aux_weight * aux_loss, "ce_loss", "sparsity_loss" (sum over layers, each weighted by
        its layer's sparsity_loss_weight, differentiable) and "aux_loss" (sum of the layers' MoE
        balance losses).
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an int64 tensor (B, T), got {tokens.dtype} {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if T < 1 or (self.pos_emb is not None and T > self.config.n_seq):
            raise ValueError(f"sequence length T={T} must be in [1, n_seq={self.config.n_seq}]"
                             + ("" if T < 1 else " (learned positions end at n_seq)"))
        if self.pos_emb is None:
            h = self.drop(self.tok_emb(tokens))  # (B, T, D)
        else:
            h = self.drop(self.tok_emb(tokens) + self.pos_emb[:T])  # (B, T, D)
        masks, aux_losses = [], []  # per layer: (B, T) live masks, () balance losses
        recompute = self.config.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                h, mask, aux = checkpoint(block, h, use_reentrant=False, preserve_rng_state=True)
            else:
                h, mask, aux = block(h)
            masks.append(mask)
            aux_losses.append(aux)
        logits = self.norm_f(h) @ self.tok_emb.weight.t()  # (B, T, V)
        layers = self.layers
        for layer, mask, aux in zip(layers, masks, aux_losses):
            layer.remember(mask, aux)  # for the seed getters only; nothing below reads it
        out = {"logits": logits,
               "layer_sparsity": torch.stack([1.0 - m.detach().float().mean() for m in masks])}
        if targets is not None:
            if targets.shape != tokens.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}")
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long())
            sp = self._sparsity_loss(masks)
            aux = sum(aux_losses)
            out.update(loss=self.config.accuracy_weight * ce + sp + self.config.moe_aux_weight * aux,
                       ce_loss=ce, sparsity_loss=sp, aux_loss=aux)
        return out

    def _sparsity_loss(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """The weighted sparsity loss of the layers' live masks (B, T): per layer, or of all
        masks together against the mean target ("model" budget; the weight is the layers'
        common one, as set_sparsity_schedule sets it; the loss is scaled by the layer count so
        that its gradient per mask entry matches the per-layer budget's)."""
        layers = self.layers
        if self.config.sparsity_budget == "layer":
            return sum(layer.weighted_sparsity_loss(m) for layer, m in zip(layers, masks))
        first = layers[0]
        target = sum(layer.sparse_bk_core.target_sparsity for layer in layers) / len(layers)
        return len(layers) * first.sparsity_loss_weight * sparsity_loss(
            torch.stack(masks), target, first.sparsity_loss_type)

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> tuple["SparseBKLM", object]:
        """(model in eval mode, tokenizer) from a training checkpoint, or a run folder's best
        checkpoint (lowest val_loss); see sparsebk.export.load_checkpoint_model."""
        from sparsebk.export import load_checkpoint_model

        loaded = load_checkpoint_model(path, device)
        return loaded.model, loaded.tokenizer

    @classmethod
    def from_pretrained(cls, directory, device="cpu") -> tuple["SparseBKLM", object]:
        """(model in eval mode, tokenizer) from a folder written by `sparsebk export`; see
        sparsebk.export.load_pretrained."""
        from sparsebk.export import load_pretrained

        loaded = load_pretrained(directory, device)
        return loaded.model, loaded.tokenizer
