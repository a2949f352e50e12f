"""Lazy public names for a package: `import sparsebk.x` stays cheap (no Ray, no pyarrow);
each submodule loads the first time one of its names is used."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for a package whose public names map to defining submodules."""
    names = sorted(n for n in exports) + [n for n in namespace.get("__all__", []) if n not in exports]

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__():
        return names

    return __getattr__, __dir__
