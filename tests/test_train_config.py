"""Training config, schedule state, checkpoints, LR schedule and metrics files (no Ray cluster)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from sparsebk.model.lm import LMConfig
from sparsebk.scheduler import AdaptiveSparsityScheduler, SchedulerConfig
from sparsebk.train.schedule import Schedule, ScheduleNotReady, ScheduleState
from sparsebk.storage.checkpoint import load_checkpoint, save_checkpoint
from sparsebk.train.config import TrainConfig, apply_override, load_config
from sparsebk.train.trainer import lr_factor, lr_lambda
from sparsebk.train.metrics import MetricsWriter, progress_line, read_metrics, write_plots

CONFIGS = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs"
PRESETS = ["tiny", "ptb-cpu", "ptb-gpu-multinode"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert cfg.optim.max_steps == raw["optim"]["max_steps"]
    assert cfg.run.num_workers == raw["run"]["num_workers"]
    preset = LMConfig.preset(raw["model"]["preset"], vocab_size=1)
    assert (cfg.model.d_model, cfg.model.n_layers) == (preset.d_model, preset.n_layers)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert Path(cfg.run.storage_path).is_absolute()
    assert cfg.model.vocab_size is None  # the presets leave it to the dataset
    vocab = cfg.model.head_cutoff + 300  # an adaptive head's first level lies inside it
    resolved = cfg.resolve_vocab(vocab)
    assert resolved.model.vocab_size == vocab and resolved.model.d_model == cfg.model.d_model
    assert resolved.resolve_vocab(vocab + 200).model.vocab_size == vocab  # decided once
    if cfg.model.head_cutoff:  # a vocabulary the first level does not fit in is refused
        with pytest.raises(ValueError, match=rf"head_cutoff={cfg.model.head_cutoff} must be "
                                             rf"below vocab_size={cfg.model.head_cutoff}"):
            cfg.resolve_vocab(cfg.model.head_cutoff)


def test_overrides_apply_and_parse_yaml_values(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", [
        "optim.max_steps=7", "run.eval_every=7", "optim.betas=[0.8, 0.9]", "run.name=abc",
        "schedule.final_sparsity=0.3", "run.inject_faults=[raise@3, nan@4]",
        f"run.storage_path={tmp_path}"])
    assert cfg.optim.max_steps == 7 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.schedule.final_sparsity == 0.3
    assert cfg.run.faults() == [("raise", 3), ("nan", 4)]
    assert cfg.run.run_dir == f"{tmp_path}/abc"
    d: dict = {}
    apply_override(d, "a.b.c=1e-3")
    assert d == {"a": {"b": {"c": 1e-3}}}


@pytest.mark.parametrize("override, field", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.max_stepz=3", "optim.max_stepz"),
    ("optim.max_steps=abc", "optim.max_steps"),
    ("run.num_workers=-2", "run.num_workers"),
    ("run.name=has space", "run.name"),
    ("run.name=..", "run.name"),  # would escape run.storage_path
    ("run.inject_faults=[boom@3]", "run.inject_faults"),
    ("run.eval_every=100000", "run.eval_every"),
    ("run.stop_grace_s=-1", "run.stop_grace_s=-1: must be >= 0"),
    ("run.stop_grace_s=.inf", "run.stop_grace_s"),
    ("data.tokenizer=chars", "data.tokenizer"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.corpus=text", "data.text"),
    ("bogus.x=1", "bogus"),
    ("schedule.final_sparsity=1.5", "schedule.final_sparsity=1.5"),
    ("schedule.warmup_stepz=3", "schedule.warmup_stepz"),
    ("schedule.schedule_type=exp", "schedule.schedule_type='exp'"),
    ("schedule.layer_scales=[1, -1]", "schedule.layer_scales[1]=-1"),
    ("model.d_modle=8", "model.d_modle"),
    ("model.preset=huge", "huge"),
    ("schedule.layer_scales=[1, 1, 1]", "schedule.layer_scales"),  # tiny has 2 layers
    ("run.storage_path=ftp://host/runs", "run.storage_path"),  # no pyarrow file system
    ("data.dir=ftp://host/data", "data.dir"),
])
def test_bad_config_names_file_and_field(override, field):
    path = CONFIGS / "tiny.yaml"
    with pytest.raises(ValueError) as e:
        load_config(path, [override])
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    assert field in msg, msg


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="bad.yaml: top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ValueError, match="expected key.sub=value"):
        load_config(CONFIGS / "tiny.yaml", ["optim.lr"])
    with pytest.raises(ValueError, match=r"tiny\.yaml: override 'optim\.lr=\[1,': the value is "
                                         r"not valid YAML"):
        load_config(CONFIGS / "tiny.yaml", ["optim.lr=[1,"])


def test_lr_schedule_hand_values():
    cfg = load_config(CONFIGS / "tiny.yaml", ["optim.warmup_steps=4", "optim.max_steps=14",
                                              "run.eval_every=7", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg.optim)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway
    assert f(14) == pytest.approx(0.1)
    assert f(20) == pytest.approx(0.1)


def test_lr_factor_with_a_budget_fraction():
    """The decay's progress given (a wall-clock budget's fraction) instead of the step's."""
    o = load_config(CONFIGS / "tiny.yaml", ["optim.warmup_steps=4", "optim.min_lr_ratio=0.1"]).optim
    assert lr_factor(1, o, 0.5) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5))  # warmup x cosine
    assert lr_factor(10, o, 0.0) == 1.0
    assert lr_factor(10, o, 1.0) == lr_factor(10, o, 3.0) == pytest.approx(0.1)
    f = lr_lambda(o)  # the step's own progress: (step - warmup) / (max_steps - warmup)
    assert all(f(s) == lr_factor(s, o, max(0, s - 4) / (o.max_steps - 4)) for s in range(0, 60, 7))


def test_schedule_section_is_a_scheduler_config():
    """Loaded from YAML like the other sections, validated once; the scheduler is built from
    it as it is, and `to_dict` holds every field."""
    cfg = load_config(CONFIGS / "tiny.yaml")
    raw = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())["schedule"]
    assert cfg.schedule == SchedulerConfig(**raw)
    assert cfg.to_dict()["schedule"] == SchedulerConfig(**raw).to_dict()
    assert set(cfg.to_dict()["schedule"]) >= set(raw)
    sched = AdaptiveSparsityScheduler.from_config(cfg.schedule)
    assert sched.config is cfg.schedule
    assert sched.state_at(7) == AdaptiveSparsityScheduler(**raw).state_at(7)
    scaled = load_config(CONFIGS / "tiny.yaml", ["schedule.layer_scales=[1, 0.5]"])
    assert scaled.schedule.layer_scales == (1.0, 0.5)
    assert scaled.to_dict()["schedule"]["layer_scales"] == [1.0, 0.5]


def test_checkpoints_with_an_untyped_schedule_still_resume(tmp_path):
    """A checkpoint written when the schedule section was the dict the YAML gave (only the
    keys given, `{}` for none) compares equal with today's full section."""
    from sparsebk.train.resume import compare

    cfg = load_config(CONFIGS / "tiny.yaml", [f"run.storage_path={tmp_path}"])
    raw = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())["schedule"]
    old = {**cfg.to_dict(), "schedule": dict(raw)}
    assert compare({"train_config": old}, cfg.to_dict(), None, None) == []
    default = TrainConfig(run={"storage_path": str(tmp_path)})
    old = {**default.to_dict(), "schedule": {}}
    assert compare({"train_config": old}, default.to_dict(), None, None) == []
    changed = TrainConfig(run={"storage_path": str(tmp_path)}, schedule={"final_sparsity": 0.6})
    assert compare({"train_config": old}, changed.to_dict(), None, None) == [
        ("schedule.final_sparsity", "<absent>", 0.6)]


def test_schedule_state_matches_scheduler_and_restores():
    kw = dict(initial_sparsity=0.1, final_sparsity=0.5, warmup_steps=10, schedule_type="linear",
              accuracy_threshold=3.0, layer_scales=[1.0, 0.5, 2.0])
    s = ScheduleState(SchedulerConfig(**kw), n_layers=3)
    ref = AdaptiveSparsityScheduler(**kw)
    with pytest.raises(ScheduleNotReady):  # a fresh (or restarted) actor waits for a state
        s.values(1)
    s.reset()
    for step in range(1, 5):
        out = s.values(step)
        assert isinstance(out, Schedule)
        assert out.targets == pytest.approx(ref.state_at(step)["layer_targets"])
        assert out.weight == pytest.approx(ref.state_at(step)["loss_weight"])
    assert s.values(4) == out  # asking again gives the same answer (the scheduler is pure)
    s.report_validation(4.0)  # above the threshold: the next target is cut by 0.9
    saved = json.loads(json.dumps(s.state_dict()))  # JSON-able, as stored in checkpoints
    assert s.values(5).targets == pytest.approx(ref.state_at(5, 4.0)["layer_targets"])
    fresh = ScheduleState(SchedulerConfig(**kw), n_layers=3)  # a restarted actor
    fresh.load_state_dict(saved)
    assert fresh.values(5).targets == pytest.approx(ref.state_at(5, 4.0)["layer_targets"])
    assert fresh.stats() == {"calls": 5, "served": 1}
    assert saved["scheduler"]["best_accuracy"] == 4.0
    single = ScheduleState(SchedulerConfig(warmup_steps=4), n_layers=2)
    single.reset()
    expect = AdaptiveSparsityScheduler(warmup_steps=4).state_at(1)["sparsity_target"]
    assert single.values(1).targets == [pytest.approx(expect)] * 2


def test_checkpoint_round_trip_restores_training_state_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
    random.seed(5)
    sched_state = {"scheduler": {"step": 3}, "last_val_loss": None}
    save_checkpoint(tmp_path, rank=0, model=model, optimizer=opt, lr_scheduler=sched, step=3,
                    data_position={"epoch": 1, "batch_in_epoch": 2},
                    schedule_state=sched_state, extra={"val_loss": 1.5})
    expect_rand, expect_py = torch.rand(3), random.random()
    next_params = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    state = load_checkpoint(tmp_path, rank=0, model=model2, optimizer=opt2, lr_scheduler=sched2)
    assert state["step"] == 3 and state["data_position"] == {"epoch": 1, "batch_in_epoch": 2}
    assert state["schedule_state"] == sched_state and state["extra"]["val_loss"] == 1.5
    assert state["rng_restored"]
    assert torch.equal(torch.rand(3), expect_rand) and random.random() == expect_py
    for k, v in model2.state_dict().items():
        assert torch.equal(v, next_params[k])
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    # Rank 1's file: only its RNG; a rank without a file reports that it was not restored.
    assert not load_checkpoint(tmp_path, rank=1)["rng_restored"]
    assert not list(tmp_path.glob("*.tmp*"))  # written via temp files + rename
    with pytest.raises(ValueError, match="missing state.pt"):
        load_checkpoint(tmp_path / "nope", rank=0)


def test_metrics_file_keeps_last_record_per_step_and_plots(tmp_path):
    w = MetricsWriter(tmp_path)
    base = {"sparsity_layers": [0.1, 0.2], "target_layers": [0.2, 0.2], "loss_weight": 0.01,
            "lr": 1e-3, "tokens_per_s": 1000.0, "eta_s": 65.0}
    w.write("train", {"step": 5, "train_loss": 3.0, **base})
    w.write("train", {"step": 10, "train_loss": 2.5, **base})
    w.write("train", {"step": 10, "train_loss": 2.4, **base})  # re-run after a restart
    w.write("eval", {"step": 10, "val_loss": 2.6, "val_ppl": math.exp(2.6)})
    w.close()
    recs = read_metrics(tmp_path)
    assert [r["train_loss"] for r in recs["train"]] == [3.0, 2.4]
    line = progress_line(recs["train"][1], 100)
    assert line.startswith("step 10/100 loss 2.4000 ppl 11.02 ")
    assert "[0.10/0.20 0.20/0.20]" in line and "ETA 1m05s" in line
    paths = write_plots(tmp_path)
    assert [p.name for p in paths] == ["loss_ppl.png", "sparsity.png", "weight.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_metrics_file_with_a_cut_last_line_still_reads(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write("eval", {"step": 10, "val_loss": 2.6})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "step": 20, "val_lo')  # the writer died mid-line
    assert read_metrics(tmp_path) == {"eval": [{"kind": "eval", "step": 10, "val_loss": 2.6}]}
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "st\n{"kind": "eval", "step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 1 is not a JSON record"):
        read_metrics(tmp_path)

