"""sparsebk.storage.store on a local folder and on a real S3 server (SeaweedFS, fixture s3_bucket),
and where relative locations resolve (home(), never the working directory)."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from sparsebk.storage.store import HOME_ENV, Store, home, open_store, resolve_location


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_bucket")(f"store-{uuid.uuid4().hex[:8]}"))


def test_round_trip(store: Store):
    assert not store.exists("a.txt") and store.list() == []
    store.write_text("a.txt", "one")
    store.write_bytes("sub/b.bin", b"\x00\x01")
    assert store.read_text("a.txt") == "one" and store.read_bytes("sub/b.bin") == b"\x00\x01"
    store.write_text("a.txt", "two")  # a replace, atomic: no temporary file left behind
    assert store.read_text("a.txt") == "two"
    assert store.list() == ["a.txt", "sub"]
    assert store.list("sub") == ["b.bin"] and store.list("missing") == []
    assert store.join("sub").read_bytes("b.bin") == b"\x00\x01"
    assert store.is_file("a.txt") and not store.is_file("sub")
    store.delete("sub")
    store.delete("never-there")
    assert not store.exists("sub/b.bin") and store.list() == ["a.txt"]
    with pytest.raises(FileNotFoundError, match="b.bin"):
        store.read_bytes("sub/b.bin")


def test_line_log(store: Store):
    log = store.line_log("m.jsonl", flush_s=3600)
    log.write("1\n")
    log.flush(force=True)
    log.write("2\n")
    log.close()
    log = store.line_log("m.jsonl")  # a second attempt appends after the first
    log.write("3\n")
    log.close()
    assert store.read_lines("m.jsonl") == ["1", "2", "3"]
    assert store.read_lines("absent.jsonl") == []


def test_names_cannot_escape(store: Store):
    for bad in ("..", "a/../b", "./a", "a//b"):
        with pytest.raises(ValueError, match="relative"):
            store.join(bad)
        with pytest.raises(ValueError, match="relative"):
            store.write_text(bad, "x")


def test_uri_join_keeps_query(s3_bucket):
    s = open_store(s3_bucket("q"))
    child = s.join("run", "metrics")
    assert child.uri.startswith("s3://test/q/run/metrics?endpoint_override=")
    fs, path = child.ray_location()
    assert path == "test/q/run/metrics" and fs is s.fs
    assert s.relative("test/q/run/x") == "run/x" and s.relative("other/x") is None


def test_relative_paths_resolve_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "h"))
    monkeypatch.chdir(tmp_path)
    assert home() == tmp_path / "h"
    assert resolve_location("runs") == str(tmp_path / "h" / "runs")
    assert resolve_location("/abs/runs") == "/abs/runs"
    assert resolve_location("~/x") == os.path.expanduser("~/x")
    assert resolve_location("s3://b/p?region=x") == "s3://b/p?region=x"
    assert resolve_location("file:///abs/p") == "/abs/p"
    with pytest.raises(ValueError, match="run.storage_path: URI scheme 'ftp'"):
        resolve_location("ftp://host/x", "run.storage_path")
    monkeypatch.delenv(HOME_ENV)
    assert home() == (tmp_path.home() / "sparsebk").resolve()


def test_prepared_dataset_in_a_bucket_reads_as_the_local_one(s3_bucket, tmp_path, monkeypatch):
    """prepare-data to an s3:// URI: uploaded with the manifest last, reused when asked again,
    and its blocks equal those of the same dataset prepared locally; a relative --out of the
    CLI lands under $SPARSEBK_HOME."""
    import torch

    from sparsebk.data.manifest import check_dataset

    from sparsebk.data.loading import load_blocks

    from sparsebk.data.tokenizers import load_tokenizer

    from sparsebk.data.prepare import prepare_dataset
    from sparsebk.data.cli import main as prepare_main

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i} of a small corpus for the bucket\n" for i in range(300)))
    args = dict(text=str(text), tokenizer="word", block_len=16, rows_per_file=200)
    local = prepare_dataset(tmp_path / "local", **args)
    uri = s3_bucket(f"ds-{uuid.uuid4().hex[:8]}")
    assert prepare_dataset(uri, **args) == uri
    store = open_store(uri)
    assert store.is_file("manifest.json") and len(store.list()) > 3
    assert prepare_dataset(uri, **args) == uri  # reused: same arguments, same text
    assert check_dataset(uri) == check_dataset(local) | {"created_unix": check_dataset(uri)["created_unix"]}
    for split in ("train", "valid", "test"):
        assert torch.equal(load_blocks(uri, split), load_blocks(local, split))
    assert load_tokenizer(uri).identity() == load_tokenizer(local).identity()

    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert prepare_main(["--text", str(text), "--tokenizer", "word", "--block-len", "16",
                         "--out", "data/rel"]) == 0
    assert (tmp_path / "home" / "data" / "rel" / "manifest.json").is_file()
    assert not (tmp_path / "data").exists()


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_tiny_run_in_a_bucket_writes_nothing_local_and_resumes(s3_bucket, ray_local, tmp_path,
                                                               monkeypatch):
    """`run.storage_path` and `data.dir` as s3:// URIs: the dataset is prepared into the
    bucket, the run's checkpoints, metrics, schedule records, plots and summary land there
    (read back from the bucket, not from a local folder), and running again resumes from the
    bucket's checkpoint. Ray's workers have the bucket's credentials from their environment,
    as on a cluster (conftest S3_ENV)."""
    from pathlib import Path

    from sparsebk.train.config import load_config
    from sparsebk.train.ray_train.driver import run_training
    from sparsebk.train.metrics import read_metrics

    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    storage, data = s3_bucket("runs"), s3_bucket("data/tiny")
    tiny = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs" / "tiny.yaml"

    def cfg(max_steps):
        return load_config(tiny, [f"run.storage_path={storage}", f"data.dir={data}",
                                  "run.name=s3tiny", f"optim.max_steps={max_steps}",
                                  "run.eval_every=5", "run.log_every=5"])

    summary = run_training(cfg(10))
    run = open_store(storage).join("s3tiny")
    assert summary["run_dir"] == run.uri and summary["steps"] == 10
    assert summary["checkpoint"].startswith("s3://test/runs/s3tiny/checkpoint_")
    stored = json.loads(run.read_text("summary.json"))
    assert stored["steps"] == 10 and stored["checkpoint"] == summary["checkpoint"]
    assert [r["step"] for r in read_metrics(run.uri)["eval"]] == [5, 10]
    assert run.list("plots") == ["loss_ppl.png", "sparsity.png", "weight.png"]
    assert run.read_bytes("plots/loss_ppl.png")[:4] == b"\x89PNG"
    for rank in (0, 1):  # each worker's schedule records, as part objects
        steps = [json.loads(x)["step"]
                 for x in run.read_lines(f"schedule/rank{rank}.jsonl")]
        assert steps == list(range(1, 11)), rank
    assert open_store(data).is_file("manifest.json")
    local = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert local == [], local  # nothing under the cwd or the home: all in the bucket

    summary2 = run_training(cfg(15))  # same run: resumes from the bucket's step-10 checkpoint
    assert summary2["steps"] == 15
    new = [json.loads(x)["step"] for x in run.read_lines("schedule/rank0.jsonl")]
    assert new == list(range(1, 16))  # continued at 11: no step trained twice
    assert [r["step"] for r in read_metrics(run.uri)["eval"]] == [5, 10, 15]


def test_config_takes_uris_and_refuses_local_only_trackers_with_them():
    from pathlib import Path

    from sparsebk.train.config import load_config

    tiny = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs" / "tiny.yaml"
    uri = "s3://b/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    cfg = load_config(tiny, [f"run.storage_path={uri}", "data.dir=gs://b/data/tiny"])
    assert cfg.run.run_dir == "s3://b/runs/tiny?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    assert cfg.data.dir == "gs://b/data/tiny"
    with pytest.raises(ValueError, match="run.tracking.*tensorboard writes local"):
        load_config(tiny, [f"run.storage_path={uri}", "run.tracking=[tensorboard]"])
    with pytest.raises(ValueError, match="run.mlflow_uri.*SQLite"):
        load_config(tiny, [f"run.storage_path={uri}", "run.tracking=[mlflow]"])
    for bad in ("../x", "a/b"):
        with pytest.raises(ValueError, match="run.name"):
            load_config(tiny, [f"run.storage_path={uri}", f"run.name={bad}"])
