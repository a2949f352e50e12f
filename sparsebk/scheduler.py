"""AdaptiveSparsityScheduler: the seed spec's ramp of sparsity target and loss weight.

Per step (the counter is advanced first, so the first `step()` returns step 1):

    progress = min(1, step / warmup_steps)
    linear:  target = initial + progress (final - initial)
    cosine:  target = initial + 0.5 (final - initial)(1 - cos(pi progress))
    step:    target = initial                        progress < 0.25
                      initial + 0.33 (final - initial) progress < 0.5
                      initial + 0.67 (final - initial) progress < 0.75
                      final                           otherwise
    weight = initial_weight + progress (final_weight - initial_weight)

Adaptive adjustment: `current_accuracy` is a validation LOSS (lower is better). When it is
given and exceeds `accuracy_threshold`, that step's target is multiplied by 0.9 and its weight
by 0.5. The adjustment is memoryless: it depends only on the value passed with that step. The
best (lowest) value seen is tracked in `best_accuracy` and kept in the state dict, but it never
feeds back into the values. Consequently `state_at(step, current_accuracy)` returns exactly what
`step(current_accuracy)` returns at that step, whatever validation history the scheduler has
seen; and a run that never saw validation values gets `state_at(step) == step()`. A caller that
validates every K steps and wants the reduction to last until the next validation passes the
latest validation loss with every step (the training side's schedule actor holds it).

Per-layer targets (the seed's first future enhancement), at most one of:
- `layer_scales`: layer i's target = clip(scale_i * target, 0, MAX_LAYER_SPARSITY);
- `layer_final_sparsity`: layer i ramps from `initial_sparsity` to its own final value with the
  same schedule; the adaptive factor 0.9 applies to it as well.
The dict then carries `layer_targets` (list of floats); `sparsity_target` stays the global
schedule's value (what a single-target consumer uses).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import InitVar, dataclass
from typing import Optional, Sequence

from sparsebk.validation import (check_choice, check_float, check_int, check_list,
                                 check_sparsity, check_sparsity_targets, field_error)

logger = logging.getLogger(__name__)

SCHEDULE_TYPES = ("linear", "cosine", "step")
# Per-layer targets are clipped below 1: a layer that skips every position computes nothing.
MAX_LAYER_SPARSITY = 0.99
# The seed's adaptive factors, applied while the validation loss is above the threshold.
ADAPT_TARGET_FACTOR = 0.9
ADAPT_WEIGHT_FACTOR = 0.5
_STATE_VERSION = 1

__all__ = ["SCHEDULE_TYPES", "MAX_LAYER_SPARSITY", "SchedulerConfig", "AdaptiveSparsityScheduler"]


def _check_loss(name: str, value) -> Optional[float]:
    """A validation loss or None: a finite real number, from Python, numpy (a scalar) or torch
    (a 0-dim tensor; converting it is a host sync, off the hot path)."""
    if value is None:
        return None
    if not isinstance(value, (bool, int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise field_error(name, value, "must be a finite number (a validation loss) "
                              "or None") from None
    return check_float(name, value)


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's fixed parameters, validated here (once), JSON-able through `to_dict()`.
    It is also the training config's `schedule` section (sparsebk.train.config), which builds
    it with `prefix="schedule."` so that an error names the field as the YAML file does."""

    initial_sparsity: float = 0.2
    final_sparsity: float = 0.5
    initial_weight: float = 0.001
    final_weight: float = 0.01
    warmup_steps: int = 1000
    schedule_type: str = "cosine"
    accuracy_threshold: Optional[float] = None
    layer_scales: Optional[tuple] = None
    layer_final_sparsity: Optional[tuple] = None
    prefix: InitVar[str] = ""  # how error messages name the fields ("schedule." in a YAML file)

    def __post_init__(self, prefix: str):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        name = lambda k: prefix + k  # noqa: E731
        for k in ("initial_sparsity", "final_sparsity"):
            set_(k, check_sparsity(name(k), getattr(self, k)))
        for k in ("initial_weight", "final_weight"):
            set_(k, check_float(name(k), getattr(self, k), min=0.0))
        check_int(name("warmup_steps"), self.warmup_steps, min=1)
        check_choice(name("schedule_type"), self.schedule_type, SCHEDULE_TYPES)
        set_("accuracy_threshold", _check_loss(name("accuracy_threshold"), self.accuracy_threshold))
        if self.layer_scales is not None and self.layer_final_sparsity is not None:
            raise field_error(name("layer_final_sparsity"), self.layer_final_sparsity,
                              f"give layer_scales or layer_final_sparsity, not both (got "
                              f"{name('layer_scales')}={self.layer_scales!r})")
        if self.layer_scales is not None:
            set_("layer_scales", tuple(check_list(
                name("layer_scales"), self.layer_scales, lambda k, v: check_float(k, v, min=0.0),
                "one non-negative scale per layer")))
        if self.layer_final_sparsity is not None:
            set_("layer_final_sparsity", tuple(check_sparsity_targets(
                name("layer_final_sparsity"), self.layer_final_sparsity)))

    @property
    def num_layers(self) -> Optional[int]:
        per_layer = self.layer_scales if self.layer_scales is not None else self.layer_final_sparsity
        return None if per_layer is None else len(per_layer)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("layer_scales", "layer_final_sparsity"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


class AdaptiveSparsityScheduler:
    """Ramps the sparsity target and the sparsity-loss weight over `warmup_steps` steps.

    `step(current_accuracy=None)` advances the counter and returns
    {"sparsity_target", "loss_weight", "progress", "step"} (+ "layer_targets" when per-layer
    targets are configured). `state_at(step, current_accuracy=None)` computes the same dict for
    any step without touching the scheduler. See the module docstring for the formulas.
    """

    def __init__(self, initial_sparsity: float = 0.2, final_sparsity: float = 0.5,
                 initial_weight: float = 0.001, final_weight: float = 0.01,
                 warmup_steps: int = 1000, schedule_type: str = "cosine",
                 accuracy_threshold: Optional[float] = None,
                 layer_scales: Optional[Sequence[float]] = None,
                 layer_final_sparsity: Optional[Sequence[float]] = None):
        self.config = SchedulerConfig(
            initial_sparsity=initial_sparsity, final_sparsity=final_sparsity,
            initial_weight=initial_weight, final_weight=final_weight,
            warmup_steps=warmup_steps, schedule_type=schedule_type,
            accuracy_threshold=accuracy_threshold, layer_scales=layer_scales,
            layer_final_sparsity=layer_final_sparsity)
        self.current_step = 0
        self.best_accuracy: Optional[float] = None

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> "AdaptiveSparsityScheduler":
        """A scheduler at step 0 over an already validated config (a training config's
        `schedule` section): the config is used as it is, not checked again."""
        if not isinstance(config, SchedulerConfig):
            raise ValueError(f"config must be a SchedulerConfig, got {type(config).__name__}")
        self = cls.__new__(cls)
        self.config, self.current_step, self.best_accuracy = config, 0, None
        return self

    # --- the pure part -------------------------------------------------------------------
    def _ramp(self, initial: float, final: float, progress: float) -> float:
        kind = self.config.schedule_type
        if kind == "linear":
            return initial + progress * (final - initial)
        if kind == "cosine":
            return initial + 0.5 * (final - initial) * (1.0 - math.cos(math.pi * progress))
        # "step"
        if progress < 0.25:
            return initial
        if progress < 0.5:
            return initial + 0.33 * (final - initial)
        if progress < 0.75:
            return initial + 0.67 * (final - initial)
        return final

    def state_at(self, step: int, current_accuracy=None) -> dict:
        """The dict `step(current_accuracy)` returns when it brings the counter to `step`.
        Side-effect free (the counter and best_accuracy are untouched)."""
        check_int("step", step, min=0)
        acc = _check_loss("current_accuracy", current_accuracy)
        cfg = self.config
        progress = min(1.0, step / cfg.warmup_steps)
        target = self._ramp(cfg.initial_sparsity, cfg.final_sparsity, progress)
        weight = cfg.initial_weight + progress * (cfg.final_weight - cfg.initial_weight)
        factor = 1.0
        if acc is not None and cfg.accuracy_threshold is not None and acc > cfg.accuracy_threshold:
            factor = ADAPT_TARGET_FACTOR
            weight *= ADAPT_WEIGHT_FACTOR
        out = {"sparsity_target": target * factor, "loss_weight": weight,
               "progress": progress, "step": step}
        if cfg.layer_scales is not None:
            out["layer_targets"] = [min(max(s * target * factor, 0.0), MAX_LAYER_SPARSITY)
                                    for s in cfg.layer_scales]
        elif cfg.layer_final_sparsity is not None:
            out["layer_targets"] = [self._ramp(cfg.initial_sparsity, f, progress) * factor
                                    for f in cfg.layer_final_sparsity]
        return out

    # --- the stateful part ---------------------------------------------------------------
    def step(self, current_accuracy=None) -> dict:
        """Advance the counter by one and return that step's values."""
        out = self.state_at(self.current_step + 1, current_accuracy)  # validates first
        self.current_step += 1
        acc = _check_loss("current_accuracy", current_accuracy)
        if acc is not None and (self.best_accuracy is None or acc < self.best_accuracy):
            self.best_accuracy = acc
        return out

    def reset(self) -> None:
        """Back to step 0 with no validation history."""
        self.current_step = 0
        self.best_accuracy = None

    def state_dict(self) -> dict:
        """Plain JSON-able Python values: the config, the counter and the best validation loss."""
        return {"version": _STATE_VERSION, "config": self.config.to_dict(),
                "step": self.current_step, "best_accuracy": self.best_accuracy}

    def load_state_dict(self, state: dict) -> None:
        """Restore config and progress, so that the next `step()` continues the saved run exactly.
        The saved config wins over the one this scheduler was built with (logged when they differ)."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in ("version", "config", "step", "best_accuracy") if k not in state]
        if missing:
            raise ValueError(f"scheduler state is missing keys {missing}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"scheduler state version={state['version']!r} is not {_STATE_VERSION}")
        if not isinstance(state["config"], dict):
            raise ValueError(f"scheduler state config={state['config']!r} must be a dict")
        unknown = sorted(set(state["config"]) - {f.name for f in dataclasses.fields(SchedulerConfig)})
        if unknown:
            raise ValueError(f"scheduler state config has unknown keys {unknown}")
        config = SchedulerConfig(**copy.deepcopy(state["config"]))
        step = state["step"]
        check_int("scheduler state step", step, min=0)
        best = _check_loss("best_accuracy", state["best_accuracy"])
        if config != self.config:
            logger.info("scheduler config replaced by the checkpoint's: %s -> %s",
                        self.config.to_dict(), config.to_dict())
        self.config, self.current_step, self.best_accuracy = config, step, best

    def __repr__(self) -> str:
        return (f"AdaptiveSparsityScheduler(step={self.current_step}, "
                f"best_accuracy={self.best_accuracy}, config={self.config.to_dict()})")
