"""Config validation, each rule written once: every config class calls these.

Every error is a ValueError of the form "<field>=<value!r>: <why>", where <field> is the
name the user wrote (a dotted YAML path such as "optim.lr", or "LMConfig.d_model"); callers
that load a file prefix its name. Checkers return the value in its canonical type (an int
stays an int, a float is a float), so a dataclass can write `self.x = check_float(...)`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, fields
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = ["field_error", "check_int", "check_float", "check_bool", "check_choice",
           "check_sparsity", "check_list", "check_sparsity_targets", "check_known", "from_mapping"]


def field_error(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{name}={value!r}: {why}")


def check_int(name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int:
    """An int (bool is not an int here) in [min, max]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise field_error(name, value, "must be an integer")
    if min is not None and value < min:
        raise field_error(name, value, f"must be >= {min}")
    if max is not None and value > max:
        raise field_error(name, value, f"must be <= {max}")
    return int(value)


def check_float(name: str, value: Any, *, min: float | None = None, max: float | None = None,
                min_open: bool = False, max_open: bool = False) -> float:
    """A finite real number (int or float, not bool) in the interval the bounds describe."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise field_error(name, value, "must be a finite number")
    if min is not None and (value < min or (min_open and value == min)):
        raise field_error(name, value, f"must be {'>' if min_open else '>='} {min}")
    if max is not None and (value > max or (max_open and value == max)):
        raise field_error(name, value, f"must be {'<' if max_open else '<='} {max}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise field_error(name, value, "must be true or false")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in tuple(choices):
        raise field_error(name, value, f"choose one of {tuple(choices)}")
    return value


def check_sparsity(name: str, value: Any) -> float:
    """A sparsity (fraction of skipped positions): in [0, 1). 1 would skip every position."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0.0 <= value < 1.0):
        raise field_error(name, value, "must be a sparsity in [0, 1)")
    return float(value)


def check_list(name: str, value: Any, check: Callable[[str, Any], Any],
               what: str = "one value per layer") -> list:
    """A non-empty list (any iterable but a string), each item checked by
    check(f"{name}[i]", item) and returned in the form `check` returns."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise field_error(name, value, f"must be a list: {what}")
    out = [check(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if not out:
        raise field_error(name, value, f"must not be empty: {what}")
    return out


def check_sparsity_targets(name: str, value: Any, n_layers: int | None = None) -> list[float]:
    """A per-layer list of sparsities (its length checked when n_layers is given)."""
    out = check_list(name, value, check_sparsity, "one sparsity per layer")
    if n_layers is not None and len(out) != n_layers:
        raise field_error(name, value, f"has {len(out)} per-layer targets for a model with "
                          f"{n_layers} layers")
    return out


def check_known(prefix: str, d: Mapping, known: Iterable[str], what: str = "field") -> None:
    """Every key of `d` is in `known`; else a ValueError naming "<prefix>.<key>"."""
    known = set(known)
    for k in d:
        if k not in known:
            name = f"{prefix}.{k}" if prefix else str(k)
            raise field_error(name, d[k], f"unknown {what}; known: {sorted(known)}")


def from_mapping(cls, d: Any, prefix: str):
    """Build dataclass `cls` from a mapping: unknown and missing fields are ValueErrors naming
    "<prefix>.<field>"; the class's own __post_init__ checks the values."""
    if not isinstance(d, Mapping):
        raise field_error(prefix, d, f"must be a mapping of {cls.__name__} fields")
    check_known(prefix, d, (f.name for f in fields(cls)))
    missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{prefix}: missing required field(s) {missing}")
    return cls(**d)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values. An empty section contributes no
    field (a checkpoint from before the schedule section was typed stores `schedule: {}`
    for "every field at its default")."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
