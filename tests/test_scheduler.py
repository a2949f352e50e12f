"""AdaptiveSparsityScheduler against the seed's formulas evaluated by hand at named points."""

from __future__ import annotations

import json
import math

import pytest

from sparsebk import AdaptiveSparsityScheduler
from sparsebk.scheduler import MAX_LAYER_SPARSITY, SCHEDULE_TYPES


def advance(sched: AdaptiveSparsityScheduler, n: int, accuracy=None) -> dict:
    out = None
    for _ in range(n):
        out = sched.step(accuracy)
    return out


def test_schedule_types_constant():
    assert SCHEDULE_TYPES == ("linear", "cosine", "step")


def test_defaults_are_the_seeds():
    c = AdaptiveSparsityScheduler().config
    assert (c.initial_sparsity, c.final_sparsity, c.initial_weight, c.final_weight,
            c.warmup_steps, c.schedule_type, c.accuracy_threshold) == (0.2, 0.5, 0.001, 0.01, 1000, "cosine", None)


def test_step_advances_counter_first():
    s = AdaptiveSparsityScheduler(warmup_steps=100)
    out = s.step()
    assert out["step"] == 1 and out["progress"] == 0.01
    assert set(out) == {"sparsity_target", "loss_weight", "progress", "step"}
    assert s.current_step == 1


def test_linear_at_step_50():
    s = AdaptiveSparsityScheduler(warmup_steps=100, schedule_type="linear")
    out = advance(s, 50)
    assert out["sparsity_target"] == pytest.approx(0.35, abs=1e-15)
    assert out["progress"] == 0.5


def test_cosine_at_named_points():
    s = AdaptiveSparsityScheduler(warmup_steps=100, schedule_type="cosine")
    first = s.step()
    assert first["sparsity_target"] == pytest.approx(0.2 + 0.15 * (1 - math.cos(math.pi / 100)), abs=1e-15)
    assert advance(s, 49)["sparsity_target"] == pytest.approx(0.35, abs=1e-15)  # step 50
    assert advance(s, 50)["sparsity_target"] == pytest.approx(0.5, abs=1e-15)  # step 100
    for _ in range(20):  # beyond warmup: stays at final, progress capped at 1
        out = s.step()
        assert out["sparsity_target"] == pytest.approx(0.5, abs=1e-15) and out["progress"] == 1.0


def test_step_schedule_at_10_30_60_80():
    s = AdaptiveSparsityScheduler(warmup_steps=100, schedule_type="step")
    got = {i: s.state_at(i)["sparsity_target"] for i in (10, 30, 60, 80)}
    assert got[10] == pytest.approx(0.2, abs=1e-15)
    assert got[30] == pytest.approx(0.2 + 0.33 * 0.3, abs=1e-15)
    assert got[60] == pytest.approx(0.2 + 0.67 * 0.3, abs=1e-15)
    assert got[80] == pytest.approx(0.5, abs=1e-15)
    # the boundaries themselves belong to the next stage (strict "<" in the seed)
    assert s.state_at(25)["sparsity_target"] == pytest.approx(0.299, abs=1e-15)
    assert s.state_at(75)["sparsity_target"] == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize("schedule_type", SCHEDULE_TYPES)
def test_weight_ramps_linearly_from_initial_to_final(schedule_type):
    s = AdaptiveSparsityScheduler(warmup_steps=100, schedule_type=schedule_type)
    assert s.state_at(0)["loss_weight"] == pytest.approx(0.001, abs=1e-18)
    assert s.state_at(50)["loss_weight"] == pytest.approx(0.0055, abs=1e-15)
    assert s.state_at(100)["loss_weight"] == pytest.approx(0.01, abs=1e-15)
    assert s.state_at(250)["loss_weight"] == pytest.approx(0.01, abs=1e-15)


def test_decreasing_schedule_is_allowed():
    s = AdaptiveSparsityScheduler(initial_sparsity=0.6, final_sparsity=0.2, warmup_steps=10,
                                  schedule_type="linear")
    assert s.state_at(5)["sparsity_target"] == pytest.approx(0.4, abs=1e-15)


def test_adaptive_adjustment_both_ways():
    s = AdaptiveSparsityScheduler(warmup_steps=100, schedule_type="linear", accuracy_threshold=3.0)
    plain = s.state_at(50)
    # validation loss above the threshold: this step's target * 0.9, weight * 0.5
    bad = advance(s, 50, accuracy=3.5)
    assert bad["sparsity_target"] == pytest.approx(0.35 * 0.9, abs=1e-15)
    assert bad["loss_weight"] == pytest.approx(0.0055 * 0.5, abs=1e-15)
    # below or equal to the threshold: unchanged
    good = s.step(2.5)
    assert good["sparsity_target"] == pytest.approx(0.2 + 0.3 * 0.51, abs=1e-15)
    assert good["loss_weight"] == pytest.approx(0.001 + 0.51 * 0.009, abs=1e-15)
    equal = s.step(3.0)
    assert equal["sparsity_target"] == pytest.approx(0.2 + 0.3 * 0.52, abs=1e-15)
    # no value given: unchanged, and the adjustment did not stick from earlier steps
    assert s.step()["sparsity_target"] == pytest.approx(0.2 + 0.3 * 0.53, abs=1e-15)
    assert plain["sparsity_target"] == pytest.approx(0.35, abs=1e-15)
    # the best (lowest) validation loss is tracked
    assert s.best_accuracy == 2.5


def test_no_threshold_means_no_adjustment_but_best_is_tracked():
    s = AdaptiveSparsityScheduler(warmup_steps=10, schedule_type="linear")
    out = s.step(1e9)
    assert out["sparsity_target"] == pytest.approx(0.23, abs=1e-15)
    s.step(4.0)
    s.step(7.0)
    assert s.best_accuracy == 4.0


@pytest.mark.parametrize("schedule_type", SCHEDULE_TYPES)
def test_state_at_equals_step_and_has_no_side_effects(schedule_type):
    s = AdaptiveSparsityScheduler(warmup_steps=40, schedule_type=schedule_type,
                                  accuracy_threshold=2.0, layer_scales=[0.5, 1.0, 2.5])
    probe = AdaptiveSparsityScheduler(warmup_steps=40, schedule_type=schedule_type,
                                      accuracy_threshold=2.0, layer_scales=[0.5, 1.0, 2.5])
    for i in range(1, 61):
        acc = None if i % 3 else (1.5 if i % 2 else 2.5)  # a mix of none / good / bad values
        before = probe.state_dict()
        expect = probe.state_at(i, acc)
        assert probe.state_dict() == before  # nothing advanced, nothing tracked
        assert s.step(acc) == expect  # exact equality, not approximate


def test_state_round_trip_mid_schedule_through_json():
    kwargs = dict(warmup_steps=100, schedule_type="cosine", accuracy_threshold=3.0,
                  layer_final_sparsity=[0.3, 0.6, 0.45])
    accs = [None if i % 7 else 3.0 + math.sin(i) for i in range(200)]
    ref = AdaptiveSparsityScheduler(**kwargs)
    ref_seq = [ref.step(a) for a in accs]

    first = AdaptiveSparsityScheduler(**kwargs)
    for a in accs[:37]:
        first.step(a)
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # strict JSON
    # a scheduler built with other settings (e.g. an actor restarted with defaults) takes the saved ones
    resumed = AdaptiveSparsityScheduler()
    resumed.load_state_dict(saved)
    assert resumed.current_step == 37 and resumed.best_accuracy == first.best_accuracy
    assert [resumed.step(a) for a in accs[37:]] == ref_seq[37:]
    assert resumed.state_dict() == ref.state_dict()


def test_state_dict_holds_only_plain_python_values():
    s = AdaptiveSparsityScheduler(layer_scales=(1.0, 2.0))
    s.step(3.25)

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (bool, int, float, str)

    assert plain(s.state_dict())
    assert s.state_dict()["config"]["layer_scales"] == [1.0, 2.0]


def test_reset():
    s = AdaptiveSparsityScheduler(warmup_steps=10, accuracy_threshold=1.0)
    first = s.step(0.5)
    advance(s, 5, accuracy=2.0)
    s.reset()
    assert s.current_step == 0 and s.best_accuracy is None
    assert s.step(0.5) == first


def test_layer_scales_clip_below_one():
    s = AdaptiveSparsityScheduler(warmup_steps=100, schedule_type="linear", accuracy_threshold=3.0,
                                  layer_scales=[0.0, 0.5, 1.0, 1.5, 4.0])
    out = s.state_at(100)
    assert out["sparsity_target"] == pytest.approx(0.5, abs=1e-15)
    assert out["layer_targets"] == pytest.approx([0.0, 0.25, 0.5, 0.75, MAX_LAYER_SPARSITY], abs=1e-15)
    assert MAX_LAYER_SPARSITY == 0.99
    # the adaptive factor scales the layer targets as well (before the clip)
    bad = s.state_at(50, 4.0)
    assert bad["layer_targets"] == pytest.approx([0.0, 0.5 * 0.315, 0.315, 1.5 * 0.315, 0.99], abs=1e-15)


def test_layer_final_sparsity_ramps_each_layer():
    s = AdaptiveSparsityScheduler(initial_sparsity=0.2, warmup_steps=100, schedule_type="linear",
                                  accuracy_threshold=3.0, layer_final_sparsity=[0.3, 0.6, 0.2])
    assert s.state_at(0)["layer_targets"] == pytest.approx([0.2, 0.2, 0.2], abs=1e-15)
    assert s.state_at(50)["layer_targets"] == pytest.approx([0.25, 0.4, 0.2], abs=1e-15)
    assert s.state_at(100)["layer_targets"] == pytest.approx([0.3, 0.6, 0.2], abs=1e-15)
    assert s.state_at(50, 3.5)["layer_targets"] == pytest.approx([0.225, 0.36, 0.18], abs=1e-15)
    assert s.config.num_layers == 3
    cos = AdaptiveSparsityScheduler(warmup_steps=100, layer_final_sparsity=[0.6])
    assert cos.state_at(1)["layer_targets"][0] == pytest.approx(0.2 + 0.2 * (1 - math.cos(math.pi / 100)), abs=1e-15)


@pytest.mark.parametrize("kwargs,match", [
    (dict(initial_sparsity=1.0), r"initial_sparsity=1\.0: .*\[0, 1\)"),
    (dict(initial_sparsity=-0.1), r"initial_sparsity=-0\.1"),
    (dict(final_sparsity=1.2), r"final_sparsity=1\.2"),
    (dict(final_sparsity=float("nan")), r"final_sparsity=nan"),
    (dict(initial_weight=-0.001), r"initial_weight=-0\.001"),
    (dict(final_weight=float("inf")), r"final_weight=inf"),
    (dict(warmup_steps=0), r"warmup_steps=0"),
    (dict(warmup_steps=2.5), r"warmup_steps=2\.5"),
    (dict(schedule_type="exp"), r"schedule_type='exp'"),
    (dict(accuracy_threshold=float("nan")), r"accuracy_threshold=nan"),
    (dict(accuracy_threshold="high"), r"accuracy_threshold='high'"),
    (dict(layer_scales=[]), r"layer_scales=\[\]"),
    (dict(layer_scales=[1.0, -0.5]), r"layer_scales\[1\]=-0\.5"),
    (dict(layer_scales=0.5), r"layer_scales=0\.5"),
    (dict(layer_final_sparsity=[0.3, 1.0]), r"layer_final_sparsity\[1\]=1\.0"),
    (dict(layer_scales=[1.0], layer_final_sparsity=[0.3]), r"not both"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveSparsityScheduler(**kwargs)


@pytest.mark.parametrize("value,match", [
    (float("nan"), r"current_accuracy=nan"),
    (float("inf"), r"current_accuracy=inf"),
    ("low", r"current_accuracy='low'"),
    (True, r"current_accuracy=True"),
])
def test_bad_current_accuracy_leaves_state_untouched(value, match):
    s = AdaptiveSparsityScheduler(warmup_steps=10)
    s.step(1.0)
    before = s.state_dict()
    with pytest.raises(ValueError, match=match):
        s.step(value)
    with pytest.raises(ValueError, match=match):
        s.state_at(3, value)
    assert s.state_dict() == before


def test_bad_state_at_step_and_bad_state_dicts():
    s = AdaptiveSparsityScheduler()
    with pytest.raises(ValueError, match=r"step=-1"):
        s.state_at(-1)
    with pytest.raises(ValueError, match=r"step=1\.5"):
        s.state_at(1.5)
    good = s.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['step'\]"):
        s.load_state_dict({k: v for k, v in good.items() if k != "step"})
    with pytest.raises(ValueError, match=r"version=99"):
        s.load_state_dict({**good, "version": 99})
    with pytest.raises(ValueError, match=r"step=-3"):
        s.load_state_dict({**good, "step": -3})
    with pytest.raises(ValueError, match=r"unknown keys \['gamma'\]"):
        s.load_state_dict({**good, "config": {**good["config"], "gamma": 1}})
    with pytest.raises(ValueError, match=r"warmup_steps=0"):
        s.load_state_dict({**good, "config": {**good["config"], "warmup_steps": 0}})
    with pytest.raises(ValueError, match=r"best_accuracy=nan"):
        s.load_state_dict({**good, "best_accuracy": float("nan")})
    assert s.state_dict() == good  # failed loads change nothing
