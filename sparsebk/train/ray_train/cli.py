"""`sparsebk train --config PATH [--set key.sub=value ...] [--address ADDR]`.

The same code path as `ray_jobs/train.py` (which `ray job submit` runs): parse, load and
validate the config (a bad config fails here, before Ray starts), connect to Ray (the cluster
at --address or RAY_ADDRESS, else a local Ray), run, print the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparsebk train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML preset, e.g. ray_jobs/configs/tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set optim.max_steps=200 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of a local Ray (default: max(cores, workers + 2))")
    return p.parse_args(argv)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node IP is 127.0.0.1


def connect_ray(address: str | None, num_cpus: int | None, workers: int) -> None:
    """The cluster at --address / RAY_ADDRESS, else a local Ray (training or a sweep).

    A local Ray listens on 127.0.0.1 only (GCS, raylet, object manager, workers, dashboard:
    nothing on the machine's other interfaces), and gets a pinned RAY_ADDRESS, which Ray
    Train's own placement-group cleaner (a state-API lookup of the controller) needs. That
    cleaner is not relied on: it failed here with other Ray instances on the machine, so a
    sweep removes the groups of stopped trials itself, through the GCS, on a local Ray and a
    cluster alike (sparsebk.tune.cleanup).
    """
    import socket

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # A local Ray listens on the loopback only: Ray's own switch for a machine that is no
        # cluster (read when Ray is imported, and by every process it starts)
        os.environ[LOOPBACK_ENV] = "0"
    import ray
    import ray._private.ray_constants as ray_constants

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    ray_constants.ENABLE_RAY_CLUSTER = False  # when Ray was imported before this call
    with socket.socket() as sock:  # a free port for the GCS, so its address is known up front
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"  # inherited by every Ray process
    # More logical CPUs than cores is fine (workers idle between collectives); Ray Data's
    # read tasks need CPUs beside the workers'.
    cpus = num_cpus or max(os.cpu_count() or 1, workers + 2)
    ray.init(address="local", num_cpus=cpus, include_dashboard=True,
             dashboard_host="127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    from sparsebk.storage.lease import RunLease
    from sparsebk.storage.store import open_store
    from sparsebk.train.config import load_config

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        # another driver on this run: said before Ray is reached (run_training takes the lease)
        RunLease(open_store(cfg.run.run_dir)).check_free()
    except ValueError as e:
        print(f"sparsebk train: {e}", file=sys.stderr)
        return 2
    connect_ray(args.address, args.num_cpus, cfg.run.num_workers)
    from sparsebk.train.ray_train.driver import RunFailed, run_training
    from sparsebk.train.ray_train.preflight import PreflightError

    try:
        summary = run_training(cfg, where=args.config)
    except (ValueError, PreflightError) as e:  # config, resume and node checks: one line each
        print(f"sparsebk train: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # retries spent: why, the latest checkpoint, how to resume
        print(f"sparsebk train: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
