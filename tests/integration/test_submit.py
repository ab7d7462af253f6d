"""jobs/submit.py against a real Ray head with the dashboard's job server: submit, follow, SUCCEEDED.

The head runs in its own process group, temp dir and free ports, with Ray 2.60's default token
authentication on, so it never meets an in-process `ray.init()` of another fixture; it is stopped by
the ids of the processes this module started. The tiny training job also shows our metrics on the
head's Prometheus endpoint (its fixed --metrics-export-port), the one a Prometheus would scrape.
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
    metrics_port: int


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
        RAY_metrics_report_interval_ms="1000",  # workers push metrics each second (default 10 s)
        DS_ACCELERATOR="cpu",
    )
    env[marker.split("=")[0]] = marker.split("=")[1]
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--temp-dir", temp_dir,
        "--port", str(gcs), "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1",
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
        "--ray-client-server-port", str(client), "--min-worker-port", "0", "--max-worker-port", "0",
        "--num-cpus", "4", "--include-dashboard", "true", "--disable-usage-stats",
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
        yield Head(address=address, env=env, metrics_port=metrics)
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


RUN_NAME = "submitted-tiny"
# Our metrics the tiny run must show on the head's Prometheus endpoint (no MFU: CPUs have no known peak).
EXPECTED_METRICS = {
    "ray_vistralv_loss", "ray_vistralv_eval_loss", "ray_vistralv_lr", "ray_vistralv_projector_lr",
    "ray_vistralv_samples_per_s", "ray_vistralv_tokens_per_s", "ray_vistralv_data_wait_fraction",
    "ray_vistralv_memory_mb", "ray_vistralv_rejected_records", "ray_vistralv_steps_total",
    "ray_vistralv_effective_lr",
}  # fmt: skip


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Our run's samples on a Prometheus endpoint: (name, sorted labels without Ray's own) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_vistralv_") and sample.labels.get("ray_train_run_name") == RUN_NAME:
                labels = {k: v for k, v in sample.labels.items() if k.startswith(("ray_train_", "reason"))}
                samples[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return samples


def test_submitted_train_job_checkpoints_and_exports_its_metrics(ray_head, tiny_assets, tiny_shards, tmp_path):
    """A real `train` job of the tiny recipe: the driver joins the head through the job's RAY_ADDRESS,
    two Ray Train workers checkpoint into run.storage, and the head's metrics port shows the run."""
    from vistralv_ray.training.metrics import prometheus_names

    storage = tmp_path / "runs"
    sets = [
        f"model.language_model={tiny_assets['llm']}", f"model.vision_tower={tiny_assets['vision']}",
        f"data.train=[{tiny_shards['align']}]", f"data.eval=[{tiny_shards['eval']}]", f"run.storage={storage}",
        f"run.name={RUN_NAME}", "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1",
        "train.eval_every=1", "scaling.workers=2", "run.progress_bar=false",
    ]  # fmt: skip
    command = [sys.executable, "jobs/submit.py", "jobs/local_tiny.yaml", "--address", ray_head.address, "--follow",
               "--entrypoint-num-cpus", "0.01"]  # fmt: skip
    for text in sets:
        command += ["--set", text]
    log = tmp_path / "submit.log"
    seen: dict[tuple[str, tuple], float] = {}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=ray_head.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            # Scraped while the job runs (a worker's series may go with it) and once after it ended.
            deadline = time.monotonic() + JOB_TIMEOUT_S * 2
            while proc.poll() is None and time.monotonic() < deadline:
                seen.update(scrape(ray_head.metrics_port))
                time.sleep(1)
            seen.update(scrape(ray_head.metrics_port))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-6000:]
    assert "SUCCEEDED" in output
    # The job's driver took the cluster from the job's own RAY_ADDRESS, not an embedded Ray of its own.
    assert f"(RAY_ADDRESS) for run {RUN_NAME}" in output, output[-6000:]
    assert "starting an embedded local Ray" not in output
    checkpoint = storage / RUN_NAME / "checkpoint-000002"
    assert (checkpoint / "projector.safetensors").is_file(), sorted(p.name for p in storage.rglob("*"))

    names = {name for name, _ in seen}
    assert names <= prometheus_names(), names - prometheus_names()
    assert EXPECTED_METRICS <= names, sorted(EXPECTED_METRICS - names)
    values = {name: value for (name, labels), value in seen.items() if len(labels) == 1}
    assert values["ray_vistralv_loss"] > 0 and values["ray_vistralv_eval_loss"] > 0
    assert values["ray_vistralv_steps_total"] >= 1 and values["ray_vistralv_rejected_records"] == 0
    # The schedule decays to 0 at the last step: the last value seen lies between 0 and the peak.
    assert 0 <= values["ray_vistralv_lr"] <= values["ray_vistralv_effective_lr"] == pytest.approx(2e-3)
    # Data wait and memory come from each rank, labelled with it.
    for metric in ("ray_vistralv_data_wait_fraction", "ray_vistralv_memory_mb"):
        ranks = {dict(labels).get("ray_train_worker_world_rank") for name, labels in seen if name == metric}
        assert ranks == {"0", "1"}, (metric, ranks)
