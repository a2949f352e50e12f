"""Sparsity objectives of the seed spec: pull a layer's measured sparsity towards a target.

A mask is (B, N) with 1 = compute and 0 = skip; the measured sparsity is 1 - mean(mask).
The loss must be built from the *live* mask (for a straight-through gate: hard forward, soft
backward) so that its gradient reaches the gate's logits; a detached mask gives a constant.

Everything here is vectorised: no Python branch on a tensor value and no host sync, so the
loss can sit on the training hot path. A Python-float target stays a Python scalar in the
arithmetic (no host-to-device copy per step).
"""

from __future__ import annotations

import math
from typing import Union

import torch

from sparsebk.validation import check_choice, check_float

LOSS_TYPES = ("l2", "l1", "kl", "adaptive")

Target = Union[float, torch.Tensor]

__all__ = ["LOSS_TYPES", "measured_sparsity", "sparsity_loss", "balanced_sparsity_loss"]


def _check_mask(mask: torch.Tensor) -> torch.Tensor:
    """Returns the mask in the dtype the loss is computed in (float32 at least)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor (B, N), got {type(mask).__name__}")
    if mask.dim() == 0 or mask.numel() == 0:
        raise ValueError(f"mask must be a non-empty (B, N) tensor, got shape {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"mask must be real (1 = compute, 0 = skip), got dtype {mask.dtype}")
    if not mask.is_floating_point():
        # bool / integer masks carry no gradient; they are still valid for measuring.
        return mask.to(torch.float32)
    if mask.dtype in (torch.float16, torch.bfloat16):
        # a mean over B*N entries in half precision loses the small deviations the loss is about
        return mask.float()
    return mask


def _check_target(target: Target) -> Target:
    """A Python float must lie in [0, 1] (1 is a valid loss target: every formula is defined there;
    a layer's own target is a sparsity in [0, 1), checked by its setter). A 0-dim tensor is
    range-checked when it lives on the CPU (reading it there costs no device sync); on an
    accelerator it is used as given, because checking it would force the host to wait for the
    device on every step."""
    if isinstance(target, torch.Tensor):
        if target.dim() != 0:
            raise ValueError(f"target must be a float or a 0-dim tensor, got shape {tuple(target.shape)}")
        if target.device.type == "cpu":
            check_float("target", float(target), min=0.0, max=1.0)
        return target
    return check_float("target", target, min=0.0, max=1.0)


def measured_sparsity(mask: torch.Tensor) -> torch.Tensor:
    """1 - mean(mask) as a 0-dim tensor, differentiable w.r.t. a floating-point mask."""
    m = _check_mask(mask)
    return 1.0 - m.mean()


def _xlogy_const(x: float) -> float:
    return 0.0 if x == 0.0 else x * math.log(x)


def _bernoulli_kl(target: Target, sparsity: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """KL(Bern(target) || Bern(sparsity)); density = 1 - sparsity, computed from the mask directly
    so that neither side suffers the cancellation of 1 - (1 - x).

    At the boundary (sparsity or density exactly 0) the KL is infinite for any target that puts
    mass there. Each side is therefore moved up to the dtype's machine epsilon, the smallest
    step float precision needs, in value only: the gradient is the one of the KL at that nearest
    interior point (finite, |d/ds| <= 1/eps), so a layer stuck at full density still gets pushed.
    A plain clamp would zero the gradient exactly there.
    """
    eps = torch.finfo(sparsity.dtype).eps
    s = sparsity + (sparsity.clamp_min(eps) - sparsity).detach()
    d = density + (density.clamp_min(eps) - density).detach()
    if isinstance(target, torch.Tensor):
        t = target.to(dtype=sparsity.dtype, device=sparsity.device)
        const = torch.xlogy(t, t) + torch.xlogy(1.0 - t, 1.0 - t)
        return const - torch.xlogy(t, s) - torch.xlogy(1.0 - t, d)
    const = _xlogy_const(target) + _xlogy_const(1.0 - target)
    return const - torch.xlogy(target, s) - torch.xlogy(1.0 - target, d)


def sparsity_loss(mask: torch.Tensor, target: Target, loss_type: str = "l2", *,
                  delta: float = 0.1) -> torch.Tensor:
    """Penalty on the distance between the measured sparsity of `mask` and `target`.

    mask: (B, N), 1 = compute, 0 = skip (float for a gradient; bool/int masks only measure).
    target: float or 0-dim tensor in [0, 1].
    loss_type: "l2" (d^2), "l1" (|d|), "kl" (KL(target || current) of two Bernoullis) or
        "adaptive" (Huber with threshold `delta`: 0.5 d^2 for |d| < delta, else
        delta (|d| - 0.5 delta)), where d = current - target.
    Returns a 0-dim tensor in float32 (or the mask's dtype when wider).
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_float("delta", delta, min=0.0, min_open=True)
    m = _check_mask(mask)
    target = _check_target(target)

    density = m.mean()  # ()
    current = 1.0 - density
    if isinstance(target, torch.Tensor):
        # keep the loss in the mask's compute dtype (a float64 target must not promote it)
        target = target.to(dtype=current.dtype, device=current.device)
    if loss_type == "kl":
        # (1 - m).mean() rather than 1 - density: exact near sparsity 0
        return _bernoulli_kl(target, (1.0 - m).mean(), density)
    diff = current - target
    if loss_type == "l2":
        return diff * diff
    if loss_type == "l1":
        return diff.abs()
    # adaptive (Huber): both branches are evaluated, torch.where picks one without a host sync
    ad = diff.abs()
    return torch.where(ad < delta, 0.5 * diff * diff, delta * (ad - 0.5 * delta))


def balanced_sparsity_loss(mask: torch.Tensor, accuracy_loss: torch.Tensor, target: Target, *,
                           sparsity_weight: float = 1.0, accuracy_weight: float = 1.0,
                           loss_type: str = "adaptive") -> tuple[torch.Tensor, dict]:
    """accuracy_weight * accuracy_loss + sparsity_weight * sparsity_loss(mask, target, loss_type).

    Returns (total, info). `info` has the seed's keys: total_loss, accuracy_loss, sparsity_loss,
    current_sparsity (detached 0-dim tensors: converting them to floats is the caller's choice,
    off the hot path), sparsity_weight, accuracy_weight (floats) and target_sparsity (as given).
    """
    sparsity_weight = check_float("sparsity_weight", sparsity_weight, min=0.0)
    accuracy_weight = check_float("accuracy_weight", accuracy_weight, min=0.0)
    if not isinstance(accuracy_loss, torch.Tensor) or accuracy_loss.dim() != 0:
        shape = tuple(accuracy_loss.shape) if isinstance(accuracy_loss, torch.Tensor) else type(accuracy_loss).__name__
        raise ValueError(f"accuracy_loss must be a 0-dim tensor, got {shape}")
    s_loss = sparsity_loss(mask, target, loss_type)
    total = accuracy_weight * accuracy_loss + sparsity_weight * s_loss
    with torch.no_grad():
        current = 1.0 - _check_mask(mask).mean()
    info = {
        "total_loss": total.detach(),
        "accuracy_loss": accuracy_loss.detach(),
        "sparsity_loss": s_loss.detach(),
        "sparsity_weight": sparsity_weight,
        "accuracy_weight": accuracy_weight,
        "current_sparsity": current,
        "target_sparsity": target.detach() if isinstance(target, torch.Tensor) else float(target),
    }
    return total, info
