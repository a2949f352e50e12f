"""`sparsebk bench <name> [--out DIR] [options]`: run one benchmark, or `all` of them."""

from __future__ import annotations

import importlib
import sys

from sparsebk.bench.common import BENCHMARKS



def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sparsebk bench {" + ",".join([*BENCHMARKS, "all"]) + "} [--out DIR] ...")
        print("Each benchmark prints its table and writes DIR/<name>.json.")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        module = importlib.import_module("sparsebk.bench.suite")
        return int(module.main(rest) or 0)
    if name not in BENCHMARKS:
        print(f"sparsebk bench: unknown benchmark {name!r}; choose from "
              f"{', '.join([*BENCHMARKS, 'all'])}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[name]).main(rest) or 0)
