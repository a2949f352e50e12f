"""The benchmark suite's machinery and a tiny quality run: what they write is what they measured."""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap

import pytest
import torch

from sparsebk.bench import suite
from sparsebk.bench.common import format_table, machine_info

FAKE = textwrap.dedent('''
    import argparse
    from sparsebk.bench.common import format_table, write_result

    def main(argv):
        p = argparse.ArgumentParser()
        p.add_argument("--out")
        p.add_argument("--quick", action="store_true")
        p.add_argument("--n", type=int, default=3)
        a = p.parse_args(argv)
        rows = [{"n": i, "square": i * i} for i in range(a.n)]
        print("starting")
        print("Squares (quick=%s):" % a.quick)
        print(format_table(rows))
        print("done")
        write_result(a.out, "fake", {"quick": a.quick, "rows": rows})
        return 0
''')
BROKEN = textwrap.dedent('''
    import sys
    def main(argv):
        print("about to fail")
        print("a clear reason", file=sys.stderr)
        return 3
''')
NO_QUICK = textwrap.dedent('''
    import argparse
    def main(argv):
        p = argparse.ArgumentParser()
        p.add_argument("--out")
        p.parse_args(argv)  # would exit 2 on an unknown --quick
        print("| a |\\n|---|\\n| 1 |")
        return 0
''')


@pytest.fixture()
def fake_modules(tmp_path, monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "fakebench.py").write_text(FAKE)
    (mods / "brokenbench.py").write_text(BROKEN)
    (mods / "noquickbench.py").write_text(NO_QUICK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(mods), os.environ.get("PYTHONPATH", "")]))
    return mods


def test_extract_tables_keeps_caption_and_rows():
    table = format_table([{"x": 1, "y": 2.5}])
    text = f"log line\nCaption here:\n{table}\ntrailing\n\n| a |\n|---|\n"
    assert suite.extract_tables(text) == [f"**Caption here:**\n\n{table}", "**trailing**\n\n| a |\n|---|"]


def test_suite_runs_records_and_renders(tmp_path, fake_modules):
    out = tmp_path / "out"
    benches = {"fake": "fakebench", "broken": "brokenbench", "noquick": "noquickbench",
               "skipme": "does_not_exist"}
    rec = suite.run_suite(out, skip=["skipme"], quick=True, benchmarks=benches,
                          extra_args={"fake": ["--n", "4"]}, echo=False, command="sparsebk bench all --x")
    runs = {r["name"]: r for r in rec["runs"]}
    assert runs["skipme"]["skipped"] is True
    assert runs["fake"]["rc"] == 0 and runs["fake"]["quick"] is True
    assert runs["fake"]["args"] == ["--out", str(out), "--quick", "--n", "4"]
    assert runs["noquick"]["rc"] == 0 and runs["noquick"]["quick"] is False
    assert runs["broken"]["rc"] == 3
    assert "a clear reason" in (out / "logs" / "broken.stderr.log").read_text()
    assert runs["fake"]["outputs"] == ["fake.json"]
    # the benchmark's own JSON holds what it computed; the markdown shows its exact table
    fake = json.loads((out / "fake.json").read_text())
    assert fake["quick"] is True and fake["rows"][3] == {"n": 3, "square": 9}
    md = (out / "BENCHMARKS.md").read_text()
    assert md == rec["markdown"]
    assert "**Squares (quick=True):**\n\n" + format_table(fake["rows"]) in md
    assert "Made by `sparsebk bench all --x`" in md
    assert "FAILED with exit code 3" in md and "## skipme\n\nSkipped" in md
    m = machine_info()
    assert f"| {m['cpu_count']} " in md and m["torch"] in md and str(m["ray"]) in md
    saved = json.loads((out / "suite.json").read_text())
    assert [r["name"] for r in saved["runs"]] == list(benches)
    assert saved["machine"]["cpu_count"] == os.cpu_count()


def test_suite_rejects_unknown_skip(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        suite.run_suite(tmp_path, skip=["nope"], benchmarks={"a": "x"}, echo=False)


def test_suite_cli_lists_every_benchmark(capsys):
    from sparsebk.bench.cli import BENCHMARKS

    with pytest.raises(SystemExit):
        suite.main(["--help"])
    help_text = capsys.readouterr().out
    for name in BENCHMARKS:
        assert name in help_text
