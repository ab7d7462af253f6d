"""Local mode starts its own Ray: a stale bootstrap address file or a running `ray start` head never
captures `vistralv-ray train` / `prepare`; RAY_ADDRESS (or --address) sends the run to that cluster.

Each command runs as a subprocess with its own RAY_TMPDIR, so the bootstrap file it could trip over is
the one the test wrote (or the one its own `ray start` head wrote), never the machine's.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from vistralv_ray.config.loader import config_to_dict

pytestmark = pytest.mark.integration

RAY_BIN = str(Path(sys.executable).with_name("ray"))
TOKEN = secrets.token_hex(16)


@pytest.fixture()
def ray_tmpdir():
    # Short: Ray's unix sockets live under it, and their paths are limited to ~107 characters.
    path = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_env(ray_tmpdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=str(ray_tmpdir),
        DS_ACCELERATOR="cpu",
        RAY_agent_register_timeout_ms="120000",
        # Every Ray process of the test on loopback: Ray otherwise turns 127.0.0.1 into the machine's
        # outward address (the one a multi-node cluster would use).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # A `ray start` head of Ray 2.60 requires a token; an explicit address never picks one up by itself.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=TOKEN,
    )
    return env


def run_cli(args: list[str], env: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "vistralv_ray.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def tiny_run_file(run_config, tmp_path: Path, name: str, *overrides: str) -> Path:
    cfg = run_config(
        "scaling.workers=1",
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "data.preprocess_actors=1",
        f"run.name={name}",
        "run.progress_bar=false",
        *overrides,
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
    return path


def final_step(proc: subprocess.CompletedProcess) -> int:
    line = next(x for x in proc.stdout.splitlines() if x.startswith("final: "))
    return json.loads(line.removeprefix("final: "))["step"]


# Fake credentials in the environment of the commands: none of them may end up in a file they write.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEVISTRALV0001",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-vistralv-7d1f",
    "WANDB_API_KEY": "fake-wandb-key-vistralv-93ab",
    "HF_TOKEN": "hf_fakevistralvtoken4c2e",
}


def files_holding(root: Path, values) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {v[:6]}..." for v in values if v.encode() in data]
    return found


def logs_holding(procs: list[subprocess.CompletedProcess], values) -> list[str]:
    return [f"{p.args[3]} output: {v[:6]}..." for p in procs for v in values if v in p.stdout + p.stderr]


def test_a_stale_bootstrap_file_does_not_stop_train_or_prepare(run_config, demo_corpus, ray_tmpdir, tmp_path):
    # What `ray start --head` leaves behind when its head is killed without `ray stop`.
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = {**command_env(ray_tmpdir), **SECRETS}

    # wandb offline: its files are written into the run directory.
    proc = run_cli(["train", str(tiny_run_file(run_config, tmp_path, "stale-file", "run.wandb=offline"))], env)
    assert final_step(proc) == 2
    assert "starting an embedded local Ray" in proc.stderr
    assert list((tmp_path / "runs" / "stale-file" / "wandb").glob("offline-run-*/run-*.wandb"))
    procs = [proc]

    out = tmp_path / "shards"
    args = ["prepare", "--format", "llava", "--input", str(demo_corpus["eval"]), "--out", str(out)]
    proc = run_cli([*args, "--image-root", str(demo_corpus["images"]), "--shard-size", "8"], env)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records_out"] == manifest["records_in"] > 8  # several shards: Ray tasks built them
    assert "starting an embedded local Ray" in proc.stderr
    procs.append(proc)
    procs.append(run_cli(["export", str(tmp_path / "runs" / "stale-file"), str(tmp_path / "export")], env))
    evaluate = ["eval", str(tmp_path / "export"), "--data", str(demo_corpus["eval"]), "--out", str(tmp_path / "eval")]
    procs.append(run_cli([*evaluate, "--limit", "2", "--max-new-tokens", "2", "--resamples", "10"], env))
    assert (tmp_path / "eval" / "metrics.json").is_file()
    # Run directory (config, plan, checkpoints, wandb files), shards, manifest, export, eval output, and
    # what the commands printed: no credential was written, nor the Ray cluster's auth token.
    secrets_and_token = [*SECRETS.values(), TOKEN]
    assert files_holding(tmp_path, secrets_and_token) == []
    assert logs_holding(procs, secrets_and_token) == []


class RayHead:
    """`ray start --head --block` on 127.0.0.1, stopped by the ids of the processes it started."""

    def __init__(self, ray_tmpdir: Path):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                RAY_BIN,
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=4",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            env=command_env(ray_tmpdir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while not (ray_tmpdir / "ray" / "ray_current_cluster").exists():
            assert self.proc.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "ray start --head did not come up in 120 s"
            time.sleep(0.5)
        self.ray_tmpdir = ray_tmpdir

    def query(self) -> dict:
        """Jobs and actors the head knows of, asked from a separate driver (which is itself one job)."""
        code = (
            "import json, ray\n"
            f"ray.init(address={self.address!r}, log_to_driver=False)\n"
            "from ray._private import state\n"
            "actors = [a['ActorClassName'] for a in state.actors().values()]\n"
            "print(json.dumps({'jobs': len(state.jobs()), 'actors': actors}))\n"
        )
        env = command_env(self.ray_tmpdir)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)


def test_a_running_ray_start_head_is_used_only_when_asked(run_config, ray_tmpdir, tmp_path):
    head = RayHead(ray_tmpdir)
    try:
        before = head.query()
        assert before["actors"] == []

        # No RAY_ADDRESS: the run starts its own Ray; the running head sees nothing of it.
        proc = run_cli(["train", str(tiny_run_file(run_config, tmp_path, "own-ray"))], command_env(ray_tmpdir))
        assert final_step(proc) == 2
        after = head.query()
        assert after["actors"] == [], after
        assert after["jobs"] == before["jobs"] + 1  # only the query's own driver

        # --address (RAY_ADDRESS) names the head: the run is a job there, its workers are actors there.
        config = str(tiny_run_file(run_config, tmp_path, "on-head"))
        proc = run_cli(["train", config, "--address", head.address], command_env(ray_tmpdir))
        assert final_step(proc) == 2
        assert f"using the cluster at {head.address}" in proc.stderr
        there = head.query()
        assert there["jobs"] == after["jobs"] + 2  # the train driver and this query
        assert "RayTrainWorker" in there["actors"], there["actors"]
    finally:
        head.stop()
    assert head.proc.poll() is not None
