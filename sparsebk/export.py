"""Use a trained model: load it (model and tokenizer) from a training checkpoint, a run folder or
an exported folder; export a self-contained folder; evaluate it on a split of its dataset.

    m = load_checkpoint_model("runs/tiny")           # a run folder: its best checkpoint
    m = load_checkpoint_model("runs/tiny/checkpoint_2026-...")
    export(m, "models/tiny")                         # or: sparsebk export --run tiny --out ...
    m = load_pretrained("models/tiny")               # needs neither the run nor the dataset
    m.model, m.tokenizer, m.record                   # record: how the weights were trained

An exported folder holds:

    config.json          {"format": "sparsebk-model", "format_version": 1, "architecture",
                          "model_config", "tokenizer" (identity, eos_id, files), "training"
                          (this module's record), "train_config"}
    model.safetensors    the state dict (no pickle)
    vocab.txt | encoder.json, vocab.bpe    the tokenizer's files (none for "byte")
    README.md            how the model was trained, for a person

A run folder's best checkpoint is the one of lowest val_loss among those Ray Train kept
(`checkpoint_manager_snapshot.json`), else summary.json's "best_checkpoint". Every error
names the path at fault.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsebk.data.tokenizers import GPT2Tokenizer, Tokenizer, WordTokenizer, get_tokenizer
from sparsebk.lm import LMConfig, SparseBKLM
from sparsebk.train.checkpoint import STATE_FILE, load_model_weights
from sparsebk.train.metrics import safe_ppl

FORMAT, FORMAT_VERSION = "sparsebk-model", 1
CONFIG_FILE, WEIGHTS_FILE, README_FILE = "config.json", "model.safetensors", "README.md"
RAY_SNAPSHOT, SUMMARY_FILE = "checkpoint_manager_snapshot.json", "summary.json"


@dataclass
class Pretrained:
    """A loaded model (eval mode), its tokenizer, and the record of how it was trained:
    run_name, step, checkpoint, dataset_dir, eval_batch_size, val_loss, val_rows, test_loss,
    sparsity_layers (eval mode, at the checkpoint; None where not recorded)."""

    model: SparseBKLM
    tokenizer: Tokenizer
    record: dict
    source: Path


# --- finding a checkpoint ------------------------------------------------------------------
def run_dir(name: str, storage_path: str | None = None) -> Path:
    """The folder of run `name` under `storage_path` (default: the training config's)."""
    from sparsebk.train.config import RunConfig

    cfg = RunConfig(name=name, storage_path=storage_path or RunConfig.storage_path)
    path = Path(cfg.run_dir)
    if not path.is_dir():
        raise ValueError(f"{path}: no run folder here (run {name!r} under {cfg.storage_path})")
    return path


def _ray_results(folder: Path) -> list[dict]:
    path = folder / RAY_SNAPSHOT
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable Ray checkpoint snapshot ({e})") from None


def best_checkpoint(folder: Path) -> Path:
    """The kept checkpoint of lowest val_loss in a run folder."""
    scored = []
    for r in _ray_results(folder):
        loss = (r.get("metrics") or {}).get("val_loss")
        path = folder / str(r.get("checkpoint_dir_name"))
        if isinstance(loss, (int, float)) and math.isfinite(loss) and (path / STATE_FILE).is_file():
            scored.append((loss, path.name))
    if scored:
        return folder / min(scored)[1]
    summary = folder / SUMMARY_FILE
    if summary.is_file():
        best = json.loads(summary.read_text()).get("best_checkpoint")
        # the absolute path the driver wrote, else the same name here (a moved run folder)
        for path in ((Path(best), folder / Path(best).name) if best else ()):
            if (path / STATE_FILE).is_file():
                return path
    raise ValueError(f"{folder}: no checkpoint to load (no {STATE_FILE} under the checkpoints "
                     f"of {RAY_SNAPSHOT} or the best_checkpoint of {SUMMARY_FILE})")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir (or its state.pt) as itself; a run folder as its best checkpoint."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ValueError(f"{p}: no such checkpoint or run folder")
    if p.is_file() and p.name == STATE_FILE:
        return p.parent
    if (p / STATE_FILE).is_file():
        return p
    if (p / RAY_SNAPSHOT).is_file() or (p / SUMMARY_FILE).is_file():
        return best_checkpoint(p)
    if (p / CONFIG_FILE).is_file():
        raise ValueError(f"{p}: an exported model, not a training checkpoint; load it with "
                         "load_pretrained / --model")
    raise ValueError(f"{p}: not a training checkpoint (no {STATE_FILE}) nor a run folder "
                     f"(no {RAY_SNAPSHOT} or {SUMMARY_FILE})")


# --- building the pieces -------------------------------------------------------------------
def _tokenizer(root: Path, ident: dict, where: str) -> Tokenizer:
    """The tokenizer of identity `ident` ({name, checksum, files, ...}) from files in `root`."""
    name, files = ident.get("name"), list(ident.get("files") or [])
    missing = [f for f in files if not (root / f).is_file()]
    if missing or (name == "word" and not files):
        raise ValueError(f"{where}: the {name!r} tokenizer's file(s) {missing or ['vocab.txt']} "
                         f"are missing in {root}")
    if name == "word":
        tok: Tokenizer = WordTokenizer.from_file(root / files[0])
    elif name == "gpt2" and files:
        tok = GPT2Tokenizer(*(root / f for f in GPT2Tokenizer.FILES))
    else:
        tok = get_tokenizer(name)
    if tok.checksum != ident.get("checksum"):
        raise ValueError(f"{where}: the tokenizer rebuilt from {root} has checksum "
                         f"{tok.checksum[:16]}..., not the model's {str(ident.get('checksum'))[:16]}...")
    return tok


def _model(model_config: dict, state: dict | None, where: str) -> SparseBKLM:
    """A model of `model_config` holding `state` (None: left as built); a state of another
    model is refused."""
    try:
        model = SparseBKLM(LMConfig.from_dict(model_config))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if state is None:
        return model.eval()
    want = model.state_dict()
    problems = [f"{k}: {tuple(v.shape)} stored, {tuple(want[k].shape)} expected"
                for k, v in state.items() if k in want and v.shape != want[k].shape]
    problems += [f"{k}: missing" for k in want if k not in state]
    problems += [f"{k}: not in this model" for k in state if k not in want]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{where}: the weights are not those of the model its config "
                         f"describes: {'; '.join(problems[:3])}{more}")
    model.load_state_dict(state)
    return model.eval()


def _ray_metrics(ckpt: Path) -> dict:
    """The metrics Ray Train stored with this checkpoint (empty outside a run folder)."""
    for r in _ray_results(ckpt.parent):
        if r.get("checkpoint_dir_name") == ckpt.name:
            return dict(r.get("metrics") or {})
    return {}


def load_checkpoint_model(path: str | os.PathLike, device="cpu") -> Pretrained:
    """Model and tokenizer from a training checkpoint (or a run folder's best). The tokenizer
    is rebuilt from the files of the dataset the checkpoint names (none for byte and gpt2)."""
    ckpt = resolve_checkpoint(path)
    where = str(ckpt / STATE_FILE)
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"{where}: not a readable checkpoint ({e})") from None
    meta = state.get("meta") or {}
    for key in ("model_config", "train_config", "tokenizer", "dataset_dir"):
        if key not in meta:
            raise ValueError(f"{where}: no meta.{key} (a checkpoint written before checkpoints "
                             "recorded their configs and tokenizer); it cannot be rebuilt")
    if state.get("sharded", False):  # an FSDP run: the weights are DCP shards beside state.pt
        model = _model(meta["model_config"], None, where)
        try:
            load_model_weights(ckpt, model)
        except Exception as e:  # noqa: BLE001 (DCP raises several kinds; all mean "not these")
            raise ValueError(f"{ckpt}: the sharded weights do not load into the model its "
                             f"config describes: {e}") from None
    else:
        model = _model(meta["model_config"], state["model"], where)
    tok = _tokenizer(Path(meta["dataset_dir"]), meta["tokenizer"],
                     f"{where} (tokenizer from its dataset)")
    tc, metrics = meta["train_config"], _ray_metrics(ckpt)
    run_state = (state.get("extra") or {}).get("run_state") or {}
    n = meta["model_config"]["n_layers"]
    eval_batches = tc["run"].get("eval_batches")
    record = {
        "run_name": tc["run"]["name"], "step": state["step"], "checkpoint": str(ckpt),
        "dataset_dir": meta["dataset_dir"], "eval_batch_size": tc["data"]["eval_batch_size"],
        "val_loss": metrics.get("val_loss", run_state.get("last_val_loss")),
        "val_rows": (eval_batches * tc["data"]["eval_batch_size"] * max(1, tc["run"]["num_workers"])
                     if eval_batches else "all"),
        "test_loss": metrics.get("test_loss"),
        "sparsity_layers": ([metrics[f"sparsity_layer_{i}"] for i in range(n)]
                            if f"sparsity_layer_{n - 1}" in metrics else None),
    }
    return Pretrained(model.to(device), tok, {**record, "train_config": tc}, ckpt)


def load_pretrained(directory: str | os.PathLike, device="cpu") -> Pretrained:
    """Model and tokenizer from a folder written by `export` (no run, no dataset needed)."""
    from safetensors.torch import load_file

    root = Path(directory).expanduser().resolve()
    cpath = root / CONFIG_FILE
    if not cpath.is_file():
        raise ValueError(f"{root}: not an exported model (no {CONFIG_FILE})")
    try:
        cfg = json.loads(cpath.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cpath}: not readable JSON ({e})") from None
    if cfg.get("format") != FORMAT or cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cpath}: format {cfg.get('format')!r} version "
                         f"{cfg.get('format_version')!r}; this sparsebk reads {FORMAT!r} "
                         f"version {FORMAT_VERSION}")
    if cfg.get("architecture") != "SparseBKLM":
        raise ValueError(f"{cpath}: architecture {cfg.get('architecture')!r} is not SparseBKLM")
    wpath = root / WEIGHTS_FILE
    if not wpath.is_file():
        raise ValueError(f"{wpath}: weights file missing")
    model = _model(cfg["model_config"], load_file(wpath), str(wpath))
    tok = _tokenizer(root, cfg["tokenizer"], str(cpath))
    record = {**cfg["training"], "train_config": cfg.get("train_config")}
    return Pretrained(model.to(device), tok, record, root)


def load(*, run: str | None = None, storage_path: str | None = None,
         checkpoint: str | None = None, model: str | None = None, device="cpu") -> Pretrained:
    """One of: a run by name, a checkpoint (or run folder) path, an exported folder."""
    if sum(x is not None for x in (run, checkpoint, model)) != 1:
        raise ValueError("give exactly one of run, checkpoint, model")
    if model is not None:
        return load_pretrained(model, device)
    return load_checkpoint_model(run_dir(run, storage_path) if run else checkpoint, device)


# --- export --------------------------------------------------------------------------------
def _fmt(x, spec: str = ".4f") -> str:
    return "not recorded" if x is None else format(x, spec)


def _readme(m: Pretrained) -> str:
    r, c, t = m.record, m.model.config, m.tokenizer
    tc = r.get("train_config") or {}
    sched, optim = tc.get("schedule") or {}, tc.get("optim") or {}
    spars = r.get("sparsity_layers")
    spars_line = ("not recorded" if spars is None else
                  f"{sum(spars) / len(spars):.3f} (per layer: {', '.join(f'{s:.3f}' for s in spars)})")
    val, test = r.get("val_loss"), r.get("test_loss")
    val_ppl, test_ppl = (None if x is None else safe_ppl(x) for x in (val, test))
    return "\n".join([
        f"# {r['run_name']}: a sparse BK language model", "",
        f"Exported by `sparsebk export` from `{r['checkpoint']}`, training step {r['step']}"
        f" of {optim.get('max_steps', '?')}.", "",
        "| | |", "| --- | --- |",
        f"| validation perplexity | {_fmt(val_ppl, '.2f')} (loss {_fmt(val)}, "
        f"rows: {r.get('val_rows')}) |",
        f"| test perplexity | {_fmt(test_ppl, '.2f')}"
        f"{'' if test is not None else ' (the run measures test at its last step only)'} |",
        f"| eval-mode sparsity | {spars_line} |",
        f"| target sparsity (schedule) | {sched.get('initial_sparsity', '?')} -> "
        f"{sched.get('final_sparsity', '?')} |",
        f"| model | SparseBKLM: {c.n_layers} layers, d_model {c.d_model}, n_seq {c.n_seq}, "
        f"{c.num_experts} experts (top-{c.top_k}), {c.bk_heads} BK head(s) |",
        f"| tokenizer | {t.name}, vocabulary {t.vocab_size}, checksum {t.checksum[:16]}... |",
        f"| dataset | `{r['dataset_dir']}` |",
        f"| optimizer | AdamW lr {optim.get('lr', '?')}, {optim.get('max_steps', '?')} steps |",
        "", "The full training config is in config.json (`train_config`).", "",
        "## Use", "", "```python", "from sparsebk.lm import SparseBKLM", "",
        'model, tokenizer = SparseBKLM.from_pretrained("THIS_FOLDER")',
        "```", "",
        "`sparsebk eval --model THIS_FOLDER [--data DATASET_DIR] [--split test]` measures its "
        "perplexity on the dataset it was trained on.", ""])


def export(m: Pretrained, out: str | os.PathLike) -> Path:
    """Write `m` as a self-contained folder `out` (which must not exist or be empty)."""
    from safetensors.torch import save_file

    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in m.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        files = m.tokenizer.save(tmp)
        record = {k: v for k, v in m.record.items() if k != "train_config"}
        config = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "architecture": "SparseBKLM", "model_config": m.model.config.to_dict(),
                  "tokenizer": {**m.tokenizer.identity(), "eos_id": m.tokenizer.eos_id,
                                "files": files},
                  "training": record, "train_config": m.record.get("train_config")}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        (tmp / README_FILE).write_text(_readme(m))
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide the model from other users
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- evaluation ----------------------------------------------------------------------------
def evaluate_split(m: Pretrained, split: str = "valid", *, batch_size: int | None = None,
                   data_dir: str | os.PathLike | None = None, device="cpu") -> dict:
    """Perplexity over every row of a split of the model's dataset (or `data_dir`, which
    must have been made with the model's tokenizer), eval-mode sparsity per layer, tokens/s.
    One evaluation function: the trainer's `evaluate`, single process, float32."""
    from sparsebk.data import check_dataset, load_blocks
    from sparsebk.train.trainer import evaluate

    root = Path(data_dir or m.record["dataset_dir"]).expanduser().resolve()
    if data_dir is None and not root.exists():
        raise ValueError(f"{root}: the dataset the model was trained on is not here; give "
                         "another copy of it (--data DIR, made with the same tokenizer)")
    c = m.model.config
    manifest = check_dataset(root, vocab_size=c.vocab_size, block_len=c.n_seq, splits=[split])
    if manifest["tokenizer"]["checksum"] != m.tokenizer.checksum:
        raise ValueError(f"{root}: made with the tokenizer {manifest['tokenizer']['name']!r} "
                         f"of checksum {manifest['tokenizer']['checksum'][:16]}..., not the "
                         f"model's ({m.tokenizer.name!r}, {m.tokenizer.checksum[:16]}...)")
    blocks = load_blocks(root, split, verify_checksums=False)  # checked just above
    batch_size = batch_size or m.record.get("eval_batch_size") or 32
    device = torch.device(device)
    m.model.to(device)
    # one untimed batch first: first-call allocations and kernel choices are not throughput
    evaluate(m.model, blocks[:batch_size], batch_size=batch_size, device=device)
    t0 = time.perf_counter()
    loss, spars = evaluate(m.model, blocks, batch_size=batch_size, device=device)  # ends in a sync
    seconds = time.perf_counter() - t0
    tokens = blocks[:, 1:].numel()
    return {"source": str(m.source), "run_name": m.record.get("run_name"),
            "step": m.record.get("step"), "dataset_dir": str(root), "split": split,
            "rows": len(blocks), "tokens": tokens, "split_tokens": manifest["splits"][split]["tokens"],
            "loss": loss, "ppl": safe_ppl(loss), "sparsity": sum(spars) / len(spars),
            "sparsity_layers": spars, "tokens_per_s": tokens / max(seconds, 1e-9),
            "seconds": seconds, "batch_size": batch_size, "device": str(device)}


def eval_table(r: dict) -> str:
    layers = " ".join(f"{s:.3f}" for s in r["sparsity_layers"])
    return "\n".join([
        f"model       {r['source']} (run {r['run_name']}, step {r['step']})",
        f"data        {r['dataset_dir']} split {r['split']}: {r['rows']} rows, {r['tokens']} "
        f"predicted tokens (of {r['split_tokens']} in the split)",
        f"loss        {r['loss']:.4f}   perplexity {r['ppl']:.2f}",
        f"sparsity    {r['sparsity']:.3f} (eval mode; per layer {layers})",
        f"speed       {r['tokens_per_s']:.0f} tokens/s ({r['seconds']:.2f} s, batch "
        f"{r['batch_size']}, {r['device']})"])


# --- command line (`sparsebk export`, `sparsebk eval`) -------------------------------------
def _parser(prog: str, doc: str, *, model_source: bool):
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run's name: its best checkpoint (lowest val_loss)")
    src.add_argument("--checkpoint", help="a checkpoint folder (or a run folder)")
    if model_source:
        src.add_argument("--model", help="a folder written by `sparsebk export`")
    p.add_argument("--storage-path", default=None,
                   help="where runs are (default: the training config's, ./runs)")
    return p


def export_main(argv: list[str]) -> int:
    import sys

    p = _parser("sparsebk export", "write a trained model as a self-contained folder",
                model_source=False)
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    args = p.parse_args(argv)
    try:
        out = export(load(run=args.run, storage_path=args.storage_path,
                          checkpoint=args.checkpoint), args.out)
    except ValueError as e:
        print(f"sparsebk export: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def eval_main(argv: list[str]) -> int:
    import sys

    p = _parser("sparsebk eval", "perplexity, eval-mode sparsity and speed on a dataset split",
                model_source=True)
    p.add_argument("--split", choices=("valid", "test"), default="valid")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch (default: the training run's eval_batch_size)")
    p.add_argument("--data", default=None,
                   help="dataset folder (default: the one the model was trained on)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size={args.batch_size}: must be >= 1")
    try:
        m = load(run=args.run, storage_path=args.storage_path, checkpoint=args.checkpoint,
                 model=args.model)
        r = evaluate_split(m, args.split, batch_size=args.batch_size, data_dir=args.data,
                           device=args.device)
    except ValueError as e:
        print(f"sparsebk eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.json else eval_table(r))
    return 0
