"""The `sparsebk` command: one subcommand per concern, each implemented in its own module.

Every subcommand is a function `main(argv: list[str]) -> int` ("module" names its `main`,
"module:function" another one); its module is imported only when the subcommand runs, so
`sparsebk --help` does not pay for Ray or torch imports.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": ("sparsebk.train.ray_train.cli", "train a sparse BK language model on Ray Train"),
    "sweep": ("sparsebk.tune.cli", "run a Ray Tune sweep over loss configurations"),
    "report": ("sparsebk.tune.report", "regenerate tables and plots of a run or sweep dir"),
    "prepare-data": ("sparsebk.data.cli", "tokenise a corpus into Parquet blocks"),
    "bench": ("sparsebk.bench.cli", "run benchmarks (bk-core, layer, training, ..., all)"),
    "export": ("sparsebk.inference.cli:export_main", "write a trained model as a self-contained folder"),
    "eval": ("sparsebk.inference.cli:eval_main", "perplexity, sparsity and speed of a trained model"),
    "generate": ("sparsebk.inference.cli:generate_main", "sample text from a trained model, token by token"),
}


def _usage() -> str:
    lines = ["usage: sparsebk <command> [options]", "", "commands:"]
    for name, (_, help_text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<14} {help_text}")
    lines.append("")
    lines.append("Run `sparsebk <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from sparsebk import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"sparsebk: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, _, func = SUBCOMMANDS[name][0].partition(":")
    return int(getattr(importlib.import_module(module), func or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
