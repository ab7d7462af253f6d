"""S3 end to end against a local moto server: `prepare` writes shards to s3://, Ray Data reads them back,
a run checkpoints there, and a Tune sweep keeps everything (its state, trial runs, results) there.

The AWS variables must reach Ray's workers (prepare's shard tasks, read_parquet's read tasks), not
only this process: the module runs on a fresh local cluster that gets them through `runtime_env`,
the way a job hands them to a real cluster. The shared cluster is restored afterwards.
"""

from __future__ import annotations

import json
import logging
import socket

import pytest

from vistralv_ray.config import config_from_dict
from vistralv_ray.data import storage
from vistralv_ray.data.prepare import MANIFEST, REJECTED, PrepareOptions, prepare

pytestmark = pytest.mark.integration

BUCKET = "vistralv-test"


def start_cluster(ray, **kwargs) -> None:
    """`ray.init`, tried twice: on a loaded machine a fresh node can miss Ray's fixed startup deadline."""
    for attempt in (1, 2):
        try:
            ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False, **kwargs)
            return
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(ray_local):
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        storage._s3_filesystem.cache_clear()
        s3fs.S3FileSystem.clear_instance_cache()
        ray_local.shutdown()
        start_cluster(ray_local, runtime_env={"env_vars": env})
        try:
            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            yield client
        finally:
            ray_local.shutdown()
            server.stop()
            storage._s3_filesystem.cache_clear()
            s3fs.S3FileSystem.clear_instance_cache()
    start_cluster(ray_local)


@pytest.fixture(scope="module")
def s3_corpus(s3, demo_corpus, tmp_path_factory):
    """The demo train records plus one whose image is missing, with the images uploaded to S3."""
    for image in sorted(demo_corpus["images"].glob("*.jpg")):
        s3.upload_file(str(image), BUCKET, f"images/{image.name}")
    records = json.loads(demo_corpus["train"].read_text())
    records.append({"id": "lost", "image": "nowhere.jpg", "conversations": records[0]["conversations"]})
    path = tmp_path_factory.mktemp("s3src") / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path, len(records)


def keys(s3, prefix: str) -> set[str]:
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix) :] for o in listing.get("Contents", [])}


def test_prepare_writes_shards_manifest_and_rejections_to_s3(s3, s3_corpus):
    source, n = s3_corpus
    out = f"s3://{BUCKET}/prepared/train"
    # The input itself from the bucket too: streamed through s3fs with retried reads (storage.open_stream).
    s3.upload_file(str(source), BUCKET, "src/train.json")
    # Shards are built by Ray tasks (more than one shard): they read images from and write to S3.
    manifest = prepare(
        f"s3://{BUCKET}/src/train.json", PrepareOptions(f"s3://{BUCKET}/images", out, shard_size=16), progress=False
    )
    assert manifest["records_in"] == n and manifest["records_out"] == n - 1
    assert manifest["rejected"] == {"missing_image": 1}
    names = [s["name"] for s in manifest["shards"]]
    assert keys(s3, "prepared/train/") == {*names, MANIFEST, REJECTED}
    assert json.loads(storage.read_bytes(f"{out}/{MANIFEST}")) == manifest
    (rejected,) = [json.loads(line) for line in storage.read_bytes(f"{out}/{REJECTED}").decode().splitlines()]
    assert rejected["id"] == "lost" and rejected["reason"] == "missing_image"
    with pytest.raises(FileExistsError):
        prepare(source, PrepareOptions(f"s3://{BUCKET}/images", out), progress=False)


def test_ray_data_reads_s3_shards_into_training_batches(s3, s3_corpus, tiny_assets):
    from vistralv_ray.data.pipeline import build_datasets
    from vistralv_ray.data.preprocess import PackingCollate
    from vistralv_ray.text.encoder import build_tokenizer

    source, n = s3_corpus
    out = f"s3://{BUCKET}/prepared/roundtrip"
    prepare(source, PrepareOptions(f"s3://{BUCKET}/images", out, shard_size=20), parallel=False, progress=False)
    cfg = config_from_dict(
        {
            "model": {
                "language_model": str(tiny_assets["llm"]),
                "vision_tower": str(tiny_assets["vision"]),
                "max_length": 256,
            },
            "data": {"train": [out], "eval": [f"{out}/part-00000.parquet"], "preprocess_cpus_per_actor": 0.5},
        }
    )
    datasets, counts = build_datasets(cfg)
    assert counts == {"train": n - 1, "eval": 20}
    collate = PackingCollate(build_tokenizer(cfg.model)[0].pad_token_id, "pack", None)
    seen, images = [], 0
    for batch in datasets["train"].iter_torch_batches(batch_size=8, collate_fn=collate):
        assert not batch.rejected and batch.num_target_tokens > 0
        seen += batch.sample_ids
        images += batch.pixel_values.shape[0]
    assert len(seen) == len(set(seen)) == n - 1
    assert images == n - 1  # every demo train record has an image
    assert datasets["eval"].count() == 20


def test_training_run_checkpoints_to_s3_and_exports_from_there(s3, run_config, tmp_path):
    """run.storage on s3://: Ray Train writes every rank's checkpoint there; export and model
    loading take the run (and an export) straight from the bucket."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vistralv_ray.inference.export import export
    from vistralv_ray.inference.models import model_directory
    from vistralv_ray.training.driver import train

    cfg = run_config(
        "scaling.workers=1", "train.max_steps=2", "train.checkpoint_every=2", f"run.storage=s3://{BUCKET}/runs"
    )
    result = train(cfg)
    assert result.error is None and result.return_value["steps"] == 2
    run_keys = keys(s3, "runs/align-test/")
    assert {"config.yaml", "lr_plan.yaml"} <= run_keys
    assert "checkpoint-000002/projector.safetensors" in run_keys
    assert any(k.startswith("checkpoint-000002/deepspeed/") for k in run_keys)
    assert "checkpoint-000002/checkpoint_complete.json" in run_keys  # written through Ray's S3 filesystem

    out = export(f"s3://{BUCKET}/runs/align-test", tmp_path / "export")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        s3.upload_file(str(path), BUCKET, f"exports/tiny/{path.relative_to(out)}")
    with model_directory(f"s3://{BUCKET}/exports/tiny") as local:
        from_s3 = LlavaForConditionalGeneration.from_pretrained(str(local)).state_dict()
    exported = LlavaForConditionalGeneration.from_pretrained(str(out)).state_dict()
    assert from_s3.keys() == exported.keys()
    assert all(torch.equal(from_s3[k], exported[k]) for k in exported)


def test_tune_sweep_on_s3_keeps_its_state_trial_runs_and_results_in_the_bucket(s3, run_config, tmp_path, capsys):
    """`vistralv-ray tune --workdir s3://...`: what a sweep on a multi-node cluster needs (no NFS).
    Two 1-step trials at once, FIFO (ASHA's ranking is test_tune.py's, on local storage)."""
    import yaml

    from vistralv_ray.cli.main import main
    from vistralv_ray.config import dump_config

    grid = [4e-3, 1e-3]
    config_path = tmp_path / "tiny.yaml"
    dump_config(run_config("train.max_steps=1", "run.name=users-own-run"), config_path)
    space = {
        "name": "s3-sweep",
        "trial": {"scaling.workers": 1, "train.log_every": 1, "train.checkpoint_every": 1},
        "search": {"train.base_lr": {"grid": grid}},
        "scheduler": {"name": "fifo", "metric": "loss", "mode": "min"},
    }
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump(space))
    workdir = f"s3://{BUCKET}/sweeps/tiny"

    assert main(["tune", str(config_path), "--space", str(space_path), "--workdir", workdir]) == 0
    out = capsys.readouterr().out

    files = keys(s3, "sweeps/tiny/")
    assert {"best.json", "trials.csv", "loss_vs_base_lr.png", "loss_curves.png"} <= files, sorted(files)
    rows = storage.read_bytes(f"{workdir}/trials.csv").decode().splitlines()
    assert len(rows) == 3 and all(",completed," in r for r in rows[1:]), rows
    best = json.loads(storage.read_bytes(f"{workdir}/best.json"))
    assert best["base_lr"] in grid and best["status"] == "completed"
    # Tune's own state and every trial's run (config, checkpoint) are in the bucket too.
    assert any(k.startswith("tune/") for k in files), sorted(files)
    for run_name in {r.split(",")[1] for r in rows[1:]}:
        assert f"runs/{run_name}/checkpoint-000001/projector.safetensors" in files, sorted(files)
    # `@` reads local files only: the command to use the result carries the values.
    assert f"--set train.base_lr={best['base_lr']}" in out and "@s3://" not in out
    assert f"best:         {workdir}/best.json" in out
