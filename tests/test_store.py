"""sparsebk.store on a local folder and on a real S3 server (SeaweedFS, fixture s3_bucket),
and where relative locations resolve (home(), never the working directory)."""

from __future__ import annotations

import os
import uuid

import pytest

from sparsebk.store import HOME_ENV, Store, home, open_store, resolve_location


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
