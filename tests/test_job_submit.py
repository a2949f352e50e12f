"""A real Ray head (token auth, bound to 127.0.0.1) and `ray job submit` of ray_jobs/train.py.

The head runs with `--block` in its own process group; the test ends it by signalling that
group (never `ray stop`, which would end every Ray process on the machine). The token lives
in a temporary HOME (`ray get-auth-token --generate`), so nothing of the user's is touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = dict(os.environ, HOME=str(home), RAY_AUTH_MODE="token",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
    assert (home / ".ray" / "auth_token").is_file()
    gcs_port, dash_port = free_port(), free_port()
    log = open(home / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the Jobs API answers once the dashboard is up
            assert head.poll() is None, (home / "head.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except Exception as e:  # noqa: BLE001 - any answer, even 401, means it is up
                if getattr(e, "code", None) is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("Ray head did not start: "
                                       + (home / "head.log").read_text()[-3000:]) from e
                time.sleep(1)
        yield {"env": env, "address": address, "home": home}
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        except ProcessLookupError:
            pass
        log.close()


def test_job_submit_tiny_runs_and_logs_progress(ray_head, tmp_path):
    env, address = ray_head["env"], ray_head["address"]
    job_id = f"sparsebk-test-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
         "--working-dir", str(REPO), "--", "python", "ray_jobs/train.py",
         "--config", "ray_jobs/configs/tiny.yaml",
         "--set", f"data.dir={tmp_path / 'data'}", "--set", f"run.storage_path={tmp_path / 'runs'}",
         "--set", "optim.max_steps=10", "--set", "run.eval_every=10",
         "--set", "data.loader=local"],
        env=env, capture_output=True, text=True, timeout=500)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout, submit.stdout[-3000:]

    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, job_id],
                          env=env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0, logs.stderr[-2000:]
    assert "step 5/10 loss" in logs.stdout and "step 10/10 loss" in logs.stdout, logs.stdout[-3000:]
    assert "run tiny finished: 10 steps" in logs.stdout
    assert (tmp_path / "runs" / "tiny" / "summary.json").is_file()

    # Without the token the Jobs API refuses the client.
    no_token = dict(env, HOME=str(tmp_path), RAY_AUTH_MODE="token")
    denied = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                            env=no_token, capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0
