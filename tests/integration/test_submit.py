"""jobs/submit.py against a real Ray head with the dashboard's job server: submit, follow, SUCCEEDED.

The head runs in its own process group, temp dir and free ports, with Ray 2.60's default token
authentication on, so it never meets an in-process `ray.init()` of another fixture; it is stopped by
the ids of the processes this module started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 180


@dataclass
class Head:
    address: str
    env: dict[str, str]


def free_ports(n: int) -> list[int]:
    """Ports from the OS's ephemeral range, outside Ray's default worker ports (10002-19999)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def dashboard_up(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=2):
            return True
    except urllib.error.HTTPError as e:
        return e.code in (401, 403)  # token auth answers: the server is up
    except OSError:
        return False


def processes_with(marker: str) -> list[int]:
    """Ids of the processes whose environment carries this module's marker (the head and its workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="vr-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    marker = f"VISTRALV_TEST_HEAD={secrets.token_hex(8)}"
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, client = free_ports(7)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `vistralv-ray` for the job
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        # On a loaded 2-core machine the dashboard agent can take more than the raylet's default wait
        # to report its ports, and the raylet aborts.
        RAY_agent_register_timeout_ms="120000",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # nothing to drain after the test: stop at once
    )
    env[marker.split("=")[0]] = marker.split("=")[1]
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--temp-dir", temp_dir,
        "--port", str(gcs), "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1",
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
        "--ray-client-server-port", str(client), "--min-worker-port", "0", "--max-worker-port", "0",
        "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not dashboard_up(address):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start:\n{(Path(temp_dir) / 'head.log').read_text()[-4000:]}")
            time.sleep(1)
        yield Head(address=address, env=env)
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        # What outlived it: the rest of the head's own process group, then workers in sessions of their own.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in processes_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submitted_plan_job_succeeds(ray_head):
    env = dict(ray_head.env, WANDB_API_KEY="wandb-s3cret-value")
    command = [
        sys.executable, "jobs/submit.py", "jobs/finetune.yaml", "--address", ray_head.address,
        "--command", "plan", "--set", "scaling.workers=16", "--env", "WANDB_API_KEY", "--follow",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "SUCCEEDED" in result.stdout
    # The job's own output, streamed back: the override reached the cluster (16 x 16 = 2 x the reference).
    assert "global_batch=256" in result.stdout
    assert "effective_lr=0.0004" in result.stdout
    # Forwarded only because --env asked for it, with a warning; never printed.
    assert "forwarded env vars: WANDB_API_KEY" in result.stdout
    assert "--env WANDB_API_KEY: its value goes into the job's runtime_env" in result.stderr
    assert "wandb-s3cret-value" not in output
