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
        p.add_argument("--rounds-max")
        p.add_argument("--rounds", default="7")
        a = p.parse_args(argv)  # would exit 2 on an unknown --quick
        print("| rounds |\\n|---|\\n| %s |" % a.rounds)
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


def test_suite_runs_records_and_renders(tmp_path, fake_modules, monkeypatch):
    # smaller sizes for a benchmark without --quick: only the options its --help names
    monkeypatch.setitem(suite.QUICK_ARGS, "noquick", [("--absent", "1"), ("--rounds", "2")])
    out = tmp_path / "out"
    benches = {"fake": "fakebench", "broken": "brokenbench", "noquick": "noquickbench",
               "skipme": "does_not_exist"}
    rec = suite.run_suite(out, skip=["skipme"], quick=True, benchmarks=benches,
                          extra_args={"fake": ["--n", "4"]}, echo=False, command="sparsebk bench all --x")
    runs = {r["name"]: r for r in rec["runs"]}
    assert runs["skipme"]["skipped"] is True
    assert runs["fake"]["rc"] == 0 and runs["fake"]["quick"] == ["--quick"]
    assert runs["fake"]["args"] == ["--out", str(out), "--quick", "--n", "4"]
    assert runs["noquick"]["rc"] == 0 and runs["noquick"]["quick"] == ["--rounds", "2"]
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
    assert "| rounds |\n|---|\n| 2 |" in md
    assert "FAILED with exit code 3" in md and "## skipme\n\nSkipped" in md
    m = machine_info()
    assert f"| {m['cpu_count']} " in md and m["torch"] in md and str(m["ray"]) in md
    saved = json.loads((out / "suite.json").read_text())
    assert [r["name"] for r in saved["runs"]] == list(benches)
    assert saved["machine"]["cpu_count"] == os.cpu_count()

    # a later run into the same DIR that skips `fake` still reports fake's last tables, marked
    rec2 = suite.run_suite(out, skip=["fake", "broken", "skipme"], benchmarks=benches, echo=False)
    md2 = (out / "BENCHMARKS.md").read_text()
    assert rec2["runs"][0]["previous"]["args"] == ["--out", str(out), "--quick", "--n", "4"]
    assert "## fake\n\nNot rerun by this command" in md2
    assert "**Squares (quick=True):**\n\n" + format_table(fake["rows"]) in md2
    assert "## skipme\n\nSkipped" in md2


def test_suite_rejects_unknown_skip(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        suite.run_suite(tmp_path, skip=["nope"], benchmarks={"a": "x"}, echo=False)


def test_suite_cli_lists_every_benchmark(capsys):
    from sparsebk.bench.common import BENCHMARKS

    with pytest.raises(SystemExit):
        suite.main(["--help"])
    help_text = capsys.readouterr().out
    for name in BENCHMARKS:
        assert name in help_text


# --- the quality benchmark on tiny data -------------------------------------------------------

def _tiny_text(path, lines=600):
    """A small corpus with structure a model can pick up: 'the <adj> <noun> <verb> .' lines."""
    g = torch.Generator().manual_seed(0)
    adj, noun, verb = ["red", "big", "old", "new"], ["cat", "dog", "car", "tree", "bird"], ["runs", "sits", "falls"]
    with open(path, "w") as f:
        for _ in range(lines):
            a, n, v = (int(torch.randint(0, len(w), (1,), generator=g)) for w in (adj, noun, verb))
            f.write(f"the {adj[a]} {noun[n]} {verb[v]} .\n")
    return path


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from sparsebk.data.prepare import prepare_dataset
    from sparsebk.model.lm import LMConfig

    root = tmp_path_factory.mktemp("quality")
    text = _tiny_text(root / "tiny.txt")
    block_len = LMConfig.preset("debug").n_seq
    return prepare_dataset(root / "ds", corpus="text", text=str(text), tokenizer="word",
                           block_len=block_len, valid_fraction=0.1, test_fraction=0.1)


def test_evaluate_matches_token_by_token_cross_entropy():
    """The benchmarks score with the training runs' `evaluate`, the dense Transformer too."""
    from sparsebk.model.baselines import TransformerConfig, TransformerLM
    from sparsebk.bench.quality import evaluate_timed

    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=11, n_seq=8, d_model=16, n_layers=1, n_heads=2))
    blocks = torch.randint(0, 11, (5, 9))
    res = evaluate_timed(model, blocks, batch_size=2)  # batches of 2, 2, 1
    assert model.training is True  # evaluated in eval mode, then put back
    model.eval()
    nll = []
    for row in blocks:
        logp = torch.log_softmax(model(row[None, :-1])["logits"][0].double(), dim=-1)
        nll += [-logp[t, row[t + 1]].item() for t in range(8)]
    assert res["tokens"] == 40
    assert res["loss"] == pytest.approx(sum(nll) / 40, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(sum(nll) / 40), rel=1e-6)
    assert res["layer_sparsity"] is None and res["tokens_per_s"] > 0


def test_quality_weight_decay_reaches_the_optimizer_matrices_only(tiny_dataset):
    """`bench quality --weight-decay`: AdamW decays the weight matrices by it and leaves the
    vectors (norms, biases) alone, as a training run's optimizer does; a bad value is named."""
    from sparsebk.bench import quality
    from sparsebk.model.lm import SparseBKLM

    s = quality.QualitySettings(preset="debug", dataset=str(tiny_dataset), weight_decay=0.25,
                                batch_size=4, lr=1e-3)
    cfg, _, blocks, train_cfg = quality.setup(s)
    assert train_cfg.optim.weight_decay == 0.25
    model = SparseBKLM(cfg)
    run = quality._BudgetRun("bk-dense", model, blocks, s, train_cfg, None)
    groups = run.trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.25, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    for bad in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match=r"weight_decay=.* must be a non-negative number"):
            quality.QualitySettings(weight_decay=bad)


def test_quality_quick_run_reports_what_it_measured(tmp_path, tiny_dataset, monkeypatch, capsys):
    from sparsebk.bench import quality
    from sparsebk.data.loading import load_blocks
    from sparsebk.model.lm import LMConfig

    # the machine probe at 1/16 of its workload: it runs 9 times here, and at full size it
    # was 70% of this test's time (test_machine_probe_times_its_workload checks the real one)
    probe = quality.machine_probe
    monkeypatch.setattr(quality, "machine_probe", lambda: probe(rows=128))
    out = tmp_path / "q"
    rc = quality.main(["--out", str(out), "--dataset", str(tiny_dataset), "--preset", "debug",
                       "--budget-s", "1.5", "--targets", "0,0.5", "--quick", "--batch-size", "4",
                       "--weight-decay", "0.05", "--eval-stride", "8", "--random-offsets",
                       "--ema-decay", "0.9", "--by-position", "--by-context", "4", "--save-weights"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Test perplexity by the context a prediction had" in printed
    assert "from exactly c ids of context" in printed
    rec = json.loads((out / "quality.json").read_text())
    assert rec["settings"]["weight_decay"] == 0.05
    assert rec["settings"]["eval_stride"] == 8 and rec["settings"]["random_offsets"] is True
    assert rec["settings"]["ema_decay"] == 0.9
    dbg = LMConfig.preset("debug")
    block_len = rec["dataset"]["block_len"]
    assert block_len == dbg.n_seq and rec["model_config"]["vocab_size"] == rec["dataset"]["vocab_size"]
    res = {r["model"]: r for r in rec["results"]}
    assert list(res) == ["bk-dense", "bk-sparse-0.5", "transformer"]
    rows = {s: len(load_blocks(tiny_dataset, s)[:16]) for s in ("valid", "test")}
    for name, r in res.items():
        # perplexity is exp of the reported mean loss, on the split's scored tokens
        assert r["valid_ppl"] == pytest.approx(math.exp(r["valid_loss"]), rel=1e-12)
        assert r["test_ppl"] == pytest.approx(math.exp(r["test_loss"]), rel=1e-12)
        assert r["test_tokens"] == rows["test"] * block_len
        # sliding windows every 8 ids score the same tokens, each with more context
        assert r["eval_stride"] == 8
        for k in ("valid", "test"):
            assert r[f"{k}_ppl_strided"] == pytest.approx(math.exp(r[f"{k}_loss_strided"]), rel=1e-12)
            assert r[f"{k}_loss_strided"] != r[f"{k}_loss"]
            # the weights' moving average, scored both ways too
            assert r[f"ema_{k}_ppl"] == pytest.approx(math.exp(r[f"ema_{k}_loss"]), rel=1e-12)
            assert r[f"ema_{k}_ppl_strided"] == pytest.approx(math.exp(r[f"ema_{k}_loss_strided"]),
                                                              rel=1e-12)
        # --by-position: the test loss at each position; the windows are full, so the mean
        # over positions is the row's test loss (float32 logits summed in float64: ~1e-7)
        for pre in ("", "ema_"):
            by_pos = r[f"{pre}test_loss_by_position"]
            assert len(by_pos) == block_len
            assert sum(by_pos) / block_len == pytest.approx(r[f"{pre}test_loss"], rel=1e-5)
            # --by-context 4: every 4th test id with block_len ids before it, from 1, 2, 4, ...
            ctx = r[f"{pre}test_loss_by_context"]
            assert ctx["contexts"] == [1, 2, 4, 8, 16, 32] == [1, 2, 4, 8, 16, block_len]
            assert ctx["every"] == 4 and ctx["targets"] > 1 and ctx["gain"][0] is None
            for k in range(1, 6):
                assert ctx["gain"][k] == pytest.approx(ctx["loss"][k - 1] - ctx["loss"][k],
                                                       abs=1e-12)
                assert ctx["gain_se"][k] > 0
        assert r["tokens_seen"] == r["steps"] * 4 * block_len
        assert r["train_s"] >= 1.5 and r["train_tokens_per_s"] == pytest.approx(r["tokens_seen"] / r["train_s"])
        assert r["train_cpu_s"] > 0 and r["load_avg_1m_start"] >= 0 and r["load_avg_1m_end"] >= 0
        # a probe before training, then one at each curve point
        assert len(r["probe_s"]) == len(r["curve"]) + 1 and min(r["probe_s"]) > 0
        assert [p["probe_s"] for p in r["curve"]] == r["probe_s"][1:]
        c = r["curve"]
        assert c and c[-1]["step"] == r["steps"]
        assert all(a["train_s"] < b["train_s"] for a, b in zip(c, c[1:]))
        for p in c:
            assert p["valid_subset_ppl"] == pytest.approx(math.exp(p["valid_subset_loss"]), rel=1e-12)
    # --save-weights: each row's model, final and averaged, scores the row's own test loss again
    from sparsebk.evaluation import evaluate
    test_rows = load_blocks(tiny_dataset, "test")[:16]
    for name, r in res.items():
        assert r["weights_file"] == str(out / "weights" / f"{name}.pt")
        for pre, ema in (("", False), ("ema_", True)):
            model = quality.load_weights(r["weights_file"], ema=ema)
            loss, _ = evaluate(model, test_rows, batch_size=4, device=torch.device("cpu"))
            assert loss == pytest.approx(r[f"{pre}test_loss"], rel=1e-12)  # the same forwards
    assert not list((out / "weights").glob("*.tmp"))
    assert res["transformer"]["layer_sparsity"] is None
    # the dense point has its gates pinned open: nothing skipped, in training or in eval
    assert res["bk-dense"]["layer_sparsity"] == [0.0] * dbg.n_layers
    assert res["bk-dense"]["train_layer_sparsity"] == [0.0] * dbg.n_layers
    sp = res["bk-sparse-0.5"]["layer_sparsity"]
    assert len(sp) == dbg.n_layers and all(0.0 <= x <= 1.0 for x in sp)
    assert res["bk-sparse-0.5"]["achieved_sparsity"] == pytest.approx(sum(sp) / len(sp))
    # the same initial weights: the BK variants start from one seed, so the param counts match
    assert res["bk-dense"]["params"] == res["bk-sparse-0.5"]["params"]
    g = rec["goal"]
    assert g["test_ppl_ratio"] == pytest.approx(res["bk-sparse-0.5"]["test_ppl"] / res["bk-dense"]["test_ppl"])
    for png in ("quality_ppl_vs_sparsity.png", "quality_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table's machine-normalised speed: tokens/s x the median of the row's probes
    import statistics

    from sparsebk.bench.quality_report import tables
    r = res["bk-dense"]
    norm = round(r["train_tokens_per_s"] * statistics.median(r["probe_s"]))
    dense_line = next(line for line in tables(rec).splitlines() if line.startswith("| bk-dense"))
    assert "tok/s x probe s" in tables(rec)
    assert "test ppl, stride 8" in tables(rec) and "EMA test ppl" in tables(rec)
    assert str(norm) in [cell.strip() for cell in dense_line.split("|")]
    # a record from before the probe still renders, without those columns
    for row in rec["results"]:
        del row["probe_s"]
    assert "probe" not in tables(rec) and "| bk-dense" in tables(rec)


def test_machine_probe_times_its_workload():
    """The probe's seconds grow with its work: 32x the rows of the same head take longer."""
    from sparsebk.bench.common import machine_probe

    small = machine_probe(rows=64, repeats=3)
    large = machine_probe(rows=2048, repeats=3)
    assert 0 < small < large


def test_tradeoff_plot_puts_each_run_in_its_series(tmp_path):
    """`bench quality --tradeoff`: dense rows of every size form one curve sorted by speed,
    sparse rows are labelled by target, skip output and gate weighting."""
    from sparsebk.bench import quality
    from sparsebk.bench.quality_report import tradeoff_points

    def run(name, mc, over, rows):
        path = tmp_path / name / "quality.json"
        path.parent.mkdir()
        results = [{"model": m, "target_sparsity": t, "train_tokens_per_s": x, "test_ppl": y}
                   for m, t, x, y in rows]
        path.write_text(json.dumps({"settings": {"model_overrides": over},
                                    "model_config": mc, "results": results}))
        return str(path)

    mc = {"d_model": 128, "n_layers": 4, "bk_heads": 8, "skip_output": "carry", "gate_weight": False}
    a = run("a", mc, {"gate_weight": True},
            [("bk-dense", 0.0, 3869.0, 177.7), ("bk-sparse-0.5", 0.5, 4120.0, 198.0),
             ("transformer", None, 3521.0, 186.3)])
    b = run("b", {**mc, "n_layers": 3}, {"skip_output": "light"},
            [("bk-dense", 0.0, 4900.0, 190.0), ("bk-sparse-0.3", 0.3, 5000.0, 201.5)])
    c = run("c", {**mc, "d_ff": 32}, {}, [("bk-dense", 0.0, 4000.0, 180.0)])
    pts = tradeoff_points([a, b, c])
    assert pts["dense"] == [(3869.0, 177.7, "d128 L4 H8"), (4000.0, 180.0, "d128 L4 H8 F32"),
                            (4900.0, 190.0, "d128 L3 H8")]
    assert pts["sparse"] == [(4120.0, 198.0, "0.5 carry weighted"), (5000.0, 201.5, "0.3 light")]
    assert pts["transformer"] == [(3521.0, 186.3, "Transformer")]
    assert quality.main(["--out", str(tmp_path / "plot"), "--tradeoff", a, b, c]) == 0
    assert (tmp_path / "plot" / "quality_tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lm_skip_output_rates_time_each_variant_at_its_forced_sparsity():
    """`bench layer --lm-skip-outputs`: a row per (skip output, sparsity), each step run with
    the forced masks asked for (the model's own reported sparsity), dense rows at ratio 1."""
    from sparsebk.bench.layer import lm_skip_output_rates

    rows = lm_skip_output_rates("debug", 4, torch.device("cpu"), 2, ["carry", "light"], [0.25, 0.5])
    assert [(r["skip_output"], r["sparsity"]) for r in rows] == [
        (k, s) for k in ("carry", "light") for s in (0.0, 0.25, 0.5)]
    for r in rows:
        assert r["achieved_sparsity"] == pytest.approx(r["sparsity"], abs=1e-6)
        assert r["tokens_per_s_wall"] == pytest.approx(4 * 32 / (r["step_wall_ms"] / 1e3))
        if r["sparsity"] == 0.0:
            assert r["vs_dense_wall"] == 1.0 and r["vs_dense_cpu"] == 1.0
    with pytest.raises(ValueError, match="lm-skip-outputs"):
        lm_skip_output_rates("debug", 4, torch.device("cpu"), 1, ["copy"], [0.5])


def test_lm_step_rate_times_each_preset_with_its_own_skip_output():
    """`bench layer --lm-presets` without --skip-output times a preset as it trains (small:
    the light FFN); --skip-output overrides it. The skippable share is what closing every gate
    removes from a step, a fraction of it."""
    from sparsebk.bench.layer import lm_step_rate

    cpu = torch.device("cpu")
    own = lm_step_rate("small", 1, cpu, 1)
    assert own["skip_output"] == "light"
    assert lm_step_rate("small", 1, cpu, 1, "carry")["skip_output"] == "carry"
    assert lm_step_rate("debug", 2, cpu, 1)["skip_output"] == "carry"
    assert own["skippable_share_wall"] < 1.0 and own["all_skipped_wall_ms"] > 0


def test_quality_ema_averages_the_weights_of_every_step_and_scores_them(tiny_dataset):
    """`bench quality --ema-decay d`: the average after step t is the definition's recurrence
    over the weights each step left (decay min(d, (1 + t) / (10 + t))), the row scores it on
    valid and test, and the model keeps its own final weights for the row's usual figures."""
    import copy

    from sparsebk.bench import quality
    from sparsebk.evaluation import evaluate
    from sparsebk.model.lm import SparseBKLM

    s = quality.QualitySettings(preset="debug", dataset=str(tiny_dataset), budget_steps=6,
                                ema_decay=0.7, batch_size=4, lr=3e-3, curve_points=1,
                                curve_eval_blocks=2, eval_blocks=4)
    cfg, _, blocks, train_cfg = quality.setup(s)
    torch.manual_seed(0)
    model = SparseBKLM(cfg)
    run = quality._BudgetRun("bk-dense", model, blocks, s, train_cfg, None)
    ref = [p.detach().double().clone() for p in model.parameters()]  # the definition, in float64
    M = max(r.abs().max().item() for r in ref)  # the largest weight along the way
    for t in range(6):
        run.train_step()
        M = max(M, *(p.detach().abs().max().item() for p in model.parameters()))
        d = min(0.7, (1 + t) / (10 + t))
        ref = [d * a + (1 - d) * p.detach().double() for a, p in zip(ref, model.parameters())]
    final = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a.float(), f) for a, f in zip(ref, final))
    # each float32 lerp a + w (p - a) rounds three times (the difference, the product, the
    # sum) plus the parameter's own float32 value: at most ~4 unit roundoffs of the largest
    # value involved per update, and an average only shrinks earlier errors; six updates
    bound = 6 * 4 * 2.0 ** -24 * M
    for a, r in zip(run.ema.avg, ref):
        torch.testing.assert_close(a.double(), r, rtol=0, atol=bound)
    rec = run.record(0.0)
    for p, f in zip(model.parameters(), final):  # the row's own weights are back
        assert torch.equal(p, f)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, r in zip(twin.parameters(), ref):
            p.copy_(r.float())
    for k in ("valid", "test"):
        loss, _ = evaluate(twin, blocks[k][:4], batch_size=4, device=torch.device("cpu"))
        # the twin's weights are the average to float32 rounding: the loss to ~1e-6
        assert rec[f"ema_{k}_loss"] == pytest.approx(loss, rel=1e-5)
        assert rec[f"ema_{k}_ppl"] == pytest.approx(math.exp(rec[f"ema_{k}_loss"]), rel=1e-12)
        assert rec[f"ema_{k}_loss"] != rec[f"{k}_loss"]
    for bad in (0.0, 1.0, -0.5, "0.9", True):
        with pytest.raises(ValueError, match=r"ema_decay=.* must be a number in \(0, 1\) or None"):
            quality.QualitySettings(ema_decay=bad)


def test_quality_row_records_the_learnt_shifts_the_training_left(tiny_dataset):
    """A model with learnt BK shifts: the row's `bk_shifts` are each layer's [Re z, Im z] per
    head, read back from the parameters z = z_re + i exp(z_log_im) after the last step (they
    moved from the init), and the report prints 1 / Im z; fixed shifts record nothing."""
    from sparsebk.bench import quality
    from sparsebk.bench.quality_report import tables
    from sparsebk.model.lm import SparseBKLM

    s = quality.QualitySettings(preset="debug", dataset=str(tiny_dataset), budget_steps=3,
                                batch_size=4, lr=3e-2, curve_points=1, curve_eval_blocks=2,
                                eval_blocks=2, model_overrides={
                                    "bk_heads": 3, "bk_learn_z": True, "bk_z_im_min": 0.01,
                                    "bk_z_im_max": 1.0})
    cfg, _, blocks, train_cfg = quality.setup(s)
    torch.manual_seed(0)
    model = SparseBKLM(cfg)
    init = [layer.sparse_bk_core.z_log_im.detach().clone() for layer in model.layers]
    # the init: Im z log-spaced over [0.01, 1] at the bin centres (h + 1/2) / H
    for il in init:
        torch.testing.assert_close(il.double().exp(), torch.tensor(
            [0.01 * 100 ** ((h + 0.5) / 3) for h in range(3)], dtype=torch.float64),
            rtol=1e-6, atol=0)
    run = quality._BudgetRun("bk-dense", model, blocks, s, train_cfg, None)
    for _ in range(3):
        run.train_step()
    rec = run.record(0.0)
    assert len(rec["bk_shifts"]) == cfg.n_layers
    for layer, il, got in zip(model.layers, init, rec["bk_shifts"]):
        core = layer.sparse_bk_core
        assert not torch.equal(core.z_log_im.detach(), il)  # the training moved them
        assert got == [[core.z_re[h].item(), core.z_log_im[h].exp().item()] for h in range(3)]
    text = tables({"settings": vars(s), "dataset": {"block_len": cfg.n_seq},
                   "goal": None, "results": [rec]})
    line = next(x for x in text.splitlines() if x.startswith("| bk-dense") and ".." in x)
    im = [z[1] for z in rec["bk_shifts"][0]]
    assert f"{1 / min(im):.1f} .. {1 / max(im):.2f}" in line
    fixed = quality.QualitySettings(preset="debug", dataset=str(tiny_dataset), budget_steps=1,
                                    batch_size=4, curve_points=1, curve_eval_blocks=2,
                                    eval_blocks=2)
    cfg, _, blocks, train_cfg = quality.setup(fixed)
    run = quality._BudgetRun("bk-dense", SparseBKLM(cfg), blocks, fixed, train_cfg, None)
    run.train_step()
    assert "bk_shifts" not in run.record(0.0)
