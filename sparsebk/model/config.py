"""The model's configuration: `LMConfig`, its named presets, and the options' allowed values.

    cfg = LMConfig.preset("small", target_sparsity=0.7)      # validated in __post_init__
    model = SparseBKLM(cfg)

Every field is checked once, here, with a message naming the field; the layers and the model
trust a config. A rule that spans two fields lives in one function, used by every class that
takes the fields (`check_gate_grad`). Architecture only: nothing here imports above the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sparsebk.model.gate import EVAL_MODES, TRAIN_NOISES
from sparsebk.model.sparse_bk_core import Z_IM_RANGE
from sparsebk.model.sparsity import LOSS_TYPES
from sparsebk.validation import (check_bool, check_choice, check_float, check_int,
                                 check_sparsity, from_mapping)

__all__ = ["LMConfig", "PRESETS", "SKIP_OUTPUTS", "GATE_GRADS", "POS_EMB", "SPARSITY_BUDGETS",
           "check_gate_grad"]

SKIP_OUTPUTS = ("carry", "own", "zero", "mix", "light")  # what a skipped position outputs (layers.py)
GATE_GRADS = ("scale", "contrast")  # what the task gradient tells the gate (layers.py)
POS_EMB = ("learned", "none")
SPARSITY_BUDGETS = ("layer", "model")


# Named sizes. "small" is PTB-sized (10k word vocabulary) and trains at a useful rate on a few
# CPU cores; "large" is for multi-GPU nodes (GPT-2 BPE vocabulary, 1k context). Both mix with
# 32 BK heads, learnt shifts and input couplings. Measured on PTB at the small size, alone on an
# idle machine (BENCHMARKS.md): the multi-channel layer (then 8 heads) against the single-channel
# one, 600 s, test ppl 200.2 against 215.7 at 0.95x its tokens/s; 32 heads against 8, 600 s, two
# seeds: 145.5 and 145.8 against 151.7 and 151.1 dense, 149.1 against 156.0 at 0.5 sparsity (one
# seed), at 0.93-0.97x the tokens/s; an hour (its best recipe): 110.0 and 109.6 against 117.2.
# (The large size's quality is not measured here: it inherits the small size's choice.) "debug"
# keeps the single-channel layer of the seed spec.
MULTI_CHANNEL = dict(bk_heads=32, bk_learn_z=True, bk_input_couplings=True)
# Both also gate the way the measurements chose (BENCHMARKS.md, "Do the gates learn which tokens
# to skip?" and "What does a skipped token cost?"): the gate's probability weighs the expert output, the training mask
# is the deterministic logit > 0, and a skipped position runs a light FFN (width D / 4 unless
# light_d_ff says otherwise) in place of the experts. PTB, small, 600 s, LR 4e-3: test ppl
# 189.3 at 0.5 and 187.8 at 0.7, against 198.0 and 237.7 when a skipped position carries the
# last computed row (dense 177.7), and 243.0 at 0.5 for the seed's Bernoulli-drawn, unweighted
# gate (at LR 2e-3). A dense model (every gate open) never runs the light FFN. The small
# preset's light FFN is 128 wide (D) rather than 32: at 0.5 sparsity, 600 s, two seeds, test
# ppl 146.8 and 147.3 against 150.1 and 151.2, at 0.97-1.00x the tokens/s, +2.8% parameters
# (BENCHMARKS.md, "An hour at 32 heads"). The large preset keeps D / 4 (not measured there).
LEARNED_GATES = dict(gate_weight=True, gate_train_noise="none", gate_eval_mode="threshold",
                     skip_output="light")
PRESETS: dict[str, dict] = {
    "debug": dict(vocab_size=64, n_seq=32, d_model=32, n_layers=2, num_experts=4, top_k=1),
    "small": dict(vocab_size=10000, n_seq=128, d_model=128, n_layers=4, num_experts=4, top_k=1,
                  **MULTI_CHANNEL, **LEARNED_GATES, light_d_ff=128),
    "large": dict(vocab_size=50257, n_seq=1024, d_model=1024, n_layers=16, num_experts=8, top_k=2,
                  **MULTI_CHANNEL, **LEARNED_GATES),
}


def light_width(d_model: int, light_d_ff: int | None) -> int:
    """The hidden width of the light FFN a skipped position runs: `light_d_ff`, or d_model // 4
    (at least 1) when it is None."""
    return max(1, d_model // 4) if light_d_ff is None else light_d_ff


def check_gate_grad(prefix: str, skip_output: str, gate_grad: str) -> None:
    """gate_grad "contrast" needs what a computed position would output if skipped; with
    skip_output "light" that is its light FFN's output, which a computed position never runs."""
    if skip_output == "light" and gate_grad == "contrast":
        raise ValueError(f"{prefix}gate_grad='contrast' is not defined for skip_output='light' "
                         "(what a computed position would output if skipped needs its light "
                         "FFN too); use gate_grad='scale'")


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
    # training rate) or "threshold" (logit > 0); see sparsebk.model.gate
    gate_eval_mode: str = "quasi"
    # multi-channel BK mixing (sparsebk.model.layers): BK heads per layer, a learnt spectral shift
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
    # see sparsebk.model.layers
    skip_output: str = "carry"
    # "light" only: the width of the light FFN a skipped position runs (None: d_model // 4)
    light_d_ff: int | None = None
    # what the task gradient tells the gate: "scale" (whether a larger output helps) or
    # "contrast" (whether computing beats skipping); forward values identical (layers.py)
    gate_grad: str = "scale"
    # scale a computed position's expert output by the gate's probability sigmoid(logit), as
    # a Mixture-of-Experts router weighs its experts: the gate then learns where the experts'
    # work helps (sparsebk.model.layers)
    gate_weight: bool = False
    # the gate's training draw: "random" (logistic noise: a Bernoulli(sigmoid(logit)) mask) or
    # "none" (mask = logit > 0, deterministic; needs gate_eval_mode "threshold", the same rule)
    gate_train_noise: str = "random"
    # how the sparsity loss shares the budget: "layer" pulls every layer's sparsity to its own
    # target; "model" pulls the sparsity of all layers' masks together to the mean target, so
    # the gates choose which layers skip more (as Mixture-of-Depths routes some blocks only)
    sparsity_budget: str = "layer"
    # the output head: 0 = a full softmax over the vocabulary (tied to the embedding); c > 0 =
    # a two-level adaptive softmax (Grave et al. 2017), still tied: ids below c (the frequent
    # words, when ids are ordered by frequency as the word tokenizer orders them) in the first
    # level with one more entry for "the rest", the rest in a second softmax read only for the
    # targets that fall there. An exact distribution over the whole vocabulary (sparsebk.model.lm)
    head_cutoff: int = 0

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
        check_gate_grad("LMConfig.", self.skip_output, self.gate_grad)
        check_choice("LMConfig.sparsity_budget", self.sparsity_budget, SPARSITY_BUDGETS)
        self.head_cutoff = check_int("LMConfig.head_cutoff", self.head_cutoff, min=0)
        if self.vocab_size is not None and self.head_cutoff >= self.vocab_size:
            raise ValueError(f"LMConfig.head_cutoff={self.head_cutoff} must be below "
                             f"vocab_size={self.vocab_size} (0: a full softmax)")

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
