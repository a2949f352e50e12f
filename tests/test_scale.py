"""Scaling knobs against single-process references: gradient accumulation (one process, and
DDP over 2 gloo processes).

Accumulation is exact only where the loss is a mean over rows: N micro-batches of B rows,
each loss scaled 1/N, give the gradient of the mean over the N * B rows. Two parts of the
training loss are not such means, so the comparisons switch them off:

- the gate's random noise: one forward of 4B rows draws its noise in a different order from
  four forwards of B rows (per layer across the batch, vs per batch across the layers), so
  the masks would differ. The models run in eval mode, where the gate is the deterministic
  per-position one (and dropout is off): a row's mask depends on that row alone.
- the sparsity loss S(mean mask, target) and the MoE balance loss are functions of batch
  statistics, not means of per-row terms: their weights are 0 here.

Gradient clipping is off (a huge bound) and the gradients are compared too, not only the
weights: AdamW's first step is nearly sign(g) * lr, blind to a wrong gradient scale. AdamW's
eps is 1e-6 here instead of 1e-8: the update g / (|g| + eps) of a gradient element near 1e-9
(an expert that saw few tokens), whose last bits depend on the summation order, would
otherwise move by a good fraction of lr between two equal computations. Even so an update
moves by lr * dg / eps for a gradient difference dg. The bounds come from the computation
(tests/rounding.py): the float32 rounding noise sigma of the losses, gradients and weights
after each step, measured on the float64 big-batch steps by Monte Carlo arithmetic (AdamW's
amplification included); two float32 evaluations (accumulated and big batch, checkpointed
and plain, compiled and eager) then agree within sqrt(2) LAMBDA sigma, per tensor.

FSDP under Ray Train (the schedule actor, a fault and a sharded restart) is tested in
tests/test_train_ray.py, with the module's other Ray Train runs on its one local Ray.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rounding import LAMBDA, SAMPLES, Float32Rounding, rms_deviation
from sparsebk.model.lm import SparseBKLM
from sparsebk.parallel import leave_worker
from sparsebk.train.config import TrainConfig
from sparsebk.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B = 3  # rows per micro-batch


def make_cfg(tmp_path: Path, run: dict | None = None, **optim) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": "debug", "vocab_size": 50, "dropout_p": 0.0, "moe_aux_weight": 0.0},
        "data": {"batch_size": B, "block_len": 16, "loader": "local",
                 "dir": str(tmp_path / "data")},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "max_steps": 10, "grad_clip": 1e9, **optim},
        "run": {"num_workers": 1, "eval_every": 10, "storage_path": str(tmp_path / "runs"),
                **(run or {})},
    })


def exact_trainer(cfg: TrainConfig, model: torch.nn.Module, rank: int = 0, world: int = 1,
                  device: str = "cpu") -> Trainer:
    """A Trainer whose loss is a mean over rows (see the module doc)."""
    t = Trainer(cfg, model, device=torch.device(device), rank=rank, world=world)
    t.net.set_sparsity_schedule(0.3, 0.0)
    for group in t.optimizer.param_groups:  # see the module doc
        group["eps"] = 1e-6
    t.model.eval()  # deterministic gate, no dropout
    return t


def rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (n, 17), generator=torch.Generator().manual_seed(seed))


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def assert_close_all(got, want, what: str, bounds: list[float]) -> None:
    """Tensor i of got and of want within bounds[i] (max norm)."""
    assert len(got) == len(want) == len(bounds)
    for i, (g, w, b) in enumerate(zip(got, want, bounds)):
        torch.testing.assert_close(g, w, rtol=0, atol=b, msg=lambda m: f"{what} {i}: {m}")


def pair_bounds(runs: list[list[torch.Tensor]], exact: list[torch.Tensor]) -> list[float]:
    """sqrt(2) LAMBDA sigma per tensor: two float32 evaluations of what `exact` holds (float64),
    sigma from the Monte Carlo `runs` of it (tests/rounding.py)."""
    return [math.sqrt(2) * LAMBDA * rms_deviation(torch.stack([r[i] for r in runs]), e)
            for i, e in enumerate(exact)]


def _big_steps(model: torch.nn.Module) -> list[dict]:
    """Two big-batch steps (rows(4B, seed=step)) of exact_trainer: per step, the loss, the
    gradients and the weights after it."""
    big = exact_trainer(make_cfg(Path("/nonexistent")), copy.deepcopy(model))
    out = []
    for step in range(2):
        loss = big.train_step(rows(4 * B, seed=step))["loss"]
        out.append({"loss": [loss], "grad": grads(big.net),
                    "weight": [p.detach().clone() for p in big.net.parameters()]})
    return out


@functools.lru_cache(maxsize=None)
def step_bounds() -> list[dict]:
    """pair_bounds of _big_steps of the model of torch.manual_seed(0), per step and kind:
    its float64 copy, SAMPLES Monte Carlo runs."""
    torch.manual_seed(0)
    model = SparseBKLM(make_cfg(Path("/nonexistent")).model).double()
    exact = _big_steps(model)
    runs = []
    for seed in range(SAMPLES):
        with Float32Rounding(seed=seed):
            runs.append(_big_steps(model))
    return [{k: pair_bounds([r[step][k] for r in runs], exact[step][k]) for k in exact[step]}
            for step in range(2)]


def loss_and_grad_bounds(model: torch.nn.Module, run) -> tuple[list[float], list[float]]:
    """pair_bounds of ([loss], gradients) of run(m) (forward and backward of a copy m of
    model), from its float64 copy."""
    def once():
        m = copy.deepcopy(model).double()
        loss = run(m)
        return [loss.detach()] + grads(m)

    exact = once()
    runs = []
    for seed in range(SAMPLES):
        with Float32Rounding(seed=seed):
            runs.append(once())
    bounds = pair_bounds(runs, exact)
    return bounds[:1], bounds[1:]


def test_accumulated_step_equals_one_big_batch(tmp_path):
    """One optimizer step of N=4 micro-batches of B rows == one step on a batch of 4B rows:
    gradients, weights after AdamW, and the step's mean loss; then a second step (AdamW's
    moments now matter) agrees too."""
    torch.manual_seed(0)
    model = SparseBKLM(make_cfg(tmp_path).model)
    big = exact_trainer(make_cfg(tmp_path), copy.deepcopy(model))
    acc = exact_trainer(make_cfg(tmp_path, grad_accum_steps=4), copy.deepcopy(model))
    for step, bound in enumerate(step_bounds()):
        x = rows(4 * B, seed=step)
        out_big = big.train_step(x)
        out_acc = acc.train_step(list(x.split(B)))
        assert_close_all(grads(acc.net), grads(big.net), f"step {step} grad", bound["grad"])
        assert_close_all(list(acc.net.parameters()), list(big.net.parameters()),
                         f"step {step} weight", bound["weight"])
        assert_close_all([out_acc["loss"]], [out_big["loss"]], f"step {step} loss",
                         bound["loss"])
    # one LR step per optimizer step, not per micro-batch
    assert acc.lr_sched.last_epoch == big.lr_sched.last_epoch == 2


def test_fit_takes_n_batches_per_step_and_counts_optimizer_steps(tmp_path):
    """fit: N batches per step, an epoch's partial group dropped, the data position counts
    batches (a resumed run skips exactly those), tokens/s counts all N * B rows."""
    cfg = make_cfg(tmp_path, {"eval_every": 5, "log_every": 5}, grad_accum_steps=3, max_steps=5)
    seen: list[tuple[int, int]] = []

    def batches(epoch, skip):  # 7 batches an epoch: 2 steps, 1 batch dropped
        for i in range(skip, 7):
            seen.append((epoch, i))
            yield rows(B, seed=100 * epoch + i)

    torch.manual_seed(0)
    t = Trainer(cfg, SparseBKLM(cfg.model), device=torch.device("cpu"), valid=rows(8))

    class Fixed:  # a constant schedule, no Ray
        def get(self, step, prefetch_next=True):
            from sparsebk.train.schedule import Schedule
            return Schedule([0.3] * cfg.model.n_layers, 0.1)

        def report_validation(self, loss):
            pass

        def checkpoint_state(self):
            return None

    t.schedule = Fixed()
    assert t.fit(batches) is None
    assert (t.state.step, t.state.epoch, t.state.batch_in_epoch) == (5, 2, 3)
    # epochs 0 and 1: batches 0-5 in two steps each, batch 6 read and dropped; epoch 2: 0-2
    assert [i for e, i in seen if e == 0] == list(range(7))
    assert [i for e, i in seen if e == 2] == [0, 1, 2]
    assert t.lr_sched.last_epoch == 5
    log = t.last_log
    assert log["step"] == 5
    assert log["tokens_per_s"] == pytest.approx(
        3 * B * 16 * 5 / (log["step_s"] * 5), rel=1e-6)
    t.close()


# --- DDP over two gloo processes -------------------------------------------------------------

def _accum_run(rank: int, world: int, tmp: str, out: str) -> None:
    """DDP over the spawn's process group, 2 micro-batches per step; rank 0 saves the weights,
    gradients and all-reduce counts to `out`."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    cfg = make_cfg(Path(tmp), grad_accum_steps=2)
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(SparseBKLM(cfg.model))
    calls = []

    def counting_hook(state, bucket):  # the all-reduce DDP would do, counted
        calls.append(1)
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    t = exact_trainer(cfg, ddp, rank=rank, world=world)
    # step 1: 2 micro-batches of B rows per rank; step 2: one batch of 2B rows per rank.
    # Together the ranks see rows 4B of each step, rank r the r-th half.
    x = rows(4 * B, seed=0)[2 * B * rank:2 * B * (rank + 1)]
    t.train_step(list(x.split(B)))
    per_step = [len(calls)]
    t.train_step(rows(4 * B, seed=1)[2 * B * rank:2 * B * (rank + 1)])
    per_step.append(len(calls) - per_step[0])
    if rank == 0:
        torch.save({"params": [p.detach() for p in t.net.parameters()],
                    "grads": grads(t.net), "calls": per_step}, out)


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    """Every 2-process gloo run of this module in one spawn (a spawn's imports cost more than
    all of its runs): the DDP accumulation steps, then DDP and FSDP 8-step runs, the FSDP
    run resumed from its step-4 sharded checkpoint on 2 workers, and on 1 (resharded)."""
    tmp = tmp_path_factory.mktemp("gloo")
    ckpt = tmp / "fsdp-ckpt-4"
    recs = _spawn_runs(tmp, [(2, "accum", "accum", None), (2, "ddp", "ddp", None),
                             (2, "fsdp", "fsdp", None), (2, "fsdp", "fsdp2", ckpt),
                             (1, "fsdp", "fsdp1", ckpt)])
    return {"tmp": tmp, "ckpt": ckpt, "accum": torch.load(tmp / "accum.pt", weights_only=True),
            **dict(zip(("ddp", "fsdp", "fsdp2", "fsdp1"), recs[1:]))}


def test_ddp_accumulation_on_two_workers_equals_one_big_batch(gloo_runs, tmp_path):
    """2 gloo workers x 2 micro-batches of B rows == one process with 4B rows; the gradient
    all-reduce runs once per optimizer step (no_sync on the first micro-batch)."""
    got = gloo_runs["accum"]

    torch.manual_seed(0)
    ref = exact_trainer(make_cfg(tmp_path), SparseBKLM(make_cfg(tmp_path).model))
    ref.train_step(rows(4 * B, seed=0))
    ref.train_step(rows(4 * B, seed=1))
    bound = step_bounds()[1]  # the same model, rows and steps (the sums grouped otherwise)
    assert_close_all(got["grads"], grads(ref.net), "grad", bound["grad"])
    assert_close_all(got["params"], list(ref.net.parameters()), "weight", bound["weight"])
    # as many bucket all-reduces in the accumulated step as in the plain one
    assert got["calls"][0] == got["calls"][1] >= 1


# --- activation checkpointing --------------------------------------------------------------

@pytest.mark.parametrize("heads,sparse", [(1, True), (2, False)])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(heads, sparse):
    """Training mode, random gate noise and dropout: the recomputation in backward replays the
    forward's RNG state, so the masks (hence the loss) and every gradient are those of the
    run without checkpointing."""
    from sparsebk.model.lm import LMConfig

    results = []
    x = rows(6)
    for ckpt in (False, True):
        cfg = LMConfig.preset("debug", vocab_size=50, bk_heads=heads,
                              use_sparse_computation=sparse, activation_checkpointing=ckpt)
        torch.manual_seed(0)
        model = SparseBKLM(cfg).train()
        model.set_sparsity_schedule(0.4, 0.5)
        torch.manual_seed(1)
        out = model(x[:, :-1], targets=x[:, 1:])
        out["loss"].backward()
        results.append((out, grads(model)))
    (plain, g_plain), (ckpt, g_ckpt) = results
    assert torch.equal(ckpt["layer_sparsity"], plain["layer_sparsity"])  # the same masks
    for key in ("loss", "ce_loss", "sparsity_loss", "aux_loss"):
        torch.testing.assert_close(ckpt[key], plain[key], rtol=0, atol=0, msg=key)

    def plain_step(m):  # the same forward in float64 (float64 draws: masks like these)
        torch.manual_seed(1)
        loss = m(x[:, :-1], targets=x[:, 1:])["loss"]
        loss.backward()
        return loss

    torch.manual_seed(0)
    model = SparseBKLM(LMConfig.preset("debug", vocab_size=50, bk_heads=heads,
                                       use_sparse_computation=sparse)).train()
    model.set_sparsity_schedule(0.4, 0.5)
    _, bounds = loss_and_grad_bounds(model, plain_step)
    assert_close_all(g_ckpt, g_plain, "grad", bounds)
    assert 0.0 < plain["layer_sparsity"].mean() < 1.0  # the gate did skip positions


# --- FSDP (fully_shard) against DDP, sharded checkpoints -------------------------------------

def _train_worker(rank: int, world: int, init_file: str, tmp: str, runs: list,
                  cuda: bool) -> None:
    """One worker of a gloo run (or several, one after the other, in the same processes: a
    spawn and its imports cost more than an 8-step run) of the Trainer, as the Ray worker
    builds it (sparsebk.train.ray_train.loop: same seeds, same wrapping), without Ray. `runs`: (world,
    parallel, name, restore) each, parallel "ddp" or "fsdp" (or "accum": `_accum_run`); a run on fewer workers than the one before gets a new
    process group of that size (the other ranks are done). `cuda`: NCCL, one GPU per worker,
    bf16 autocast (tests/test_gpu.py)."""
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    size = 0
    try:
        for i, (run_world, parallel, name, restore) in enumerate(runs):
            if run_world != size:
                if size:
                    dist.barrier()  # every rank's checkpoint files are written
                    dist.destroy_process_group()
                    size = 0
                if rank >= run_world:
                    break
                dist.init_process_group("nccl" if cuda else "gloo",
                                        init_method=f"file://{init_file}-{i}", rank=rank,
                                        world_size=run_world)
                size = run_world
            elif i:
                dist.barrier()  # the run before has written its checkpoints on every rank
            if parallel == "accum":
                _accum_run(rank, size, tmp, str(Path(tmp) / f"{name}.pt"))
            else:
                _train_run(rank, size, tmp, parallel, name, restore, device, cuda)
    finally:
        if size:
            dist.destroy_process_group()
    leave_worker()


def _train_run(rank: int, world: int, tmp: str, parallel: str, name: str, restore: str | None,
               device: torch.device, cuda: bool) -> None:
    import shutil
    from contextlib import nullcontext

    from sparsebk.parallel import shard
    from sparsebk.train.run_state import local_batches
    from sparsebk.train.schedule import LocalSchedule

    cfg = fsdp_cfg(Path(tmp), parallel, name)
    torch.manual_seed(1000 + rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1000)
        model = SparseBKLM(cfg.model)
    if parallel == "fsdp":
        model = shard(model, world, device)
    else:
        model = torch.nn.parallel.DistributedDataParallel(
            model.to(device), device_ids=[rank] if cuda else None)

    def reporter(metrics, directory):  # Ray merges the ranks' files; so do we
        if directory is not None:
            shutil.copytree(directory, Path(tmp) / f"{name}-ckpt-{metrics['step']}",
                            dirs_exist_ok=True)

    train, valid = fsdp_rows()
    t = Trainer(cfg, model, device=device, rank=rank, world=world, valid=valid,
                reporter=reporter, run_dir=cfg.run.run_dir,
                autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda
                else nullcontext)
    state = t.restore(restore) if restore else None
    t.schedule = LocalSchedule(cfg.schedule, cfg.model.n_layers, state)
    if restore and rank == 0:  # the weights as restored, gathered, for the test to compare
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu()
                for k, v in t.net.state_dict().items()}
    elif restore:
        [v.full_tensor() for v in t.net.state_dict().values() if hasattr(v, "full_tensor")]
    if restore and rank == 0:
        torch.save(full, Path(tmp) / f"{name}-restored.pt")
    t.finish(t.fit(lambda e, skip: local_batches(train, cfg, e, skip, rank, world)))


def fsdp_cfg(tmp: Path, parallel: str, name: str) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": "debug", "vocab_size": 50, "activation_checkpointing": True},
        "data": {"batch_size": 4, "block_len": 16, "eval_batch_size": 8, "loader": "local",
                 "dir": str(tmp / "data")},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 8, "grad_accum_steps": 2},
        "schedule": {"initial_sparsity": 0.1, "final_sparsity": 0.4, "warmup_steps": 6,
                     "initial_weight": 0.1, "final_weight": 1.0},
        "run": {"log_every": 1, "eval_every": 4, "num_workers": 2, "parallel": parallel,
                "name": name, "storage_path": str(tmp / "runs"), "seed": 1},
    })


def fsdp_rows() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (64, 17), generator=g), torch.randint(0, 50, (20, 17), generator=g)


def _spawn_runs(tmp: Path, runs: list[tuple], cuda: bool = False) -> list[dict]:
    """Runs (world, parallel, name, restore) one after the other in one spawn of the largest
    world's processes; each run's metrics records."""
    from sparsebk.train.metrics import read_metrics

    runs = [(w, par, name, str(r) if r else None) for w, par, name, r in runs]
    readable = [name for _, par, name, _ in runs if par != "accum"]
    world = max(r[0] for r in runs)
    mp.start_processes(_train_worker, args=(world, str(tmp / f"pg-{runs[0][2]}"), str(tmp),
                                            runs, cuda),
                       nprocs=world, join=True, start_method="spawn")
    return [read_metrics(tmp / "runs" / name) if name in readable else None
            for _, _, name, _ in runs]


def _spawn(tmp: Path, world: int, parallel: str, name: str, restore: Path | None = None,
           cuda: bool = False):
    return _spawn_runs(tmp, [(world, parallel, name, restore)], cuda)[0]


def _curve(recs: dict, key: str = "train_loss", kind: str = "train") -> dict[int, float]:
    return {r["step"]: r[key] for r in recs[kind]}


def test_fsdp_equals_ddp_and_resumes_from_sharded_checkpoints(gloo_runs):
    """2 gloo workers, accumulation 2, activation checkpointing, gate noise on: FSDP's
    training and validation losses follow DDP's step for step; FSDP holds about half the
    parameter + optimizer bytes per worker; its step-4 sharded checkpoint (one shard file per
    rank) resumes on 2 workers onto the same curve, loads into 1 worker (resharded) and into
    a plain single-process model."""
    from sparsebk.storage.checkpoint import load_model_weights

    tmp_path, ckpt = gloo_runs["tmp"], gloo_runs["ckpt"]
    ddp, fsdp, resumed, one = (gloo_runs[k] for k in ("ddp", "fsdp", "fsdp2", "fsdp1"))
    want, got = _curve(ddp), _curve(fsdp)
    assert sorted(got) == list(range(1, 9))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), step
    for step, v in _curve(ddp, "val_loss", "eval").items():
        assert _curve(fsdp, "val_loss", "eval")[step] == pytest.approx(v, rel=1e-4)
    held = {name: recs["train"][-1]["param_optim_mb"] for name, recs in (("ddp", ddp), ("fsdp", fsdp))}
    assert 0.45 < held["fsdp"] / held["ddp"] < 0.6, held

    assert {p.name for p in (ckpt / "shards").iterdir()} == {".metadata", "__0_0.distcp",
                                                              "__1_0.distcp"}
    assert "model" not in torch.load(ckpt / "state.pt", weights_only=True)

    for step in range(5, 9):
        assert _curve(resumed)[step] == pytest.approx(got[step], rel=1e-5), step

    assert sorted(_curve(one)) == [5, 6, 7, 8]  # it continued from step 4 on one worker
    plain = SparseBKLM(fsdp_cfg(tmp_path, "fsdp", "x").model)
    load_model_weights(ckpt, plain)
    restored = torch.load(tmp_path / "fsdp1-restored.pt", weights_only=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(restored[k], v), k
    assert torch.equal(torch.load(tmp_path / "fsdp2-restored.pt", weights_only=True)["pos_emb"],
                       plain.pos_emb)


# --- torch.compile ---------------------------------------------------------------------------

def test_compiled_experts_give_the_eager_loss_and_gradients():
    """run.compile compiles the experts in place: same parameter names (checkpoints load
    either way), and the loss and gradients of the eager model (eval mode: the same masks)."""
    from sparsebk.parallel import compile_blocks

    torch.manual_seed(0)
    cfg = make_cfg(Path("/nonexistent")).model
    eager = SparseBKLM(cfg).eval()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = rows(4)
    outs = []

    def step(model):
        loss = model(x[:, :-1], targets=x[:, 1:])["loss"]
        loss.backward()
        return loss

    loss_bound, grad_bounds = loss_and_grad_bounds(eager, step)  # the eager model's rounding
    for model in (eager, compiled):
        outs.append((step(model).detach(), grads(model)))
    assert_close_all([outs[1][0]], [outs[0][0]], "loss", loss_bound)
    assert_close_all(outs[1][1], outs[0][1], "grad", grad_bounds)


def test_bench_scale_smoke(tmp_path):
    """`sparsebk bench scale --quick` for one variant (the full table is `make bench`'s)."""
    from sparsebk.bench.scale import main

    assert main(["--quick", "--variants", "fsdp", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert row["variant"] == "fsdp" and row["workers"] == 2
    for key in ("tokens_per_s", "param_optim_mb", "activation_mb", "block_act_mb", "peak_mb"):
        assert row[key] > 0, key
