"""`chat` beyond one greedy answer: the system prompt, sampling, the interactive loop and the `chat`,
`eval` and `eval-compare` command handlers, on a tiny export (no Ray).

Streamed greedy answers equal to plain `generate`, the history of a second turn and the image
loading of `chat --image` are pinned in test_serving.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vistralv_ray.config.schema import Config, ModelConfig
from vistralv_ray.inference.chat import ChatSession, run_chat
from vistralv_ray.text.templates import VISTRAL_SYSTEM_PROMPT

SYSTEM = "Bạn là trợ lý chỉ trả lời bằng một từ."


@pytest.fixture(scope="module")
def exported(tiny_assets, tmp_path_factory):
    """(export directory, ModelConfig) of a tiny vistral model whose answers depend on the prompt."""
    from vistralv_ray.inference.export import save_export
    from vistralv_ray.model.assembly import build_model

    mc = ModelConfig(language_model=str(tiny_assets["llm"]), vision_tower=str(tiny_assets["vision"]), max_length=512)
    assembled = build_model(mc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the 0.02 init answers every prompt alike
        for name, p in assembled.model.named_parameters():
            if "vision_tower" not in name and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp("export")
    save_export(assembled.model, assembled.tokenizer, assembled.chat_template, Config(model=mc), out)
    return out, mc


@pytest.fixture(scope="module")
def loaded(exported):
    from vistralv_ray.inference.models import load_model

    return load_model(exported[0], "cpu")


def recording(loaded, monkeypatch) -> list[torch.Tensor]:
    """The input ids of every `generate` call from now on."""
    prompts, generate = [], loaded.model.generate
    monkeypatch.setattr(loaded.model, "generate", lambda **kw: prompts.append(kw["input_ids"]) or generate(**kw))
    return prompts


IMAGE = Image.new("RGB", (48, 32), (30, 200, 30))


def test_system_prompt_replaces_the_trained_default_as_training_renders_it(exported, loaded, monkeypatch):
    from vistralv_ray.text.encoder import build_encoder

    _, mc = exported
    prompts = recording(loaded, monkeypatch)
    list(ChatSession(loaded, image=IMAGE).ask("Màu gì?", max_new_tokens=2))
    list(ChatSession(loaded, image=IMAGE, system=SYSTEM).ask("Màu gì?", max_new_tokens=2))
    default, own = (loaded.tokenizer.decode(p[0]) for p in prompts)
    assert VISTRAL_SYSTEM_PROMPT in default and SYSTEM not in default
    assert SYSTEM in own and VISTRAL_SYSTEM_PROMPT not in own
    # The prompt a model trained with this system prompt saw, up to where its answer starts.
    encoder = build_encoder(dataclasses.replace(mc, system_prompt=SYSTEM))
    messages = [{"role": "user", "content": "<image>\nMàu gì?"}, {"role": "assistant", "content": "Xanh."}]
    text, spans = encoder.render(messages)
    assert own == text[: spans[0][0]].replace("<image>", "<image>" * (prompts[1][0] == encoder.image_token_id).sum())


def test_sampling_is_reproducible_with_a_seed_and_differs_from_greedy(loaded):
    def answer(temperature: float, seed: int) -> str:
        torch.manual_seed(seed)  # generate samples from the global generator, in its own thread
        return "".join(ChatSession(loaded, image=IMAGE).ask("Màu gì?", max_new_tokens=12, temperature=temperature))

    greedy = answer(0.0, 0)
    assert answer(0.0, 1) == greedy  # greedy does not depend on the seed
    sampled = answer(1.5, 0)
    assert answer(1.5, 0) == sampled and sampled != greedy
    assert any(answer(1.5, seed) != sampled for seed in (1, 2, 3))


def test_interactive_loop_asks_each_line_with_the_history_until_an_empty_line(loaded, monkeypatch):
    prompts = recording(loaded, monkeypatch)
    session = ChatSession(loaded, image=IMAGE)
    lines = iter(["Màu gì?", "  Có mấy hình?  ", "", "never asked"])
    asked, written = [], []

    def read(prompt: str) -> str:
        asked.append(prompt)
        return next(lines)

    run_chat(session, None, written.append, read=read, max_new_tokens=4)
    assert asked == ["bạn> "] * 3 and next(lines) == "never asked"
    assert [m["content"] for m in session.messages[::2]] == ["<image>\nMàu gì?", "Có mấy hình?"]
    answers = "".join(written).split("trợ lý> ")
    assert answers[0] == "" and [a.strip() for a in answers[1:]] == [m["content"] for m in session.messages[1::2]]
    assert len(prompts) == 2 and prompts[1].shape[1] > prompts[0].shape[1]  # the second turn carries the first
    for end in (["exit"], ["thoát"], []):  # `exit`, `thoát`, or Ctrl-D (EOF) end it without asking
        source = iter(end)

        def read_end(prompt: str, source=source) -> str:
            try:
                return next(source)
            except StopIteration:
                raise EOFError from None

        before = len(prompts)
        run_chat(ChatSession(loaded), None, written.append, read=read_end)
        assert len(prompts) == before


def chat_args(model, **kw) -> argparse.Namespace:
    from vistralv_ray.cli.main import build_parser

    args = build_parser().parse_args(["chat", str(model), "--device", "cpu", "--max-new-tokens", "4"])
    return argparse.Namespace(**{**vars(args), **kw})


def test_chat_command_without_prompt_reads_stdin_until_eof(exported, loaded, monkeypatch, capsys):
    from vistralv_ray.cli import infer

    monkeypatch.setattr(sys, "stdin", io.StringIO("Màu gì?\nCó mấy hình?\n"))
    assert infer.chat(chat_args(exported[0], system=SYSTEM)) == 0
    out = capsys.readouterr().out
    # The same two turns by the library, with the same system prompt: the command's answers.
    session = ChatSession(loaded, system=SYSTEM)
    expected = ["".join(session.ask(q, max_new_tokens=4)).strip() for q in ("Màu gì?", "Có mấy hình?")]
    assert out.count("bạn> ") == 3 and out.count("trợ lý> ") == 2
    assert [a.split("\n")[0].strip() for a in out.split("trợ lý> ")[1:]] == expected


def test_chat_command_passes_sampling_options(exported, monkeypatch, capsys):
    from vistralv_ray.cli import infer
    from vistralv_ray.inference import chat as chat_module

    seen = []
    monkeypatch.setattr(chat_module, "run_chat", lambda session, prompt, write, **gen: seen.append((session, gen)))
    args = chat_args(exported[0], prompt="Màu gì?", temperature=0.7, top_p=0.5, system=SYSTEM)
    assert infer.chat(args) == 0
    ((session, gen),) = seen
    assert gen == {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.5}
    assert session.messages == [{"role": "system", "content": SYSTEM}] and session.image is None
    with pytest.raises(FileNotFoundError, match="--image"):
        infer.chat(chat_args(exported[0], image=Path("missing.jpg")))


def test_eval_commands_pass_their_options(exported, monkeypatch, tmp_path, capsys):
    from vistralv_ray.cli import infer
    from vistralv_ray.cli.main import build_parser
    from vistralv_ray.evaluation import compare, runner
    from vistralv_ray.inference import evaluate

    calls = {}
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: calls.setdefault("llava", (a, kw)) and {"accuracy": 1})
    monkeypatch.setattr(
        runner,
        "run_benchmark",
        lambda *a, **kw: (
            calls.setdefault("bench", (a, kw))
            and {"accuracy": 0.5, "ci95": {"accuracy": [0.4, 0.6]}, "questions": 8, "rejected": {}}
        ),
    )
    monkeypatch.setattr(compare, "compare", lambda *a: calls.setdefault("compare", a) and (None, "| table |"))
    parse = build_parser().parse_args
    out = str(tmp_path / "eval")
    common = ["--data", "d.json", "--out", out, "--batch-size", "3", "--max-new-tokens", "7", "--limit", "5"]
    assert infer.evaluate(parse(["eval", str(exported[0]), *common, "--images", "imgs", "--actors", "2"])) == 0
    args, kw = calls["llava"]
    assert args == (exported[0].resolve(), "d.json", Path(out))
    assert kw == {
        "image_root": "imgs",
        "actors": 2,
        "cpus_per_actor": None,
        "batch_size": 3,
        "max_new_tokens": 7,
        "limit": 5,
        "progress": None,  # the bar: where stderr is a terminal
    }
    assert json.loads(capsys.readouterr().out.split("predictions:")[0]) == {"accuracy": 1}

    bench = ["eval", str(exported[0]), *common, "--benchmark", "vivqa", "--blank-images", "--no-progress"]
    assert infer.evaluate(parse(bench)) == 0
    args, kw = calls["bench"]
    assert args[1:] == ("vivqa", "d.json", Path(out)) and kw["blank_images"] is True and kw["limit"] == 5
    assert kw["progress"] is False
    assert "0.5000   95% CI [0.4000, 0.6000]" in capsys.readouterr().out

    assert infer.eval_compare(parse(["eval-compare", "a", "b", "--out", out, "--resamples", "9"])) == 0
    assert calls["compare"] == (Path("a"), Path("b"), Path(out), 9) and "| table |" in capsys.readouterr().out
