"""`sparsebk bench cost`: the counted work against the work a real forward does, hand counts of
the presets' shares, the speed-up formulas, the forced rates, and a quick run's record."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from sparsebk.bench import cost
from sparsebk.model.config import LMConfig, SKIP_OUTPUTS
from sparsebk.model.forcing import forced_gates
from sparsebk.model.lm import SparseBKLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small ops: one thread on a loaded box


def _tiny(skip_output: str) -> LMConfig:
    return LMConfig(vocab_size=50, n_seq=8, d_model=16, n_layers=2, num_experts=3, top_k=2,
                    d_ff=24, bk_heads=2, bk_learn_z=True, bk_input_couplings=True,
                    skip_output=skip_output, light_d_ff=5)


def _linear_work(model: SparseBKLM, tokens: torch.Tensor, masks) -> dict[str, int]:
    """Multiply-adds of every nn.Linear call of one forward with the forced masks, by part:
    rows x in_features x out_features, read off the calls themselves."""
    tally = {"bk_mixer": 0, "experts": 0, "light": 0}

    def part(name: str) -> str:
        return "experts" if ".moe." in name else "light" if ".light." in name else "bk_mixer"

    def hook(module, inputs, _out, key):
        tally[key] += inputs[0].shape[:-1].numel() * module.in_features * module.out_features

    hooks = [m.register_forward_hook(lambda m, i, o, k=part(n): hook(m, i, o, k))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad(), forced_gates(model, "mask", masks=masks):
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return tally


@pytest.mark.parametrize("skip_output", SKIP_OUTPUTS)
def test_counted_work_is_the_work_of_a_real_forward(skip_output):
    """position_macs x positions equals the matmul work the sparse forward did, part by part,
    open, partly skipped and closed; closing every gate strictly lowers it."""
    cfg = _tiny(skip_output)
    torch.manual_seed(0)
    model = SparseBKLM(cfg).eval()
    B, T, L, H, D = 2, cfg.n_seq, cfg.n_layers, cfg.bk_heads, cfg.d_model
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    gen = torch.Generator().manual_seed(1)
    totals = {}
    for skip_per_row in (0, 3, T):
        masks = []
        for _ in range(L):  # skip_per_row random positions of each row, in each layer
            m = torch.ones(B, T)
            m.scatter_(1, torch.rand(B, T, generator=gen).argsort(1)[:, :skip_per_row], 0.0)
            masks.append(m)
        seen = _linear_work(model, tokens, masks)
        want = cost.counted_macs(cfg, skip_per_row / T)
        # not matmuls: the chain's estimate (in bk_mixer), and under "carry" the one projected
        # zero row per layer call that a skipped position copies before any computed one
        extra = -B * T * L * H * cost.BK_CHAIN_MACS
        extra += L * 2 * H * D if skip_output == "carry" else 0
        for part in ("bk_mixer", "experts", "light"):
            expected = B * T * want[part] + (extra if part == "bk_mixer" else 0)
            assert seen[part] == pytest.approx(expected, rel=1e-12), (part, skip_per_row)
        assert want["head"] == D * cfg.vocab_size  # the tied head's (B T, D) @ (D, V)
        totals[skip_per_row] = sum(seen.values())
    assert totals[T] < totals[3] < totals[0]
    assert 0 < cost.counted_share(cfg) < 1


def test_counted_shares_of_the_presets_by_hand():
    """Multiply-adds per position counted by hand: per layer the gate (D), potentials and
    couplings (2 D H), output projection (2 H D), chain (12 H), router (D E), experts (k 2 D F)
    or the light FFN (2 D D/4); the tied head D V."""
    # debug: D 32, H 1, no couplings, "carry", E 4 top-1, F 128, V 64, 2 layers
    computed, skipped = 32 + 32 + 64 + 12 + 128 + 2 * 32 * 128, 32 + 12
    assert cost.counted_share(LMConfig.preset("debug")) == pytest.approx(
        2 * (computed - skipped) / (32 * 64 + 2 * computed), rel=1e-12)
    # small: D 128, H 32, couplings, "light" (128 wide), E 4 top-1, F 512, V 10000, 4 layers
    mixer = 128 + 2 * 4096 + 8192 + 384
    computed, skipped = mixer + 512 + 2 * 128 * 512, mixer + 2 * 128 * 128
    assert computed == 148480 and skipped == 49664
    small = cost.counted_share(LMConfig.preset("small"))
    assert small == pytest.approx(4 * (computed - skipped) / (128 * 10000 + 4 * computed),
                                  rel=1e-12)
    assert 0.210 < small < 0.211
    # with the default D / 4 light FFN a skipped position saves more
    assert cost.counted_share(LMConfig.preset("small", light_d_ff=None)) == pytest.approx(
        4 * (computed - mixer - 2 * 128 * 32) / (128 * 10000 + 4 * computed), rel=1e-12)
    # large: D 1024, H 32, E 8 top-2, F 4096, light 256, V 50257, 16 layers
    mixer = 1024 + 2 * 32768 + 65536 + 384
    computed, skipped = mixer + 8192 + 2 * 2 * 1024 * 4096, mixer + 2 * 1024 * 256
    assert cost.counted_share(LMConfig.preset("large")) == pytest.approx(
        16 * (computed - skipped) / (1024 * 50257 + 16 * computed), rel=1e-12)
    split = cost.split_row(LMConfig.preset("small"), "small")
    assert split["head_%"] == pytest.approx(100 * 1.28e6 / (1.28e6 + 4 * 148480), rel=1e-12)


def test_widths_scale_the_experts_as_the_presets_do():
    """Geometric in log2(width) between small (128: 4 experts, top-1, 4 layers) and large
    (1024: 8, top-2, 16): at 512, 4 * 2^(2/3) = 6.35 experts, top-2^(2/3) = 1.59."""
    at = lambda w, recipe="experts", **o: cost.width_config(w, recipe, o)  # noqa: E731
    small, large = LMConfig.preset("small"), LMConfig.preset("large")
    for cfg, want in ((at(128), (128, 4, 1, 4)), (at(512), (512, 6, 2, 4)),
                      (at(512, "presets"), (512, 6, 2, 10)),
                      (at(1024, "presets"), (1024, 8, 2, 16)),
                      (at(64), (64, 4, 1, 4)), (at(2048, "presets"), (2048, 8, 2, 16))):
        assert (cfg.d_model, cfg.num_experts, cfg.top_k, cfg.n_layers) == want
        assert cfg.vocab_size == small.vocab_size and cfg.n_seq == small.n_seq
        assert cfg.skip_output == small.skip_output == large.skip_output
    # the light FFN's share of d_model, geometric from small's 128 / 128 to large's D / 4
    # (None: the default D / 4); below small, small's share, above large, large's
    for width, light in ((64, 64), (128, 128), (256, round(256 * 0.25 ** (1 / 3))),
                         (512, round(512 * 0.25 ** (2 / 3))), (1024, None), (2048, None)):
        assert at(width).light_d_ff == light
    assert (at(256).light_d_ff, at(512).light_d_ff) == (161, 203)
    assert small.light_d_ff == 128 and large.light_d_ff is None
    assert cost._experts(small) == "4x512 top-1, light 128"
    assert cost._experts(LMConfig.preset("debug")) == "4x128 top-1"  # "carry": no light FFN
    # the prepared GPU check measures the large preset itself
    gpu = cost.GPU_CHECK.split()
    sets = [gpu[i + 1].split("=") for i, a in enumerate(gpu) if a == "--set"]
    over = {k: int(v) for k, v in sets}
    width = int(gpu[gpu.index("--widths") + 1])
    assert at(width, gpu[gpu.index("--recipe") + 1], **over).to_dict() == large.to_dict()
    assert at(256, n_layers=2, d_ff=64).n_layers == 2 and at(256, d_ff=64).d_ff == 64
    with pytest.raises(ValueError, match="top_k"):
        at(256, num_experts=1, top_k=2)


def test_speedup_formula_and_the_width_that_reaches_a_target():
    assert cost.ideal_speedup(0.25, 0.5) == pytest.approx(8 / 7)
    assert cost.ideal_speedup(0.0, 0.75) == 1.0 and cost.ideal_speedup(1.0, 0.5) == 2.0
    pts = [(512, 1.4), (128, 1.1), (256, 1.2), (768, 1.6)]
    got = cost.width_reaching(pts, 1.3)  # between 256 (1.2) and 512 (1.4): halfway
    assert got["width"] == pytest.approx(384) and got["between"] == [256, 512]
    assert cost.width_reaching(pts, 1.5)["width"] == pytest.approx(640)
    assert cost.width_reaching(pts, 1.7) == {"width": None,
                                             "text": "not within the widths measured"}
    first = cost.width_reaching(pts, 1.05)
    assert first["width"] is None and first["at_or_below"] == 128


def test_forced_rates_give_the_measured_sparsity():
    """Open and closed exactly; a rate within 5 binomial standard deviations of its draws;
    decoding counts the layers' own decisions and leaves each layer's `decide` as it was."""
    cfg = _tiny("light")
    torch.manual_seed(0)
    model = SparseBKLM(cfg)
    cases = [0.0, 0.3, 0.75, 1.0]
    train = cost.time_training(model, 4, cases, repeats=2, warmup=1, device="cpu")
    with torch.no_grad():
        decode = cost.time_decode(model, 16, cases, steps=4, repeats=4, warmup=1, device="cpu")
    for timed, per_call in ((train, 4 * cfg.n_seq * cfg.n_layers),
                            (decode, 16 * 4 * 4 * cfg.n_layers)):
        for s in cases:
            n = timed[s]["decisions"]
            assert n >= per_call and timed[s]["median_s"] > 0
            bound = 5 * math.sqrt(s * (1 - s) / n)
            assert abs(timed[s]["sparsity"] - s) <= bound, (s, timed[s]["sparsity"], bound)
    assert all(decode[s]["step_s"] == decode[s]["median_s"] / 4 for s in cases)
    assert all("decide" not in layer.sparse_bk_core.__dict__ for layer in model.layers)


def test_quick_run_reports_what_it_measured(tmp_path, capsys):
    assert cost.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| width" in printed and "PREDICTION for the `large` preset" in printed
    rec = json.loads((tmp_path / "cost.json").read_text())
    assert [(r["width"], r["phase"]) for r in rec["rows"]] == [
        (w, p) for w in (32, 64) for p in ("train", "decode")]
    for r in rec["rows"]:
        raw = rec["raw"][str(r["width"])][r["phase"]]
        key = "median_s" if r["phase"] == "train" else "step_s"
        t = {s: raw[s][key] for s in ("0", "0.5", "0.75", "1")}
        assert r["open_ms"] == pytest.approx(1e3 * t["0"])
        assert r["closed_ms"] == pytest.approx(1e3 * t["1"])
        assert r["saved_share"] == pytest.approx((t["0"] - t["1"]) / t["0"])
        assert r["open_tok_s"] == pytest.approx(r["tokens_per_step"] / t["0"])
        assert r["tokens_per_step"] == (2 * 32 if r["phase"] == "train" else 4)
        for s in ("0.5", "0.75"):
            assert r[f"measured@{s}"] == pytest.approx(t["0"] / t[s])
            assert r[f"ideal@{s}"] == pytest.approx(1 / (1 - float(s) * r["saved_share"]))
            bound = 5 * math.sqrt(0.25 / raw[s]["decisions"])
            assert abs(r[f"sparsity@{s}"] - float(s)) <= bound
        assert raw["0"]["sparsity"] == 0.0 and raw["1"]["sparsity"] == 1.0
        assert r["probe_s"] > 0 and r["load_1m_start"] >= 0 and r["load_1m_end"] >= 0
    big = rec["summary"]["large"]
    assert big["counted_share"] == pytest.approx(cost.counted_share(LMConfig.preset("large")))
    assert "prediction" in big["label"] and rec["split"][-1]["model"].startswith("large")
    assert rec["config"]["model_configs"][0]["vocab_size"] == 256
    assert (tmp_path / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_are_refused_with_the_option_named(capsys):
    for argv, word in ((["--widths", "128,x"], "--widths"),
                       (["--sparsities", "0.5,1"], "--sparsities"),
                       (["--set", "d_model=64"], "--widths"), (["--repeats", "0"], "--repeats")):
        with pytest.raises(SystemExit):
            cost.parse_args(argv)
        assert word in capsys.readouterr().err


@pytest.mark.parametrize("autocast,want", [("none", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_option_times_the_steps_in_that_precision(autocast, want):
    """--autocast bf16 runs the timed training and decode steps under bf16 autocast (how the
    training loop runs on a GPU); none keeps them float32. Read off the experts' matmuls."""
    torch.manual_seed(0)
    model = SparseBKLM(_tiny("light"))
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".moe." in n]
    cost.time_training(model, 2, [0.0, 0.5], repeats=1, warmup=0, device="cpu", autocast=autocast)
    assert seen == {want}
    seen.clear()
    with torch.no_grad():
        cost.time_decode(model, 2, [0.0], steps=2, repeats=1, warmup=0, device="cpu",
                         autocast=autocast)
    assert seen == {want}
    assert cost.parse_args(["--autocast", autocast])[0].autocast == autocast


def test_an_adaptive_head_is_counted_where_it_is_read_and_tokens_follow_zipf():
    """With head_cutoff c the head costs its first level, D (c + 1), and the second, D D +
    D (V - c), for the targets past c: in training the share Zipf's law puts there, in decoding
    every position (every log-probability is formed). `zipf_tokens` draws that share."""
    cfg = LMConfig.preset("small", head_cutoff=2000)
    D, V, c = 128, 10000, 2000
    q = 1 - sum(1 / k for k in range(1, c + 1)) / sum(1 / k for k in range(1, V + 1))
    assert cost.zipf_rest_share(V, c) == pytest.approx(q, rel=1e-12)
    assert 0.16 < q < 0.17  # under the law; PTB's own share past 2,000 ids is 0.13
    assert cost.position_macs(cfg)["computed"]["head"] == pytest.approx(
        D * (c + 1) + q * (D * D + D * (V - c)), rel=1e-12)
    assert cost.position_macs(cfg, "decode")["skipped"]["head"] == D * (c + 1) + D * D + D * (V - c)
    full = LMConfig.preset("small")
    assert cost.position_macs(full, "decode") == cost.position_macs(full)
    assert cost.counted_share(cfg) > cost.counted_share(full)  # a cheaper head: experts weigh more
    n = 200_000
    ids = cost.zipf_tokens((n,), V, torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < V
    past = (ids >= c).double().mean().item()
    assert abs(past - q) < 5 * math.sqrt(q * (1 - q) / n)  # five binomial standard deviations
    assert (ids == 0).double().mean().item() == pytest.approx(
        1 / sum(1 / k for k in range(1, V + 1)), abs=5 * math.sqrt(0.1 / n))
