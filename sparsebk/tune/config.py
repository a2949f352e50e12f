"""Sweep configuration: a YAML file -> validated dataclasses, checked before any trial starts.

A sweep file names a training config (the same YAML `sparsebk train` takes), overrides for
it, a search space over named parameters, the search algorithm, ASHA early stopping,
concurrency, retries and the sparsity levels the report answers for. Every search-space
parameter maps to one dotted field of the training config; `check_against_train` applies each
parameter's extreme values to the real training config so a value the trainer would reject
fails here, naming the sweep file and the parameter.

    name: sweep-tiny
    train_config: ray_jobs/configs/tiny.yaml
    train_overrides: [run.num_workers=1]
    search: {algorithm: grid, num_samples: 1, seed: 0}
    space:
      loss_type: {grid: [l2, adaptive]}
      sparsity_weight: {loguniform: [1.0e-3, 1.0e-1]}
      lr: {key: optim.lr, choice: [1.0e-3, 3.0e-3]}
      tau: 1.0                      # fixed for every trial
    asha: {enabled: true, grace_period: 1, reduction_factor: 2}
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

ALGORITHMS = ("grid", "random", "optuna")
KINDS = ("value", "choice", "grid", "uniform", "loguniform", "randint")

# The named parameters of the issue and the training-config field each one sets.
# Any other dotted training field can be swept by giving `key:` explicitly.
DEFAULT_KEYS = {
    "loss_type": "model.sparsity_loss_type",
    "sparsity_weight": "schedule.final_weight",
    # loss = accuracy_weight * ce + weighted sparsity + aux (the seed's balanced loss)
    "accuracy_weight": "model.accuracy_weight",
    "schedule_type": "schedule.schedule_type",
    "final_sparsity": "schedule.final_sparsity",
    "warmup_steps": "schedule.warmup_steps",
    "tau": "model.tau",
    "lr": "optim.lr",
}


def _number(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: {v!r} is not a finite number")
    return float(v)


@dataclass
class ParamSpec:
    """One search-space parameter. kind: value | choice | grid | uniform | loguniform | randint."""

    name: str
    key: str
    kind: str
    values: list = field(default_factory=list)   # value (1 item), choice, grid
    low: float | None = None                     # uniform, loguniform, randint (high exclusive)
    high: float | None = None

    def __post_init__(self):
        where = f"space.{self.name}"
        if not self.key or any(not part for part in self.key.split(".")):
            raise ValueError(f"{where}.key: {self.key!r} is not a dotted training-config field")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind in ("choice", "grid") and not self.values:
            raise ValueError(f"{where}.{self.kind}: needs a non-empty list of values")
        if self.kind in ("uniform", "loguniform", "randint"):
            lo = _number(f"{where}.{self.kind}[0]", self.low)
            hi = _number(f"{where}.{self.kind}[1]", self.high)
            if not lo < hi:
                raise ValueError(f"{where}.{self.kind}: low {lo!r} must be below high {hi!r}")
            if self.kind == "loguniform" and lo <= 0:
                raise ValueError(f"{where}.loguniform: low {lo!r} must be > 0")
            if self.kind == "randint" and (lo != int(lo) or hi != int(hi)):
                raise ValueError(f"{where}.randint: bounds [{lo}, {hi}) must be integers")

    @classmethod
    def from_yaml(cls, name: str, spec: Any) -> "ParamSpec":
        where = f"space.{name}"
        if not isinstance(spec, dict):  # a bare value: fixed for every trial
            if name not in DEFAULT_KEYS:
                cls._needs_key(name)
            return cls(name, DEFAULT_KEYS[name], "value", [spec])
        spec = dict(spec)
        key = spec.pop("key", DEFAULT_KEYS.get(name))
        if key is None:
            cls._needs_key(name)
        kinds = [k for k in spec if k in KINDS]
        unknown = [k for k in spec if k not in KINDS]
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown} (expected key and one of {KINDS})")
        if len(kinds) != 1:
            raise ValueError(f"{where}: give exactly one of {KINDS}, got {kinds or 'none'}")
        kind = kinds[0]
        arg = spec[kind]
        if kind == "value":
            return cls(name, key, kind, [arg])
        if kind in ("choice", "grid"):
            if not isinstance(arg, list):
                raise ValueError(f"{where}.{kind}: {arg!r} is not a list")
            return cls(name, key, kind, list(arg))
        if not (isinstance(arg, list) and len(arg) == 2):
            raise ValueError(f"{where}.{kind}: {arg!r} is not a [low, high] pair")
        return cls(name, key, kind, [], arg[0], arg[1])

    @staticmethod
    def _needs_key(name: str):
        raise ValueError(f"space.{name}: not a known parameter ({sorted(DEFAULT_KEYS)}); "
                         f"give `key: <section.field>` of the training config")

    @property
    def encoded(self) -> bool:
        """Choices that are lists or mappings travel through Tune as JSON strings (Tune's
        variant generator would read a list as nested parameters; Optuna takes scalars)."""
        return self.kind in ("choice", "grid") and any(
            isinstance(v, (list, dict, tuple)) for v in self.values)

    def extremes(self) -> list:
        """Values that bound what a trial can see: every listed value, or both ends."""
        if self.kind in ("value", "choice", "grid"):
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high) - 1]
        return [float(self.low), float(self.high)]


@dataclass
class SearchConfig:
    algorithm: str = "random"
    num_samples: int | None = None  # grid: repeats of the whole grid (default 1);
                                    # random/optuna: trials (default 4)
    seed: int = 0
    metric: str = "val_loss"   # single objective (and the ASHA metric)
    mode: str = "min"
    multi_objective: bool = True  # optuna only: (val_loss min, sparsity max)
    points_to_evaluate: list = field(default_factory=list)  # random/optuna: these come first

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"search.algorithm: {self.algorithm!r} is not one of {ALGORITHMS}")
        if self.num_samples is None:
            self.num_samples = 1 if self.algorithm == "grid" else 4
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) \
                or self.num_samples < 1:
            raise ValueError(f"search.num_samples: {self.num_samples!r} must be an integer >= 1")
        if self.mode not in ("min", "max"):
            raise ValueError(f"search.mode: {self.mode!r} must be 'min' or 'max'")
        if not isinstance(self.points_to_evaluate, list) or \
                any(not isinstance(pt, dict) for pt in self.points_to_evaluate):
            raise ValueError(f"search.points_to_evaluate: {self.points_to_evaluate!r} must be a "
                             f"list of {{parameter: value}} mappings")
        if self.points_to_evaluate and self.algorithm == "grid":
            raise ValueError("search.points_to_evaluate: not used by algorithm 'grid'")


@dataclass
class AshaConfig:
    enabled: bool = True
    grace_period: int = 1      # evaluations before a trial can be stopped
    reduction_factor: int = 2
    max_t: int | None = None   # evaluations of a full trial; None: read from the training config

    def __post_init__(self):
        if not isinstance(self.grace_period, int) or self.grace_period < 1:
            raise ValueError(f"asha.grace_period: {self.grace_period!r} must be an integer >= 1")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 2:
            raise ValueError(f"asha.reduction_factor: {self.reduction_factor!r} must be an integer >= 2")
        if self.max_t is not None and (not isinstance(self.max_t, int) or self.max_t < self.grace_period):
            raise ValueError(f"asha.max_t: {self.max_t!r} must be an integer >= grace_period")


@dataclass
class SweepConfig:
    name: str
    train_config: str
    train_overrides: list[str] = field(default_factory=list)
    storage_path: str | None = None        # None: the training config's run.storage_path
    report_path: str | None = None         # a path or URI (s3://...); None: SWEEP_DIR/report
    space: dict[str, ParamSpec] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    asha: AshaConfig = field(default_factory=AshaConfig)
    max_concurrent_trials: int | None = None  # None: from cluster resources / per-trial need
    trial_cpus: float = 0.01   # the trial function only waits on its Train controller
                               # (Tune refuses a zero request)
    max_retries: int = 0       # a failing trial is re-run this many times, then recorded
    sparsity_levels: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    last_k: int = 3            # evaluations averaged for "mean achieved sparsity"
    source: str = "<dict>"     # the file this came from, for messages

    def __post_init__(self):
        self._check_names()
        self._check_space()
        self._check_points_to_evaluate()
        self._check_limits()

    def _check_names(self) -> None:
        """The sweep's name, where its report goes, the training config and its overrides."""
        if (not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)
                or set(self.name) == {"."}):  # a path separator or ".." would escape storage
            raise ValueError(f"name: {self.name!r} must use letters, digits, '_', '.', '-' "
                             "(not only dots)")
        if self.report_path is not None:
            from sparsebk.storage.store import resolve_location

            if not isinstance(self.report_path, str) or not self.report_path:
                raise ValueError(f"report_path: {self.report_path!r} must be a path or a URI")
            resolve_location(self.report_path, "report_path")  # an unknown scheme fails here
        if not isinstance(self.train_config, str) or not self.train_config:
            raise ValueError(f"train_config: {self.train_config!r} must be a path to a training YAML")
        if not isinstance(self.train_overrides, list) or \
                any(not isinstance(o, str) or "=" not in o for o in self.train_overrides):
            raise ValueError(f"train_overrides: {self.train_overrides!r} must be a list of 'key=value'")

    def _check_space(self) -> None:
        """At least one varied parameter, each training field set once, each kind fit for the
        search algorithm."""
        if not self.space:
            raise ValueError("space: empty; give at least one parameter to sweep")
        varied = [p for p in self.space.values() if p.kind != "value"]
        if not varied:
            raise ValueError("space: every parameter is fixed; nothing to sweep")
        keys = [p.key for p in self.space.values()]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"space: training field(s) {dup} set by more than one parameter")
        alg = self.search.algorithm
        for p in self.space.values():
            if alg == "grid" and p.kind not in ("value", "grid"):
                raise ValueError(f"space.{p.name}: {p.kind} cannot be enumerated by "
                                 f"search.algorithm 'grid'; use grid: [...]")
            if alg != "grid" and p.kind == "grid":
                raise ValueError(f"space.{p.name}: grid is only for search.algorithm 'grid' "
                                 f"(got {alg!r}); use choice: [...]")

    def _check_points_to_evaluate(self) -> None:
        """Every given starting point names varied parameters, with values inside their range."""
        for i, pt in enumerate(self.search.points_to_evaluate):
            for n, v in pt.items():
                p = self.space.get(n)
                if p is None or p.kind == "value":
                    raise ValueError(f"search.points_to_evaluate[{i}].{n}: not a varied "
                                     f"parameter of space")
                if p.kind == "choice" and v not in p.values:
                    raise ValueError(f"search.points_to_evaluate[{i}].{n}: {v!r} is not one "
                                     f"of {p.values}")
                if p.kind in ("uniform", "loguniform", "randint") and not (
                        isinstance(v, (int, float)) and p.low <= v <= p.high):
                    raise ValueError(f"search.points_to_evaluate[{i}].{n}: {v!r} is outside "
                                     f"[{p.low}, {p.high}]")

    def _check_limits(self) -> None:
        """Concurrency, the trial's CPUs, retries and the report's sparsity levels."""
        if self.max_concurrent_trials is not None and (
                not isinstance(self.max_concurrent_trials, int) or self.max_concurrent_trials < 1):
            raise ValueError(f"max_concurrent_trials: {self.max_concurrent_trials!r} must be an "
                             f"integer >= 1 or null (from cluster resources)")
        _number("trial_cpus", self.trial_cpus)
        if self.trial_cpus <= 0:
            raise ValueError(f"trial_cpus: {self.trial_cpus!r} must be > 0 (Tune needs a "
                             f"non-empty request; 0.01 is enough)")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) \
                or self.max_retries < 0:
            raise ValueError(f"max_retries: {self.max_retries!r} must be an integer >= 0")
        if not isinstance(self.sparsity_levels, list) or not self.sparsity_levels or any(
                not 0.0 <= _number("sparsity_levels", s) < 1.0 for s in self.sparsity_levels):
            raise ValueError(f"sparsity_levels: {self.sparsity_levels!r} must be a non-empty "
                             f"list of numbers in [0, 1)")
        if not isinstance(self.last_k, int) or self.last_k < 1:
            raise ValueError(f"last_k: {self.last_k!r} must be an integer >= 1")

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "<dict>") -> "SweepConfig":
        if not isinstance(d, dict):
            raise ValueError(f"{source}: top level must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown} (known: {sorted(known)})")
        for req in ("name", "train_config", "space"):
            if req not in d:
                raise ValueError(f"{source}: missing field {req!r}")
        kw = dict(d)
        try:
            if not isinstance(kw["space"], dict):
                raise ValueError(f"space: {kw['space']!r} must be a mapping of parameters")
            kw["space"] = {str(n): ParamSpec.from_yaml(str(n), s) for n, s in kw["space"].items()}
            for sec, sec_cls in (("search", SearchConfig), ("asha", AshaConfig)):
                sub = kw.get(sec) or {}
                if not isinstance(sub, dict):
                    raise ValueError(f"{sec}: {sub!r} must be a mapping")
                ok = {f.name for f in fields(sec_cls)}
                bad = sorted(set(sub) - ok)
                if bad:
                    raise ValueError(f"{sec}: unknown field(s) {bad} (known: {sorted(ok)})")
                kw[sec] = sec_cls(**sub)
            return cls(**kw, source=source)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        except TypeError as e:  # e.g. a mapping where a number belongs
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        if d["report_path"] is None:  # sweeps stored before the field existed still resume
            d.pop("report_path")
        d["space"] = {n: _spec_to_yaml(p) for n, p in self.space.items()}
        return d

    def resolve_path(self, path: str) -> Path:
        """A path as given, or else relative to the sweep file's folder."""
        p = Path(path).expanduser()
        if p.is_absolute() or p.exists() or self.source.startswith("<"):
            return p
        alt = Path(self.source).parent / p
        return alt if alt.exists() else p


def _spec_to_yaml(p: ParamSpec) -> dict:
    if p.kind in ("value",):
        return {"key": p.key, "value": p.values[0]}
    if p.kind in ("choice", "grid"):
        return {"key": p.key, p.kind: list(p.values)}
    return {"key": p.key, p.kind: [p.low, p.high]}


def load_sweep_config(path: str | Path, overrides: list[str] | tuple = ()) -> SweepConfig:
    """Read a sweep YAML; `overrides` are `field=value` or `section.field=value` (YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: sweep config file not found")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    d = d if d is not None else {}
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r}: expected key=value")
        key, raw = ov.split("=", 1)
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {ov!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return SweepConfig.from_dict(d, source=str(path))
