"""Stopping a run on request (docs/operations.md, the fault matrix): SIGTERM to `sparsebk
train` stops its workers at the next step boundary with a checkpoint of that step, and the
same command resumes from it to the weights of a run that never stopped; a step that outlasts
run.stop_grace_s, or a second signal, aborts the run as Ray Train aborts it.

The stopped and the resumed run are `sparsebk train --address` subprocesses on the session's
local Ray (`ray_local`), as a scheduler runs and signals a driver; the uninterrupted reference
and the aborted runs run in this process on the same Ray, the latter signalled here (the
driver's own handlers, in its main thread). Each test prints its `ROW` (pytest -s)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from sparsebk.train.config import load_config
from conftest import RAY_TEST_ENV

pytestmark = [pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "ray_jobs" / "configs" / "tiny.yaml"


# Steps of the stopped run: enough that a SIGTERM sent after step 4 reaches the workers before
# the last step on a fast machine too. The driver handles a signal only when Ray's blocking
# get in `fit` next checks for signals, not at once; tiny's steps took 36 ms on one machine of
# this kind, where 40 steps ended before the stop arrived (a clean-clone run); with 120 the
# stop came after steps 21 and 31 there.
STEPS = 120


def _sets(tmp_path: Path, name: str, *extra: str) -> list[str]:
    """tiny, STEPS steps, one checkpoint at the end (a stop falls between checkpoints), the
    exact data loader."""
    return [f"data.dir={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}",
            f"run.name={name}", f"optim.max_steps={STEPS}", f"run.eval_every={STEPS}",
            "run.log_every=2",
            "data.loader=local", "run.plots=false", "optim.warmup_steps=1", *extra]


# --- one process: the Trainer and the schedule's state, no Ray ------------------------------
def _small_cfg(tmp_path: Path, max_steps: int = 12):
    from sparsebk.train.config import TrainConfig

    return TrainConfig.from_dict({
        "model": {"preset": "debug", "vocab_size": 50},
        "data": {"batch_size": 4, "block_len": 16, "eval_batch_size": 8, "loader": "local",
                 "dir": str(tmp_path / "data")},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "max_steps": max_steps},
        "schedule": {"initial_sparsity": 0.1, "final_sparsity": 0.4, "warmup_steps": 6},
        "run": {"log_every": 2, "eval_every": max_steps, "num_workers": 1,
                "storage_path": str(tmp_path / "runs")}})


class _StopBefore:
    """Trainer hooks: the driver's request reaches the schedule's state before step `at`."""

    def __init__(self, state, at: int | None):
        self.state, self.at = state, at

    def before_step(self, step: int) -> None:
        if step == self.at:
            self.state.request_stop()

    def loss(self, step, loss):
        return loss


def _fit(cfg, rows, valid, tmp_path: Path, stop_at=None, resume_from=None):
    """A single-process Trainer fit (LocalSchedule); returns it and its checkpoint folders."""
    import shutil

    from sparsebk.model.lm import SparseBKLM
    from sparsebk.train.schedule import LocalSchedule
    from sparsebk.train.run_state import local_batches
    from sparsebk.train.trainer import Trainer

    saved = []

    def reporter(metrics, directory):
        if directory is not None:
            saved.append(tmp_path / f"ckpt-{len(list(tmp_path.glob('ckpt-*')))}")
            shutil.copytree(directory, saved[-1])

    torch.manual_seed(0)
    t = Trainer(cfg, SparseBKLM(cfg.model), device=torch.device("cpu"), valid=valid,
                reporter=reporter)
    sched = t.restore(resume_from) if resume_from is not None else None
    t.schedule = LocalSchedule(cfg.schedule, cfg.model.n_layers, sched)
    t.hooks = _StopBefore(t.schedule.state, stop_at)
    stopped = t.fit(lambda epoch, start: local_batches(rows, cfg, epoch, start, 0, 1))
    t.finish(stopped)
    return t, stopped, saved


@pytest.mark.usefixtures("one_torch_thread")
def test_a_stopped_trainer_saves_its_last_step_and_resumes_to_the_same_weights(tmp_path):
    """The schedule's state asked to stop before step 5: the Trainer trains step 5, saves a
    checkpoint of it (validation measured, not given to the schedule) and returns; a Trainer
    restored from it trains steps 6-12 to the weights of a fit that never stopped."""
    cfg = _small_cfg(tmp_path)
    rows = torch.randint(0, 50, (96, 17), generator=torch.Generator().manual_seed(1))
    valid = torch.randint(0, 50, (16, 17), generator=torch.Generator().manual_seed(2))
    ref, stopped, _ = _fit(cfg, rows, valid, tmp_path / "ref")
    assert stopped is None and ref.state.step == 12
    a, stopped, saved = _fit(cfg, rows, valid, tmp_path / "a", stop_at=5)
    assert stopped == "stopped at step 5 on request, with a checkpoint of that step"
    assert a.state.step == 5 and len(saved) == 1
    state = torch.load(saved[0] / "state.pt", weights_only=True)
    assert state["step"] == 5 and state["schedule_state"]["last_val_loss"] is None
    b, stopped, _ = _fit(cfg, rows, valid, tmp_path / "b", resume_from=saved[0])
    assert stopped is None and b.state.step == 12
    for (k, v), w in zip(ref.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(v, w), k


def _trained_steps(run_dir: Path, rank: int) -> list[list[int]]:
    """The steps each worker process of `rank` trained, in order (schedule/rank{r}.jsonl)."""
    seqs: dict[int, list[int]] = defaultdict(list)
    for line in (run_dir / "schedule" / f"rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        seqs[r["pid"]].append(r["step"])
    return list(seqs.values())


def _newest_state(run_dir: Path) -> dict:
    from sparsebk.train.resume import list_checkpoints

    import pyarrow.fs as pafs

    newest = list_checkpoints(pafs.LocalFileSystem(), str(run_dir))[0]
    return torch.load(Path(newest) / "state.pt", weights_only=True)


def _cli(address: str, sets: list[str], log: Path) -> subprocess.Popen:
    """`sparsebk train --address` (the session's Ray: no Ray start of its own)."""
    env = dict(os.environ, **RAY_TEST_ENV)
    cmd = [sys.executable, "-m", "sparsebk.cli", "train", "--config", str(TINY),
           "--address", address, *[a for s in sets for a in ("--set", s)]]
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.ray
def test_sigterm_stops_at_a_step_boundary_and_the_same_command_resumes_exactly(
        tmp_path, ray_local):
    """SIGTERM while `sparsebk train` trains between checkpoints: exit 1, one line naming a
    checkpoint of the last step trained (no step lost), the lease released; the same command
    then trains the remaining steps only, and ends with the weights of the reference run."""
    from sparsebk.train.ray_train.driver import run_training

    ref = run_training(load_config(TINY, _sets(tmp_path, "ref")))
    assert ref["steps"] == STEPS
    run_dir, log = tmp_path / "runs" / "term", tmp_path / "term.log"
    address = ray_local.get_runtime_context().gcs_address
    proc = _cli(address, _sets(tmp_path, "term"), log)
    try:
        t0 = time.time()
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and '"step": 4,' in metrics.read_text()):  # a few steps in
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < 300, "no training step logged"
            time.sleep(0.2)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = _finish(proc, 120)
        took = time.time() - sent
    finally:
        _finish(proc, 0)
    out = log.read_text()
    ours = [line for line in out.splitlines() if line.startswith("sparsebk train:")]
    print(f"\nROW SIGTERM to the driver: exited {took:.1f} s after the signal: {ours}")
    assert rc == 1, out[-3000:]
    # no traceback of the driver's (Ray forwards its processes' logs as "(Name pid=...) ...")
    own = [line for line in out.splitlines() if not re.match(r"(\x1b\[\d+m)?\(", line)]
    assert len(ours) == 1 and not any("Traceback" in line for line in own), out[-3000:]
    m = re.search(r"stopped by SIGTERM after step (\d+): latest checkpoint (\S+) \(step \1, "
                  r"no step to redo\); the same command resumes from it$", ours[0])
    assert m, ours[0]
    step = int(m.group(1))
    assert 4 <= step < STEPS
    assert Path(m.group(2)).parent == run_dir and (Path(m.group(2)) / "manifest_rank0.json").is_file()
    assert _newest_state(run_dir)["step"] == step  # the newest checkpoint holds that step
    for rank in (0, 1):  # ... and no rank trained past it
        assert _trained_steps(run_dir, rank) == [list(range(1, step + 1))]
    assert not (run_dir / "driver.lease.json").exists()

    proc = _cli(address, _sets(tmp_path, "term"), log)  # the same command
    assert _finish(proc, 400) == 0, log.read_text()[-3000:]
    for rank in (0, 1):
        assert _trained_steps(run_dir, rank) == [list(range(1, step + 1)),
                                                 list(range(step + 1, STEPS + 1))]
    got, want = _newest_state(run_dir), _newest_state(tmp_path / "runs" / "ref")
    assert got["step"] == want["step"] == STEPS
    assert got["model"].keys() == want["model"].keys()
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k  # bit-identical: the stop changed nothing


def _signal_at_the_hang(run_dir: Path, signals: list[int], out: dict) -> threading.Thread:
    """Sends `signals` to this process, a second apart, once the hang fault fired."""
    def go():
        while not (run_dir / "faults" / "hang@6").exists():
            time.sleep(0.1)
        out["sent"] = time.time()
        for i, s in enumerate(signals):
            if i:
                time.sleep(1)
            os.kill(os.getpid(), s)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th


@pytest.mark.ray
@pytest.mark.parametrize("grace, signals, why", [
    (2, [signal.SIGINT], "no step ended within run.stop_grace_s=2 s"),
    (300, [signal.SIGTERM, signal.SIGTERM], "a second SIGTERM"),
])
def test_a_stop_that_cannot_reach_a_step_boundary_aborts(tmp_path, ray_local, grace, signals,
                                                         why):
    """The last rank hangs before step 6 (a step that never ends): a SIGINT waits
    run.stop_grace_s, a second SIGTERM does not; either way the run is aborted, and the line
    names the checkpoint of step 4, the latest one."""
    from sparsebk.train.ray_train.driver import run_training
    from sparsebk.train.ray_train.stopping import Stopped

    cfg = load_config(TINY, _sets(tmp_path, "hang", "run.eval_every=4", "run.inject_faults=[hang@6]",
                                  f"run.stop_grace_s={grace}"))
    out: dict = {}
    _signal_at_the_hang(Path(cfg.run.run_dir), signals, out)
    with pytest.raises(Stopped) as err:
        run_training(cfg)
    took = time.time() - out["sent"]
    msg = str(err.value)
    print(f"\nROW stop aborted ({why}): ended {took:.1f} s after the first signal: {msg}")
    name = signal.Signals(signals[0]).name
    assert f"stopped by {name} ({why}): latest checkpoint " in msg, msg
    assert "the steps after it are redone" in msg and "the same command resumes" in msg
    latest = Path(msg.split("latest checkpoint ")[1].split(" ")[0])
    assert torch.load(latest / "state.pt", weights_only=True)["step"] == 4
    if len(signals) == 1:
        assert grace <= took < grace + 60  # the grace period, then the abort (seconds)
    else:
        assert took < 60  # the second signal did not wait for the grace period


def test_a_signal_before_the_fit_stops_at_once_and_the_handlers_are_put_back():
    """Nothing trains yet (data preparation, the checks): the first SIGTERM ends the driver
    with its one line; the process's own handlers are back afterwards."""
    from sparsebk.train.ray_train.stopping import Stopped, stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.monotonic()
    with pytest.raises(Stopped) as err:
        with stop_on_signals(90, "r"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises in here
    assert time.monotonic() - t0 < 10
    assert str(err.value) == ("run r stopped by SIGTERM while no worker trained for it; the "
                              "same command resumes from its latest checkpoint")
    assert {s: signal.getsignal(s) for s in before} == before
