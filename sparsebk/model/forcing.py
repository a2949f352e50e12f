"""Forcing a model's gates, for benchmarks and ablations: one context manager for every way.

    with forced_gates(model, "rate", rate=0.5, generator=g):   # a SparseBKLM or one layer
        loss, sparsity = evaluate(model, blocks, ...)           # the model's own forward

Inside the block every sparse layer's gate is forced as `mode` says; on exit everything is
as it was (the layers' methods, the importance predictors' weights and requires_grad), also
when the block raises. What each mode forces, and what it leaves of the learned gate:

    mode             mask (forward value)        logit l, gate weight       gradient to the gate
    "open"           1 at every position         the predictor's,           straight-through
    "closed"         0 at every position         sigmoid(l) with            through the forced
    "rate"           0 with probability `rate`   `gate_weight`              mask, as for a
    "mask"           masks[k] for layer k                                   learned one
    "pinned_open"    1 (the gate's own decision)  pinned at +30, weight 1   none (frozen)
    "pinned_closed"  0 (the gate's own decision)  pinned at -30, weight 0   none (frozen)
    "calibrated"     the gate's own decision     bias at a quantile         the gate's own

The first four replace the mask's forward value through the gate's `force` path
(`SparseBKCore.gate_parts(x, force_mask)`, the code a learned mask takes; in decoding, the
layer's `decide`): the layer's outputs follow from the forced mask and its real logits, the
sparsity loss reads the forced mask, and in training the predictor still gets the
straight-through gradient d sigmoid(l / tau) through it. "rate" draws a fresh mask at every
forward from `generator` (layer by layer; a recomputed forward under activation checkpointing
would draw another: use "mask" there); `rate` is one rate or one per layer.

"pinned_open" is the dense model: each predictor's weight is 0 and its bias +30, frozen, so
l = 30 everywhere: the mask is 1 on every path (forward, training noise included: the
logistic noise of a float32 sample stays above -17; decoding) with no method replaced,
sigmoid(l) is exactly 1.0 in float32 (so `gate_weight` leaves the experts' outputs as they
are) and the gate learns nothing. Without `gate_weight` it computes what "open" does; with
it, "open" keeps the learned sigmoid(l) factors and "pinned_open" does not. "pinned_closed"
is the same at -30: every position skipped (a "light" FFN weighted by 1 - sigmoid(l) = 1).

"calibrated" leaves each gate deciding by its own logit, with its bias set (layer by layer,
eval mode) to minus the `rate`-quantile of w.x over the positions of `tokens`, so that the
threshold eval gate skips that fraction of them (the "quasi" gate about that fraction): a gate
of a given rate that still chooses its tokens, for timing a model without training one.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from sparsebk.model.layers import SparseMoEResNetBKLayer
from sparsebk.validation import check_choice, check_float, check_list, field_error

__all__ = ["forced_gates", "GATE_MODES"]

FORCED_MASKS = ("open", "closed", "rate", "mask")  # through the gate's force path
PINNED = {"pinned_open": 30.0, "pinned_closed": -30.0}  # sigmoid(30) rounds to 1.0 in float32
GATE_MODES = (*FORCED_MASKS, *PINNED, "calibrated")

MaskMaker = Callable[[int, torch.Size, torch.Tensor], torch.Tensor]  # (layer, (B, N), x)


def _sparse_layers(model: nn.Module) -> list[SparseMoEResNetBKLayer]:
    if isinstance(model, SparseMoEResNetBKLayer):
        return [model]
    layers = list(getattr(model, "layers", None) or [])
    if not layers or not all(isinstance(x, SparseMoEResNetBKLayer) for x in layers):
        raise ValueError(f"forced_gates takes a SparseBKLM or a SparseMoEResNetBKLayer, got "
                         f"{type(model).__name__}")
    return layers


@contextmanager
def forced_gates(model: nn.Module, mode: str, *, rate: float | Sequence[float] | None = None,
                 masks: Sequence[torch.Tensor] | None = None,
                 generator: torch.Generator | None = None,
                 tokens: torch.Tensor | None = None) -> Iterator[None]:
    """Force the gates of `model` (a SparseBKLM, or one SparseMoEResNetBKLayer) inside the
    block; see the module docstring for the modes. `rate`: "rate" (one, or one per layer, in
    [0, 1]) and "calibrated" (in (0, 1)); `masks`: "mask", one 0/1 tensor (B, N) per layer;
    `generator`: "rate"'s draws (None: torch's global one); `tokens`: "calibrated"'s input
    (what `model` takes)."""
    layers = _sparse_layers(model)
    check_choice("mode", mode, GATE_MODES)
    with ExitStack() as stack:
        if mode in FORCED_MASKS:
            stack.enter_context(_forced_masks(layers, _mask_maker(mode, len(layers), rate, masks,
                                                                  generator)))
        else:
            preds = stack.enter_context(_predictors_restored(layers))
            if mode in PINNED:
                _pin(preds, PINNED[mode])
            else:
                if tokens is None:
                    raise field_error("tokens", tokens, "mode 'calibrated' calibrates on tokens")
                _calibrate(model, preds, tokens, check_float("rate", rate, min=0.0, max=1.0,
                                                             min_open=True, max_open=True))
        yield


def _mask_maker(mode: str, n_layers: int, rate, masks, generator) -> MaskMaker:
    """make(k, (B, N), x) -> layer k's forced 0/1 mask (B, N) on x's device."""
    if mode == "open":
        return lambda k, shape, x: torch.ones(shape, device=x.device)
    if mode == "closed":
        return lambda k, shape, x: torch.zeros(shape, device=x.device)
    if mode == "rate":
        one = lambda name, v: check_float(name, v, min=0.0, max=1.0)  # noqa: E731
        rates = ([one("rate", rate)] * n_layers if isinstance(rate, (int, float))
                 else check_list("rate", rate, one, "one skip rate per layer"))
        if len(rates) != n_layers:
            raise field_error("rate", rate, f"has {len(rates)} rates for {n_layers} layers")
        return lambda k, shape, x: (torch.rand(shape, generator=generator) >= rates[k]).to(
            device=x.device, dtype=torch.float32)
    if masks is None or len(masks) != n_layers:
        raise field_error("masks", masks, f"mode 'mask' takes one (B, N) mask per layer "
                          f"({n_layers})")

    def given(k: int, shape: torch.Size, x: torch.Tensor) -> torch.Tensor:
        if tuple(masks[k].shape) != tuple(shape):
            raise ValueError(f"masks[{k}] has shape {tuple(masks[k].shape)}; layer {k} is "
                             f"called on (B, N) = {tuple(shape)}")
        return masks[k].to(x.device)

    return given


@contextmanager
def _forced_masks(layers: list[SparseMoEResNetBKLayer], make: MaskMaker) -> Iterator[None]:
    """Each layer's `gate_parts` (forward) and `decide` (decoding) answer with make's mask as
    the forward value, through the core's own methods; an instance attribute shadows the
    method, and on exit whatever the instance held before comes back."""
    cores = [layer.sparse_bk_core for layer in layers]
    held = [{n: core.__dict__[n] for n in ("gate_parts", "decide") if n in core.__dict__}
            for core in cores]
    for k, core in enumerate(cores):
        def gate_parts(x, force_mask=None, core=core, k=k):  # the context's mask wins
            return type(core).gate_parts(core, x, make(k, x.shape[:2], x))

        def decide(x, start, core=core, k=k):
            _, logits = type(core).decide(core, x, start)
            return make(k, x.shape[:2], x) > 0.5, logits

        core.gate_parts, core.decide = gate_parts, decide
    try:
        yield
    finally:
        for core, before in zip(cores, held):
            for name in ("gate_parts", "decide"):
                core.__dict__.pop(name, None)
                if name in before:
                    core.__dict__[name] = before[name]


@contextmanager
def _predictors_restored(layers: list[SparseMoEResNetBKLayer]) -> Iterator[list[nn.Linear]]:
    """The layers' importance predictors; on exit their weights, biases and requires_grad are
    put back (in place: an optimizer holding them keeps the same tensors)."""
    preds = [layer.sparse_bk_core.importance_predictor for layer in layers]
    saved = [[(p.detach().clone(), p.requires_grad) for p in (lin.weight, lin.bias)]
             for lin in preds]
    try:
        yield preds
    finally:
        with torch.no_grad():
            for lin, params in zip(preds, saved):
                for p, (value, grad) in zip((lin.weight, lin.bias), params):
                    p.copy_(value)
                    p.requires_grad_(grad)


@torch.no_grad()
def _pin(preds: list[nn.Linear], logit: float) -> None:
    for lin in preds:
        lin.weight.zero_()
        lin.bias.fill_(logit)
        lin.requires_grad_(False)


@torch.no_grad()
def _calibrate(model: nn.Module, preds: list[nn.Linear], tokens: torch.Tensor, rate: float) -> None:
    """Layer by layer (each one's input depends on the layers before it only): the eval
    forward's w.x over every position of `tokens`, and the bias -quantile(w.x, rate)."""
    was_training = model.training
    model.eval()
    try:
        for lin in preds:
            seen = []
            hook = lin.register_forward_hook(lambda m, i, o: seen.append(i[0] @ m.weight.t()))
            try:
                model(tokens)
            finally:
                hook.remove()
            lin.bias.fill_(-float(torch.quantile(seen[0].flatten().float(), rate)))
    finally:
        model.train(was_training)
