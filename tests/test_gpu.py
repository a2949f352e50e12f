"""The GPU path: BK-core, the model and a 1-GPU Ray Train run on CUDA, each checked against a
CPU reference. Every test here needs a CUDA device and skips cleanly without one.

TF32 is switched off for the comparisons, so CUDA float32 matmuls are true float32 and the
tolerances below are float32 rounding, not TF32's 10-bit mantissa.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "ray_jobs" / "configs" / "tiny.yaml"

# |G_ii| <= 1/Im z = 1 for z = 1j, so absolute tolerances are on the scale of the values.
# The float32 bound is the one tests/test_bk_core.py holds float32 to against float64.
BK_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture
def strict_fp32():
    """True float32 on CUDA for the duration of a test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _bk_case(B: int, N: int, dtype, with_offdiag: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    diag = -2.0 + torch.randn(B, N, generator=g, dtype=torch.float64)
    off = (0.5 + torch.rand(B, N - 1, generator=g, dtype=torch.float64)) if with_offdiag and N > 1 else None
    w = torch.randn(B, N, 2, generator=g, dtype=torch.float64)  # weights of a real test loss
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(diag), cast(off), w.to(dtype)


def _bk_value_and_grad(diag, off, w, z, causal, device):
    """G on `device` and d(sum w * [Re G, Im G]) / d diag, both returned on the CPU."""
    from sparsebk.model.bk_core import resolvent_diagonal

    d = diag.to(device).requires_grad_(True)
    o = None if off is None else off.to(device)
    g = resolvent_diagonal(d, z, offdiag=o, causal=causal)
    loss = (torch.view_as_real(g) * w.to(device)).sum()
    (grad,) = torch.autograd.grad(loss, d)
    return g.detach().cpu(), grad.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("N,with_offdiag", [(1, False), (7, True), (128, False), (1000, True)])
@pytest.mark.parametrize("z", [1j, 0.3 + 0.5j])
def test_bk_core_on_cuda_equals_cpu(dtype, causal, N, with_offdiag, z):
    from sparsebk.model.bk_core import resolvent_diagonal_reference

    diag, off, w = _bk_case(3, N, dtype, with_offdiag)
    g_cpu, grad_cpu = _bk_value_and_grad(diag, off, w, z, causal, "cpu")
    g_gpu, grad_gpu = _bk_value_and_grad(diag, off, w, z, causal, "cuda")
    assert g_gpu.dtype == g_cpu.dtype
    torch.testing.assert_close(g_gpu, g_cpu, **BK_TOL[dtype])
    # Gradients pass through |1/alpha|^2 factors <= 1/eta^2; scale the tolerance with that.
    tol = {k: v / min(1.0, z.imag) ** 2 for k, v in BK_TOL[dtype].items()}
    torch.testing.assert_close(grad_gpu, grad_cpu, **tol)
    # And both against the float64 loop reference (the trusted one).
    ref = resolvent_diagonal_reference(diag.double(), z, offdiag=None if off is None else off.double(),
                                       causal=causal)
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(g_gpu.to(ref.dtype), ref, rtol=BK_TOL[dtype]["rtol"],
                               atol=BK_TOL[dtype]["atol"] * scale)


def _debug_model(seed: int = 0, **overrides):
    from sparsebk.model.lm import LMConfig, SparseBKLM

    torch.manual_seed(seed)
    cfg = LMConfig.preset("debug", dropout_p=0.0, **overrides)
    return cfg, SparseBKLM(cfg)


def _forward_backward(model, tokens, device, autocast_dtype=None):
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    x = tokens.to(device)
    ctx = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
           if autocast_dtype is not None else torch.autocast(device_type="cpu", enabled=False))
    with ctx:
        out = model(x[:, :-1], targets=x[:, 1:])
    out["loss"].backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}
    return {k: v.detach().float().cpu() for k, v in out.items()}, grads


def test_model_forward_backward_on_cuda_equals_cpu(strict_fp32):
    """Eval mode (no gate noise, no dropout): the same weights give the same logits, losses,
    masks and parameter gradients on CUDA as on the CPU."""
    cfg, model = _debug_model()
    model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.n_seq + 1), generator=torch.Generator().manual_seed(1))
    out_cpu, grads_cpu = _forward_backward(copy.deepcopy(model), tokens, "cpu")
    out_gpu, grads_gpu = _forward_backward(copy.deepcopy(model), tokens, "cuda")
    # Hard masks first: if a gate decision flipped, every later comparison would be noise.
    assert torch.equal(out_gpu["layer_sparsity"], out_cpu["layer_sparsity"])
    for key in ("logits", "loss", "ce_loss", "sparsity_loss", "aux_loss"):
        torch.testing.assert_close(out_gpu[key], out_cpu[key], rtol=1e-4, atol=1e-5, msg=key)
    assert grads_gpu.keys() == grads_cpu.keys()
    for name in grads_cpu:
        torch.testing.assert_close(grads_gpu[name], grads_cpu[name], rtol=1e-3, atol=1e-5,
                                   msg=f"grad of {name}")


def test_model_trains_on_cuda_under_bf16_autocast(strict_fp32):
    """The training loop's precision (bf16 autocast, train mode, gate noise from the CUDA RNG):
    the loss is close to float32's and a few AdamW steps overfit one batch."""
    cfg, model = _debug_model()
    model = model.cuda().train()
    tokens = torch.randint(0, cfg.vocab_size, (8, cfg.n_seq + 1), generator=torch.Generator().manual_seed(2)).cuda()
    model.eval()
    with torch.no_grad():
        fp32 = model(tokens[:, :-1], targets=tokens[:, 1:])["ce_loss"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(tokens[:, :-1], targets=tokens[:, 1:])["ce_loss"]
    assert abs(bf16.item() - fp32.item()) < 0.02 * fp32.item(), (bf16.item(), fp32.item())
    # An untrained model predicts about uniformly: cross-entropy near ln(V).
    assert abs(fp32.item() - math.log(cfg.vocab_size)) < 0.5

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.cuda.manual_seed(0)
    first = None
    for _ in range(60):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens[:, :-1], targets=tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        first = out["ce_loss"].item() if first is None else first
    assert out["ce_loss"].item() < 0.7 * first, (first, out["ce_loss"].item())


@pytest.mark.ray
def test_ray_train_tiny_on_one_gpu_matches_cpu(ray_local, tmp_path):
    """`tiny` on 1 GPU worker (NCCL group, bf16 autocast, pinned batches) learns like the same
    run on 1 CPU worker: same data, same init, same schedule."""
    from sparsebk.data.manifest import load_manifest
    from sparsebk.train.config import load_config
    from sparsebk.train.ray_train.driver import run_training

    assert ray_local.cluster_resources().get("GPU", 0) >= 1, "Ray sees no GPU"
    summaries = {}
    for dev in ("cpu", "gpu"):
        cfg = load_config(TINY, [f"run.use_gpu={'true' if dev == 'gpu' else 'false'}", "run.num_workers=1",
                                 f"run.storage_path={tmp_path / 'runs'}", f"run.name=tiny-{dev}",
                                 f"data.dir={tmp_path / 'data'}", "run.plots=false"])
        summaries[dev] = run_training(cfg)
    cpu, gpu = summaries["cpu"], summaries["gpu"]
    vocab = load_manifest(tmp_path / "data")["vocab_size"]
    assert gpu["steps"] == cpu["steps"]
    # Both learned: well below the uniform predictor's perplexity (= vocabulary size).
    for name, s in summaries.items():
        assert s["best_val_ppl"] < 0.8 * vocab, (name, s["best_val_ppl"], vocab)
    # bf16 and the CUDA gate-noise stream change the path, not where a short run ends up.
    assert abs(gpu["best_val_loss"] - cpu["best_val_loss"]) < 0.1 * cpu["best_val_loss"], (gpu, cpu)
    assert json.loads((Path(gpu["run_dir"]) / "summary.json").read_text())["steps"] == gpu["steps"]


# --- the scaling knobs on CUDA (issue 16): accumulation, checkpointing, FSDP over NCCL --------

def test_accumulation_on_cuda_equals_one_big_batch(strict_fp32, tmp_path):
    """optim.grad_accum_steps on CUDA: 4 micro-batches of B rows give the gradients and the
    weights of one batch of 4B (eval-mode gate, no batch-statistic losses: see
    tests/test_scale.py's module doc for why that is the exact comparison), within the bounds
    tests/test_scale.py derives for two float32 evaluations of these steps (TF32 off)."""
    from test_scale import B, assert_close_all, exact_trainer, grads, make_cfg, rows, step_bounds

    from sparsebk.model.lm import SparseBKLM

    torch.manual_seed(0)
    model = SparseBKLM(make_cfg(tmp_path).model)
    big = exact_trainer(make_cfg(tmp_path), copy.deepcopy(model).cuda(), device="cuda")
    acc = exact_trainer(make_cfg(tmp_path, grad_accum_steps=4), copy.deepcopy(model).cuda(),
                        device="cuda")
    for step, bound in enumerate(step_bounds()):
        x = rows(4 * B, seed=step)
        big.train_step(x)
        acc.train_step(list(x.split(B)))
        assert_close_all([g.cpu() for g in grads(acc.net)], [g.cpu() for g in grads(big.net)],
                         f"step {step} grad", bound["grad"])
        assert_close_all([p.detach().cpu() for p in acc.net.parameters()],
                         [p.detach().cpu() for p in big.net.parameters()],
                         f"step {step} weight", bound["weight"])


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_activation_checkpointing_on_cuda_same_loss_and_gradients(strict_fp32, autocast_dtype):
    """Checkpointing replays the CUDA RNG (the gate noise) and the autocast state: the loss
    and every gradient equal the run without it, in float32 and under bf16 autocast."""
    from sparsebk.model.lm import LMConfig, SparseBKLM

    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = SparseBKLM(LMConfig.preset("debug", activation_checkpointing=ckpt)).cuda().train()
        model.set_sparsity_schedule(0.4, 0.5)
        x = torch.randint(0, 64, (6, 33), generator=torch.Generator().manual_seed(3)).cuda()
        torch.cuda.manual_seed(1)
        ctx = (torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype
               else torch.autocast("cuda", enabled=False))
        with ctx:
            out = model(x[:, :-1], targets=x[:, 1:])
        out["loss"].backward()
        results.append((out["loss"].detach().cpu(), out["layer_sparsity"].cpu(),
                        [p.grad.detach().float().cpu() for p in model.parameters()]))
    (l0, s0, g0), (l1, s1, g1) = results
    assert torch.equal(s1, s0)  # the recomputation took the forward's gate decisions
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for i, (a, b) in enumerate(zip(g1, g0)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"grad {i}")


def test_fsdp_over_nccl_follows_ddp_and_resumes(tmp_path):
    """FSDP with NCCL (one process per GPU, up to 2; bf16 autocast, accumulation 2,
    activation checkpointing): its loss curve follows DDP's, its sharded checkpoint resumes
    onto the same curve. On a 1-GPU machine this is a 1-worker run of the same code path."""
    from test_scale import _curve, _spawn

    world = min(2, torch.cuda.device_count())
    ddp = _spawn(tmp_path, world, "ddp", "ddp", cuda=True)
    fsdp = _spawn(tmp_path, world, "fsdp", "fsdp", cuda=True)
    want, got = _curve(ddp), _curve(fsdp)
    assert sorted(got) == list(range(1, 9))
    for step in want:  # bf16: a rare flipped gate decision moves a loss by far less than 2%
        assert got[step] == pytest.approx(want[step], rel=2e-2), step
    if world == 2:
        held = [r["train"][-1]["param_optim_mb"] for r in (ddp, fsdp)]
        assert 0.45 < held[1] / held[0] < 0.6, held
    resumed = _spawn(tmp_path, world, "fsdp", "fsdp2", restore=tmp_path / "fsdp-ckpt-4",
                     cuda=True)
    for step in range(5, 9):
        assert _curve(resumed)[step] == pytest.approx(got[step], rel=1e-3), step


def test_bench_scale_on_cuda(tmp_path):
    """`sparsebk bench scale --quick` on the GPU(s): every variant runs and reports CUDA
    memory; checkpointing keeps less activation memory than the baseline."""
    from sparsebk.bench.scale import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "scale.json").read_text())["rows"]}
    assert set(rows) == {"ddp", "fsdp", "ckpt", "compile", "accum4"}
    assert all(r["peak_kind"] == "cuda_peak_mb" for r in rows.values())
    assert rows["ckpt"]["activation_mb"] < rows["ddp"]["activation_mb"]
