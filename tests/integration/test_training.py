"""Ray Train + DeepSpeed on CPU: ZeRO-2 and ZeRO-3 runs (with export and wandb offline), parity with plain
PyTorch, resume after a fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vistralv_ray.training.driver import train

pytestmark = pytest.mark.integration


def losses(result) -> list[float]:
    return [m["loss"] for m in result.return_value["history"]]


@pytest.fixture(scope="module")
def held_out_benchmarks(demo_corpus, tmp_path_factory):
    from vistralv_ray.data.demo import held_out_benchmark_files

    return held_out_benchmark_files(demo_corpus["eval"], demo_corpus["images"], tmp_path_factory.mktemp("bench"))


# The benchmark step's metrics (train.benchmark) and the largest value each can take.
BENCH_METRICS = {
    "openvivqa": {"exact_match": 1, "f1": 1, "bleu_1": 1, "bleu_4": 1, "bleu": 1, "rouge_l": 1, "cider": 10},
    "mtvqa": {"accuracy": 1},
}


@pytest.mark.parametrize(("zero_stage", "stage"), [(2, "align"), (3, "finetune")])
def test_two_worker_run_completes_lowers_the_loss_and_exports(
    ray_local, run_config, zero_stage, stage, tmp_path, monkeypatch, held_out_benchmarks, demo_corpus
):
    from vistralv_ray.training.hooks import PROBE_ENV

    monkeypatch.setenv(PROBE_ENV, str(tmp_path / "probe.pt"))
    wandb = "offline" if zero_stage == 2 else "off"  # one of the runs also checks the wandb metrics
    projector_scale = 1.0 if stage == "align" else 0.5  # finetune: the projector at half the LR
    # The benchmark step on 5 held-out questions (uneven over 2 ranks) at steps 3 and 6; under ZeRO-3
    # every rank must take part in every generate call.
    bench = "openvivqa" if zero_stage == 2 else "mtvqa"
    cfg = run_config(
        f"train.zero_stage={zero_stage}",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        f"train.projector_lr_scale={projector_scale}",
        f"run.wandb={wandb}",
        f"run.name=zero{zero_stage}-{stage}",
        f"train.benchmark.name={bench}",
        f"train.benchmark.data={held_out_benchmarks[bench]}",
        f"train.benchmark.images={demo_corpus['images']}",
        "train.benchmark.every_steps=3",
        "train.benchmark.max_questions=5",
        "train.benchmark.max_new_tokens=4",
        stage=stage,
    )
    result = train(cfg)
    assert result.error is None
    history = losses(result)
    assert result.return_value["steps"] == 6 and len(history) == 6
    reports = result.return_value["history"]
    assert_benchmark_step_reported(reports, BENCH_METRICS[bench], steps=[3, 6], questions=5)
    from vistralv_ray.training.optim import lr_lambda

    cosine = lr_lambda(6, 0, "cosine")  # no warmup here: the LR in use after step s
    assert [m["lr"] for m in reports] == pytest.approx([2e-3 * cosine(m["step"]) for m in reports])
    assert all(m["projector_lr"] == pytest.approx(projector_scale * m["lr"]) for m in reports)
    assert history[-1] < history[0] - 0.2, history
    run_dir = Path(result.path)
    assert_run_files_hold_the_run(run_dir, cfg, total_steps=6)
    ckpt = Path(result.checkpoint.path)
    assert (ckpt / "projector.safetensors").is_file() and (ckpt / "tokenizer" / "tokenizer_config.json").is_file()
    assert sorted((ckpt / "seen").glob("rank-*.npy")) and len(list((ckpt / "seen").glob("*.npy"))) == 2
    # Each checkpoint is marked complete, last, once both ranks' uploads are done; resume and export
    # take the newest complete one.
    from vistralv_ray.data.runs import COMPLETE_FILE, latest_checkpoint_uri

    marked = sorted(p.parent.name for p in run_dir.glob(f"checkpoint-*/{COMPLETE_FILE}"))
    assert marked == ["checkpoint-000003", "checkpoint-000006"]
    assert latest_checkpoint_uri(str(run_dir)) == str(ckpt)
    # The exported model, loaded by plain transformers, computes what the trained engine computed.
    model = assert_export_matches_trainer(run_dir, tmp_path / "probe.pt", tmp_path / "export")
    # The checkpoint's projector file (what a finetune starts from) holds the trained projector in
    # full, also where ZeRO-3 partitions it across the ranks.
    saved = load_file(str(ckpt / "projector.safetensors"))
    trained = model.model.multi_modal_projector.state_dict()
    assert saved.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    if wandb == "offline":
        assert_wandb_offline_run_has_the_metrics(run_dir, reports)


def assert_benchmark_step_reported(reports: list[dict], ranges: dict, steps: list[int], questions: int) -> None:
    """bench/<metric> in the reports of the benchmark step's steps only, every metric in its range."""
    assert [m["step"] for m in reports if any(k.startswith("bench/") for k in m)] == steps
    for m in reports:
        if m["step"] in steps:
            assert m["bench/questions"] == questions
            for name, top in ranges.items():
                assert 0.0 <= m[f"bench/{name}"] <= top, (m["step"], name, m[f"bench/{name}"])


def assert_run_files_hold_the_run(run_dir: Path, cfg, total_steps: int) -> None:
    """config.yaml loads back as the config the run trained with (local paths made absolute, as the
    driver hands them to the workers); lr_plan.yaml holds that config's LR arithmetic and step plan."""
    import yaml

    from vistralv_ray.config import load_config
    from vistralv_ray.training.driver import absolute_local_paths
    from vistralv_ray.training.scaling import lr_plan

    assert load_config(run_dir / "config.yaml") == absolute_local_paths(cfg)
    plan = yaml.safe_load((run_dir / "lr_plan.yaml").read_text())
    expected = lr_plan(cfg).to_dict()
    assert {k: plan[k] for k in expected} == pytest.approx(expected)
    assert plan["effective_lr"] == pytest.approx(cfg.train.base_lr)  # lr_rule none
    assert plan["global_batch"] == cfg.scaling.workers * cfg.data.per_device_batch * cfg.train.grad_accum
    assert plan["total_steps"] == total_steps and plan["steps_per_epoch"] >= 1 and plan["records"]["train"] > 0


def wandb_history_rows(path: Path) -> list[dict]:
    """The history rows (one per `wandb.log`) of an offline run file: a LevelDB-style log of
    protobuf records, in 32 KiB blocks; a record may be split across blocks (first, middle, last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), "not a wandb run file"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def assert_wandb_offline_run_has_the_metrics(run_dir: Path, reports: list[dict]) -> None:
    import time

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (log_file,) = runs[0].glob("run-*.wandb")
    # One history row per report, at its step, with its values. The file is written by wandb's own
    # process: wait (with a deadline) until it holds as many rows as there were reports.
    deadline = time.monotonic() + 60
    while len(rows := wandb_history_rows(log_file)) < len(reports) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [row["_step"] for row in rows] == [m["step"] for m in reports]
    for row, report in zip(rows, reports):
        for key in ("loss", "lr", "tokens_per_s", "grad_norm", "data_wait_fraction"):
            assert row[key] == pytest.approx(report[key]), (report["step"], key)
        # The benchmark step's rows (train.benchmark) carry its metrics too.
        bench = sorted(k for k in report if k.startswith("bench/"))
        assert sorted(k for k in row if k.startswith("bench/")) == bench
        for key in bench:
            assert row[key] == pytest.approx(report[key]), (report["step"], key)


def assert_export_matches_trainer(run_dir: Path, probe_path: Path, out: Path):
    from transformers import LlavaForConditionalGeneration

    from vistralv_ray.inference.export import export
    from vistralv_ray.training.step import model_kwargs

    export(str(run_dir), out)
    model = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    probe = torch.load(probe_path, weights_only=False)
    with torch.no_grad():
        logits = model(**model_kwargs(probe["batch"], torch.float32)).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-4, atol=1e-4)
    return model


def plain_pytorch_step(cfg, shard_dir: str):
    """One AdamW step of the same model on every record of the shards, in one process, no Ray."""
    import dataclasses

    import pyarrow.parquet as pq

    from vistralv_ray.data.pipeline import shard_files
    from vistralv_ray.data.preprocess import PackingCollate, Preprocessor
    from vistralv_ray.model.assembly import apply_stage, build_model
    from vistralv_ray.training.optim import build_param_groups
    from vistralv_ray.training.step import summed_token_loss

    rows = pq.read_table(shard_files([shard_dir])).to_pydict()
    batch = {k: rows[k] for k in ("id", "image", "messages")}
    pre = Preprocessor(dataclasses.asdict(cfg.model), cfg.data.max_image_pixels)(
        {"id": batch["id"], "image": batch["image"], "messages": batch["messages"]}
    )
    assembled = build_model(cfg.model, seed=cfg.train.seed)
    model = apply_stage(assembled.model, "align", cfg.model.lora)
    collated = PackingCollate(assembled.tokenizer.pad_token_id, "pack", None)(pre)
    groups = build_param_groups(model, cfg.train.base_lr, cfg.train.base_lr, 0.0)
    for g in groups:
        g.pop("param_names")
    opt = torch.optim.AdamW(groups, betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps)
    loss = summed_token_loss(model, collated, torch.float32) / collated.num_target_tokens
    loss.backward()
    opt.step()
    state = {k: v.detach().clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    return loss.item(), state


@pytest.fixture(scope="module")
def parity_shards(demo_corpus, tmp_path_factory):
    """Exactly 8 records: one global batch, so a step sees all of them whatever the worker count."""
    from vistralv_ray.data.prepare import PrepareOptions, prepare

    src = json.loads(Path(demo_corpus["align"]).read_text())[:8]
    path = tmp_path_factory.mktemp("parity") / "align8.json"
    path.write_text(json.dumps(src, ensure_ascii=False))
    out = path.parent / "shards"
    prepare(path, PrepareOptions(str(demo_corpus["images"]), str(out), shard_size=3), parallel=False, progress=False)
    return str(out)


def test_deepspeed_step_matches_plain_pytorch_and_data_parallel_split(ray_local, run_config, parity_shards):
    # eps = 1 makes Adam's first update proportional to the gradient (not just its sign), so a
    # wrongly scaled gradient would show.
    common = [
        "train.max_steps=1",
        "train.checkpoint_every=1",
        "train.adam_eps=1.0",
        "train.grad_clip=0.0",
        f"data.train=[{parity_shards}]",
    ]
    one = train(run_config(*common, "scaling.workers=1", "data.per_device_batch=8", "run.name=parity-1x8"))
    two = train(run_config(*common, "scaling.workers=2", "data.per_device_batch=4", "run.name=parity-2x4"))
    accum = train(
        run_config(*common, "scaling.workers=1", "data.per_device_batch=4", "train.grad_accum=2", "run.name=parity-acc")
    )
    plain_loss, plain_state = plain_pytorch_step(run_config(*common), parity_shards)

    assert one.return_value["history"][0]["loss"] == pytest.approx(plain_loss, abs=1e-5)
    assert two.return_value["history"][0]["loss"] == pytest.approx(plain_loss, abs=1e-5)
    assert accum.return_value["history"][0]["loss"] == pytest.approx(plain_loss, abs=1e-5)
    one_state = load_file(str(Path(one.checkpoint.path) / "projector.safetensors"))
    two_state = load_file(str(Path(two.checkpoint.path) / "projector.safetensors"))
    accum_state = load_file(str(Path(accum.checkpoint.path) / "projector.safetensors"))
    from vistralv_ray.model.assembly import build_model

    base = run_config()
    initial = build_model(base.model, seed=base.train.seed).model.model.multi_modal_projector.state_dict()
    for key, value in plain_state.items():
        # Compare the updates, not the weights: an update is ~1e-5 of weights ~1e-1.
        plain_update = value - initial[key]
        assert plain_update.abs().max() > 1e-6, f"{key} did not move"
        for name, state in (("1x8", one_state), ("2x4", two_state), ("1x4, 2 accumulated", accum_state)):
            torch.testing.assert_close(state[key] - initial[key], plain_update, rtol=1e-3, atol=5e-8, msg=name)


@pytest.fixture(scope="module")
def shared_id_shards(demo_corpus, tmp_path_factory):
    """The 48 align records with every id shared by two records, as LLaVA's finetune JSON shares one
    image's id between its conversations."""
    from vistralv_ray.data.prepare import PrepareOptions, prepare

    records = json.loads(Path(demo_corpus["align"]).read_text())
    for n, record in enumerate(records):
        record["id"] = f"shared-{n // 2}"
    path = tmp_path_factory.mktemp("shared-ids") / "align.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    out = path.parent / "shards"
    manifest = prepare(
        path, PrepareOptions(str(demo_corpus["images"]), str(out), shard_size=16), parallel=False, progress=False
    )
    assert manifest["records_out"] == 48 and manifest["duplicate_ids"]["ids"] == 24
    return str(out)


def test_killed_worker_resumes_and_finishes_the_planned_steps(ray_local, run_config, monkeypatch, shared_id_shards):
    from vistralv_ray.config import ConfigError
    from vistralv_ray.training.driver import build_trainer
    from vistralv_ray.training.hooks import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "2")
    import ray

    # The fault variable must reach the workers: a fresh cluster inherits this environment.
    ray.shutdown()
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        # 48 align records / (2 workers x 4) = 6 steps: one full epoch, so every record exactly once.
        cfg = run_config(
            "train.max_steps=6",
            "train.checkpoint_every=2",
            "scaling.max_failures=1",
            f"data.train=[{shared_id_shards}]",
            "run.name=faulty",
        )
        result = train(cfg)
    finally:
        ray.shutdown()
        monkeypatch.delenv(FAULT_ENV)  # the shared cluster, started anew, must not inherit the fault
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    assert result.error is None
    out = result.return_value
    assert out["steps"] == 6
    marker = Path(cfg.run.storage).expanduser() / "faulty" / ".fault-injected-faulty"
    assert marker.is_file(), "the fault was not injected"
    # After the restart from step 2, the resumed attempt trained only the remaining steps...
    assert [m["step"] for m in out["history"]] == [3, 4, 5, 6]
    # ...and the epoch saw each of the 48 records exactly once across both attempts.
    from vistralv_ray.training.checkpointing import TrainerState

    # Ids repeat here: keyed by id, the resumed attempt would have left out every record sharing an id
    # with one trained before the fault (and the epoch would have run short).
    state = TrainerState.load(Path(result.checkpoint.path))
    assert state.epoch == 0 and state.epoch_samples == 48 and len(state.seen_keys) == 48
    assert state.plan["world_size"] == 2 and state.plan["total_steps"] == 6

    # Resuming the finished run under another plan is refused before any worker starts, naming the change.
    doubled = run_config(
        "train.max_steps=6", "train.base_lr=4e-3", f"data.train=[{shared_id_shards}]", "run.name=faulty"
    )
    with pytest.raises(ConfigError, match=r"run.name: run faulty resumes from .*base_lr: 0.002 -> 0.004"):
        build_trainer(doubled)


@pytest.mark.parametrize("dropout", [0.3])
def test_resume_restores_rng_states_so_dropout_continues_as_uninterrupted(ray_local, run_config, monkeypatch, dropout):
    """LoRA dropout on, one worker, data in a fixed order: a run killed after its step-2 checkpoint and
    resumed gives the per-step losses of a run that never stopped (each rank's RNG states come back)."""
    from vistralv_ray.training.hooks import FAULT_ENV

    common = [
        "model.lora.enabled=true",
        "model.lora.r=8",
        "model.lora.alpha=16",
        f"model.lora.dropout={dropout}",
        "scaling.workers=1",
        "data.preprocess_actors=1",
        "train.max_steps=5",
        "train.checkpoint_every=2",
        "scaling.max_failures=1",
    ]
    straight = train(run_config(*common, "run.name=rng-straight", stage="finetune"))
    assert straight.error is None
    import ray

    monkeypatch.setenv(FAULT_ENV, "2")
    ray.shutdown()
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        resumed = train(run_config(*common, "run.name=rng-resumed", stage="finetune"))
    finally:
        ray.shutdown()
        monkeypatch.delenv(FAULT_ENV)
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    assert resumed.error is None
    after = {m["step"]: m["loss"] for m in resumed.return_value["history"]}
    before = {m["step"]: m["loss"] for m in straight.return_value["history"]}
    assert sorted(after) == [3, 4, 5]
    assert [after[s] for s in (3, 4, 5)] == pytest.approx([before[s] for s in (3, 4, 5)], rel=1e-5, abs=1e-6)
