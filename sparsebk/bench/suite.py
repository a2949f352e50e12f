"""`sparsebk bench all --out DIR [--skip NAME ...] [--quick]`: every benchmark, one report.

Each benchmark listed in `sparsebk.bench.common.BENCHMARKS` runs in its own Python process
(a crash, a hung Ray worker or a changed thread setting in one cannot spoil the next), with
`--out DIR`; with `--quick`, plus `--quick` where the benchmark's own `--help` offers it, or
else the smaller sizes of QUICK_ARGS that its `--help` names. Its stdout is echoed
live; its stderr (logging) goes to DIR/logs/<name>.stderr.log. Afterwards the suite writes

- DIR/suite.json: per benchmark the command, exit code, wall time and the JSON files it wrote;
- DIR/BENCHMARKS.md: the machine (cores, torch and Ray versions, device, load average), then per
  benchmark the command that made it and the markdown tables it printed, and links to its PNGs.

`--args 'NAME=ARGS'` passes extra arguments to one benchmark (e.g. `--args 'quality=--budget-s
180'`). Each run's record is kept in DIR/logs/<name>.run.json, so a benchmark run earlier into
the same DIR (say the long quality run) and `--skip`ped now still appears in the markdown,
marked as such, with the command and time of that run.

The tables are taken from the benchmarks' printed output (lines starting with "|", as
`format_table` prints them), so the markdown shows exactly what the benchmark showed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from sparsebk.bench.common import BENCHMARKS, format_table, machine_info, write_result

# run a benchmark module's main(argv) in a fresh interpreter
_RUNNER = ("import importlib, sys; m = importlib.import_module(sys.argv[1]); "
           "sys.exit(int(m.main(sys.argv[2:]) or 0))")


# Smoke-run sizes for benchmarks whose --help offers no --quick: (option, value) pairs, each
# passed only when that benchmark's --help names the option (so a renamed option is dropped,
# not an error).
QUICK_ARGS: dict[str, list[tuple[str, str]]] = {
    "bk-core": [("--sizes", "128,512"), ("--repeats", "3"), ("--min-time", "0.05"),
                ("--max-reference-n", "512"), ("--max-dense-n", "128")],
    "layer": [("--n-seq", "128"), ("--rounds", "2"), ("--lm-batch", "4")],
    "data": [("--repeats", "1")],
    "training": [("--steps", "20")],  # its first 10 steps are warm-up
}


def _default_benchmarks() -> dict[str, str]:
    return dict(BENCHMARKS)


def help_text(module: str) -> str:
    """What `module`'s `main(["--help"])` prints (a benchmark we do not own)."""
    proc = subprocess.run([sys.executable, "-c", _RUNNER, module, "--help"],
                          capture_output=True, text=True, timeout=300)
    return proc.stdout


def quick_args(name: str, module: str) -> list[str]:
    """`--quick` if the benchmark offers it, else the QUICK_ARGS its --help names."""
    text = help_text(module)
    if "--quick" in text:
        return ["--quick"]
    named = lambda opt: re.search(re.escape(opt) + r"(?![\w-])", text) is not None
    return [x for opt, value in QUICK_ARGS.get(name, []) if named(opt) for x in (opt, value)]


def extract_tables(text: str) -> list[str]:
    """Markdown tables in `text`, each with the non-empty line just above it as its caption."""
    tables, block, caption, prev = [], [], None, ""
    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            if not block:
                caption = prev.strip() or None
            block.append(line.strip())
            continue
        if block:
            tables.append(("**" + caption + "**\n\n" if caption else "") + "\n".join(block))
            block, prev = [], ""  # a caption belongs to one table only
        if line.strip():
            prev = line
    if block:
        tables.append(("**" + caption + "**\n\n" if caption else "") + "\n".join(block))
    return tables


def _run_one(name: str, module: str, args: list[str], log_dir: Path, timeout_s: float,
             echo: bool) -> dict:
    cmd = [sys.executable, "-c", _RUNNER, module, *args]
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / f"{name}.stderr.log"
    t0 = time.perf_counter()
    lines: list[str] = []
    with open(stderr_path, "w") as err:
        # own session: on timeout we signal only the group this benchmark started
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)

        def stop():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:  # it ended just now
                pass

        timer = threading.Timer(timeout_s, stop)
        timer.start()
        try:
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    print(line, end="", flush=True)
            rc = proc.wait()
        except BaseException:  # interrupted or terminated: do not leave the benchmark running
            stop()
            raise
        finally:
            timer.cancel()
    wall = time.perf_counter() - t0
    timed_out = rc < 0 and wall >= timeout_s
    return {"name": name, "module": module, "args": args, "rc": rc, "timed_out": timed_out,
            "wall_s": wall, "stdout": "".join(lines), "stderr_log": str(stderr_path),
            "finished_utc": _now()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _run_recorded(name: str, module: str, args: list[str], quick_used: list[str], out: Path,
                  timeout_s: float, echo: bool) -> dict:
    """One benchmark's run record (`_run_one`, its --quick arguments, the files of OUT it
    wrote or updated), also kept as OUT/logs/NAME.run.json; with `echo`, its command line
    and, when it fails, its stderr's tail."""
    if echo:
        print(f"\n=== sparsebk bench {name} {shlex.join(args)}", flush=True)
    before = {p: p.stat().st_mtime for p in out.glob("*")}
    run = _run_one(name, module, args, out / "logs", timeout_s, echo)
    run["quick"] = quick_used
    run["outputs"] = sorted(p.name for p in out.glob("*")
                            if p.is_file() and (p not in before or p.stat().st_mtime > before[p]))
    (out / "logs" / f"{name}.run.json").write_text(json.dumps(run, indent=1))
    if echo and run["rc"] != 0:
        tail = Path(run["stderr_log"]).read_text()[-2000:]
        print(f"=== {name} FAILED (exit {run['rc']}); stderr tail:\n{tail}", flush=True)
    return run


def run_suite(out_dir: str | os.PathLike, *, skip: Sequence[str] = (), quick: bool = False,
              benchmarks: Mapping[str, str] | None = None,
              extra_args: Mapping[str, Sequence[str]] | None = None,
              timeout_s: float = 3600.0, echo: bool = True, command: str | None = None) -> dict:
    """Run the benchmarks (all of `benchmarks`, default the CLI's list, minus `skip`).

    `extra_args[name]` is appended to that benchmark's arguments. Returns the suite record
    (also written to OUT/suite.json) with the markdown under "markdown".
    """
    benchmarks = dict(benchmarks if benchmarks is not None else _default_benchmarks())
    unknown = sorted(set(skip) - set(benchmarks))
    if unknown:
        raise ValueError(f"--skip: unknown benchmark(s) {unknown}; choose from {sorted(benchmarks)}")
    extra_args = dict(extra_args or {})
    unknown = sorted(set(extra_args) - set(benchmarks))
    if unknown:
        raise ValueError(f"extra_args: unknown benchmark(s) {unknown}; choose from {sorted(benchmarks)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = _now()
    load_before = os.getloadavg()
    runs = []
    for name, module in benchmarks.items():
        if name in skip:
            # a skipped benchmark keeps the record of its last run in this DIR, if any
            last = out / "logs" / f"{name}.run.json"
            prev = json.loads(last.read_text()) if last.exists() else None
            runs.append({"name": name, "module": module, "skipped": True, "previous": prev})
            continue
        quick_used = quick_args(name, module) if quick else []
        args = ["--out", str(out), *quick_used, *extra_args.get(name, ())]
        runs.append(_run_recorded(name, module, args, quick_used, out, timeout_s, echo))
    record = {
        "command": command or f"sparsebk bench all --out {out}",
        "started_utc": started,
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
        "quick": quick,
        "runs": runs,
    }
    record["markdown"] = render_markdown(record, machine_info())
    (out / "BENCHMARKS.md").write_text(record["markdown"])
    write_result(out, "suite", record)
    return record


def render_markdown(record: dict, machine: dict) -> str:
    """BENCHMARKS.md-ready text: machine, then each benchmark's command and tables."""
    lines = ["# Benchmarks", "",
             f"Made by `{record['command']}` on {record['started_utc']}"
             + (" (quick smoke sizes)" if record.get("quick") else "") + ".", "",
             "## Machine", ""]
    load = record["load_avg_before"]
    row = {"cores": machine.get("cpu_count"), "torch threads": machine.get("torch_threads"),
           "torch": machine.get("torch"), "ray": machine.get("ray"),
           "device": machine.get("device"), "python": machine.get("python"),
           "platform": machine.get("platform"),
           "load avg (1/5/15 min) at start": "/".join(f"{x:.2f}" for x in load)}
    lines += [format_table([row]), ""]
    for run in record["runs"]:
        lines += [f"## {run['name']}", ""]
        if run.get("skipped"):
            if not run.get("previous"):
                lines += ["Skipped in this run (`--skip`).", ""]
                continue
            run = run["previous"]
            lines += [f"Not rerun by this command (`--skip`): tables from its run that finished "
                      f"{run['finished_utc']}.", ""]
        cmd = shlex.join(["sparsebk", "bench", run["name"], *run["args"]])
        status = "ok" if run["rc"] == 0 else (
            "TIMED OUT" if run["timed_out"] else f"FAILED with exit code {run['rc']}")
        lines += [f"Command: `{cmd}` — {status}, {run['wall_s']:.1f} s.", ""]
        tables = extract_tables(run["stdout"])
        if tables:
            for t in tables:
                lines += [t, ""]
        else:
            lines += ["(no table printed)", ""]
        if run["rc"] != 0:
            lines += [f"stderr: `{run['stderr_log']}`", ""]
        pngs = [o for o in run.get("outputs", []) if o.endswith(".png")]
        jsons = [o for o in run.get("outputs", []) if o.endswith(".json")]
        if jsons:
            lines += ["JSON: " + ", ".join(f"`{j}`" for j in jsons), ""]
        for png in pngs:
            lines += [f"![{png}]({png})", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    names = list(_default_benchmarks())
    p = argparse.ArgumentParser(prog="sparsebk bench all", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out", help="directory for JSON, logs, PNGs, BENCHMARKS.md")
    p.add_argument("--skip", action="append", default=[], choices=names, metavar="NAME",
                   help=f"skip a benchmark (repeatable): one of {', '.join(names)}")
    p.add_argument("--quick", action="store_true",
                   help="small sizes/budgets (a smoke run), passed to benchmarks that offer --quick")
    p.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                   help="extra arguments for one benchmark, e.g. --args 'quality=--budget-s 180'")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per-benchmark wall-clock limit")
    args = p.parse_args(argv)
    # SIGTERM -> SystemExit, so the running benchmark's process group is ended with the suite
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, sep, rest = item.partition("=")
        if not sep or name not in names:
            p.error(f"--args {item!r}: expected NAME=ARGS with NAME one of {', '.join(names)}")
        extra.setdefault(name, []).extend(shlex.split(rest))
    command = shlex.join(["sparsebk", "bench", "all", *argv])
    record = run_suite(args.out, skip=args.skip, quick=args.quick, timeout_s=args.timeout_s,
                       extra_args=extra, command=command)
    print(f"\nwrote {Path(args.out) / 'BENCHMARKS.md'} and {Path(args.out) / 'suite.json'}")
    failed = [r["name"] for r in record["runs"] if not r.get("skipped") and r["rc"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
