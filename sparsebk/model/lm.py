"""Language model of sparse BK layers: config dataclass with presets, and the model.

    h_0 = E[tokens] + P[:T]                         (B, T, D)  (no P with pos_emb="none")
    y_l, m_l, a_l = Layer_l(LayerNorm(h_{l-1}))     l = 1..L: output (B, T, D), mask (B, T), aux ()
    h_l = h_{l-1} + y_l                             (pre-norm residual blocks)
    logits = LayerNorm(h_L) @ E^T                   (B, T, V)  (output head tied to E)

With `head_cutoff` c > 0 the head is a two-level adaptive softmax (Grave et al. 2017), tied
to E as well. With u = LayerNorm(h_L):

    first level   a = [u @ E[:c]^T, w . u + b]      (c + 1): the ids below c and "the rest"
    second level  r = (P u) @ E[c:]^T               (V - c)
    log p(i) = log_softmax(a)_i                     i < c
    log p(i) = log_softmax(a)_c + log_softmax(r)_(i - c)    i >= c

an exact distribution over the vocabulary (its probabilities sum to 1). The loss reads the
second level only at the targets that fall there, so with ids ordered by frequency (the word
tokenizer's order; on PTB the 2,000 most frequent ids are 87% of the tokens) a training step
does a fraction of the full head's work. The model's logits are then these log-probabilities.
P starts as the identity and b at log(V - c), so that at initialisation the rest's share
matches what a full softmax of the same E gives to V - c near-equal logits.

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

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparsebk.model.config import PRESETS, LMConfig  # noqa: F401 (re-exported)
from sparsebk.model.layers import LayerOutput, LayerState, SparseMoEResNetBKLayer
from sparsebk.model.sparsity import sparsity_loss

__all__ = ["LMConfig", "SparseBKLM", "DecodeState", "PRESETS", "adamw_with_decay_groups"]

def adamw_with_decay_groups(model: nn.Module, weight_decay: float, lr: float,
                            betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with nanoGPT's rule: weight decay on the parameters with ndim >= 2 (matrices and
    embeddings), none on the rest (biases, norm scales, other vectors). Groups in that order,
    each in `parameters()` order (a tied parameter appears once)."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr, betas=betas)


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 when it is (a half-precision softmax rounds the probabilities)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class DecodeState:
    """A SparseBKLM's decoding state: one `LayerState` per layer and the next position (the
    quasi gate's offset and the learned position row). Nothing grows with the context.
    `prefill` and `step` return a new state and leave the one they were given valid (a
    caller may branch from it)."""

    layers: list[LayerState]
    pos: int = 0  # positions consumed: the position of the next token

    @property
    def batch_size(self) -> int:
        return self.layers[0].carry.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the state: the same at every position."""
        return sum(s.nbytes() for s in self.layers)


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
        c = config.head_cutoff
        if c:  # the adaptive head's own parameters (module docstring)
            self.rest_logit = nn.Linear(config.d_model, 1)  # w, b
            self.rest_proj = nn.Linear(config.d_model, config.d_model, bias=False)  # P
            nn.init.zeros_(self.rest_logit.weight)
            nn.init.constant_(self.rest_logit.bias, math.log(config.vocab_size - c))
            nn.init.eye_(self.rest_proj.weight)
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

    def bk_shifts(self) -> list[list[complex]] | None:
        """Each layer's BK shifts z_h (one complex per head), when they are learnt
        (`bk_learn_z`); None for the fixed z = 1j. Im z_h sets head h's memory length, about
        1 / Im z_h positions (docs/math.md): what the training made of the init range."""
        if not self.config.bk_learn_z:
            return None
        return [[complex(z) for z in layer.sparse_bk_core.shifts().detach().cdouble().tolist()]
                for layer in self.layers]

    def set_tau(self, tau: float) -> None:
        """Gate temperature of every layer (annealing)."""
        for layer in self.layers:
            layer.sparse_bk_core.tau = tau

    def configure_optimizers(self, weight_decay: float, lr: float,
                             betas: tuple[float, float]) -> torch.optim.AdamW:
        """AdamW over the model's weight-decay groups: see `adamw_with_decay_groups`."""
        return adamw_with_decay_groups(self, weight_decay, lr, betas)

    # --- streaming decoding: eval mode, a constant-size state per layer ------------------
    def init_state(self, batch_size: int) -> DecodeState:
        """A fresh decoding state for `batch_size` sequences: O(1) in the context per layer."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        return DecodeState([layer.init_state(batch_size) for layer in self.layers], 0)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, state: DecodeState | None = None
                ) -> tuple[torch.Tensor, DecodeState]:
        """tokens (B, T) at the state's next positions (fresh when None) -> (logits (B, T, V),
        state): the parallel scan over the chunk, the state the step-wise path would reach.
        From a fresh state the logits equal the forward's bit for bit on the same device."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32) or tokens.shape[1] < 1:
            raise ValueError(f"prefill takes int64 tokens (B, T) with T >= 1, got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        state = self.init_state(tokens.shape[0]) if state is None else state
        return self._continue(tokens, state, "prefill")

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        """tokens (B,) at position state.pos -> (logits (B, V), the next state)."""
        if tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"step takes one int64 token per sequence, shape (B,), got "
                             f"{tokens.dtype} {tuple(tokens.shape)}")
        logits, state = self._continue(tokens[:, None], state, "step")
        return logits[:, 0], state

    def state_nbytes_per_sequence(self) -> int:
        """Bytes of decoding state per sequence (any position): per layer 8H (alpha,
        complex64), 4H (k_prev) and, under skip_output "carry" only, 4D (carry) at float32."""
        return self.init_state(1).nbytes()

    def _continue(self, tokens: torch.Tensor, state: DecodeState, how: str
                  ) -> tuple[torch.Tensor, DecodeState]:
        """tokens (B, T) at positions state.pos.. -> (logits (B, T, V), the state after them),
        each layer running its `prefill` (T tokens at once) or `step` (one)."""
        if self.training:
            raise ValueError("decoding runs the eval-mode model (no gate noise, no dropout); "
                             "call model.eval() first")
        if not isinstance(state, DecodeState):
            raise ValueError(f"state must be a DecodeState (from init_state or prefill), got "
                             f"{type(state).__name__}")
        B, T = tokens.shape
        if B != state.batch_size:
            raise ValueError(f"{B} sequences given to a state of batch size {state.batch_size}")
        pos = state.pos
        if self.pos_emb is not None and pos + T > self.config.n_seq:
            raise ValueError(
                f"positions {pos}..{pos + T - 1} are past n_seq={self.config.n_seq}: this model "
                f"has learned absolute positions (pos_emb='learned'), whose table ends at n_seq; "
                f"a model trained with pos_emb='none' decodes past its training length")
        h = self.tok_emb(tokens)  # (B, T, D)
        if self.pos_emb is not None:
            h = h + self.pos_emb[pos:pos + T]
        h = self.drop(h)
        layers = []
        for block, st in zip(self.blocks, state.layers):
            if how == "step":
                y, st = block.layer.step(block.norm(h[:, 0]), st, pos)
                y = y[:, None]
            else:
                y, st = block.layer.prefill(block.norm(h), st, pos)
            h = h + y
            layers.append(st)
        return self.logits(self.norm_f(h)), DecodeState(layers, pos + T)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        """tokens (B, T) int64 with T <= n_seq (any T with pos_emb="none"); targets (B, T)
        (-100 = ignored) or None.

        Returns "logits" (B, T, V) and "layer_sparsity" (L,) (detached 1 - mean(mask) per layer,
        no host sync); "logits" is left out when targets are given to a model with an adaptive
        head (`head_cutoff` > 0: not forming them is that head's saving). With targets also
        "loss" = accuracy_weight * ce_loss + sparsity_loss + moe_aux_weight * aux_loss,
        "ce_loss", "sparsity_loss" (sum over layers, each weighted by
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
        u = self.norm_f(h)  # (B, T, D)
        layers = self.layers
        for layer, mask, aux in zip(layers, masks, aux_losses):
            layer.remember(mask, aux)  # for the seed getters only; nothing below reads it
        out = {}
        if targets is None or not self.config.head_cutoff:
            out["logits"] = logits = self.logits(u)
        out["layer_sparsity"] = torch.stack([1.0 - m.detach().float().mean() for m in masks])
        if targets is not None:
            if targets.shape != tokens.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}")
            if self.config.head_cutoff:
                ce = self._adaptive_ce(u.reshape(-1, u.shape[-1]), targets.reshape(-1).long())
            else:
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                     targets.reshape(-1).long())
            sp = self._sparsity_loss(masks)
            aux = sum(aux_losses)
            out.update(loss=self.config.accuracy_weight * ce + sp + self.config.moe_aux_weight * aux,
                       ce_loss=ce, sparsity_loss=sp, aux_loss=aux)
        return out

    def logits(self, u: torch.Tensor) -> torch.Tensor:
        """The head on final-norm outputs u (..., D): logits (..., V); with an adaptive head the
        log-probabilities over the whole vocabulary (module docstring), in float32 at least."""
        E, c = self.tok_emb.weight, self.config.head_cutoff
        if not c:
            return u @ E.t()
        first = torch.log_softmax(_at_least_f32(self._first_level(u)), dim=-1)  # (..., c + 1)
        rest = torch.log_softmax(_at_least_f32(self.rest_proj(u) @ E[c:].t()), dim=-1)  # (..., V - c)
        return torch.cat([first[..., :c], first[..., c:] + rest], dim=-1)

    def _first_level(self, u: torch.Tensor) -> torch.Tensor:
        """(..., c + 1): the frequent ids' logits and the rest's, one matmul (the weights are
        joined, (c + 1, D), not the (..., c + 1) outputs)."""
        c = self.config.head_cutoff
        weight = torch.cat([self.tok_emb.weight[:c], self.rest_logit.weight])
        return F.linear(u, weight, F.pad(self.rest_logit.bias, (c, 0)))  # bias 0 but the rest's

    def _adaptive_ce(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean -log p(t) over the targets t (M,) that are not -100, for u (M, D), as
        F.cross_entropy of the full log-probabilities gives it; the second level only at the
        rows whose target is in it (one host sync: their count)."""
        E, c = self.tok_emb.weight, self.config.head_cutoff
        rest = t >= c
        first_t = torch.where(rest, torch.full_like(t, c), t)  # -100 stays ignored
        total = F.cross_entropy(_at_least_f32(self._first_level(u)), first_t, reduction="sum")
        idx = rest.nonzero().squeeze(1)  # (R,): R = 0 keeps P and E[c:] in the graph, grad 0
        second = self.rest_proj(u.index_select(0, idx)) @ E[c:].t()  # (R, V - c)
        total = total + F.cross_entropy(_at_least_f32(second), t.index_select(0, idx) - c,
                                        reduction="sum")
        return total / (t != -100).sum()

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
