"""ZeRO-3 with one rank's micro-batch text-only and the other's with an image: the same collectives on
both ranks, and the step a single process takes on the same global batch.

Every parameter is partitioned (persistence threshold 0), so each module's forward gathers its
weights with a collective and every gradient is reduce-scattered: a rank that ran the vision path
at another point than its peer would issue mismatched collectives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vistralv_ray.training.driver import train

pytestmark = pytest.mark.integration


def text_only(record: dict) -> dict:
    turns = [{**t, "value": t["value"].replace("<image>", "").strip()} for t in record["conversations"]]
    out = {k: v for k, v in record.items() if k != "image"}
    return {**out, "id": f"{record['id']}-text", "conversations": turns}


@pytest.fixture(scope="module")
def mixed_shards(demo_corpus, tmp_path_factory):
    """Two finetune records, one with an image and one without: with 2 workers and per-device batch 1
    every rank gets one record, so one rank's micro-batch is text-only whichever record it draws."""
    from vistralv_ray.data.prepare import PrepareOptions, prepare

    first, second = json.loads(Path(demo_corpus["train"]).read_text())[:2]
    path = tmp_path_factory.mktemp("mixed") / "mixed.json"
    path.write_text(json.dumps([first, text_only(second)], ensure_ascii=False))
    out = path.parent / "shards"
    opts = PrepareOptions(str(demo_corpus["images"]), str(out), shard_size=1, fmt="llava")
    manifest = prepare(path, opts, parallel=False, progress=False)
    assert manifest["records_out"] == 2
    return str(out)


@pytest.fixture(scope="module")
def start_projector(tiny_assets, tmp_path_factory):
    """A projector file both the run and the reference start from, whatever seeds the fresh one."""
    from vistralv_ray.config.schema import ModelConfig
    from vistralv_ray.model.assembly import build_model, save_projector

    cfg = ModelConfig(language_model=str(tiny_assets["llm"]), vision_tower=str(tiny_assets["vision"]))
    path = tmp_path_factory.mktemp("projector") / "projector.safetensors"
    save_projector(build_model(cfg).model, path)
    return str(path)


def single_process_step(cfg, shard_dir: str, probe_batch):
    """One AdamW step on both records in one micro-batch, in one process, no Ray or DeepSpeed:
    the loss, the projector after the step, and the logits before and after on the probe batch."""
    import dataclasses

    import pyarrow.parquet as pq

    from vistralv_ray.data.pipeline import shard_files
    from vistralv_ray.data.preprocess import PackingCollate, Preprocessor
    from vistralv_ray.model.assembly import apply_stage, build_model
    from vistralv_ray.training.optim import build_param_groups
    from vistralv_ray.training.step import forward_logits, summed_token_loss

    rows = pq.read_table(shard_files([shard_dir])).to_pydict()
    pre = Preprocessor(dataclasses.asdict(cfg.model), cfg.data.max_image_pixels)(
        {k: rows[k] for k in ("id", "image", "messages")}
    )
    assembled = build_model(cfg.model)
    model = apply_stage(assembled.model, "finetune", cfg.model.lora)
    batch = PackingCollate(assembled.tokenizer.pad_token_id, "pack", None)(pre)
    assert batch.num_samples == 2 and batch.pixel_values.shape[0] == 1
    groups = build_param_groups(model, cfg.train.base_lr, cfg.train.base_lr, 0.0)
    for g in groups:
        g.pop("param_names")
    opt = torch.optim.AdamW(groups, betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps)
    model.eval()  # dropout is off in the tiny model; eval keeps the comparison exact anyway
    with torch.no_grad():
        before = forward_logits(model, probe_batch, torch.float32)
    loss = summed_token_loss(model, batch, torch.float32) / batch.num_target_tokens
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = forward_logits(model, probe_batch, torch.float32)
    projector = {k: v.detach().clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    return loss.item(), projector, before, after


def test_zero3_run_with_a_text_only_rank_matches_a_single_process_step(
    ray_local, run_config, mixed_shards, start_projector, tmp_path, monkeypatch
):
    from vistralv_ray.training.hooks import PROBE_ENV

    probe_path = tmp_path / "probe.pt"
    monkeypatch.setenv(PROBE_ENV, str(probe_path))
    # eps = 1 makes Adam's first update proportional to the gradient, so a wrong gradient shows.
    cfg = run_config(
        "train.zero_stage=3",
        "train.zero3_persistence_threshold=0",
        "data.per_device_batch=1",
        "train.max_steps=1",
        "train.checkpoint_every=1",
        "train.adam_eps=1.0",
        "train.grad_clip=0.0",
        f"data.train=[{mixed_shards}]",
        f"model.init_projector_from={start_projector}",
        "run.name=zero3-mixed-modality",
        stage="finetune",
    )
    result = train(cfg)
    assert result.error is None
    assert result.return_value["steps"] == 1
    probe = torch.load(probe_path, weights_only=False)
    plain_loss, plain_projector, before, after = single_process_step(cfg, mixed_shards, probe["batch"])

    assert result.return_value["history"][0]["loss"] == pytest.approx(plain_loss, abs=1e-5)
    initial = load_file(start_projector)
    trained = load_file(str(Path(result.checkpoint.path) / "projector.safetensors"))
    for key, value in plain_projector.items():
        # Compare the updates, not the weights: an update is ~1e-5 of weights ~1e-1.
        plain_update = value - initial[key]
        assert plain_update.abs().max() > 1e-6, f"{key} did not move"
        torch.testing.assert_close(trained[key] - initial[key], plain_update, rtol=1e-3, atol=5e-8, msg=key)
    # The language model's update too: the trained engine's logits on rank 0's batch moved as far as
    # the single-process model's did.
    plain_change = after - before
    assert plain_change.abs().max() > 1e-4
    torch.testing.assert_close(probe["logits"] - before, plain_change, rtol=1e-3, atol=1e-5)
