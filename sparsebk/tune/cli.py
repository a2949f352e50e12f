"""`sparsebk sweep --config PATH [--set field=value ...] [--address ADDR]`.

The same code path as `ray_jobs/sweep.py` (for `ray job submit`): parse, load and validate
the sweep (a bad sweep config fails here, before Ray starts a trial), connect to Ray (the
cluster at --address or RAY_ADDRESS, else a local Ray), run or resume, print the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparsebk sweep", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True,
                   help="sweep YAML, e.g. ray_jobs/configs/sweep-tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep field, e.g. --set search.num_samples=8 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from sparsebk.train.ray_train.cli import connect_ray, setup_logging
    from sparsebk.tune.config import load_sweep_config
    from sparsebk.tune.sweep import prepare_sweep, run_sweep

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging()
    try:
        cfg = load_sweep_config(args.config, args.overrides)
        prep = prepare_sweep(cfg)
    except ValueError as e:
        print(f"sparsebk sweep: {e}", file=sys.stderr)
        return 2
    connect_ray(args.address, args.num_cpus, prep.num_workers)
    try:
        summary = run_sweep(cfg, prepared=prep)
    except ValueError as e:  # e.g. the sweep folder holds a sweep of another config
        print(f"sparsebk sweep: {e}", file=sys.stderr)
        return 2
    report_md = summary.get("report", {}).get("report_md")
    if report_md:  # a path or a URI (report_path): read back through the store
        from sparsebk.tune.report import read_back

        print(read_back(report_md))
    print(json.dumps(summary, indent=2))
    logging.getLogger(__name__).info("sweep folder: %s", summary["sweep_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
