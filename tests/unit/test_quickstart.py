"""The quickstart's two runs and the command line around them, without running them."""

from __future__ import annotations

from vistralv_ray.cli.main import build_parser
from vistralv_ray.cli.quickstart import DEMO_SYSTEM_PROMPT, demo_configs
from vistralv_ray.training.scaling import lr_plan


def test_quickstart_runs_chain_align_into_finetune(tmp_path):
    args = build_parser().parse_args(["quickstart", "--workdir", str(tmp_path), "--workers", "2"])
    align, finetune = demo_configs(tmp_path, args)
    assert (align.train.stage, align.model.template, align.model.aspect) == ("align", "plain", "resize")
    assert (finetune.train.stage, finetune.model.template, finetune.model.aspect) == ("finetune", "vistral", "pad")
    # Finetune starts from the align run's projector, named as a run under the same storage.
    assert finetune.model.init_projector_from == align.run_name
    assert finetune.run.storage == align.run.storage == str(tmp_path / "runs")
    assert finetune.data.eval and finetune.model.system_prompt == DEMO_SYSTEM_PROMPT
    # The LR rule is live: 2 workers x 16 = 32 = the demo's reference batch, so LR = base LR.
    assert lr_plan(finetune).effective_lr == finetune.train.base_lr
    args = build_parser().parse_args(["quickstart", "--workdir", str(tmp_path), "--workers", "1"])
    assert lr_plan(demo_configs(tmp_path, args)[1]).effective_lr == finetune.train.base_lr / 2


def test_help_lists_every_command():
    text = build_parser().format_help()
    for command in ("make-tiny", "demo-data", "prepare", "train", "plan", "export", "chat", "eval", "quickstart"):
        assert command in text, command


def test_a_diverged_stage_stops_the_quickstart_before_export(tmp_path, monkeypatch):
    import types

    import pytest

    from vistralv_ray.cli import quickstart
    from vistralv_ray.training import driver

    args = build_parser().parse_args(["quickstart", "--workdir", str(tmp_path)])
    align, _ = demo_configs(tmp_path, args)

    def fake_train(cfg, final):
        value = {"final": final, "history": []}
        return types.SimpleNamespace(error=None, return_value=value, path=str(tmp_path / cfg.run_name))

    monkeypatch.setattr(
        driver, "train", lambda cfg: fake_train(cfg, {"step": 7, "loss": float("nan"), "diverged": True})
    )
    with pytest.raises(RuntimeError, match=r"run quickstart-align diverged at step 7 \(loss nan\)"):
        quickstart.train_stage(align)
    monkeypatch.setattr(driver, "train", lambda cfg: fake_train(cfg, {"step": 7, "loss": 0.5, "diverged": False}))
    assert quickstart.train_stage(align)["final"]["loss"] == 0.5
