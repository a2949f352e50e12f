"""Use a trained model: load it (model and tokenizer) from a training checkpoint, a run folder or
an exported folder; export a self-contained folder; evaluate it on a split of its dataset.

    m = load_checkpoint_model("runs/tiny")           # a run folder: its best checkpoint
    m = load_checkpoint_model("runs/tiny/checkpoint_2026-...")
    m = load_checkpoint_model("s3://bucket/runs/tiny?endpoint_override=...")  # in a bucket
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

Checkpoints and run folders are local paths or URIs (sparsebk.storage.run_folder finds them): from an
object store, state.pt is read into memory and an FSDP run's DCP shards are copied into a
temporary folder, removed after loading. A checkpoint carries its tokenizer's files
(meta.tokenizer_files, checked against the tokenizer's checksum); one written before that
rebuilds its tokenizer from its dataset's files. Every error names the path or URI at fault.
The command lines (`sparsebk export`, `sparsebk eval`) are sparsebk.inference.cli.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsebk.data.tokenizers import GPT2Tokenizer, Tokenizer, WordTokenizer, get_tokenizer
from sparsebk.model.lm import LMConfig, SparseBKLM
from sparsebk.storage.run_folder import (EXPORT_CONFIG, best_checkpoint, local_dir,  # noqa: F401 (API)
                                 ray_metrics, resolve_checkpoint, run_dir)
from sparsebk.storage.store import Store, is_uri, open_store, resolve_location
from sparsebk.storage.checkpoint import (SHARDS_DIR, STATE_FILE, load_sharded_weights,
                                         verify_checkpoint)
from sparsebk.evaluation import (context_scores, evaluate, evaluate_strided, loss_by_position,
                                 safe_ppl)

FORMAT, FORMAT_VERSION = "sparsebk-model", 1
CONFIG_FILE, WEIGHTS_FILE, README_FILE = EXPORT_CONFIG, "model.safetensors", "README.md"


@dataclass
class Pretrained:
    """A loaded model (eval mode), its tokenizer, and the record of how it was trained:
    run_name, step, checkpoint, dataset_dir, eval_batch_size, val_loss, val_rows, test_loss,
    sparsity_layers (eval mode, at the checkpoint; None where not recorded)."""

    model: SparseBKLM
    tokenizer: Tokenizer
    record: dict
    source: Path | str  # a local folder, or the URI of a checkpoint in an object store


# --- building the pieces -------------------------------------------------------------------
def _tokenizer(root: Path, ident: dict, where: str, source: str | None = None) -> Tokenizer:
    """The tokenizer of identity `ident` ({name, checksum, files, ...}) from files in `root`
    (named `source` in errors: default, `root`)."""
    name, files = ident.get("name"), list(ident.get("files") or [])
    source = source or str(root)
    missing = [f for f in files if not (root / f).is_file()]
    if missing or (name == "word" and not files):
        raise ValueError(f"{where}: the {name!r} tokenizer's file(s) {missing or ['vocab.txt']} "
                         f"are missing in {source}")
    if name == "word":
        tok: Tokenizer = WordTokenizer.from_file(root / files[0])
    elif name == "gpt2" and files:
        tok = GPT2Tokenizer(*(root / f for f in GPT2Tokenizer.FILES))
    else:
        tok = get_tokenizer(name)
    if tok.checksum != ident.get("checksum"):
        raise ValueError(f"{where}: the tokenizer rebuilt from {source} has checksum "
                         f"{tok.checksum[:16]}..., not the model's {str(ident.get('checksum'))[:16]}...")
    return tok


def _tokenizer_of(files: dict[str, bytes], ident: dict, where: str, source: str) -> Tokenizer:
    """`_tokenizer` from the files' contents (a checkpoint's own copy, or read from a bucket),
    put in a temporary folder for the tokenizers to read."""
    with tempfile.TemporaryDirectory(prefix="sparsebk-tokenizer-") as tmp:
        for name, data in files.items():
            if name != Path(name).name or name in ("", ".", ".."):
                raise ValueError(f"{where}: tokenizer file {name!r} is not a plain file name")
            Path(tmp, name).write_bytes(data)
        try:
            return _tokenizer(Path(tmp), ident, where, source)
        except ValueError as e:  # a tokenizer's own error names the temporary copy
            raise ValueError(str(e).replace(tmp, source)) from None


def _checkpoint_tokenizer(meta: dict, where: str) -> Tokenizer:
    """From the files the checkpoint carries, else (a checkpoint written before it carried
    them) from those of its dataset, a local path or a URI."""
    ident, data = meta["tokenizer"], str(meta["dataset_dir"])
    names = list(ident.get("files") or [])
    own = meta.get("tokenizer_files") or {}
    if names and all(isinstance(own.get(n), str) for n in names):
        return _tokenizer_of({n: own[n].encode("utf-8") for n in names}, ident,
                             f"{where} (its tokenizer files)", "meta.tokenizer_files")
    where = f"{where} (tokenizer from its dataset)"
    if not is_uri(data):
        return _tokenizer(Path(data), ident, where)
    store = open_store(data)
    return _tokenizer_of({n: store.read_bytes(n) for n in names if store.is_file(n)}, ident,
                         where, data)


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


def _read_state(store: Store, where: str) -> dict:
    try:
        source = (store.path(STATE_FILE) if store.is_local  # an object: read into memory
                  else io.BytesIO(store.read_bytes(STATE_FILE)))
        return torch.load(source, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"{where}: not a readable checkpoint ({e})") from None


def _checkpoint_model(store: Store, state: dict, meta: dict, where: str) -> SparseBKLM:
    if not state.get("sharded", False):
        return _model(meta["model_config"], state["model"], where)
    # an FSDP run: the weights are DCP shards beside state.pt
    model = _model(meta["model_config"], None, where)
    try:
        with local_dir(store.join(SHARDS_DIR)) as shards:
            load_sharded_weights(shards, model)
    except Exception as e:  # noqa: BLE001 (DCP raises several kinds; all mean "not these")
        raise ValueError(f"{store.uri}: the sharded weights do not load into the model its "
                         f"config describes: {e}") from None
    return model


def _record(state: dict, meta: dict, ckpt: Path | str) -> dict:
    """How the checkpoint's weights were trained (Pretrained.record)."""
    tc, metrics = meta["train_config"], ray_metrics(ckpt)
    run_state = (state.get("extra") or {}).get("run_state") or {}
    n = meta["model_config"]["n_layers"]
    eval_batches = tc["run"].get("eval_batches")
    return {
        "run_name": tc["run"]["name"], "step": state["step"], "checkpoint": str(ckpt),
        "dataset_dir": meta["dataset_dir"], "eval_batch_size": tc["data"]["eval_batch_size"],
        "val_loss": metrics.get("val_loss", run_state.get("last_val_loss")),
        "val_rows": (eval_batches * tc["data"]["eval_batch_size"] * max(1, tc["run"]["num_workers"])
                     if eval_batches else "all"),
        "test_loss": metrics.get("test_loss"),
        "sparsity_layers": ([metrics[f"sparsity_layer_{i}"] for i in range(n)]
                            if f"sparsity_layer_{n - 1}" in metrics else None),
        "train_config": tc,
    }


def load_checkpoint_model(path: str | os.PathLike, device="cpu") -> Pretrained:
    """Model and tokenizer from a training checkpoint (or a run folder's best), a local path or
    a URI. The tokenizer is rebuilt from the files the checkpoint carries, else from those of
    the dataset it names (none needed for byte and gpt2)."""
    ckpt = resolve_checkpoint(path)
    store = open_store(ckpt)
    where = store.location(STATE_FILE)
    verify_checkpoint(store)  # before anything in it is read: a corrupt one is refused
    state = _read_state(store, where)
    meta = state.get("meta") or {}
    for key in ("model_config", "train_config", "tokenizer", "dataset_dir"):
        if key not in meta:
            raise ValueError(f"{where}: no meta.{key} (a checkpoint written before checkpoints "
                             "recorded their configs and tokenizer); it cannot be rebuilt")
    model = _checkpoint_model(store, state, meta, where)
    tok = _checkpoint_tokenizer(meta, where)
    return Pretrained(model.to(device), tok, _record(state, meta, ckpt), ckpt)


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
    """One of: a run by name, a checkpoint (or run folder) path or URI, an exported folder."""
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
        "## Use", "", "```python", "from sparsebk import load_pretrained", "",
        'loaded = load_pretrained("THIS_FOLDER")  # .model (eval mode), .tokenizer, .record',
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
                   data_dir: str | os.PathLike | None = None, device="cpu",
                   stride: int | None = None, by_position: bool = False,
                   by_context_every: int | None = None) -> dict:
    """Perplexity over every row of a split of the model's dataset (or `data_dir`, which
    must have been made with the model's tokenizer), eval-mode sparsity per layer, tokens/s.
    The dataset is a local path or a URI. One evaluation function: the trainer's `evaluate`,
    single process, float32. With `stride` S also the sliding-window perplexity
    (`evaluate_strided`: windows of the dataset's block_len L every S ids, each token scored
    once with at least L - S tokens before it) as `loss_strided` / `ppl_strided`. With
    `by_position` also the mean loss at each position of the window (`loss_by_position`:
    entry t predicts from t + 1 ids of context) as `loss_by_position`. With
    `by_context_every` N also every N-th target scored from exactly 1, 2, 4, ..., block_len
    ids (`context_scores`: the same targets at each context, with each doubling's gain and its
    paired standard error) as `by_context`."""
    c = m.model.config
    if stride is not None and not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"--stride={stride}: must be a positive integer")
    if by_context_every is not None and (isinstance(by_context_every, bool) or not isinstance(
            by_context_every, int) or by_context_every < 1):
        raise ValueError(f"--by-context={by_context_every}: must be a positive integer")
    from sparsebk.data.manifest import check_dataset
    from sparsebk.data.loading import load_blocks

    root = str(data_dir or m.record["dataset_dir"])
    root = (resolve_location(root, "--data") if is_uri(root)
            else str(Path(root).expanduser().resolve()))
    if data_dir is None and not open_store(root).exists():
        raise ValueError(f"{root}: the dataset the model was trained on is not here; give "
                         "another copy of it (--data DIR, made with the same tokenizer)")
    manifest = check_dataset(root, vocab_size=c.vocab_size, block_len=c.n_seq, splits=[split])
    if manifest["tokenizer"]["checksum"] != m.tokenizer.checksum:
        raise ValueError(f"{root}: made with the tokenizer {manifest['tokenizer']['name']!r} "
                         f"of checksum {manifest['tokenizer']['checksum'][:16]}..., not the "
                         f"model's ({m.tokenizer.name!r}, {m.tokenizer.checksum[:16]}...)")
    L = manifest["block_len"]
    if stride is not None and stride > L:
        raise ValueError(f"--stride={stride}: must be at most the dataset's block_len={L} (its "
                         f"window; {root})")
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
    extra = {}
    if stride is not None:
        loss_s, _ = evaluate_strided(m.model, blocks, stride=stride, batch_size=batch_size,
                                     device=device)
        extra = {"stride": stride, "loss_strided": loss_s, "ppl_strided": safe_ppl(loss_s)}
    if by_context_every is not None:
        extra["by_context"] = context_scores(m.model, blocks, every=by_context_every,
                                             batch_size=batch_size, device=device)
    if by_position:
        extra["loss_by_position"] = loss_by_position(m.model, blocks, batch_size=batch_size,
                                                       device=device).tolist()
    return {"source": str(m.source), "run_name": m.record.get("run_name"),
            "step": m.record.get("step"), "dataset_dir": root, "split": split,
            "rows": len(blocks), "tokens": tokens, "split_tokens": manifest["splits"][split]["tokens"],
            "loss": loss, "ppl": safe_ppl(loss), "sparsity": sum(spars) / len(spars),
            "sparsity_layers": spars, "tokens_per_s": tokens / max(seconds, 1e-9),
            "seconds": seconds, "batch_size": batch_size, "device": str(device), **extra}
