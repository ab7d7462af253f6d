"""The quickstart's two runs and the command line around them, without running them."""

from __future__ import annotations

from pathlib import Path

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


def fake_steps(monkeypatch) -> dict[str, list]:
    """Demo data, tiny model, prepare, training, export and eval replaced by stand-ins that write
    what a rerun looks for and record their calls."""
    import types

    from vistralv_ray.data import demo, prepare
    from vistralv_ray.inference import evaluate, export
    from vistralv_ray.model import tiny
    from vistralv_ray.training import driver

    calls: dict[str, list] = {"demo": [], "tiny": [], "prepare": [], "train": [], "export": [], "eval": []}

    def make_demo_corpus(out, **kw):
        calls["demo"].append(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text("[]")

    def make_tiny(out, **kw):
        calls["tiny"].append(out)
        (out / "llm").mkdir(parents=True, exist_ok=True)
        (out / "llm" / "config.json").write_text("{}")

    def run_prepare(source, opts, **kw):
        calls["prepare"].append(Path(opts.out).name)
        Path(opts.out).mkdir(parents=True)
        (Path(opts.out) / prepare.MANIFEST).write_text("{}")
        return {"records_in": 3, "records_out": 3}

    def train(cfg):
        calls["train"].append(cfg)
        path = Path(cfg.run.storage) / cfg.run_name
        return types.SimpleNamespace(error=None, path=str(path), return_value={"final": {"loss": 1.0}})

    monkeypatch.setattr(demo, "make_demo_corpus", make_demo_corpus)
    monkeypatch.setattr(tiny, "make_tiny", make_tiny)
    monkeypatch.setattr(prepare, "prepare", run_prepare)
    monkeypatch.setattr(driver, "train", train)
    monkeypatch.setattr(export, "export", lambda source, out, **kw: calls["export"].append((source, out, kw)))
    metrics = {"loss": 1.0, "perplexity": 2.7, "accuracy": 0.5, "blank_image_accuracy": 0.1}
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: calls["eval"].append(a) or metrics)
    return calls


def test_a_rerun_reuses_data_and_shards_and_redoes_only_what_is_missing(tmp_path, monkeypatch):
    import shutil

    from vistralv_ray.cli.quickstart import prepare_data

    calls = fake_steps(monkeypatch)
    args = build_parser().parse_args(["quickstart", "--workdir", str(tmp_path)])
    first = prepare_data(tmp_path, args)
    assert first == {name: str(tmp_path / "shards" / name) for name in ("align", "train", "eval")}
    assert (len(calls["demo"]), len(calls["tiny"]), calls["prepare"]) == (1, 1, ["align", "train", "eval"])
    assert prepare_data(tmp_path, args) == first
    assert (len(calls["demo"]), len(calls["tiny"]), len(calls["prepare"])) == (1, 1, 3)  # all of it reused
    # What is missing is made again, and only that: shards whose prepare never finished, the tiny model.
    shutil.rmtree(tmp_path / "shards" / "train")
    (tmp_path / "tiny" / "llm" / "config.json").unlink()
    assert prepare_data(tmp_path, args) == first
    assert (len(calls["demo"]), len(calls["tiny"]), calls["prepare"][3:]) == (1, 2, ["train"])
    (tmp_path / "data" / "eval.json").unlink()
    prepare_data(tmp_path, args)
    assert len(calls["demo"]) == 2 and len(calls["prepare"]) == 4


def test_a_rerun_trains_the_same_runs_and_replaces_its_export(tmp_path, monkeypatch, capsys):
    import json

    from vistralv_ray.cli.quickstart import run

    calls = fake_steps(monkeypatch)
    args = build_parser().parse_args(["quickstart", "--workdir", str(tmp_path)])
    assert run(args) == 0 and run(args) == 0
    assert len(calls["demo"]) == len(calls["tiny"]) == 1 and len(calls["prepare"]) == 3
    # The same run names, storage and plans: the rerun resumes the finished runs (training resumes a
    # run from its newest checkpoint), it does not start new ones beside them.
    first_align, first_finetune, again_align, again_finetune = calls["train"]
    assert (again_align, again_finetune) == (first_align, first_finetune)
    assert first_finetune.model.init_projector_from == first_align.run_name
    finetune_run = str(tmp_path / "runs" / first_finetune.run_name)
    assert calls["export"] == [(finetune_run, tmp_path / "export", {"overwrite": True})] * 2
    summary = json.loads((tmp_path / "quickstart.json").read_text())
    assert summary["finetune_run"] == finetune_run and summary["accuracy"] == 0.5


def test_train_exits_non_zero_on_a_diverged_run(tmp_path, monkeypatch, capsys):
    import types

    from vistralv_ray.cli.main import main
    from vistralv_ray.training import driver

    def fake(final):
        value = {"final": final, "history": []}
        return lambda cfg: types.SimpleNamespace(error=None, return_value=value, path=str(tmp_path), checkpoint=None)

    argv = ["train", "jobs/local_tiny.yaml", "--set", f"run.storage={tmp_path}"]
    monkeypatch.setattr(driver, "train", fake({"step": 3, "loss": float("inf"), "diverged": True}))
    assert main(argv) == 1
    assert "run diverged at step 3 (loss inf)" in capsys.readouterr().err
    monkeypatch.setattr(driver, "train", fake({"step": 20, "loss": 0.4, "diverged": False}))
    assert main(argv) == 0
